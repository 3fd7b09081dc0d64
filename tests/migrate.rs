//! `migrate` against a real PostgreSQL: the schema, idempotence, concurrency, append-only audit.

mod common;
use common::*;
use serde_json::json;

fn migrate(repo: &TestRepo, db: &TestDb) -> Out {
    let out = run(repo, Some(db), &["migrate"]);
    assert_eq!(out.code, 0, "{}", out.all());
    out
}

#[test]
fn creates_both_tables_with_their_columns_constraints_and_indexes() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    let out = migrate(&repo, &db);
    assert!(out.stdout.contains("001_tenant_registry.sql"), "{}", out.stdout);

    let columns = |table: &str| -> Vec<(String, String)> {
        db.rows(&format!(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position"
        ))
        .iter()
        .map(|r| (r["column_name"].as_str().unwrap().to_string(), r["data_type"].as_str().unwrap().to_string()))
        .collect()
    };
    let tenants: Vec<(&str, &str)> = vec![
        ("tenant_id", "text"),
        ("state", "text"),
        ("config", "jsonb"),
        ("config_version", "bigint"),
        ("created_at", "timestamp with time zone"),
        ("updated_at", "timestamp with time zone"),
        ("provisioning_started_at", "timestamp with time zone"),
        ("provisioned_at", "timestamp with time zone"),
        ("age_public_key", "text"),
        ("endpoints", "jsonb"),
    ];
    let got = columns("tenants");
    assert_eq!(got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>(), tenants);
    let audit: Vec<String> = columns("audit_events").into_iter().map(|c| c.0).collect();
    for c in ["event_id", "tenant_id", "event_type", "occurred_at", "actor", "details", "previous_event_id"] {
        assert!(audit.contains(&c.to_string()), "audit_events lacks {c}: {audit:?}");
    }
    assert_eq!(
        db.scalar("SELECT data_type FROM information_schema.columns WHERE table_name='audit_events' AND column_name='event_id'"),
        json!("uuid")
    );

    let indexes: Vec<String> = db
        .rows("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        .iter()
        .map(|r| r["indexname"].as_str().unwrap().to_string())
        .collect();
    for i in [
        "tenants_pkey",
        "tenants_state_idx",
        "tenants_created_at_idx",
        "audit_events_pkey",
        "audit_events_tenant_time_idx",
        "audit_events_type_time_idx",
    ] {
        assert!(indexes.contains(&i.to_string()), "missing index {i}: {indexes:?}");
    }

    // The CHECKs do their job.
    let key = tenant_recipient();
    let insert = |id: &str, state: &str, key: &str| {
        db.try_exec(&format!(
            "INSERT INTO tenants (tenant_id, state, age_public_key) VALUES ('{id}', '{state}', '{key}')"
        ))
    };
    assert!(insert("Bad_Id", "pending", &key).unwrap_err().contains("tenants_tenant_id_dns_label"));
    assert!(insert("ab", "pending", &key).is_err());
    assert!(insert("good-id", "archived", &key).unwrap_err().contains("tenants_state_lifecycle"));
    assert!(
        insert("good-id", "pending", "age1notakey")
            .unwrap_err()
            .contains("tenants_age_public_key_x25519")
    );
    // Migration 009 rewrote two checks for speed: they accept exactly what the first ones did.
    let long = "a".repeat(61);
    let k = &key[4..];
    let ids = [
        "abc",
        "ab",
        "a",
        "a-b",
        "-ab",
        "ab-",
        "a--b",
        "Abc",
        "a_b",
        "a.b",
        "0-9",
        "abc\\n",
        &format!("a{long}b"),
        &format!("a{long}bc"),
    ];
    let keys = [
        key.clone(),
        format!("age1{}", &k[1..]),
        format!("{key}q"),
        format!("age1{}", k.to_uppercase()),
        format!("age2{k}"),
        format!("age1b{}", &k[1..]),
        format!("age1{k}\\n"),
    ];
    let first = |v: &str, pattern: &str| db.scalar(&format!("SELECT E'{v}' ~ '{pattern}' AS m")) == json!(true);
    let accepts = |id: &str, key: &str| {
        db.try_exec(&format!("INSERT INTO tenants (tenant_id, age_public_key) VALUES (E'{id}', E'{key}')"))
            .is_ok()
    };
    for id in ids {
        let accepted = accepts(id, &key);
        assert_eq!(accepted, first(id, "^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"), "tenant_id {id:?}");
        db.exec("DELETE FROM tenants");
    }
    for k in &keys {
        let accepted = accepts("key-test", k);
        assert_eq!(accepted, first(k, "^age1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{58}$"), "age_public_key {k:?}");
        db.exec("DELETE FROM tenants");
    }
    db.exec(&format!("INSERT INTO tenants (tenant_id, age_public_key) VALUES ('good-id', '{key}')"));
    assert_eq!(db.scalar("SELECT state FROM tenants"), json!("pending"));
    assert_eq!(db.scalar("SELECT config_version FROM tenants"), json!(0));

    // updated_at moves on a real change only.
    db.exec(
        "ALTER TABLE tenants DISABLE TRIGGER tenants_touch_updated_at;
         UPDATE tenants SET updated_at = '2000-01-01' WHERE tenant_id = 'good-id';
         ALTER TABLE tenants ENABLE TRIGGER tenants_touch_updated_at;",
    );
    db.exec("UPDATE tenants SET state = state WHERE tenant_id = 'good-id'");
    assert_eq!(
        db.count("SELECT 1 FROM tenants WHERE updated_at = '2000-01-01'"),
        1,
        "a no-op update must not touch updated_at"
    );
    db.exec("UPDATE tenants SET state = 'active' WHERE tenant_id = 'good-id'");
    assert_eq!(db.count("SELECT 1 FROM tenants WHERE updated_at > now() - interval '1 minute'"), 1);
}

