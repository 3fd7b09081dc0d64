//! The status page at scale: the overview and a tenant's page, each built from PostgreSQL (the
//! page cache is bypassed: every request is a new URL), with 100,000 tenants and 1,000,000 audit
//! events (FROSTBYTE_BENCH_TENANTS, FROSTBYTE_BENCH_EVENTS) in a database of default durability.
//! Each page's p95 over 200 requests is printed beside its floor from the same run: the page's
//! own queries, run directly one after another with no HTML, JSON or HTTP. `cargo bench --bench status`.

mod support;
use frostbyte_gitops::config::{Config, Flags};
use frostbyte_gitops::domain::audit::AuditEvent;
use frostbyte_gitops::{status, store, web};
use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use support::*;

const REQUESTS: usize = 200;

fn p(ds: &mut [Duration], q: f64) -> Duration {
    ds.sort_unstable();
    ds[((ds.len() as f64 * q).ceil() as usize).clamp(1, ds.len()) - 1]
}

fn get(port: u16, path: &str) -> usize {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "{path}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    body.len()
}

/// `tenants` tenants owned by source `default`, `events` config events spread over them (each
/// tenant's first adds its document, the rest change its plan), a week of runs, and 1% drifted.
async fn fill(pool: &deadpool_postgres::Pool, tenants: usize, events: usize) {
    let mut c = store::client(pool).await.unwrap();
    store::migrate(&mut c).await.unwrap();
    let key = keys("other.agekey").recipients()[0].clone();
    c.execute(
        "INSERT INTO tenants (tenant_id, state, config, config_version, age_public_key, endpoints)
         SELECT 't' || lpad(i::text, 7, '0'), 'active',
                jsonb_build_object('schema_version', 1, 'display_name', 'Tenant ' || i, 'plan', 'pro', 'region', 'eu-west-1'),
                greatest(1, $2::int / $3::int), $1, jsonb_build_object('api', 'https://t' || i || '.example.com')
           FROM generate_series(1, $3::int) i",
        &[&key, &(events as i32), &(tenants as i32)],
    )
    .await
    .unwrap();
    c.batch_execute(
        "INSERT INTO gitops_owners (tenant_id, source, source_name, file_path)
           SELECT tenant_id, 'bench#tenants', 'default', 'tenants/' || tenant_id || '.toml' FROM tenants;
         INSERT INTO gitops_runs (source_name, source, started_at, duration_ms, trigger, commit_fetched, commit_applied, outcome,
                                  created, updated, drift, replica)
           SELECT 'default', 'bench#tenants', now() - make_interval(mins => i * 10), 40, 'interval', repeat('a', 40), repeat('a', 40),
                  CASE WHEN i % 7 = 0 THEN 'applied' WHEN i % 29 = 0 THEN 'failed' ELSE 'in_sync' END, 0, i % 7,
                  jsonb_build_object('in-sync', 99000, 'modified', 1000, 'pending', 0, 'missing', 0, 'orphaned', 0), 'bench (pid 1)'
             FROM generate_series(1, 1000) i;
         INSERT INTO gitops_tenant_drift (tenant_id, source_name, classes, detail)
           SELECT tenant_id, 'default', '{modified}', jsonb_build_object('tenant_id', tenant_id, 'classes', jsonb_build_array('modified'),
                  'modified', jsonb_build_array(jsonb_build_object('path', '/config/plan', 'git', 'pro', 'database', 'free')))
             FROM tenants WHERE right(tenant_id, 2) = '00'",
    )
    .await
    .unwrap();
    let per = (events / tenants).max(1);
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..events {
        let (t, v) = (i % tenants + 1, i / tenants + 1);
        let patch = match v {
            1 => {
                json!([{"op": "add", "path": "/config", "value": {"schema_version": 1, "display_name": format!("Tenant {t}"), "plan": "pro", "region": "eu-west-1"}},
                        {"op": "add", "path": "/endpoints", "value": {"api": format!("https://t{t}.example.com")}},
                        {"op": "add", "path": "/age_public_key", "value": key}])
            }
            _ => json!([{"op": "replace", "path": "/config/plan", "value": if v % 2 == 0 { "enterprise" } else { "pro" }}]),
        };
        batch.push(AuditEvent {
            tenant_id: format!("t{t:07}"),
            event_type: "TENANT_CONFIG_UPDATED",
            actor: "bench".into(),
            details: json!({"from_version": v - 1, "to_version": v, "commit": "0123456789abcdef0123456789abcdef01234567",
                            "file": format!("tenants/t{t:07}.toml"), "source": "bench#tenants", "patch": patch}),
        });
        if batch.len() == 10_000 || i + 1 == events {
            let tx = c.transaction().await.unwrap();
            store::emit_audit_events(&tx, &batch).await.unwrap();
            tx.commit().await.unwrap();
            batch.clear();
        }
    }
    c.batch_execute("VACUUM ANALYZE").await.unwrap();
    println!("status: {tenants} tenants, {events} config events ({per} a tenant), 1,000 runs, 1% drifted");
}

