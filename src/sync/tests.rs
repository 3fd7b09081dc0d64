//! The rules of a run, on the in-memory source and store: what it refuses, what it applies, and
//! what it sees under the lock. The same rules through git and PostgreSQL are in `tests/`.

use super::fake::{FakeSource, FakeStore, Tables, tenant_file};
use super::*;
use crate::config::{Config, Flags};
use crate::domain::plan::Entries;
use serde_json::json;

const DEV: &str = "mode = \"dev\"\nallow_plaintext = true\nrequire_tenant_recipient = false\n";

fn ctx(settings: &str) -> Ctx {
    let text = format!("{DEV}{settings}");
    let cfg = Config::resolve(&Flags::default(), &|_| None, Some(("frostbyte.toml", &text)), None).expect("settings");
    Ctx {
        cfg,
        keys: crate::sops::AgeKeys::default(),
        signers: crate::verify::TrustedSigners::default(),
        progress: false,
        notifier: std::sync::Arc::new(crate::notify::Notifier::new(&[]).expect("no receivers")),
    }
}

fn source_with(id: &str, tenants: &[&str]) -> FakeSource {
    let mut source = FakeSource::new(id);
    source.commit(|files| tenants.iter().for_each(|t| tenant_file(files, t, "pro")));
    source
}

const APPLY: Run = Run::Apply { allow_non_fast_forward: false };

async fn apply(ctx: &Ctx, source: &FakeSource, store: &mut FakeStore) -> Result<Outcome, SyncError> {
    run_with(ctx, 0, source, store, APPLY, RunOptions::default()).await
}

async fn run_with(ctx: &Ctx, src: usize, source: &FakeSource, store: &mut FakeStore, how: Run, opts: RunOptions) -> Result<Outcome, SyncError> {
    run(ctx, source, store, &ctx.cfg.sources[src], how, opts).await
}

/// Each entry's tenant and action, in tenant order.
fn actions(o: &Outcome) -> Vec<(String, Action)> {
    let mut out = vec![];
    o.entries()
        .try_for_each_window(&mut |w| {
            out.extend(w.iter().map(|t| (t.tenant_id.clone(), t.action)));
            Ok(())
        })
        .expect("entries");
    out
}

fn versions(t: &Tables) -> Vec<(&str, i64)> {
    t.tenants.iter().map(|(id, r)| (id.as_str(), r.config_version)).collect()
}

fn events_of<'t>(t: &'t Tables, tenant: &str) -> Vec<&'t str> {
    t.events.iter().filter(|(id, _)| id == tenant).map(|(_, e)| e.as_str()).collect()
}

#[tokio::test]
async fn a_change_is_applied_once_with_its_version_and_events() {
    let ctx = ctx("");
    let mut source = source_with("repo#tenants", &["acme", "globex"]);
    let mut store = FakeStore::default();
    let first = apply(&ctx, &source, &mut store).await.expect("first sync");
    assert_eq!(first.applied, 2);
    assert_eq!(actions(&first), [("acme".into(), Action::Create), ("globex".into(), Action::Create)]);
    assert_eq!(events_of(&store.committed, "acme"), ["TENANT_CREATED", "TENANT_CONFIG_UPDATED"]);

    source.commit(|files| tenant_file(files, "acme", "enterprise"));
    let second = apply(&ctx, &source, &mut store).await.expect("second sync");
    assert_eq!(second.applied, 1);
    assert_eq!(versions(&store.committed), [("acme", 2), ("globex", 1)]);
    assert_eq!(store.committed.tenants["acme"].document["config"]["plan"], "enterprise");
    assert_eq!(events_of(&store.committed, "acme").len(), 3);

    let again = apply(&ctx, &source, &mut store).await.expect("a sync of the applied commit");
    assert_eq!(again.applied, 0);
    assert_eq!(versions(&store.committed), [("acme", 2), ("globex", 1)]);
    assert_eq!(store.committed.events.len(), 5, "nothing written twice");
}