#[test]
fn a_second_run_changes_nothing() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    migrate(&repo, &db);
    let before = db.rows("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version");
    assert_eq!(before.len(), frostbyte_gitops::store::MIGRATIONS.len());
    let out = migrate(&repo, &db);
    assert!(out.stdout.contains("nothing to apply"), "{}", out.stdout);
    assert_eq!(db.rows("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version"), before);
}

#[test]
fn two_concurrent_runs_both_succeed_and_apply_each_migration_once() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    let outs = run_concurrently(&repo, &db, &["migrate"], 2);
    for o in &outs {
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    assert_eq!(db.count("SELECT * FROM schema_migrations"), frostbyte_gitops::store::MIGRATIONS.len() as i64);
    let applied: Vec<String> = outs.iter().map(|o| o.stdout.clone()).collect();
    assert_eq!(applied.iter().filter(|s| s.contains("Applied migrations")).count(), 1, "{applied:?}");
}

#[test]
fn audit_events_refuse_update_delete_and_truncate() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    migrate(&repo, &db);
    db.exec("SELECT emit_audit_event('acme', 'TENANT_CREATED', 'test', '{\"k\": 1}')");
    db.exec("SELECT emit_audit_event('acme', 'TENANT_CONFIG_UPDATED', 'test', '{}')");
    db.exec("SELECT emit_audit_event('acme', 'TENANT_CONFIG_UPDATED', 'test', '{}')");
    for sql in ["UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events", "TRUNCATE audit_events"] {
        let err = db.try_exec(sql).unwrap_err();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(db.count("SELECT * FROM audit_events WHERE actor = 'test'"), 3);
    // Config events chain; lifecycle events do not.
    assert_eq!(
        db.count("SELECT * FROM audit_events WHERE event_type = 'TENANT_CREATED' AND previous_event_id IS NULL"),
        1
    );
    assert_eq!(
        db.count("SELECT * FROM audit_events WHERE event_type = 'TENANT_CONFIG_UPDATED' AND previous_event_id IS NULL"),
        1
    );
    assert_eq!(
        db.count("SELECT * FROM audit_events a JOIN audit_events b ON a.previous_event_id = b.event_id WHERE b.event_type = 'TENANT_CONFIG_UPDATED'"),
        1
    );
    assert!(db.try_exec("SELECT emit_audit_event('acme', 'TENANT_EXPLODED', 'test', '{}')").is_err());
}

