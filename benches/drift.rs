//! Drift reports over N synced tenants (default 10,000): nothing drifted, then 1% of the rows
//! edited by hand. `cargo bench --bench drift`.

mod support;
use frostbyte_gitops::compose;
use frostbyte_gitops::domain::drift::{DriftClass, counts};
use frostbyte_gitops::sync::Run;
use support::*;

fn main() {
    let n = tenants();
    let drifted = (n / 100).max(1);
    println!("drift: {n} tenants, {drifted} edited by hand in the second step");
    let repo = Repo::generate(n);
    let url = database();
    let ctx = repo.ctx(Some(&url));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let db = rt.block_on(compose::connect(&ctx.cfg)).unwrap();
    rt.block_on(compose::prepare(&ctx.cfg, &db)).unwrap();
    rt.block_on(compose::run(
        &ctx,
        &db,
        &ctx.cfg.sources[0],
        Run::Apply { allow_non_fast_forward: false },
        Default::default(),
    ))
    .unwrap();
    let report_once = || rt.block_on(compose::drift(&ctx, &db, &ctx.cfg.sources[0], false)).unwrap().1;
    let source = frostbyte_gitops::source::Source::open(&ctx.source_spec(&ctx.cfg.sources[0])).unwrap();
    let (_, listing) = time(|| source.snapshot(source.resolve(None).unwrap()).unwrap());

    for round in 1..=3 {
        let (r, d) = time(report_once);
        assert_eq!(counts(&r)[&DriftClass::InSync], n);
        against(&format!("drift report, nothing drifted (round {round})"), d, listing);
    }
    println!("    floor = listing the tenant tree at the commit");
    rt.block_on(async {
        let c = db.pool.get().await.unwrap();
        let ids: Vec<String> = (0..drifted).map(|k| id(k * 89 % n)).collect();
        c.execute(
            "UPDATE tenants SET config = jsonb_set(config, '{limits,max_users}', '1') WHERE tenant_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    });
    for round in 1..=3 {
        let (r, d) = time(report_once);
        assert_eq!(counts(&r)[&DriftClass::Modified], drifted);
        against(&format!("drift report, 1% modified (round {round})"), d, listing);
    }
    // As the binary runs it, with its peak RSS: every file decoded, every row read.
    let full = (0..2)
        .map(|_| cli(repo.dir.path(), Some(&url), &["drift", "--full"]))
        .inspect(|m| assert!(m.stdout.contains(&format!(" {drifted} modified")), "{}", m.stdout))
        .reduce(|best, m| Measured {
            wall: best.wall.min(m.wall),
            peak_rss_mib: best.peak_rss_mib.max(m.peak_rss_mib),
            stdout: m.stdout,
        })
        .expect("two runs");
    let m = cli(repo.dir.path(), None, &["validate"]);
    against("`drift --full` process, 1% modified", full.wall, m.wall);
    println!("    floor = the `validate` process (--full reads and decodes every file); best of 2");
    println!("    peak RSS: validate {:.0} MiB, drift --full {:.0} MiB", m.peak_rss_mib, full.peak_rss_mib);
}
