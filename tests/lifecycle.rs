//! `transition_tenant_state`, the one way a tenant's state changes: every legal and illegal
//! transition, its timestamps and event, concurrency, the CLI, and that git never touches state.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use serde_json::json;

fn synced() -> (TestRepo, TestDb) {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    (repo, db)
}

fn state(repo: &TestRepo, db: &TestDb, to: &str) -> Out {
    run(repo, Some(db), &["tenant", "state", "alpha", to, "--reason", "provisioner says so"])
}

const STATES: [&str; 6] = ["pending", "provisioning", "active", "suspended", "decommissioning", "decommissioned"];

fn legal(from: &str, to: &str) -> Option<&'static str> {
    match (from, to) {
        ("pending", "provisioning") => Some("TENANT_PROVISION_STARTED"),
        ("provisioning", "active") => Some("TENANT_PROVISIONED"),
        ("active", "suspended") => Some("TENANT_SUSPENDED"),
        ("suspended", "active") => Some("TENANT_RESUMED"),
        (f, "decommissioning") if f != "decommissioning" && f != "decommissioned" => Some("TENANT_DECOMMISSION_REQUESTED"),
        ("decommissioning", "decommissioned") => Some("TENANT_DECOMMISSIONED"),
        _ => None,
    }
}

#[test]
fn every_transition_is_allowed_or_refused_as_documented() {
    let db = TestDb::new();
    let repo = TestRepo::new();
    assert_eq!(run(&repo, Some(&db), &["migrate"]).code, 0);
    let key = tenant_recipient();
    for from in STATES {
        for to in STATES {
            db.exec(&format!(
                "DELETE FROM tenants; INSERT INTO tenants (tenant_id, state, age_public_key) VALUES ('alpha', '{from}', '{key}')"
            ));
            let events_before = db.count("SELECT 1 FROM audit_events");
            let result = db.try_exec(&format!("SELECT transition_tenant_state('alpha', '{to}', 'test', '{{}}')"));
            let now = db.scalar("SELECT state AS s FROM tenants");
            match legal(from, to) {
                Some(event) => {
                    assert!(result.is_ok(), "{from} -> {to}: {result:?}");
                    assert_eq!(now, json!(to), "{from} -> {to}");
                    let e = db.rows("SELECT event_type, previous_event_id, details FROM audit_events ORDER BY event_seq DESC LIMIT 1");
                    assert_eq!(e[0]["event_type"], json!(event), "{from} -> {to}");
                    assert_eq!(e[0]["previous_event_id"], json!(null), "lifecycle events are not chained to config events");
                    assert_eq!(e[0]["details"]["from_state"], json!(from));
                }
                None => {
                    let err = result.unwrap_err();
                    assert!(err.contains(&format!("from {from} to {to} is not allowed")), "{from} -> {to}: {err}");
                    assert_eq!(now, json!(from), "a refused transition changed the state");
                    assert_eq!(db.count("SELECT 1 FROM audit_events"), events_before, "a refused transition wrote an event");
                }
            }
        }
    }
}