#[test]
fn a_changed_migration_is_refused() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    migrate(&repo, &db);
    db.exec("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 2");
    let out = run(&repo, Some(&db), &["migrate"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("migration 002_audit_events.sql was changed after it was applied"),
        "{}",
        out.stderr
    );
}

#[test]
fn production_mode_refuses_an_unmigrated_database() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("acme"), frostbyte_gitops::sops::Format::Toml);
    repo.commit("one tenant");
    let mut c = command(repo.path(), Some(&db));
    c.env("FROSTBYTE_MODE", "production").env("FROSTBYTE_VERIFY_COMMITS", "off").arg("sync");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("not migrated"), "{}", out.stderr);
}

/// Runs one statement as `role` on `db`, returning the server's message on failure.
fn as_role(db: &TestDb, role: &str, sql: &str) -> Result<(), String> {
    let url = format!("{} user={role}", db.url);
    let sql = sql.to_string();
    block_on(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        c.batch_execute(&sql)
            .await
            .map_err(|e| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()))
    })
}

#[test]
fn the_app_role_syncs_but_cannot_touch_the_audit_trail() {
    let db = TestDb::new();
    let role = format!("app_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    db.exec(&format!("CREATE ROLE {role} LOGIN"));
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), frostbyte_gitops::sops::Format::Toml);
    repo.commit("alpha");

    let out = run(&repo, Some(&db), &["migrate", "--app-role", &role]);
    assert_eq!(out.code, 0, "{}", out.all());
    // The agent, connected as the app role, syncs.
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_CONTROL_DB_URL", format!("{} user={role}", db.url)).arg("sync");
    let sync = output(c);
    assert_eq!(sync.code, 0, "{}", sync.all());
    assert_eq!(db.count("SELECT 1 FROM audit_events"), 2);

    for forbidden in [
        "INSERT INTO audit_events (tenant_id, event_type, actor, prev_hash, chain_hash) VALUES ('alpha', 'TENANT_CREATED', 'me', '\\x00', '\\x00')",
        "UPDATE audit_events SET actor = 'someone else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",
        "DROP TRIGGER audit_events_no_update_delete ON audit_events",
        "SET session_replication_role = replica",
        "UPDATE audit_chain_head SET last_seq = 0",
        "CREATE TABLE mine (x int)",
        "CREATE OR REPLACE FUNCTION emit_audit_event(text, text, text, jsonb) RETURNS uuid LANGUAGE sql AS 'SELECT gen_random_uuid()'",
        "DELETE FROM tenants",
    ] {
        let r = as_role(&db, &role, forbidden);
        assert!(r.is_err(), "the app role may: {forbidden}");
    }
    assert_eq!(db.count("SELECT 1 FROM audit_events"), 2);

    // A superuser in replica mode still meets the triggers.
    let err = db
        .try_exec("SET session_replication_role = replica; UPDATE audit_events SET actor = 'x'")
        .unwrap_err();
    assert!(err.contains("append-only"), "{err}");

    // Refused: a role that owns something, and the migrating role itself.
    db.exec(&format!("CREATE TABLE owned_by_app (x int); ALTER TABLE owned_by_app OWNER TO {role}"));
    let out = run(&repo, Some(&db), &["migrate", "--app-role", &role]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("owns 1 table"), "{}", out.stderr);
    let out = run(&repo, Some(&db), &["migrate", "--app-role", "postgres"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("running the migrations"), "{}", out.stderr);
}
