//! The tamper-evident audit trail: writing N events through `emit_audit_event` (default 100,000,
//! FROSTBYTE_BENCH_EVENTS), by one writer and by two at once (they serialise on the chain head),
//! and `audit verify` over all of them. Each figure is printed beside its floor, measured in the
//! same run: a plain INSERT of the same rows into an unchained table, and a plain read of the
//! rows verify reads. `cargo bench --bench audit`.

mod support;
use frostbyte_gitops::domain::audit::AuditEvent;
use frostbyte_gitops::store;
use serde_json::json;
use std::time::{Duration, Instant};
use support::*;

const BATCH: usize = 1_000;

fn events(n: usize, writer: usize) -> Vec<AuditEvent> {
    (0..n)
        .map(|i| AuditEvent {
            tenant_id: id(i % 10_000),
            event_type: "TENANT_CONFIG_UPDATED",
            actor: format!("bench-writer-{writer}"),
            details: json!({"from_version": i, "to_version": i + 1, "commit": "0123456789abcdef0123456789abcdef01234567",
                            "file": format!("tenants/{}.toml", id(i % 10_000)), "patch": [{"op": "replace", "path": "/config/plan", "value": "pro"}]}),
        })
        .collect()
}

fn line(label: &str, d: Duration, floor: Duration, n: usize) {
    println!(
        "{label:<44} {:>9.1} ms  {:>9.0} events/s   floor {:>8.1} ms   ratio {:>5.2}x",
        d.as_secs_f64() * 1e3,
        n as f64 / d.as_secs_f64(),
        floor.as_secs_f64() * 1e3,
        d.as_secs_f64() / floor.as_secs_f64()
    );
}

fn main() {
    let n = env_count("FROSTBYTE_BENCH_EVENTS", 100_000);
    let url = database();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let pool = store::pool(&url, store::TlsPolicy::AsGiven, std::time::Duration::from_secs(30)).unwrap();
    rt.block_on(async {
        let mut c = store::client(&pool).await.unwrap();
        store::migrate(&mut c).await.unwrap();
        c.batch_execute("CREATE TABLE floor_events (LIKE audit_events INCLUDING DEFAULTS INCLUDING IDENTITY)")
            .await
            .unwrap();
    });
    println!("audit: {n} events in transactions of {BATCH}");

    // Floor: the same rows, inserted set-based with no chain, no function, no lock.
    let all = events(n, 0);
    let floor_write = rt.block_on(async {
        let mut c = store::client(&pool).await.unwrap();
        let start = Instant::now();
        for chunk in all.chunks(BATCH) {
            let tx = c.transaction().await.unwrap();
            let tenants: Vec<&str> = chunk.iter().map(|e| e.tenant_id.as_str()).collect();
            let actors: Vec<&str> = chunk.iter().map(|e| e.actor.as_str()).collect();
            let details: Vec<&serde_json::Value> = chunk.iter().map(|e| &e.details).collect();
            tx.execute(
                "INSERT INTO floor_events (event_id, tenant_id, event_type, actor, details, prev_hash, chain_hash)
                 SELECT gen_random_uuid(), t, 'TENANT_CONFIG_UPDATED', a, d, '\\x00', '\\x00' FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS u(t, a, d)",
                &[&tenants, &actors, &details],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        start.elapsed()
    });

    let emit = rt.block_on(async {
        let mut c = store::client(&pool).await.unwrap();
        let start = Instant::now();
        for chunk in all.chunks(BATCH) {
            let tx = c.transaction().await.unwrap();
            store::emit_audit_events(&tx, chunk).await.unwrap();
            tx.commit().await.unwrap();
        }
        start.elapsed()
    });
    line("emit_audit_event, one writer", emit, floor_write, n);

    // Two writers at once: they take turns at the chain head.
    let half = n / 2;
    let two = rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (1..=2)
            .map(|w| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut c = store::client(&pool).await.unwrap();
                    for chunk in events(half, w).chunks(BATCH) {
                        let tx = c.transaction().await.unwrap();
                        store::emit_audit_events(&tx, chunk).await.unwrap();
                        tx.commit().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    });
    line(
        "emit_audit_event, two writers at once",
        two,
        floor_write * (2 * half) as u32 / n as u32,
        2 * half,
    );

    let total = n + 2 * half;
    // Floor: reading the very columns verify reads, in the same order, and dropping them.
    let floor_read = rt.block_on(async {
        let c = store::client(&pool).await.unwrap();
        let start = Instant::now();
        let rows = c
            .query(
                "SELECT event_seq, event_id::text, tenant_id, event_type, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        actor, details::text, coalesce(previous_event_id::text, ''), prev_hash, chain_hash FROM audit_events ORDER BY event_seq",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), total);
        start.elapsed()
    });
    let (report, verify) = time(|| rt.block_on(async { store::verify_audit(&**store::client(&pool).await?, None).await }).unwrap());
    assert!(report.intact(), "{:?}", report.broken);
    assert_eq!(report.events as usize, total);
    line("audit verify (chain + config_version check)", verify, floor_read, total);
}
