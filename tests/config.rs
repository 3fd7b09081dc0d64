//! `config` through the binary: flag > environment > file > default, secrets masked, errors together.

mod common;
use common::*;

#[test]
fn config_shows_each_value_and_where_it_came_from() {
    let repo = TestRepo::new();
    let file = repo.path().join("frostbyte.toml");
    std::fs::write(&file, "path = \"from-file\"\nref = \"release\"\ndrift_policy = \"warn\"\ninterval = 30\n").unwrap();
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_CONTROL_DB_URL", "postgres://agent:hunter2@db.internal:5432/registry")
        .env("SOPS_AGE_KEY", "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ")
        .env("FROSTBYTE_GITOPS_REF", "main")
        .args(["--config", file.to_str().unwrap(), "--path", "from-flag", "config"]);
    let out = output(c);
    assert_eq!(out.code, 0, "{}", out.all());
    let line = |key: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in {}", out.stdout))
            .to_string()
    };
    assert!(line("path").contains("from-flag") && line("path").ends_with("(flag)"));
    assert!(line("ref").contains("main") && line("ref").ends_with("(env FROSTBYTE_GITOPS_REF)"));
    assert!(line("drift_policy").contains("warn") && line("drift_policy").ends_with("(config file)"));
    assert!(line("interval").contains("30") && line("interval").ends_with("(config file)"));
    assert!(line("mode").ends_with("(default)"));
    assert!(line("database_url").contains("postgres://agent:****@db.internal:5432/registry"));
    assert!(line("age_key").contains("(set, hidden)"));
    assert!(!out.all().contains("hunter2") && !out.all().contains("AGE-SECRET-KEY"), "{}", out.all());
}

#[test]
fn every_invalid_setting_is_named_in_one_error() {
    let repo = TestRepo::new();
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_MODE", "staging")
        .env("FROSTBYTE_LOG_FORMAT", "xml")
        .args(["--drift-policy", "ignore", "config"]);
    let out = output(c);
    assert_eq!(out.code, 1);
    for needle in [
        "mode (from env FROSTBYTE_MODE)",
        "log_format (from env FROSTBYTE_LOG_FORMAT)",
        "drift_policy (from flag)",
    ] {
        assert!(out.stderr.contains(needle), "missing {needle:?}: {}", out.stderr);
    }
}

#[test]
fn a_refused_connection_names_host_and_port_and_says_each_cause_once() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), frostbyte_gitops::sops::Format::Toml);
    repo.commit("alpha");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_CONTROL_DB_URL", format!("postgres://app:s3cretpw@127.0.0.1:{port}/frostbyte"))
        .arg("sync");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out.stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(line.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}")), "{}", out.stderr);
    assert!(line.contains("Connection refused"), "{line}");
    assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    assert!(!line.contains("error connecting to server: error connecting"), "{line}");
    assert!(!out.all().contains("s3cretpw"), "{}", out.all());
}
