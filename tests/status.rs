//! `status` and the run history against a real PostgreSQL: what each run did, read back from the
//! database alone, and the history's bound.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use serde_json::{Value, json};

fn status(repo: &TestRepo, db: &TestDb) -> (i32, Value) {
    let out = run(repo, Some(db), &["status", "--format", "json"]);
    assert!(out.code == 0 || out.code == 2, "{}", out.all());
    (out.code, serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout)))
}

#[test]
fn status_says_what_the_last_run_did_and_why_a_source_needs_attention() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    for (id, f) in [("alpha", Format::Toml), ("bravo", Format::Json), ("charlie", Format::Yaml)] {
        repo.put_tenant(&tenant_doc(id), f);
    }
    let first = repo.commit("three tenants");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);

    let (code, v) = status(&repo, &db);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["healthy"], json!(true));
    let s = &v["sources"][0];
    assert_eq!(s["name"], json!("default"));
    assert_eq!(s["last_applied_commit"], json!(first));
    assert!(s["applied_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{s}");
    assert_eq!(s["lease_holder"], Value::Null, "no agent runs");
    let last = &s["last_run"];
    assert_eq!(
        (&last["outcome"], &last["trigger"], &last["created"]),
        (&json!("applied"), &json!("command"), &json!(3))
    );
    assert_eq!(last["commit_applied"], json!(first));
    assert!(last["replica"].as_str().unwrap().contains("(pid "), "{last}");
    assert!(v["audit"]["head_seq"].as_i64().unwrap() > 0);
    assert_eq!(v["audit"]["last_check"], Value::Null);
    let text = run(&repo, Some(&db), &["status"]);
    assert!(text.stdout.contains("Source default: healthy"), "{}", text.stdout);
    assert!(text.stdout.contains("never verified"), "{}", text.stdout);

    assert_eq!(run(&repo, Some(&db), &["audit", "verify"]).code, 0);
    let (_, v) = status(&repo, &db);
    let check = &v["audit"]["last_check"];
    assert_eq!((&check["intact"], &check["events"]), (&json!(true), &json!(6)), "{check}");
    assert_eq!(check["head_seq"], v["audit"]["head_seq"]);

    // A file that cannot be read: the run is refused, and status says why and what stays applied.
    repo.write("tenants/broken.json", "{");
    repo.commit("broken");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 1);
    let (code, v) = status(&repo, &db);
    assert_eq!(code, 2, "{v}");
    let s = &v["sources"][0];
    assert_eq!(s["last_run"]["outcome"], json!("refused"));
    assert!(s["last_run"]["error"].as_str().unwrap().contains("tenants/broken.json"), "{s}");
    assert_eq!(s["last_run"]["commit_applied"], Value::Null);
    assert_eq!(s["last_applied_commit"], json!(first), "nothing else was applied");
    let text = run(&repo, Some(&db), &["status"]);
    assert_eq!(text.code, 2);
    assert!(text.stdout.contains("Source default: needs attention: last run refused"), "{}", text.stdout);
    let md = run(&repo, Some(&db), &["status", "--format", "markdown"]);
    assert!(md.stdout.contains("### Source default"), "{}", md.stdout);
}

#[test]
fn the_run_history_keeps_the_newest_runs_of_each_source() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    for _ in 0..4 {
        let mut c = command(repo.path(), Some(&db));
        c.env("FROSTBYTE_RUN_HISTORY", "2").arg("sync");
        assert_eq!(output(c).code, 0);
    }
    let runs = db.rows("SELECT run_id, outcome FROM gitops_runs ORDER BY run_id");
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[1]["run_id"].as_i64().unwrap() - runs[0]["run_id"].as_i64().unwrap(), 1);
    assert_eq!(runs[0]["run_id"], json!(3), "the newest two of four");
    assert_eq!(runs[1]["outcome"], json!("in_sync"));
}

#[test]
fn a_source_never_synced_needs_attention() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    let (code, v) = status(&repo, &db);
    assert_eq!(code, 2);
    assert_eq!(v["sources"][0]["last_run"], Value::Null);
    assert!(run(&repo, Some(&db), &["status"]).stdout.contains("needs attention: never synced"));
}
