//! plan, apply and sync through the binary, against a real PostgreSQL database.

mod common;
use common::*;
use frostbyte_gitops::domain::json::apply_patch;
use frostbyte_gitops::sops::Format;
use serde_json::{Value, json};

fn sync(repo: &TestRepo, db: &TestDb) -> Out {
    let out = run(repo, Some(db), &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    out
}

fn three_tenants() -> (TestRepo, TestDb) {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    repo.put_tenant(&tenant_doc("charlie"), Format::Yaml);
    repo.commit("three tenants");
    (repo, db)
}

fn events(db: &TestDb, kind: &str) -> i64 {
    db.count(&format!("SELECT 1 FROM audit_events WHERE event_type = '{kind}'"))
}

#[test]
fn create_then_edit_then_nothing_to_do() {
    let (repo, db) = three_tenants();
    let out = sync(&repo, &db);
    assert!(out.stdout.contains("Applied: 3 created, 0 updated, 0 orphaned"), "{}", out.stdout);
    assert!(out.stdout.contains("+ alpha created (version 1)  tenants/alpha.toml"), "{}", out.stdout);
    assert_eq!(db.count("SELECT 1 FROM tenants WHERE config_version = 1 AND state = 'pending'"), 3);
    assert_eq!(events(&db, "TENANT_CREATED"), 3);
    assert_eq!(events(&db, "TENANT_CONFIG_UPDATED"), 3);
    // The stored config carries the decrypted secret: it is what services read.
    assert_eq!(
        db.scalar("SELECT config->'secrets'->>'db_password' AS p FROM tenants WHERE tenant_id = 'bravo'"),
        json!("pw-bravo-s3cret")
    );

    let mut doc = tenant_doc("bravo");
    doc["config"]["plan"] = json!("enterprise");
    doc["config"]["features"]["beta"] = json!(true);
    repo.put_tenant(&doc, Format::Json);
    let commit = repo.commit("bravo goes enterprise");
    let plan = run(&repo, Some(&db), &["plan"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(plan.stdout.contains("0 to create, 1 to update, 0 orphaned"), "{}", plan.stdout);
    let applied = sync(&repo, &db);
    assert!(applied.stdout.contains("~ bravo updated (1 -> 2)  tenants/bravo.json"), "{}", applied.stdout);
    assert!(
        applied.stdout.contains("Applied: 0 created, 1 updated, 0 orphaned (2 unchanged)."),
        "{}",
        applied.stdout
    );
    assert_eq!(db.scalar("SELECT config_version FROM tenants WHERE tenant_id = 'bravo'"), json!(2));
    assert_eq!(db.scalar("SELECT config_version FROM tenants WHERE tenant_id = 'alpha'"), json!(1));
    assert_eq!(events(&db, "TENANT_CONFIG_UPDATED"), 4);
    let last = db.scalar("SELECT details FROM audit_events WHERE tenant_id = 'bravo' ORDER BY event_seq DESC LIMIT 1");
    assert_eq!(last["from_version"], json!(1));
    assert_eq!(last["to_version"], json!(2));
    assert_eq!(last["commit"], json!(commit));
    assert_eq!(last["file"], json!("tenants/bravo.json"));
    assert_eq!(last["commit_author"], json!("Test Author <author@example.com>"));
    assert_eq!(
        last["patch"],
        json!([
            {"op": "replace", "path": "/config/plan", "value": "enterprise", "old": "pro"},
            {"op": "replace", "path": "/config/features/beta", "value": true, "old": false}
        ])
    );

    // Nothing to do writes nothing, not even updated_at.
    let before = db.rows("SELECT tenant_id, updated_at, xmin::text AS xmin FROM tenants ORDER BY tenant_id");
    let sources = db.rows("SELECT * FROM gitops_sources");
    let out = sync(&repo, &db);
    assert!(out.stdout.contains("No changes"), "{}", out.stdout);
    assert_eq!(
        db.rows("SELECT tenant_id, updated_at, xmin::text AS xmin FROM tenants ORDER BY tenant_id"),
        before
    );
    assert_eq!(db.rows("SELECT * FROM gitops_sources"), sources);
    assert_eq!(db.count("SELECT 1 FROM audit_events"), 7);
    assert_eq!(run(&repo, Some(&db), &["plan"]).code, 0);
}

#[test]
fn replaying_config_events_rebuilds_every_version() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    let mut versions = vec![];
    let mut doc = tenant_doc("delta");
    for step in 0..4 {
        match step {
            1 => doc["config"]["limits"]["max_users"] = json!(500),
            2 => {
                doc["config"]["secrets"]["db_password"] = json!("rotated-password-1");
                doc["endpoints"]["ingest"] = json!("https://ingest.example.com");
            }
            3 => {
                doc["config"]["contacts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "Sec", "email": "sec@example.com"}));
                doc["config"].as_object_mut().unwrap().shift_remove("features");
            }
            _ => {}
        }
        repo.put_tenant(&doc, Format::Yaml);
        repo.commit(&format!("step {step}"));
        sync(&repo, &db);
        versions.push(doc.clone());
    }
    assert_eq!(db.scalar("SELECT config_version FROM tenants"), json!(4));
    let events = db.rows("SELECT details FROM audit_events WHERE event_type = 'TENANT_CONFIG_UPDATED' ORDER BY event_seq");
    assert_eq!(events.len(), 4, "one config event per version");
    let mut replayed = json!({});
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["details"]["to_version"], json!(i + 1));
        apply_patch(&mut replayed, e["details"]["patch"].as_array().unwrap()).unwrap();
        let mut expected = versions[i].clone();
        expected.as_object_mut().unwrap().shift_remove("tenant_id");
        for k in ["db_password", "api_key"] {
            expected["config"]["secrets"][k] = json!("[REDACTED]");
        }
        assert_eq!(replayed, expected, "version {}", i + 1);
    }
    // The chain of config events links each to the one before.
    assert_eq!(
        db.count("SELECT 1 FROM audit_events WHERE event_type = 'TENANT_CONFIG_UPDATED' AND previous_event_id IS NOT NULL"),
        3
    );
}

#[test]
fn a_secret_change_is_only_ever_called_changed() {
    let (repo, db) = three_tenants();
    sync(&repo, &db);
    let new_secret = "n3w-t0p-s3cret-value";
    let mut doc = tenant_doc("alpha");
    doc["config"]["secrets"]["db_password"] = json!(new_secret);
    doc["config"]["secrets"]["extra_token"] = json!("added-t0ken-value");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("rotate alpha's password");
    let mut outputs = vec![];
    for format in ["text", "json", "markdown"] {
        let out = run(&repo, Some(&db), &["plan", "--format", format]);
        assert_eq!(out.code, 2, "{}", out.all());
        outputs.push(out.all());
    }
    assert!(outputs[0].contains("/config/secrets/db_password (secret changed)"), "{}", outputs[0]);
    assert!(outputs[0].contains("/config/secrets/extra_token (secret added)"), "{}", outputs[0]);
    let json_plan: Value = serde_json::from_str(&run(&repo, Some(&db), &["plan", "--format", "json"]).stdout).unwrap();
    let ops = &json_plan["tenants"][0]["patch"];
    assert_eq!(
        ops[0],
        json!({"op": "replace", "path": "/config/secrets/db_password", "value": "[REDACTED]", "secret": "changed", "old": "[REDACTED]"})
    );
    // The sync writes the new secret as a query parameter: no FROSTBYTE_LOG can bring it to a log.
    let mut c = command(repo.path(), Some(&db));
    c.env(
        "FROSTBYTE_LOG",
        "trace,tokio_postgres=trace,tokio_postgres::query=trace,tokio_postgres::prepare=trace",
    )
    .arg("sync");
    let traced = output(c);
    assert_eq!(traced.code, 0, "{}", traced.all());
    assert!(
        traced.stderr.contains("TRACE") || traced.stderr.contains("DEBUG"),
        "trace logging is on: {}",
        traced.stderr
    );
    outputs.push(traced.all());
    outputs.push(db.rows("SELECT * FROM audit_events").iter().map(|r| r.to_string()).collect());
    outputs.push(db.rows("SELECT * FROM gitops_applied").iter().map(|r| r.to_string()).collect());
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("p.json");
    let out = run(&repo, Some(&db), &["plan", "--out", saved.to_str().unwrap()]);
    outputs.push(out.all() + &std::fs::read_to_string(&saved).unwrap());
    outputs.push(run(&repo, Some(&db), &["drift", "--format", "json"]).all());
    for (i, text) in outputs.iter().enumerate() {
        for secret in [new_secret, "added-t0ken-value", "pw-alpha-s3cret", "key-alpha-hidden", "pw-bravo-s3cret"] {
            assert!(!text.contains(secret), "output {i} leaks {secret}:\n{text}");
        }
    }
    let event = db.scalar("SELECT details FROM audit_events WHERE tenant_id = 'alpha' ORDER BY event_seq DESC LIMIT 1");
    assert_eq!(event["patch"][0]["secret"], json!("changed"));
    assert_eq!(
        db.scalar("SELECT config->'secrets'->>'db_password' AS p FROM tenants WHERE tenant_id = 'alpha'"),
        json!(new_secret)
    );
}

#[test]
fn a_row_the_database_refuses_is_named_without_its_values() {
    // PostgreSQL's DETAIL for a violated CHECK quotes the whole row, decrypted config included.
    let (repo, db) = three_tenants();
    assert_eq!(run(&repo, Some(&db), &["migrate"]).code, 0);
    db.exec("ALTER TABLE tenants ADD CONSTRAINT no_pro_plan CHECK (config->>'plan' <> 'pro')");
    let mut c = command(repo.path(), Some(&db));
    c.env("FROSTBYTE_LOG", "trace").arg("sync");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("no_pro_plan"), "the constraint is named: {}", out.stderr);
    assert!(out.stderr.contains("SQLSTATE 23514"), "{}", out.stderr);
    for secret in ["pw-alpha-s3cret", "key-alpha-hidden", "pw-bravo-s3cret", "pw-charlie-s3cret", "Failing row"] {
        assert!(!out.all().contains(secret), "the error quotes the row ({secret}):\n{}", out.all());
    }
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0);
    assert_eq!(db.count("SELECT 1 FROM audit_events"), 0);
}

