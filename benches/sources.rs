//! Many sources: N tenants (FROSTBYTE_BENCH_TENANTS, default 100,000) spread over S sources
//! (FROSTBYTE_BENCH_SOURCES, default 10) in nested directories of one repository, synced source
//! by source as `sync` does. Each figure beside its floor from the same run: decoding every file
//! plus a COPY of the rows the sync wrote (cold), listing every source's tree (no-op), and that
//! listing plus decoding the changed files (1% changed).

mod support;
use frostbyte_gitops::compose;
use frostbyte_gitops::source::Source;
use frostbyte_gitops::sync::{self, Run};
use std::time::Duration;
use support::*;

fn main() {
    let n: usize = tenants_or(100_000);
    let s = env_count("FROSTBYTE_BENCH_SOURCES", 10);
    let (repo, made) = time(|| Repo::generate_sharded(n, s));
    println!(
        "sources: {n} tenants in {s} sources, nested two levels (generated in {:.1} s)",
        made.as_secs_f64()
    );
    let url = database();
    let ctx = repo.ctx(Some(&url));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let db = rt.block_on(compose::connect(&ctx.cfg)).unwrap();
    rt.block_on(compose::prepare(&ctx.cfg, &db)).unwrap();

    let sync_all = || {
        let mut applied = 0;
        for src in &ctx.cfg.sources {
            let o = rt
                .block_on(compose::run(&ctx, &db, src, Run::Apply { allow_non_fast_forward: false }, Default::default()))
                .unwrap();
            applied += o.applied;
        }
        applied
    };
    let decode_all = || {
        for src in &ctx.cfg.sources {
            let source = Source::open(&ctx.source_spec(src)).unwrap();
            let d = sync::read_desired(&source, src, &ctx, false, true).unwrap();
            assert!(d.issues.is_empty());
        }
    };
    let list_all = || {
        for src in &ctx.cfg.sources {
            let source = Source::open(&ctx.source_spec(src)).unwrap();
            source.snapshot(source.resolve(None).unwrap()).unwrap();
        }
    };

    let ((), decode) = time(decode_all);
    let (applied, cold) = time(sync_all);
    assert_eq!(applied, n);
    let copy = copy_floor(&url, &["tenants", "audit_events", "gitops_applied", "gitops_owners"]);
    against("cold sync (every tenant created)", cold, decode + copy);
    println!(
        "    floor = decode every file {:.1} ms + COPY of the rows written {:.1} ms",
        decode.as_secs_f64() * 1e3,
        copy.as_secs_f64() * 1e3
    );

    let ((), list) = time(list_all);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let (applied, d) = time(sync_all);
        assert_eq!(applied, 0);
        best = best.min(d);
    }
    against("no-op sync (best of 3)", best, list);
    println!("    floor = listing every source's tree");

    let changed: Vec<usize> = (0..n / 100).map(|k| (k * 97 + 1) % n).collect();
    repo.write(changed.clone(), 1);
    repo.commit("1% changed");
    let (applied, one) = time(sync_all);
    assert_eq!(applied, changed.len());
    let ((), list) = time(list_all);
    let per_file = decode.as_secs_f64() / n as f64;
    let floor = list + Duration::from_secs_f64(per_file * changed.len() as f64);
    against("sync after 1% changed", one, floor);
    println!("    floor = listing + decoding the {} changed files at the cold run's rate", changed.len());
    println!("peak RSS {:.0} MiB", peak_rss_mib());
}
