//! Many sources: two repositories, three sources (two of them paths of one repository), nested
//! tenant files, ownership, per-source orphans and prune, against a real PostgreSQL.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use serde_json::{Value, json};

struct Fleet {
    /// Sources `eu` (tenants/eu) and `us` (tenants/us).
    regions: TestRepo,
    /// Source `platform` (tenants), with prune on.
    platform: TestRepo,
    db: TestDb,
    config: tempfile::NamedTempFile,
}

fn put(repo: &TestRepo, rel: &str, id: &str, format: Format) {
    repo.write(rel, encrypt(&tenant_doc(id), format));
}

fn fleet(prune_max_fraction: f64) -> Fleet {
    let (regions, platform, db) = (TestRepo::new(), TestRepo::new(), TestDb::new());
    put(&regions, "tenants/eu/ac/acme.toml", "acme", Format::Toml);
    put(&regions, "tenants/eu/bo/bolt.json", "bolt", Format::Json);
    put(&regions, "tenants/us/cargo.yaml", "cargo", Format::Yaml);
    regions.commit("regions");
    for id in ["delta", "echo", "foxtrot", "golf"] {
        put(&platform, &format!("tenants/{id}.toml"), id, Format::Toml);
    }
    platform.commit("platform");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[[sources]]\nname = \"eu\"\nrepo = {r:?}\npath = \"tenants/eu\"\n\n[[sources]]\nname = \"us\"\nrepo = {r:?}\npath = \"tenants/us\"\n\n\
             [[sources]]\nname = \"platform\"\nrepo = {p:?}\npath = \"tenants\"\nprune = true\nprune_max_fraction = {prune_max_fraction}\n",
            r = regions.path().display().to_string(),
            p = platform.path().display().to_string(),
        ),
    )
    .unwrap();
    Fleet { regions, platform, db, config }
}

impl Fleet {
    fn run(&self, args: &[&str]) -> Out {
        let mut c = command(self.regions.path(), Some(&self.db));
        c.env("FROSTBYTE_CONFIG", self.config.path()).args(args);
        output(c)
    }