#[test]
fn a_saved_plan_applies_exactly_and_a_stale_one_is_refused() {
    let (repo, db) = three_tenants();
    let dir = tempfile::tempdir().unwrap();
    let plan_file = dir.path().join("plan.json");
    let plan_path = plan_file.to_str().unwrap();
    let out = run(&repo, Some(&db), &["plan", "--out", plan_path]);
    assert_eq!(out.code, 2, "{}", out.all());
    // A commit made after the plan does not sneak in: the plan names its commit.
    repo.put_tenant(&tenant_doc("echo"), Format::Toml);
    repo.commit("echo arrives after the plan");
    let out = run(&repo, Some(&db), &["apply", plan_path]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(db.count("SELECT 1 FROM tenants"), 3, "exactly the saved plan");

    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("free");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("alpha downgrades");
    assert_eq!(run(&repo, Some(&db), &["plan", "--out", plan_path]).code, 2);
    // Someone changes alpha in the database between plan and apply.
    db.exec("UPDATE tenants SET config_version = config_version + 1, config = jsonb_set(config, '{display_name}', '\"Hand edit\"') WHERE tenant_id = 'alpha'");
    let before = db.count("SELECT 1 FROM audit_events");
    let out = run(&repo, Some(&db), &["apply", plan_path]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("the saved plan is stale"), "{}", out.stderr);
    assert!(
        out.stderr.contains("alpha: config_version is 2 in the database, the plan expected 1"),
        "{}",
        out.stderr
    );
    assert_eq!(db.count("SELECT 1 FROM audit_events"), before, "nothing applied");
    assert_eq!(db.count("SELECT 1 FROM tenants"), 3, "echo was not created either");
}

#[test]
fn two_concurrent_syncs_apply_each_change_once() {
    let (repo, db) = three_tenants();
    let outs = run_concurrently(&repo, &db, &["sync"], 2);
    for o in &outs {
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    let stdout: Vec<String> = outs.iter().map(|o| o.stdout.clone()).collect();
    assert_eq!(stdout.iter().filter(|s| s.contains("No changes")).count(), 1, "{stdout:?}");
    assert_eq!(events(&db, "TENANT_CREATED"), 3);
    assert_eq!(events(&db, "TENANT_CONFIG_UPDATED"), 3);
}

#[test]
fn a_backend_killed_during_apply_leaves_nothing_half_applied() {
    let (repo, db) = three_tenants();
    // Hold a lock the apply will wait on after it has inserted the first tenant.
    let url = db.url.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    run(&repo, Some(&db), &["migrate"]);
    let holder = std::thread::spawn(move || {
        block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute("BEGIN; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE").await.unwrap();
            locked_tx.send(()).unwrap();
            tokio::task::spawn_blocking(move || release_rx.recv()).await.unwrap().ok();
            client.batch_execute("ROLLBACK").await.unwrap();
        })
    });
    locked_rx.recv().unwrap();
    let mut c = command(repo.path(), Some(&db));
    c.arg("sync").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    // Wait until the sync is blocked inside its transaction, then kill its backend.
    let mut killed = false;
    for _ in 0..200 {
        let n = db.count("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%emit_audit_event%'");
        if n > 0 {
            killed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(killed, "the sync never blocked on the audit lock");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0, "the insert before the kill was rolled back");
    assert_eq!(db.count("SELECT 1 FROM gitops_applied"), 0);
    let out = sync(&repo, &db);
    assert!(out.stdout.contains("3 created"), "{}", out.stdout);
    assert_eq!(db.count("SELECT 1 FROM tenants WHERE config_version = 1"), 3);
    assert_eq!(events(&db, "TENANT_CONFIG_UPDATED"), 3);
}

/// The plans of created tenants wait in a temporary file until they are printed: where none can
/// be made, the run fails before it commits, says why, and writes nothing.
#[test]
fn without_a_temporary_directory_a_first_sync_applies_nothing() {
    let (repo, db) = three_tenants();
    let mut c = command(repo.path(), Some(&db));
    c.env("TMPDIR", repo.path().join("no-such-dir")).arg("sync");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr
            .contains("keeping the created tenants' plans in a temporary file (TMPDIR); nothing was applied"),
        "{}",
        out.stderr
    );
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0);
    assert_eq!(db.count("SELECT 1 FROM audit_events"), 0);
    let out = sync(&repo, &db);
    assert!(out.stdout.contains("Applied: 3 created, 0 updated, 0 orphaned"), "{}", out.stdout);
}

