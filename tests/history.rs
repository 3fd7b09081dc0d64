//! `tenant history`, `tenant show` and `tenant restore` against a real PostgreSQL and git.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use serde_json::{Value, json};

fn json_of(out: &Out) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.all()))
}

/// alpha at three versions: created, its plan changed, its password changed.
fn three_versions() -> (TestRepo, TestDb, String) {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    let mut doc = tenant_doc("alpha");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("alpha");
    let first = std::fs::read_to_string(repo.path().join("tenants/alpha.toml")).unwrap();
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    doc["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("alpha goes enterprise");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    doc["config"]["secrets"]["db_password"] = json!("rotated-s3cret-value");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("rotate alpha's password");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    (repo, db, first)
}

#[test]
fn history_lists_each_version_old_to_new_and_never_a_secret() {
    let (repo, db, _) = three_versions();
    let out = run(&repo, Some(&db), &["tenant", "history", "alpha", "--format", "json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let v = json_of(&out);
    let versions = v["versions"].as_array().unwrap();
    assert_eq!(versions.iter().map(|v| v["version"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(versions[1]["changes"], json!([{"path": "/config/plan", "old": "pro", "new": "enterprise"}]));
    assert_eq!(versions[2]["changes"][0]["secret"], json!("changed"), "{}", versions[2]);
    assert!(versions[0]["commit"].as_str().unwrap().len() == 40);
    for format in ["json", "text", "markdown"] {
        let out = run(&repo, Some(&db), &["tenant", "history", "alpha", "--format", format]);
        assert!(!out.stdout.contains("s3cret"), "{format}: {}", out.stdout);
    }
    let text = run(&repo, Some(&db), &["tenant", "history", "alpha"]).stdout;
    assert!(text.contains("~ /config/plan: \"pro\" -> \"enterprise\""), "{text}");
    assert!(text.contains("~ /config/secrets/db_password: (secret changed)"), "{text}");
    assert!(text.find("version 3").unwrap() < text.find("version 1").unwrap(), "newest first: {text}");

    let missing = run(&repo, Some(&db), &["tenant", "history", "nobody"]);
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("tenant nobody has no config version"), "{}", missing.stderr);
}

#[test]
fn show_replays_a_version_and_tells_a_row_edited_outside_git() {
    let (repo, db, _) = three_versions();
    let out = run(&repo, Some(&db), &["tenant", "show", "alpha", "--format", "json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let v = json_of(&out);
    assert_eq!((&v["version"], &v["current"]), (&json!(3), &json!(true)));
    assert_eq!(v["row_differs_at"], json!([]));
    assert_eq!(v["document"]["config"]["secrets"]["db_password"], json!("[REDACTED]"));
    assert_eq!(v["document"]["config"]["plan"], json!("enterprise"));

    let first = json_of(&run(&repo, Some(&db), &["tenant", "show", "alpha", "--version", "1", "--format", "json"]));
    assert_eq!(first["document"]["config"]["plan"], json!("pro"));
    assert_eq!(first["row_differs_at"], Value::Null, "only the current version is compared with the row");

    db.exec("UPDATE tenants SET config = jsonb_set(config, '{region}', '\"us-east-1\"') WHERE tenant_id = 'alpha'");
    let edited = run(&repo, Some(&db), &["tenant", "show", "alpha", "--format", "json"]);
    assert_eq!(edited.code, 2);
    assert_eq!(json_of(&edited)["row_differs_at"], json!(["/config/region"]));
    let text = run(&repo, Some(&db), &["tenant", "show", "alpha"]);
    assert!(text.stdout.contains("The row differs at /config/region"), "{}", text.stdout);
    assert!(!text.stdout.contains("s3cret"), "{}", text.stdout);

    let none = run(&repo, Some(&db), &["tenant", "show", "alpha", "--version", "9"]);
    assert_eq!(none.code, 1);
    assert!(none.stderr.contains("tenant alpha has no version 9 (its versions: 1..3)"), "{}", none.stderr);
}

#[test]
fn restore_writes_the_file_as_git_had_it_and_refuses_a_commit_the_clone_lacks() {
    let (repo, db, first) = three_versions();
    let out = run(&repo, Some(&db), &["tenant", "restore", "alpha", "--version", "1"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let restored = std::fs::read_to_string(repo.path().join("tenants/alpha.toml")).unwrap();
    assert_eq!(restored, first, "the file as committed, still encrypted");
    // Committed and synced, the revert is a new version with version 1's config.
    repo.commit("revert alpha to version 1");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    let v = json_of(&run(&repo, Some(&db), &["tenant", "show", "alpha", "--format", "json"]));
    assert_eq!((&v["version"], &v["document"]["config"]["plan"]), (&json!(4), &json!("pro")));

    let elsewhere = tempfile::tempdir().unwrap();
    let out_file = elsewhere.path().join("alpha.toml");
    let to_file = run(
        &repo,
        Some(&db),
        &["tenant", "restore", "alpha", "--version", "2", "--out", out_file.to_str().unwrap()],
    );
    assert_eq!(to_file.code, 0, "{}", to_file.all());
    assert!(std::fs::read_to_string(&out_file).unwrap().contains("sops"));

    // A shallow clone has the newest commit only.
    let shallow = elsewhere.path().join("shallow");
    let cloned = std::process::Command::new("git")
        .args(["clone", "-q", "--depth", "1"])
        .arg(format!("file://{}", repo.path().display()))
        .arg(&shallow)
        .status()
        .unwrap();
    assert!(cloned.success());
    let mut c = command(&shallow, Some(&db));
    c.args(["tenant", "restore", "alpha", "--version", "1"]);
    let refused = output(c);
    assert_eq!(refused.code, 1, "{}", refused.all());
    assert!(refused.stderr.contains("is not in the repository of source"), "{}", refused.stderr);
    assert_eq!(
        std::fs::read_to_string(shallow.join("tenants/alpha.toml")).unwrap(),
        restored,
        "nothing was written"
    );
}