fn main() {
    let tenants = tenants_or(100_000);
    let events = env_count("FROSTBYTE_BENCH_EVENTS", 1_000_000).max(tenants);
    let url = database();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let pool = store::pool(&url, store::TlsPolicy::AsGiven, Duration::from_secs(30)).unwrap();
    let (_, filled) = time(|| rt.block_on(fill(&pool, tenants, events)));
    println!("    filled in {:.1} s", filled.as_secs_f64());
    let cfg = Config::resolve(&Flags::default(), &|_| None, None, None).unwrap();
    let sources = cfg.sources.clone();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = web::routes(web::PageState::new(pool.clone(), sources.clone(), None));
    rt.spawn(frostbyte_gitops::agent::http::serve(listener, app, stop_rx));

    let ids: Vec<String> = (0..REQUESTS).map(|i| format!("t{:07}", (i * 7919) % tenants + 1)).collect();
    let pages = |path: &dyn Fn(usize) -> String| -> Vec<Duration> {
        (0..REQUESTS)
            .map(|i| {
                let start = Instant::now();
                get(port, &path(i));
                start.elapsed()
            })
            .collect()
    };
    let mut overview = pages(&|i| format!("/?n={i}"));
    let mut tenant = pages(&|i| format!("/tenants/{}?n={i}", ids[i]));

    let src: Vec<_> = sources.iter().collect();
    let timed = |f: &mut dyn FnMut(usize)| -> Vec<Duration> {
        (0..REQUESTS)
            .map(|i| {
                let start = Instant::now();
                f(i);
                start.elapsed()
            })
            .collect()
    };
    let mut overview_floor = timed(&mut |_| {
        rt.block_on(async {
            let c = store::client(&pool).await.unwrap();
            status::gather(&**c, &src).await.unwrap();
            store::pages::hours(&**c, 168).await.unwrap();
        })
    });
    let mut tenant_floor = timed(&mut |i| {
        let id = &ids[i];
        rt.block_on(async {
            let c = store::client(&pool).await.unwrap();
            store::history::lifecycle(&**c, id).await.unwrap();
            store::load_actual_for(&**c, std::slice::from_ref(id)).await.unwrap();
            store::history::tenant_events(&**c, id).await.unwrap();
            store::pages::tenant_book(&**c, id).await.unwrap();
        })
    });
    let _ = stop_tx.send(true);
    for (label, ds, floor) in [
        ("overview (GET /)", &mut overview, &mut overview_floor),
        ("tenant page (GET /tenants/ID)", &mut tenant, &mut tenant_floor),
    ] {
        let (p50, p95, f95) = (p(ds, 0.5), p(ds, 0.95), p(floor, 0.95));
        against(&format!("{label}, p95 (p50 {:.1} ms)", p50.as_secs_f64() * 1e3), p95, f95);
    }
}
