//! Syncing N generated tenants (default 10,000) into PostgreSQL: a first sync, a sync with nothing
//! to do, and a sync where 1% of the files changed. `cargo bench --bench sync`.

mod support;
use frostbyte_gitops::sync::{self, Run};
use support::*;

fn main() {
    let n = tenants();
    let changed = (n / 100).max(1);
    println!("sync: {n} tenants, {changed} changed in the last step");
    let (repo, setup) = time(|| Repo::generate(n));
    println!("{:<48} {:>9.1} ms", "setup: generate, encrypt and commit", setup.as_secs_f64() * 1e3);
    let url = database();
    let ctx = repo.ctx(Some(&url));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let db = rt.block_on(sync::connect(&ctx.cfg)).unwrap();
    rt.block_on(sync::prepare(&ctx.cfg, &db)).unwrap();
    let apply = || {
        rt.block_on(sync::run(
            &ctx,
            &db.pool,
            &ctx.cfg.sources[0],
            Run::Apply { allow_non_fast_forward: false },
            Default::default(),
        ))
        .unwrap()
    };

    let (o, first) = time(apply);
    assert_eq!(o.applied, n);
    report("first sync (every tenant created)", first, n);
    let mut noop_best = std::time::Duration::MAX;
    for round in 1..=3 {
        let (o, noop) = time(apply);
        assert_eq!(o.applied, 0);
        noop_best = noop_best.min(noop);
        report(&format!("sync with nothing to do (round {round})"), noop, n);
    }
    for round in 1..=3 {
        repo.write((0..changed).map(|k| (k * 97 + round) % n).collect(), round as u32);
        repo.commit(&format!("change 1% (round {round})"));
        let (o, one) = time(apply);
        assert_eq!(o.applied, changed);
        report(&format!("sync with 1% of files changed (round {round})"), one, n);
    }
    let full = sync::RunOptions {
        full: true,
        ..Default::default()
    };
    let (o, d) = time(|| {
        rt.block_on(sync::run(
            &ctx,
            &db.pool,
            &ctx.cfg.sources[0],
            Run::Apply { allow_non_fast_forward: false },
            full,
        ))
        .unwrap()
    });
    assert_eq!(o.applied, 0);
    println!(
        "{:<48} {:>9.1} ms   ({:.1}x the incremental no-op sync above)",
        "full sync, nothing to do (--full)",
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() / noop_best.as_secs_f64()
    );
}