#[tokio::test]
async fn a_rewritten_history_is_refused_unless_allowed() {
    let ctx = ctx("");
    let mut source = source_with("repo#tenants", &["acme"]);
    let mut store = FakeStore::default();
    let applied = apply(&ctx, &source, &mut store).await.expect("first sync");
    let old = store.committed.last_applied["repo#tenants"].clone();
    assert_eq!(applied.commit_time.as_deref(), Some("2026-12-08T00:00:00+00:00"));
    let new = source.rewrite(|files| tenant_file(files, "acme", "enterprise"));

    let refused = apply(&ctx, &source, &mut store).await.err().expect("refused");
    match refused {
        SyncError::NonFastForward { new: n, old: o } => assert_eq!((n, o), (new.to_string(), old.to_string())),
        other => panic!("{other}"),
    }
    assert_eq!(versions(&store.committed), [("acme", 1)], "nothing applied");
    assert_eq!(store.committed.last_applied["repo#tenants"], old);

    let allowed = Run::Apply { allow_non_fast_forward: true };
    run_with(&ctx, 0, &source, &mut store, allowed, RunOptions::default()).await.expect("allowed");
    assert_eq!(versions(&store.committed), [("acme", 2)]);
    assert_eq!(store.committed.last_applied["repo#tenants"], new);
}

const TWO_SOURCES: &str = "[[sources]]\nname = \"a\"\nrepo = \"a\"\npath = \"tenants\"\n[[sources]]\nname = \"b\"\nrepo = \"b\"\npath = \"tenants\"\n";

#[tokio::test]
async fn a_tenant_another_source_owns_is_refused_and_the_run_applies_nothing() {
    let ctx = ctx(TWO_SOURCES);
    let a = source_with("a#tenants", &["acme"]);
    let b = source_with("b#tenants", &["acme", "initech"]);
    let mut store = FakeStore::default();
    run_with(&ctx, 0, &a, &mut store, APPLY, RunOptions::default()).await.expect("a applies");

    let refused = run_with(&ctx, 1, &b, &mut store, APPLY, RunOptions::default()).await.err().expect("refused");
    let SyncError::Invalid { issues, .. } = refused else { panic!("{refused}") };
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].file, "tenants/acme.json");
    assert!(issues[0].message.contains("belongs to source a (a#tenants)"), "{}", issues[0].message);
    assert!(!store.committed.tenants.contains_key("initech"), "a run that fails applies nothing");
    assert_eq!(store.committed.owners["acme"].source, "a#tenants");
    assert!(!store.committed.last_applied.contains_key("b#tenants"));
}

#[tokio::test]
async fn a_mass_prune_is_refused_unless_allowed() {
    let ctx = ctx("prune = true\n");
    let mut source = source_with("repo#tenants", &["acme", "globex", "initech", "umbrella"]);
    let mut store = FakeStore::default();
    apply(&ctx, &source, &mut store).await.expect("first sync");
    source.commit(|files| {
        files.remove("tenants/acme.json");
        files.remove("tenants/globex.json");
    });

    let refused = apply(&ctx, &source, &mut store).await.err().expect("refused");
    let SyncError::MassPrune { name, why } = refused else { panic!("{refused}") };
    assert_eq!(name, "default");
    assert!(why.contains("2 of its 4"), "{why}");
    assert!(store.committed.tenants.values().all(|r| r.state == "provisioning"), "nothing decommissioned");

    let opts = RunOptions {
        allow_mass_prune: true,
        ..Default::default()
    };
    let o = run_with(&ctx, 0, &source, &mut store, APPLY, opts).await.expect("allowed");
    assert_eq!(o.applied, 2);
    let states: Vec<(&str, &str)> = store.committed.tenants.iter().map(|(id, r)| (id.as_str(), r.state.as_str())).collect();
    assert_eq!(
        states,
        [
            ("acme", "decommissioning"),
            ("globex", "decommissioning"),
            ("initech", "provisioning"),
            ("umbrella", "provisioning")
        ]
    );
}

#[tokio::test]
async fn under_the_warn_policy_git_and_a_hand_edit_on_one_tenant_conflict_and_neither_wins() {
    let ctx = ctx("drift_policy = \"warn\"\n");
    let mut source = source_with("repo#tenants", &["acme", "globex"]);
    let mut store = FakeStore::default();
    apply(&ctx, &source, &mut store).await.expect("first sync");
    store.committed.edit_by_hand("acme", "/config/region", json!("us-east-1"));
    source.commit(|files| {
        tenant_file(files, "acme", "enterprise");
        tenant_file(files, "globex", "enterprise");
    });

    let o = apply(&ctx, &source, &mut store).await.expect("sync");
    assert_eq!(actions(&o), [("acme".into(), Action::Conflict), ("globex".into(), Action::Update)]);
    assert_eq!(o.applied, 1);
    let acme = &store.committed.tenants["acme"];
    assert_eq!(
        (acme.config_version, &acme.document["config"]["region"]),
        (1, &json!("us-east-1")),
        "the hand edit is kept"
    );
    assert_eq!(acme.document["config"]["plan"], "pro", "git's change waits");
    assert_eq!(store.committed.tenants["globex"].config_version, 2);
}