#[test]
fn the_cli_walks_the_lifecycle_with_timestamps_and_git_never_touches_state() {
    let (repo, db) = synced();
    assert!(db.scalar("SELECT provisioning_started_at AS t FROM tenants").is_null());
    let out = state(&repo, &db, "provisioning");
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(!db.scalar("SELECT provisioning_started_at AS t FROM tenants").is_null());
    assert!(db.scalar("SELECT provisioned_at AS t FROM tenants").is_null());
    assert_eq!(state(&repo, &db, "active").code, 0);
    assert!(!db.scalar("SELECT provisioned_at AS t FROM tenants").is_null());
    assert_eq!(
        db.scalar("SELECT details->>'reason' AS r FROM audit_events WHERE event_type = 'TENANT_PROVISIONED'"),
        json!("provisioner says so")
    );

    let refused = state(&repo, &db, "provisioning");
    assert_eq!(refused.code, 1, "{}", refused.all());
    assert!(refused.stderr.contains("from active to provisioning is not allowed"), "{}", refused.stderr);

    // Git does not own state: no plan, drift or sync sees it, even a full one.
    let plan = run(&repo, Some(&db), &["plan"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert_eq!(run(&repo, Some(&db), &["drift", "--full"]).code, 0);
    assert_eq!(run(&repo, Some(&db), &["sync", "--full"]).code, 0);
    assert_eq!(db.scalar("SELECT state AS s FROM tenants"), json!("active"));
    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("a config change");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    assert_eq!(db.scalar("SELECT state AS s FROM tenants"), json!("active"));
    assert_eq!(run(&repo, Some(&db), &["audit", "verify"]).code, 0, "lifecycle events keep the chain intact");
}

#[test]
fn two_concurrent_transitions_of_one_tenant_serialise() {
    let (repo, db) = synced();
    let outs = run_concurrently(&repo, &db, &["tenant", "state", "alpha", "provisioning"], 2);
    let codes: Vec<i32> = outs.iter().map(|o| o.code).collect();
    assert!(
        codes.contains(&0) && codes.contains(&1),
        "{codes:?}: {:?}",
        outs.iter().map(|o| o.all()).collect::<Vec<_>>()
    );
    let loser = outs.iter().find(|o| o.code == 1).unwrap();
    assert!(loser.stderr.contains("from provisioning to provisioning is not allowed"), "{}", loser.stderr);
    assert_eq!(db.count("SELECT 1 FROM audit_events WHERE event_type = 'TENANT_PROVISION_STARTED'"), 1);
}

#[test]
fn an_unknown_tenant_is_named() {
    let (repo, db) = synced();
    let out = run(&repo, Some(&db), &["tenant", "state", "nobody", "active"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("tenant nobody does not exist"), "{}", out.stderr);
}

#[test]
fn an_unknown_state_is_named_with_the_states_there_are() {
    let (repo, db) = synced();
    let out = run(&repo, Some(&db), &["tenant", "state", "alpha", "bogus"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr
            .contains("unknown state \"bogus\" (one of: pending, provisioning, active, suspended, decommissioning, decommissioned)"),
        "{}",
        out.stderr
    );
}

/// A sync plans the tenants it creates as it writes them, the rest before: what it reports having
/// applied is, tenant by tenant, what `plan` said it would do.
#[test]
fn a_sync_applies_what_its_plan_said_creates_and_updates_alike() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.put_tenant(&tenant_doc("delta"), Format::Yaml);
    repo.commit("two tenants");
    assert_eq!(run(&repo, Some(&db), &["sync"]).code, 0);
    let mut changed = tenant_doc("alpha");
    changed["config"]["plan"] = json!("enterprise");
    changed["config"]["secrets"]["api_key"] = json!("rotated-k3y");
    repo.put_tenant(&changed, Format::Toml);
    let mut own = tenant_doc("bravo");
    own["config"]["embedding"] = json!({"endpoint": "https://embed.bravo.example/v1", "model": "e5-small"});
    repo.put_tenant(&own, Format::Json);
    repo.put_tenant(&tenant_doc("charlie"), Format::Yaml);
    repo.commit("alpha changed, bravo and charlie added");
    let json = |args: &[&str], code: i32| {
        let mut c = command(repo.path(), Some(&db));
        c.env("FROSTBYTE_EMBEDDING_ENDPOINT", "https://embed.platform.example/v1")
            .args(args)
            .args(["--format", "json"]);
        let out = output(c);
        assert_eq!(out.code, code, "{}", out.all());
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()
    };
    let planned = json(&["plan"], 2);
    let applied = json(&["sync"], 0);
    assert_eq!(
        applied["summary"],
        json!({"create": 2, "update": 1, "unchanged": 1, "orphaned": 0, "conflict": 0, "decommission": 0})
    );
    assert_eq!(applied["tenants"], planned["tenants"]);
    let ids: Vec<&str> = applied["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "bravo", "charlie", "delta"]);
    assert_eq!(applied["tenants"][1]["embedding_endpoint"]["from"], json!("tenant_file"));
    assert!(!applied.to_string().contains("rotated-k3y"));
    // Events in tenant order, as before creates were planned while written.
    let events: Vec<String> = db
        .rows("SELECT tenant_id || ' ' || event_type AS e FROM audit_events WHERE event_seq > 4 ORDER BY event_seq")
        .into_iter()
        .map(|r| r["e"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        events,
        [
            "alpha TENANT_CONFIG_UPDATED",
            "bravo TENANT_CREATED",
            "bravo TENANT_CONFIG_UPDATED",
            "charlie TENANT_CREATED",
            "charlie TENANT_CONFIG_UPDATED"
        ]
    );
}

#[test]
fn a_plan_says_which_embedding_endpoint_serves_each_tenant_and_the_default_is_not_written() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    let mut own = tenant_doc("bravo");
    own["config"]["embedding"] = json!({"endpoint": "https://embed.bravo.example/v1", "model": "e5-small"});
    repo.put_tenant(&own, Format::Json);
    repo.commit("two tenants");
    let with_default = |args: &[&str]| {
        let mut c = command(repo.path(), Some(&db));
        c.env("FROSTBYTE_EMBEDDING_ENDPOINT", "https://embed.platform.example/v1").args(args);
        output(c)
    };
    let plan = with_default(&["plan"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(
        plan.stdout
            .contains("embedding endpoint: https://embed.platform.example/v1 (the platform default, resolved by readers)"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("embedding endpoint: https://embed.bravo.example/v1 (from the tenant file)"),
        "{}",
        plan.stdout
    );
    let json_plan: serde_json::Value = serde_json::from_str(&with_default(&["plan", "--format", "json"]).stdout).unwrap();
    assert_eq!(
        json_plan["tenants"][0]["embedding_endpoint"],
        json!({"value": "https://embed.platform.example/v1", "from": "platform_default"})
    );
    assert_eq!(with_default(&["sync"]).code, 0);
    assert_eq!(
        db.scalar("SELECT config ? 'embedding' AS e FROM tenants WHERE tenant_id = 'alpha'"),
        json!(false)
    );
    let config = with_default(&["config"]);
    assert!(
        config.stdout.contains("embedding_endpoint") && config.stdout.contains("https://embed.platform.example/v1"),
        "{}",
        config.stdout
    );
}
