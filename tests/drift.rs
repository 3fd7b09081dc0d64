//! `drift` against a real PostgreSQL: each class, exit codes, redaction, correction by `sync`.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use serde_json::{Value, json};

fn psql(db: &TestDb, sql: &str) {
    let out = std::process::Command::new("psql")
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-d", &db.url, "-c", sql])
        .output()
        .expect("psql on PATH");
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
}

fn drift_json(repo: &TestRepo, db: &TestDb, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["drift", "--format", "json"];
    args.extend_from_slice(extra);
    let out = run(repo, Some(db), &args);
    assert!(out.code == 0 || out.code == 2, "{}", out.all());
    (out.code, serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout)))
}

fn classes(report: &Value, id: &str) -> Vec<String> {
    let t = report["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == json!(id))
        .unwrap_or_else(|| panic!("no {id}"));
    t["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect()
}

fn tenant<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["tenants"].as_array().unwrap().iter().find(|t| t["tenant_id"] == json!(id)).unwrap()
}

fn synced() -> (TestRepo, TestDb) {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    for (id, f) in [
        ("alpha", Format::Toml),
        ("bravo", Format::Json),
        ("charlie", Format::Yaml),
        ("delta", Format::Toml),
        ("echo", Format::Json),
    ] {
        repo.put_tenant(&tenant_doc(id), f);
    }
    repo.commit("five tenants");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    (repo, db)
}

#[test]
fn in_sync_exits_zero() {
    let (repo, db) = synced();
    let (code, report) = drift_json(&repo, &db, &[]);
    assert_eq!(code, 0);
    assert_eq!(report["counts"]["in-sync"], json!(5));
    let text = run(&repo, Some(&db), &["drift"]);
    assert_eq!(text.code, 0);
    assert!(
        text.stdout.contains("5 tenant(s): 5 in-sync, 0 pending, 0 modified, 0 missing, 0 orphaned"),
        "{}",
        text.stdout
    );
}

#[test]
fn every_class_is_told_apart() {
    let (repo, db) = synced();
    // modified: a hand edit with psql, including a secret.
    psql(
        &db,
        "UPDATE tenants SET config = jsonb_set(jsonb_set(config, '{limits,max_users}', '999'), '{secrets,db_password}', '\"typed-by-hand-pw\"') WHERE tenant_id = 'alpha'",
    );
    // pending: a commit not yet synced.
    let mut bravo = tenant_doc("bravo");
    bravo["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&bravo, Format::Json);
    // pending and modified at once.
    let mut charlie = tenant_doc("charlie");
    charlie["config"]["region"] = json!("us-east-1");
    repo.put_tenant(&charlie, Format::Yaml);
    psql(
        &db,
        "UPDATE tenants SET endpoints = '{\"api\": \"https://moved.example.com\"}' WHERE tenant_id = 'charlie'",
    );
    // orphaned: the file is deleted.
    repo.remove("tenants/delta.toml");
    // missing: the row is deleted.
    psql(&db, "DELETE FROM tenants WHERE tenant_id = 'echo'");
    repo.commit("changes not yet synced");

    let (code, report) = drift_json(&repo, &db, &[]);
    assert_eq!(code, 2);
    assert_eq!(classes(&report, "alpha"), ["modified"]);
    assert_eq!(
        tenant(&report, "alpha")["modified_paths"],
        json!(["/config/limits/max_users", "/config/secrets/db_password"])
    );
    assert_eq!(classes(&report, "bravo"), ["pending"]);
    assert_eq!(tenant(&report, "bravo")["pending_paths"], json!(["/config/plan"]));
    // What git has and what the database has, a secret only as differing, and when the row changed.
    assert_eq!(
        tenant(&report, "alpha")["modified"],
        json!([
            {"path": "/config/limits/max_users", "git": 50, "database": 999},
            {"path": "/config/secrets/db_password", "secret": true}
        ])
    );
    assert!(tenant(&report, "alpha")["updated_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{report}");
    assert_eq!(classes(&report, "charlie"), ["pending", "modified"]);
    assert_eq!(tenant(&report, "charlie")["modified_paths"], json!(["/endpoints/api"]));
    assert_eq!(classes(&report, "delta"), ["orphaned"]);
    assert_eq!(classes(&report, "echo"), ["missing"]);
    assert_eq!(
        report["counts"],
        json!({"in-sync": 0, "pending": 2, "modified": 2, "missing": 1, "orphaned": 1})
    );

    let text = run(&repo, Some(&db), &["drift"]);
    assert_eq!(text.code, 2);
    assert!(text.stdout.contains("charlie: pending + modified"), "{}", text.stdout);
    assert!(text.stdout.contains("modified /config/secrets/db_password (secret differs)"), "{}", text.stdout);
    assert!(
        text.stdout.contains("modified /config/limits/max_users: git 50, database 999"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("alpha: modified (row last changed "), "{}", text.stdout);
    let md = run(&repo, Some(&db), &["drift", "--format", "markdown"]);
    assert_eq!(md.code, 2);
    assert!(
        md.stdout.lines().any(|l| l.starts_with("| `charlie` | pending + modified (row last changed ")
            && l.ends_with(" | `/config/region` | /endpoints/api: git \"https://charlie.api.example.com\", database \"https://moved.example.com\" |")),
        "{}",
        md.stdout
    );
    for out in [text.all(), md.all(), report.to_string()] {
        assert!(!out.contains("typed-by-hand-pw") && !out.contains("pw-alpha-s3cret"), "a secret leaked:\n{out}");
    }

    // --fail-on narrows what counts for the exit code.
    assert_eq!(run(&repo, Some(&db), &["drift", "--fail-on", "orphaned"]).code, 2);
    psql(&db, "DELETE FROM tenants WHERE tenant_id = 'delta'");
    assert_eq!(run(&repo, Some(&db), &["drift", "--fail-on", "orphaned"]).code, 0);
    assert_eq!(run(&repo, Some(&db), &["drift", "--fail-on", "missing"]).code, 2);
    let bad = run(&repo, Some(&db), &["drift", "--fail-on", "sideways"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("unknown drift class \"sideways\""), "{}", bad.stderr);
}

#[test]
fn sync_corrects_a_hand_edit_and_says_so() {
    let (repo, db) = synced();
    psql(
        &db,
        "UPDATE tenants SET config = jsonb_set(config, '{plan}', '\"free\"') WHERE tenant_id = 'alpha'",
    );
    let plan = run(&repo, Some(&db), &["plan"]);
    assert_eq!(plan.code, 2);
    assert!(plan.stdout.contains("overwrites changes made outside git: /config/plan"), "{}", plan.stdout);
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    assert_eq!(db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"), json!("pro"));
    let event = db.scalar("SELECT details FROM audit_events WHERE tenant_id = 'alpha' ORDER BY event_seq DESC LIMIT 1");
    assert_eq!(event["corrected_out_of_band_changes"], json!(["/config/plan"]));
    assert_eq!(event["from_version"], json!(1));
    let (code, _) = drift_json(&repo, &db, &[]);
    assert_eq!(code, 0, "in sync after the correction");
}

#[test]
fn the_warn_policy_leaves_a_hand_edit_but_applies_git_changes() {
    let (repo, db) = synced();
    psql(
        &db,
        "UPDATE tenants SET config = jsonb_set(config, '{plan}', '\"free\"') WHERE tenant_id = 'alpha'",
    );
    let mut bravo = tenant_doc("bravo");
    bravo["config"]["plan"] = json!("starter");
    repo.put_tenant(&bravo, Format::Json);
    repo.commit("bravo changes");
    let out = run(&repo, Some(&db), &["sync", "--drift-policy", "warn"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"),
        json!("free"),
        "left alone"
    );
    assert_eq!(
        db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'bravo'"),
        json!("starter"),
        "applied"
    );
    let (_, report) = drift_json(&repo, &db, &[]);
    assert_eq!(classes(&report, "alpha"), ["modified"]);
}

#[test]
fn under_warn_a_tenant_changed_in_git_and_by_hand_is_a_conflict_left_alone() {
    let (repo, db) = synced();
    psql(
        &db,
        "UPDATE tenants SET config = jsonb_set(config, '{display_name}', '\"Renamed by hand\"') WHERE tenant_id = 'alpha'",
    );
    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("alpha goes enterprise");
    let warn = |args: &[&str]| {
        let mut c = command(repo.path(), Some(&db));
        c.env("FROSTBYTE_DRIFT_POLICY", "warn").args(args);
        output(c)
    };

    let plan = warn(&["plan"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(plan.stdout.contains("alpha is in conflict"), "{}", plan.stdout);
    assert!(plan.stdout.contains("/config/display_name"), "{}", plan.stdout);
    assert!(plan.stdout.contains("1 in conflict (left alone)"), "{}", plan.stdout);

    let sync = warn(&["sync"]);
    assert_eq!(sync.code, 2, "a conflict is not success: {}", sync.all());
    assert!(sync.stderr.contains("1 tenant(s) in conflict were left alone"), "{}", sync.stderr);
    let row = db.rows("SELECT config->>'display_name' AS name, config->>'plan' AS plan, config_version FROM tenants WHERE tenant_id = 'alpha'");
    assert_eq!(
        row[0],
        json!({"name": "Renamed by hand", "plan": "pro", "config_version": 1}),
        "the hand edit was overwritten"
    );

    let (code, report) = drift_json(&repo, &db, &[]);
    assert_eq!(code, 2);
    assert_eq!(classes(&report, "alpha"), ["pending", "modified"]);

    // The policy decides: correct writes git's version over the hand edit.
    let fixed = run(&repo, Some(&db), &["sync"]);
    assert_eq!(fixed.code, 0, "{}", fixed.all());
    let row = db.rows("SELECT config->>'display_name' AS name, config->>'plan' AS plan FROM tenants WHERE tenant_id = 'alpha'");
    assert_eq!(row[0], json!({"name": "Tenant alpha", "plan": "enterprise"}));
}

#[test]
fn an_edit_with_triggers_off_is_missed_incrementally_and_found_by_full() {
    let (repo, db) = synced();
    // As a restore or logical replication would: replica mode skips the updated_at trigger.
    psql(
        &db,
        "SET session_replication_role = replica; UPDATE tenants SET config = jsonb_set(config, '{plan}', '\"free\"') WHERE tenant_id = 'alpha'",
    );
    let (code, report) = drift_json(&repo, &db, &[]);
    assert_eq!(code, 0, "the incremental read cannot see it: {report}");
    let (code, report) = drift_json(&repo, &db, &["--full"]);
    assert_eq!(code, 2, "{report}");
    assert_eq!(classes(&report, "alpha"), ["modified"]);

    assert!(
        run(&repo, Some(&db), &["sync"]).stdout.contains("No changes"),
        "an incremental sync misses it too"
    );
    let full = run(&repo, Some(&db), &["sync", "--full"]);
    assert_eq!(full.code, 0, "{}", full.all());
    assert_eq!(db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"), json!("pro"));
    assert_eq!(drift_json(&repo, &db, &["--full"]).0, 0);
}

/// A full read compares every row but keeps only those that differ from their files; what it
/// reports of the others is what an incremental read reports without reading them.
#[test]
fn a_full_and_an_incremental_report_agree_tenant_by_tenant() {
    let (repo, db) = synced();
    psql(
        &db,
        "UPDATE tenants SET config = jsonb_set(config, '{plan}', '\"free\"') WHERE tenant_id = 'alpha'",
    );
    let (code, incremental) = drift_json(&repo, &db, &[]);
    let (full_code, full) = drift_json(&repo, &db, &["--full"]);
    assert_eq!((code, full_code), (2, 2));
    assert_eq!(classes(&full, "alpha"), ["modified"]);
    assert_eq!(incremental["tenants"], full["tenants"]);
    assert_eq!(incremental["counts"], full["counts"]);
    let commit = db.scalar("SELECT last_applied_commit FROM gitops_sources");
    for id in ["alpha", "bravo", "echo"] {
        assert_eq!(tenant(&full, id)["last_applied_commit"], commit, "{id}");
    }
}

/// Rows are kept as jsonb's text and read into trees when planned: a row nested deeper than a tree
/// can be read back is refused up front, the tenant named, not a panic halfway through a run.
#[test]
fn a_row_nested_too_deep_to_read_is_refused_with_its_tenant_named() {
    let (repo, db) = synced();
    let deep = format!("{}1{}", "[".repeat(130), "]".repeat(130));
    psql(
        &db,
        &format!("UPDATE tenants SET config = jsonb_set(config, '{{deep}}', '{deep}') WHERE tenant_id = 'alpha'"),
    );
    for args in [&["drift", "--full"][..], &["sync", "--full"]] {
        let out = run(&repo, Some(&db), args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.all());
        assert!(out.stderr.contains("tenant alpha: JSON nested 132 levels deep"), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

#[test]
fn rows_written_from_the_work_tree_are_not_trusted_by_the_next_commit_sync() {
    let (repo, db) = synced();
    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&doc, Format::Toml);
    let out = run(&repo, Some(&db), &["sync", "--worktree"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"),
        json!("enterprise")
    );
    // The commit still says pro: the record written from the work tree must not stand for it.
    let out = run(&repo, Some(&db), &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"), json!("pro"));
}

/// `sync --full` compares its rows a thousand at a time, fetching back the documents each chunk
/// needs: a hand edit (missed by an incremental read) in the first, a chunk's first and the last
/// partial chunk is each found and undone, and a new file beside them is created.
#[test]
fn a_full_sync_across_chunks_of_rows_finds_every_hand_edit() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    let formats = [Format::Toml, Format::Json, Format::Yaml];
    for i in 0..2_100 {
        repo.put_tenant(&tenant_doc(&format!("t-{i:04}")), formats[i % 3]);
    }
    repo.commit("2,100 tenants");
    let first = run(&repo, Some(&db), &["sync"]);
    assert_eq!(first.code, 0, "{}", first.all());

    let edited = ["t-0005", "t-1000", "t-2099"];
    psql(
        &db,
        &format!(
            "SET session_replication_role = replica; UPDATE tenants SET config = jsonb_set(config, '{{plan}}', '\"free\"') WHERE tenant_id IN ('{}')",
            edited.join("', '")
        ),
    );
    repo.put_tenant(&tenant_doc("t-9999"), Format::Json);
    repo.commit("one more");
    let full = run(&repo, Some(&db), &["sync", "--full"]);
    assert_eq!(full.code, 0, "{}", full.all());
    assert!(full.stdout.contains("Applied: 1 created, 3 updated"), "{}", full.stdout);
    for id in edited {
        assert!(full.stdout.contains(&format!("~ {id} updated (1 -> 2)")), "{id}: {}", full.stdout);
    }
    let plans = db.rows("SELECT DISTINCT config->>'plan' AS plan FROM tenants");
    assert_eq!(plans, [json!({"plan": "pro"})]);
    assert_eq!(db.count("SELECT 1 FROM tenants"), 2_101);
    let (code, report) = drift_json(&repo, &db, &["--full"]);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn a_value_added_by_hand_under_a_secret_path_is_never_shown() {
    let (repo, db) = synced();
    psql(
        &db,
        "UPDATE tenants SET config = jsonb_set(config, '{secrets,typed_in}', '\"hand-typed-secret-42\"') WHERE tenant_id = 'alpha'",
    );
    let mut outputs = vec![];
    for format in ["text", "json", "markdown"] {
        let out = run(&repo, Some(&db), &["drift", "--format", format]);
        assert_eq!(out.code, 2, "{format}: {}", out.all());
        assert!(out.stdout.contains("/config/secrets/typed_in"), "{format}: the path is named: {}", out.stdout);
        outputs.push(out);
    }
    for format in ["text", "json", "markdown"] {
        outputs.push(run(&repo, Some(&db), &["plan", "--format", format]));
    }
    let sync = run(&repo, Some(&db), &["sync"]);
    assert_eq!(sync.code, 0, "{}", sync.all());
    outputs.push(sync);
    for out in &outputs {
        assert!(!out.all().contains("hand-typed-secret-42"), "a secret in the output: {}", out.all());
    }
    let events = db.rows("SELECT details::text AS d FROM audit_events");
    assert!(!format!("{events:?}").contains("hand-typed-secret-42"), "a secret in the audit trail");
    assert_eq!(db.count("SELECT 1 FROM tenants WHERE config->'secrets' ? 'typed_in'"), 0, "corrected");
}