    fn owners(&self) -> Vec<(String, String)> {
        self.db
            .rows("SELECT tenant_id, source_name FROM gitops_owners ORDER BY tenant_id")
            .iter()
            .map(|r| {
                (
                    r["tenant_id"].as_str().unwrap().to_string(),
                    r["source_name"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn version(&self, id: &str) -> Value {
        self.db.scalar(&format!("SELECT config_version FROM tenants WHERE tenant_id = '{id}'"))
    }

    fn state(&self, id: &str) -> Value {
        self.db.scalar(&format!("SELECT state FROM tenants WHERE tenant_id = '{id}'"))
    }
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn each_source_owns_what_it_created_and_a_claim_from_another_is_refused() {
    let f = fleet(0.5);
    let out = f.run(&["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    for name in ["=== source eu ===", "=== source us ===", "=== source platform ==="] {
        assert!(out.stdout.contains(name), "{}", out.stdout);
    }
    assert_eq!(
        f.owners(),
        owned(&[
            ("acme", "eu"),
            ("bolt", "eu"),
            ("cargo", "us"),
            ("delta", "platform"),
            ("echo", "platform"),
            ("foxtrot", "platform"),
            ("golf", "platform")
        ])
    );
    let file =
        f.db.scalar("SELECT details->>'file' AS f FROM audit_events WHERE tenant_id = 'acme' AND event_type = 'TENANT_CONFIG_UPDATED'");
    assert_eq!(file, json!("tenants/eu/ac/acme.toml"), "nested files are tenants; the stem is the id");

    // platform claims acme, which eu owns; in the same round us changes cargo and platform adds hotel.
    put(&f.platform, "tenants/acme.toml", "acme", Format::Toml);
    put(&f.platform, "tenants/hotel.toml", "hotel", Format::Toml);
    f.platform.commit("claim acme");
    let mut cargo = tenant_doc("cargo");
    cargo["config"]["plan"] = json!("enterprise");
    f.regions.write("tenants/us/cargo.yaml", encrypt(&cargo, Format::Yaml));
    f.regions.commit("cargo goes enterprise");
    let out = f.run(&["sync"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let refusal = out
        .stderr
        .lines()
        .find(|l| l.contains("claims it too"))
        .unwrap_or_else(|| panic!("{}", out.all()));
    for needle in ["tenants/acme.toml", "belongs to source eu", "tenants/eu/ac/acme.toml", "source platform"] {
        assert!(refusal.contains(needle), "{needle:?} missing in {refusal}");
    }
    assert!(out.stderr.contains("error: source platform:"), "{}", out.stderr);
    assert_eq!(f.version("cargo"), json!(2), "a failing source does not hold back the others");
    assert_eq!(
        f.db.count("SELECT 1 FROM tenants WHERE tenant_id = 'hotel'"),
        0,
        "the refused source applied nothing"
    );
    assert_eq!(f.version("acme"), json!(1));
    assert_eq!(f.owners()[0], ("acme".into(), "eu".into()));

    // --source limits a run to one source; the others are not even read.
    let plan = f.run(&["plan", "--source", "us"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(!plan.stdout.contains("=== source"), "one source reads as before: {}", plan.stdout);
    assert_eq!(f.run(&["plan", "--source", "nope"]).code, 1);
}

#[test]
fn orphans_are_per_source_and_a_move_is_explicit_and_audited() {
    let f = fleet(0.5);
    assert_eq!(f.run(&["sync"]).code, 0);
    f.regions.remove("tenants/eu/bo/bolt.json");
    f.regions.commit("bolt leaves eu");
    let eu = f.run(&["drift", "--source", "eu"]);
    assert_eq!(eu.code, 2, "{}", eu.all());
    assert!(eu.stdout.contains("bolt"), "{}", eu.stdout);
    let us = f.run(&["drift", "--source", "us"]);
    assert_eq!(us.code, 0, "bolt is eu's orphan, not us's: {}", us.all());
    let platform = f.run(&["drift", "--source", "platform", "--format", "json"]);
    assert_eq!(platform.code, 0, "{}", platform.all());
    assert!(!platform.stdout.contains("bolt"), "{}", platform.stdout);

    // Moving acme to platform: the file moves repository, the tenant keeps its row and history.
    let moved = f.run(&["tenant", "move", "acme", "--to", "platform"]);
    assert_eq!(moved.code, 0, "{}", moved.all());
    let event =
        f.db.scalar("SELECT details FROM audit_events WHERE tenant_id = 'acme' AND event_type = 'TENANT_SOURCE_CHANGED'");
    assert_eq!(event["from_file"], json!("tenants/eu/ac/acme.toml"));
    assert_eq!(event["to_source_name"], json!("platform"));
    let mut acme = tenant_doc("acme");
    acme["config"]["plan"] = json!("enterprise");
    f.platform.write("tenants/acme.toml", encrypt(&acme, Format::Toml));
    f.platform.commit("acme moves here");
    f.regions.remove("tenants/eu/ac/acme.toml");
    f.regions.commit("acme moved out");
    let out = f.run(&["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(f.version("acme"), json!(2));
    assert_eq!(f.owners()[0], ("acme".into(), "platform".into()));
    assert_eq!(f.state("acme"), json!("pending"), "moved, not pruned");
    let again = f.run(&["tenant", "move", "acme", "--to", "platform"]);
    assert_eq!(again.code, 1, "{}", again.all());
    assert!(again.stderr.contains("already belongs to source platform"), "{}", again.stderr);
}

#[test]
fn the_same_tenant_id_twice_anywhere_in_a_source_is_refused() {
    let f = fleet(0.5);
    put(&f.regions, "tenants/eu/zz/acme.json", "acme", Format::Json);
    f.regions.commit("a second acme");
    let out = f.run(&["validate", "--source", "eu"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("tenants/eu/ac/acme.toml") && out.stdout.contains("tenants/eu/zz/acme.json") && out.stdout.contains("duplicate tenant_id"),
        "{}",
        out.stdout
    );
    assert_eq!(f.run(&["validate", "--source", "us"]).code, 0);
}

#[test]
fn prune_decommissions_deleted_tenants_within_the_safety_limit() {
    let f = fleet(0.3);
    assert_eq!(f.run(&["sync"]).code, 0);
    f.platform.remove("tenants/delta.toml");
    let commit = f.platform.commit("delta is gone");
    let plan = f.run(&["plan", "--source", "platform"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(
        plan.stdout.contains("- delta will be decommissioned (its file tenants/delta.toml was deleted)"),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("1 to decommission"), "{}", plan.stdout);
    let out = f.run(&["sync", "--source", "platform"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(f.state("delta"), json!("decommissioning"));
    assert_eq!(f.db.count("SELECT 1 FROM tenants WHERE tenant_id = 'delta'"), 1, "never deleted");
    let event =
        f.db.scalar("SELECT details FROM audit_events WHERE tenant_id = 'delta' AND event_type = 'TENANT_DECOMMISSION_REQUESTED'");
    assert_eq!(event["commit"], json!(commit));
    assert_eq!(event["file"], json!("tenants/delta.toml"));
    assert!(event["source"].as_str().unwrap().ends_with("#tenants"), "{event}");
    assert_eq!(f.run(&["sync", "--source", "platform"]).code, 0, "already decommissioning: nothing more to do");
    assert_eq!(f.db.count("SELECT 1 FROM audit_events WHERE event_type = 'TENANT_DECOMMISSION_REQUESTED'"), 1);

    // The directory emptied: every remaining tenant would go. Refused with the counts.
    for id in ["echo", "foxtrot", "golf"] {
        f.platform.remove(&format!("tenants/{id}.toml"));
    }
    f.platform.commit("oops: everything deleted");
    let out = f.run(&["sync", "--source", "platform"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("would decommission 3 of its 4 tenant(s)"), "{}", out.stderr);
    assert!(out.stderr.contains("--allow-mass-prune"), "{}", out.stderr);
    assert_eq!(f.db.count("SELECT 1 FROM tenants WHERE state = 'decommissioning'"), 1, "nothing applied");
    let out = f.run(&["sync", "--source", "platform", "--allow-mass-prune"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(f.db.count("SELECT 1 FROM tenants WHERE state = 'decommissioning'"), 4);

    // Without prune, a deleted file leaves an orphan, state untouched.
    f.regions.remove("tenants/us/cargo.yaml");
    f.regions.commit("cargo is gone");
    let out = f.run(&["sync", "--source", "us"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("1 orphaned tenant(s) left alone"), "{}", out.stdout);
    assert_eq!(f.state("cargo"), json!("pending"));
}

/// Another source claims a tenant between this run's plan and its writes: a trigger gives the
/// owner row this run inserts to another source, as a concurrent claim would leave it. The run
/// fails naming the owner, and none of the source's tenants is written.
#[test]
fn a_tenant_another_source_claims_while_the_run_writes_fails_the_run() {
    let f = fleet(0.5);
    let migrated = f.run(&["migrate"]);
    assert_eq!(migrated.code, 0, "{}", migrated.all());
    f.db.exec(
        "CREATE FUNCTION claimed_meanwhile() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.tenant_id = 'golf' THEN NEW.source := 'elsewhere'; NEW.source_name := 'elsewhere'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER claimed_meanwhile BEFORE INSERT ON gitops_owners FOR EACH ROW EXECUTE FUNCTION claimed_meanwhile()",
    );
    let out = f.run(&["sync"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("golf") && out.stderr.contains("belongs to source elsewhere"),
        "{}",
        out.all()
    );
    let platform = "tenant_id IN ('delta', 'echo', 'foxtrot', 'golf')";
    for table in ["tenants", "audit_events", "gitops_owners", "gitops_applied"] {
        let rows = f.db.rows(&format!("SELECT tenant_id FROM {table} WHERE {platform}"));
        assert!(rows.is_empty(), "{table}: {rows:?}");
    }
}

#[test]
fn entries_the_walk_cannot_read_are_problems_and_stop_a_pruning_run() {
    let f = fleet(1.0);
    put(&f.platform, "tenants/shard/hotel.toml", "hotel", Format::Toml);
    f.platform.commit("a sharded tenant");
    assert_eq!(f.run(&["sync", "--source", "platform"]).code, 0);

    // The shard directory replaced by a link to a directory elsewhere; a tenant file whose
    // extension has another case; one with a trailing space; one in a hidden directory; a stray file.
    std::fs::remove_dir_all(f.platform.path().join("tenants/shard")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", f.platform.path().join("tenants/shard")).unwrap();
    f.platform.remove("tenants/delta.toml");
    put(&f.platform, "tenants/delta.TOML", "delta", Format::Toml);
    f.platform.remove("tenants/echo.toml");
    put(&f.platform, "tenants/echo.toml ", "echo", Format::Toml);
    f.platform.remove("tenants/foxtrot.toml");
    put(&f.platform, "tenants/.old/foxtrot.toml", "foxtrot", Format::Toml);
    f.platform.write("tenants/golf.toml.bak", "kept by an editor");
    f.platform.write("tenants/NOTES.md", "notes for people are fine");
    f.platform.commit("entries nothing reads");

    let out = f.run(&["validate", "--source", "platform"]);
    assert_eq!(out.code, 1, "{}", out.all());
    for (path, why) in [
        ("tenants/shard", "symbolic link"),
        ("tenants/delta.TOML", "extension .TOML"),
        ("tenants/echo.toml ", "white space"),
        ("tenants/.old", "hidden directory"),
        ("tenants/golf.toml.bak", "not a tenant file"),
    ] {
        assert!(
            out.stdout.lines().any(|l| l.contains(path) && l.contains(why)),
            "{path} not reported as {why:?}: {}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains("NOTES.md"), "{}", out.stdout);

    let out = f.run(&["sync", "--source", "platform"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("nothing was applied"), "{}", out.all());
    assert_eq!(
        f.db.count("SELECT 1 FROM tenants WHERE state = 'decommissioning'"),
        0,
        "a walk that met such entries pruned"
    );
    assert_eq!(f.db.count("SELECT 1 FROM audit_events WHERE event_type = 'TENANT_DECOMMISSION_REQUESTED'"), 0);
}

#[test]
fn a_repository_spelled_another_way_keeps_its_tenants_and_another_repository_is_said_once() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    for id in ["alpha", "bravo", "charlie"] {
        put(&repo, &format!("tenants/{id}.toml"), id, Format::Toml);
    }
    repo.commit("three");
    let with_repo = |spelled: &str, args: &[&str]| {
        let mut c = command(repo.path(), Some(&db));
        c.env("FROSTBYTE_GITOPS_REPO", spelled).args(args);
        output(c)
    };
    let path = repo.path().display().to_string();
    assert_eq!(with_repo(&path, &["sync"]).code, 0);
    // The same repository as a file:// URL: the same source, nothing to do.
    let out = with_repo(&format!("file://{path}"), &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("No changes"), "{}", out.stdout);
    let sources = db.rows("SELECT DISTINCT source FROM gitops_owners");
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert!(sources[0]["source"].as_str().unwrap().starts_with("file://"), "{sources:?}");
    assert_eq!(with_repo(&path, &["sync"]).code, 0, "and back");

    // Another repository under the same name, with the same tenants: one message, not three.
    let other = TestRepo::new();
    for id in ["alpha", "bravo", "charlie"] {
        put(&other, &format!("tenants/{id}.toml"), id, Format::Toml);
    }
    other.commit("the same tenants elsewhere");
    let out = with_repo(&other.path().display().to_string(), &["sync"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.stderr.matches("source default now reads").count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("3 of its tenants") && out.stderr.contains("tenant move"), "{}", out.stderr);
}