#[tokio::test]
async fn a_row_edited_while_the_run_decoded_is_seen_under_the_lock_and_corrected() {
    let ctx = ctx("");
    let mut source = source_with("repo#tenants", &["acme", "globex"]);
    let mut store = FakeStore::default();
    apply(&ctx, &source, &mut store).await.expect("first sync");
    source.commit(|files| tenant_file(files, "acme", "enterprise"));
    // Git changed acme only, so only acme is decoded before the lock; by the time the run holds
    // it, someone has edited globex.
    store
        .before_lock
        .push(Box::new(|t: &mut Tables| t.edit_by_hand("globex", "/config/region", json!("us-east-1"))));
    let begun = store.transactions;

    let o = apply(&ctx, &source, &mut store).await.expect("sync");
    assert_eq!(store.transactions - begun, 2, "a second round, once globex's file was decoded");
    assert_eq!(actions(&o), [("acme".into(), Action::Update), ("globex".into(), Action::Update)]);
    let globex = &store.committed.tenants["globex"];
    assert_eq!((globex.config_version, &globex.document["config"]["region"]), (2, &json!("eu-west-1")));
    assert!(!globex.touched);
    assert_eq!(store.committed.tenants["acme"].config_version, 2);
}

#[tokio::test]
async fn a_run_that_another_run_beat_to_the_lock_writes_nothing_twice() {
    let ctx = ctx("");
    let mut source = source_with("repo#tenants", &["acme"]);
    let mut store = FakeStore::default();
    apply(&ctx, &source, &mut store).await.expect("first sync");
    source.commit(|files| tenant_file(files, "acme", "enterprise"));
    // The other run applies the same commit and commits before this one gets the lock.
    let mut other = FakeStore {
        committed: store.committed.clone(),
        ..Default::default()
    };
    apply(&ctx, &source, &mut other).await.expect("the other run");
    let theirs = other.committed.clone();
    store.before_lock.push(Box::new(move |t: &mut Tables| *t = theirs));

    let o = apply(&ctx, &source, &mut store).await.expect("sync");
    assert_eq!(o.applied, 0);
    assert_eq!(actions(&o), [("acme".into(), Action::Unchanged)]);
    assert_eq!(versions(&store.committed), [("acme", 2)]);
    assert_eq!(events_of(&store.committed, "acme").len(), 3, "one update event, the other run's");
}

#[tokio::test]
async fn a_source_that_fails_applies_nothing_and_leaves_the_others_applying() {
    let ctx = ctx(TWO_SOURCES);
    let mut a = source_with("a#tenants", &["acme"]);
    let mut b = source_with("b#tenants", &["initech"]);
    let mut store = FakeStore::default();
    run_with(&ctx, 0, &a, &mut store, APPLY, RunOptions::default()).await.expect("a");
    run_with(&ctx, 1, &b, &mut store, APPLY, RunOptions::default()).await.expect("b");

    // b's repository goes away as a new commit of a arrives, and b's new tenant with it.
    b.commit(|files| tenant_file(files, "umbrella", "pro"));
    b.broken = Some("connection reset by peer".into());
    a.commit(|files| tenant_file(files, "acme", "enterprise"));
    let failed = run_with(&ctx, 1, &b, &mut store, APPLY, RunOptions::default()).await.err().expect("b fails");
    assert!(matches!(failed, SyncError::Source(_)), "{failed}");
    assert_eq!(failed.retry(), Retry::Backoff, "an unreachable repository is retried");
    run_with(&ctx, 0, &a, &mut store, APPLY, RunOptions::default()).await.expect("a goes on");

    assert_eq!(versions(&store.committed), [("acme", 2), ("initech", 1)]);
    assert_eq!(store.committed.owners["initech"].source, "b#tenants");
    b.broken = None;
    run_with(&ctx, 1, &b, &mut store, APPLY, RunOptions::default()).await.expect("b again");
    assert_eq!(versions(&store.committed), [("acme", 2), ("initech", 1), ("umbrella", 1)]);
}

#[tokio::test]
async fn a_plan_run_takes_no_lock_and_writes_nothing() {
    let ctx = ctx("");
    let source = source_with("repo#tenants", &["acme"]);
    let mut store = FakeStore::default();
    store.before_lock.push(Box::new(|_: &mut Tables| panic!("a plan took the apply lock")));
    let o = run_with(&ctx, 0, &source, &mut store, Run::Plan, RunOptions::default()).await.expect("plan");
    assert_eq!(actions(&o), [("acme".into(), Action::Create)]);
    assert!(store.committed.tenants.is_empty() && store.committed.events.is_empty());
}