#[test]
fn an_invalid_file_stops_the_run_before_it_writes() {
    let (repo, db) = three_tenants();
    let mut bad = tenant_doc("foxtrot");
    bad["config"]["plan"] = json!("gold");
    repo.put_tenant(&bad, Format::Toml);
    repo.write("tenants/golf.json", "{\"tenant_id\": \"golf\"");
    repo.commit("two bad files");
    let out = run(&repo, Some(&db), &["sync"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("2 problem(s) in 2 file(s)"), "{}", out.stderr);
    assert!(
        out.stderr.contains("tenants/foxtrot.toml") && out.stderr.contains("tenants/golf.json"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("nothing was applied"));
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0);
}

#[test]
fn a_rewritten_history_is_refused_unless_allowed() {
    let (repo, db) = three_tenants();
    sync(&repo, &db);
    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("starter");
    repo.put_tenant(&doc, Format::Toml);
    repo.rewrite_history("force-pushed");
    let out = run(&repo, Some(&db), &["sync"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("does not descend from the last applied commit"), "{}", out.stderr);
    assert_eq!(db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"), json!("pro"));
    let out = run(&repo, Some(&db), &["sync", "--allow-non-fast-forward"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        db.scalar("SELECT config->>'plan' AS p FROM tenants WHERE tenant_id = 'alpha'"),
        json!("starter")
    );
}

#[test]
fn a_deleted_file_is_reported_as_orphaned_and_never_deleted() {
    let (repo, db) = three_tenants();
    sync(&repo, &db);
    repo.remove("tenants/charlie.yaml");
    repo.commit("charlie leaves git");
    let plan = run(&repo, Some(&db), &["plan"]);
    assert_eq!(plan.code, 0, "orphans alone are not a change: {}", plan.all());
    assert!(plan.stdout.contains("charlie is orphaned"), "{}", plan.stdout);
    assert!(plan.stdout.contains("0 to create, 0 to update, 1 orphaned"), "{}", plan.stdout);
    sync(&repo, &db);
    assert_eq!(db.count("SELECT 1 FROM tenants WHERE tenant_id = 'charlie'"), 1);
}

#[test]
fn plan_against_a_ref_needs_no_database() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    let base = repo.commit("base");
    let mut doc = tenant_doc("alpha");
    doc["config"]["region"] = json!("us-east-1");
    doc["config"]["secrets"]["api_key"] = json!("rotated-api-key-xyz");
    repo.put_tenant(&doc, Format::Toml);
    repo.put_tenant(&tenant_doc("charlie"), Format::Yaml);
    repo.remove("tenants/bravo.json");
    repo.commit("change");
    let mut c = command(repo.path(), None);
    // Production mode with no database configured: proves nothing connects.
    c.env("FROSTBYTE_MODE", "production")
        .env("FROSTBYTE_VERIFY_COMMITS", "off")
        .args(["plan", "--against-ref", &base, "--format", "markdown"]);
    let out = output(c);
    assert_eq!(out.code, 2, "{}", out.all());
    let md = &out.stdout;
    assert!(md.contains("1 to create, 1 to update, 1 orphaned"), "{md}");
    assert!(md.contains("~ /config/region: \"eu-west-1\" -> \"us-east-1\""), "{md}");
    assert!(md.contains("~ /config/secrets/api_key (secret changed)"), "{md}");
    assert!(!md.contains("rotated-api-key-xyz"));
    let same = run(&repo, None, &["plan", "--against-ref", "HEAD"]);
    assert_eq!(same.code, 0, "{}", same.all());
    assert!(same.stdout.contains("No changes"), "{}", same.stdout);
}

#[test]
fn the_markdown_plan_matches_the_reviewed_snapshot() {
    let (repo, db) = three_tenants();
    sync(&repo, &db);
    // Uncommitted edits, planned with --worktree so that no commit id enters the output.
    let mut alpha = tenant_doc("alpha");
    alpha["config"]["plan"] = json!("enterprise");
    alpha["config"]["limits"] = json!({"max_users": 1000, "storage_gb": 500, "requests_per_minute": 9000});
    alpha["config"]["secrets"]["db_password"] = json!("changed-password");
    repo.put_tenant(&alpha, Format::Toml);
    let mut bravo = tenant_doc("bravo");
    bravo["endpoints"]["ingest"] = json!("https://ingest.bravo.example.com");
    bravo["config"]["secrets"].as_object_mut().unwrap().shift_remove("api_key");
    repo.put_tenant(&bravo, Format::Json);
    let mut delta = tenant_doc("delta");
    delta["config"]["display_name"] = json!("Delta | Pipes & `ticks`");
    repo.put_tenant(&delta, Format::Yaml);
    repo.remove("tenants/charlie.yaml");
    let out = run(&repo, Some(&db), &["plan", "--worktree", "--format", "markdown"]);
    assert_eq!(out.code, 2, "{}", out.all());
    let got = out.stdout.replace(&tenant_recipient(), "<tenant-key>");
    let path = fixtures().join("plan-snapshot.md");
    if std::env::var_os("FROSTBYTE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("snapshot missing: run with FROSTBYTE_UPDATE_SNAPSHOTS=1 and review it");
    assert_eq!(
        got, want,
        "the markdown plan changed; review it and update the snapshot with FROSTBYTE_UPDATE_SNAPSHOTS=1"
    );
}

#[test]
fn production_mode_needs_a_database_url_to_sync() {
    let (repo, _db) = three_tenants();
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_MODE", "production").env("FROSTBYTE_VERIFY_COMMITS", "off").arg("sync");
    let out = output(c);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("production mode needs a database: set FROSTBYTE_CONTROL_DB_URL"),
        "{}",
        out.stderr
    );
    assert!(!repo.path().join(".frostbyte/pgdata").exists(), "no local cluster in production");
}

/// Moves bravo to another plan in a new commit, and syncs.
fn sync_a_change_to_bravo(repo: &TestRepo, db: &TestDb) -> Out {
    let mut doc = tenant_doc("bravo");
    doc["config"]["plan"] = json!("starter");
    repo.put_tenant(&doc, Format::Json);
    repo.commit("bravo");
    sync(repo, db)
}

/// git lists `delta-eu.json` before `delta.toml` ('-' sorts before '.'), the rows come in the
/// other order: both are still known unchanged without a read.
#[test]
fn files_listed_out_of_their_tenant_ids_order_are_known_unchanged() {
    let (repo, db) = three_tenants();
    repo.put_tenant(&tenant_doc("delta-eu"), Format::Json);
    repo.put_tenant(&tenant_doc("delta"), Format::Toml);
    repo.commit("deltas");
    sync(&repo, &db);
    let out = sync_a_change_to_bravo(&repo, &db);
    assert!(out.stderr.contains("incremental read decrypting=1 unchanged=4"), "{}", out.stderr);
}

#[test]
fn a_sync_decrypts_only_what_changed_since_the_last_applied_commit() {
    let (repo, db) = three_tenants();
    sync(&repo, &db);
    let out = sync_a_change_to_bravo(&repo, &db);
    assert!(out.stderr.contains("incremental read decrypting=1 unchanged=2"), "{}", out.stderr);
    assert!(out.stdout.contains("0 created, 1 updated"), "{}", out.stdout);
    // A row changed by hand is read again even though its file did not change.
    db.exec("UPDATE tenants SET endpoints = '{}' WHERE tenant_id = 'alpha'");
    let out = sync(&repo, &db);
    assert!(out.stderr.contains("incremental read decrypting=1 unchanged=2"), "{}", out.stderr);
    assert_eq!(
        db.scalar("SELECT endpoints->>'api' AS a FROM tenants WHERE tenant_id = 'alpha'"),
        json!("https://alpha.api.example.com")
    );
    // A deleted row too.
    db.exec("DELETE FROM tenants WHERE tenant_id = 'charlie'");
    let out = sync(&repo, &db);
    assert!(out.stdout.contains("1 created"), "{}", out.stdout);
}

#[test]
fn a_remote_url_is_cloned_and_fetched_on_every_run() {
    let (origin, db) = three_tenants();
    let url = format!("file://{}", origin.path().display());
    let elsewhere = tempfile::tempdir().unwrap();
    let remote_run = |args: &[&str]| {
        let mut c = command(elsewhere.path(), Some(&db));
        c.env("FROSTBYTE_GITOPS_REPO", &url).args(args);
        output(c)
    };
    let out = remote_run(&["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("3 created"), "{}", out.stdout);
    assert!(elsewhere.path().join(".frostbyte/git-cache").is_dir(), "cloned into the cache");

    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("enterprise");
    origin.put_tenant(&doc, Format::Toml);
    let commit = origin.commit("upstream change");
    let out = remote_run(&["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("0 created, 1 updated"), "fetched: {}", out.stdout);
    assert_eq!(
        db.scalar("SELECT details->>'commit' AS c FROM audit_events ORDER BY event_seq DESC LIMIT 1"),
        json!(commit)
    );

    // --ref names a branch of the remote.
    let out = remote_run(&["plan", "--ref", "does-not-exist"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot resolve revision \"does-not-exist\""), "{}", out.stderr);
}

#[test]
fn the_incremental_read_follows_nested_files_and_ignores_the_rest_of_the_repository() {
    let (repo, db) = three_tenants();
    let nested = tenant_doc("delta");
    repo.write("tenants/eu/de/delta.yaml", encrypt(&nested, Format::Yaml));
    repo.commit("delta, nested");
    sync(&repo, &db);
    // The tenant directory did not change: nothing is decrypted.
    repo.write("docs/notes.md", "not a tenant");
    repo.commit("docs");
    let out = sync(&repo, &db);
    assert!(out.stderr.contains("incremental read decrypting=0 unchanged=4"), "{}", out.stderr);
    // A nested file's change is the one file read.
    let mut doc = nested.clone();
    doc["config"]["plan"] = json!("starter");
    repo.write("tenants/eu/de/delta.yaml", encrypt(&doc, Format::Yaml));
    repo.commit("delta starter");
    let out = sync(&repo, &db);
    assert!(out.stderr.contains("incremental read decrypting=1 unchanged=3"), "{}", out.stderr);
    assert!(out.stdout.contains("~ delta updated (1 -> 2)  tenants/eu/de/delta.yaml"), "{}", out.stdout);
    // Decoded before the lock was first taken: one round under it, one read of the index.
    assert_eq!(out.stderr.matches("incremental read").count(), 1, "{}", out.stderr);
    // A row edited by hand is found under the lock: its file is decoded in a second round.
    db.exec("UPDATE tenants SET config = jsonb_set(config, '{plan}', '\"free\"') WHERE tenant_id = 'alpha'");
    doc["config"]["plan"] = json!("pro");
    repo.write("tenants/eu/de/delta.yaml", encrypt(&doc, Format::Yaml));
    repo.commit("delta pro");
    let out = sync(&repo, &db);
    assert_eq!(out.stderr.matches("incremental read").count(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("incremental read decrypting=2 unchanged=2"), "{}", out.stderr);
    assert!(out.stdout.contains("~ alpha updated (1 -> 2)"), "{}", out.stdout);
    assert!(out.stdout.contains("~ delta updated (2 -> 3)"), "{}", out.stdout);
    // A file moved to another directory is read at its new path.
    repo.remove("tenants/eu/de/delta.yaml");
    repo.write("tenants/us/de/delta.yaml", encrypt(&doc, Format::Yaml));
    repo.commit("delta moves");
    let out = sync(&repo, &db);
    assert!(out.stderr.contains("incremental read decrypting=1 unchanged=3"), "{}", out.stderr);
}

#[test]
fn a_key_that_opens_nothing_fails_a_run_with_nothing_to_decrypt() {
    let (repo, db) = three_tenants();
    assert_eq!(sync(&repo, &db).code, 0);
    // The key rotated away: no new commit, so no file would be decrypted.
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), frostbyte_gitops::sops::AgeKeys::generate().0.secret_text()).unwrap();
    for args in [&["sync"][..], &["plan"], &["drift"]] {
        let mut c = command(repo.path(), Some(&db));
        c.env("SOPS_AGE_KEY_FILE", wrong.path()).args(args);
        let out = output(c);
        assert_eq!(out.code, 1, "{args:?}: {}", out.all());
        assert!(out.stderr.contains("open none of source default's files"), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(&wrong.path().display().to_string()),
            "{args:?}: the key file is named: {}",
            out.stderr
        );
    }
    assert_eq!(sync(&repo, &db).code, 0, "the right key still says no changes");
}

#[test]
fn a_last_applied_commit_beyond_a_shallow_clones_history_is_called_that() {
    let (repo, db) = three_tenants();
    assert_eq!(sync(&repo, &db).code, 0);
    for plan in ["enterprise", "starter"] {
        let mut doc = tenant_doc("alpha");
        doc["config"]["plan"] = json!(plan);
        repo.put_tenant(&doc, Format::Toml);
        repo.commit(plan);
    }
    let shallow = tempfile::tempdir().unwrap();
    let clone = std::process::Command::new("git")
        .args(["clone", "-q", "--depth", "1"])
        .arg(format!("file://{}", repo.path().display()))
        .arg(shallow.path().join("c"))
        .output()
        .unwrap();
    assert!(clone.status.success(), "{}", String::from_utf8_lossy(&clone.stderr));
    let mut c = command(repo.path(), Some(&db));
    c.env("FROSTBYTE_GITOPS_REPO", shallow.path().join("c")).arg("sync");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("shallow clone"), "{}", out.stderr);
    assert!(!out.stderr.contains("history was rewritten"), "{}", out.stderr);
}
