//! `validate`: every problem in every file, each naming the file; no database needed.

mod common;
use common::*;
use frostbyte_gitops::sops::{self, Format, Rules};
use serde_json::{Value, json};

fn validate(repo: &TestRepo, args: &[&str]) -> Out {
    let mut all = vec!["validate"];
    all.extend_from_slice(args);
    run(repo, None, &all)
}

#[test]
fn valid_files_in_every_format_pass() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    repo.put_tenant(&tenant_doc("charlie"), Format::Yaml);
    repo.write("tenants/delta.yml", encrypt(&tenant_doc("delta"), Format::Yaml));
    repo.write("tenants/README.md", "not a tenant file");
    repo.commit("four tenants");
    let out = validate(&repo, &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("4 file(s) checked, 0 invalid"), "{}", out.stdout);
    // No database was touched: no local cluster appeared.
    assert!(!repo.path().join(".frostbyte/pgdata").exists());
}

#[test]
fn files_are_read_from_the_commit_unless_worktree_is_given() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("one tenant");
    repo.write("tenants/alpha.toml", "tenant_id = \"alpha\"\nbroken = [\n");
    assert_eq!(validate(&repo, &[]).code, 0, "the committed file is valid");
    let out = validate(&repo, &["--worktree"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("tenants/alpha.toml:2: cannot parse"), "{}", out.stdout);
}

/// A repository with one file for each kind of bad input.
fn bad_repo() -> TestRepo {
    let repo = TestRepo::new();
    // Name does not match the file.
    let mut d = tenant_doc("mismatch");
    d["tenant_id"] = json!("someone-else");
    repo.write("tenants/mismatch.toml", encrypt(&d, Format::Toml));
    // Duplicate tenant_id across formats.
    repo.put_tenant(&tenant_doc("twin"), Format::Toml);
    repo.put_tenant(&tenant_doc("twin"), Format::Json);
    // A symlink.
    repo.put_tenant(&tenant_doc("target"), Format::Yaml);
    std::os::unix::fs::symlink("target.yaml", repo.path().join("tenants/linked.yaml")).unwrap();
    // Over 1 MiB.
    let mut big = tenant_doc("big");
    big["config"]["display_name"] = json!("x".repeat(1_100_000));
    repo.write("tenants/big.json", encrypt(&big, Format::Json));
    // Not UTF-8.
    repo.write("tenants/latin1.toml", b"tenant_id = \"latin1\"\nname = \"caf\xe9\"\n");
    // Nested too deep.
    let mut deep = json!("bottom");
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    let mut d = tenant_doc("deep");
    d["config"]["features"] = deep;
    repo.write("tenants/deep.json", encrypt(&d, Format::Json));
    // Plaintext, not encrypted.
    repo.write("tenants/plain.json", serde_json::to_string(&tenant_doc("plain")).unwrap());
    // Tampered: a plaintext value changed after encryption.
    let text = encrypt(&tenant_doc("tampered"), Format::Yaml).replace("plan: pro", "plan: enterprise");
    repo.write("tenants/tampered.yaml", text);
    // Encrypted to someone else only.
    let (_, stranger) = sops::AgeKeys::generate();
    let enc = sops::encrypt(&tenant_doc("stranger"), &[stranger], &Rules::default(), None).unwrap();
    repo.write("tenants/stranger.json", sops::serialize(Format::Json, &enc).unwrap());
    // Not encrypted to the tenant's own key.
    let enc = sops::encrypt(
        &tenant_doc("nokey"),
        &[agent_recipient()],
        &Rules {
            encrypted_regex: Some("^secrets$".into()),
            ..Rules::default()
        },
        None,
    )
    .unwrap();
    repo.write("tenants/nokey.json", sops::serialize(Format::Json, &enc).unwrap());
    // Three schema problems in one file, one of them on a secret.
    let mut d = tenant_doc("schema");
    d["config"]["plan"] = json!("platinum");
    d["config"]["limits"]["max_users"] = json!(0);
    d["config"]["secrets"]["db_password"] = json!(31337);
    d["colour"] = json!("blue");
    repo.write("tenants/schema.toml", encrypt(&d, Format::Toml));
    // Does not parse.
    repo.write("tenants/broken.yaml", "tenant_id: broken\nconfig:\n  plan: [unclosed\n");
    // And one good file, which must not be reported.
    repo.put_tenant(&tenant_doc("fine"), Format::Toml);
    repo.commit("bad inputs");
    repo
}

#[test]
fn every_problem_in_every_file_is_reported_with_its_file() {
    let repo = bad_repo();
    let out = validate(&repo, &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    let text = &out.stdout;
    let expect = [
        ("tenants/mismatch.toml", "does not match the file name"),
        ("tenants/twin.toml", "duplicate tenant_id \"twin\": also defined in tenants/twin.json"),
        ("tenants/twin.json", "duplicate tenant_id \"twin\": also defined in tenants/twin.toml"),
        ("tenants/linked.yaml", "symbolic link"),
        ("tenants/big.json", "the limit is 1048576 bytes"),
        ("tenants/latin1.toml:2", "not valid UTF-8"),
        ("tenants/deep.json", "nesting is deeper than 32 levels"),
        ("tenants/plain.json", "is not encrypted"),
        ("tenants/tampered.yaml", "MAC mismatch"),
        ("tenants/stranger.json", "none of the configured age identities can decrypt this file"),
        ("tenants/nokey.json", "is not encrypted to the tenant's own age_public_key"),
        ("tenants/schema.toml", "/config/plan"),
        ("tenants/schema.toml", "/config/limits/max_users"),
        ("tenants/schema.toml", "/config/secrets/db_password"),
        ("tenants/schema.toml", "unknown top-level field \"colour\""),
        ("tenants/broken.yaml:4", "cannot parse"),
    ];
    for (file, needle) in expect {
        assert!(
            text.lines().any(|l| l.contains(file) && l.contains(needle)),
            "no line with {file} and {needle:?} in:\n{text}"
        );
    }
    assert!(!text.contains("tenants/fine.toml") && !text.contains("tenants/target.yaml"), "{text}");
    assert!(!text.contains("31337"), "a secret's value appeared in:\n{text}");
    assert!(text.contains("15 file(s) checked, 13 invalid, 16 problem(s)"), "{text}");
    // Line numbers point into the committed file.
    assert!(
        text.lines().any(|l| l.starts_with("error: tenants/schema.toml:") && l.contains("/config/plan")),
        "{text}"
    );
}

#[test]
fn json_and_markdown_reports_list_the_same_problems() {
    let repo = bad_repo();
    let out = validate(&repo, &["--format", "json"]);
    assert_eq!(out.code, 1);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["valid"], json!(false));
    assert_eq!(v["files"], json!(15));
    let issues = v["issues"].as_array().unwrap();
    assert!(issues.iter().all(|i| i["file"].as_str().unwrap().starts_with("tenants/")));
    let plan = issues.iter().find(|i| i["pointer"] == json!("/config/plan")).unwrap();
    assert!(plan["line"].as_u64().unwrap() > 1);
    assert!(
        !out.stderr.contains('\u{1b}') && !out.stderr.contains("decrypting"),
        "no progress bar when piped"
    );

    let md = validate(&repo, &["--format", "markdown"]);
    assert_eq!(md.code, 1);
    assert!(md.stdout.contains("| `tenants/schema.toml` |"), "{}", md.stdout);
    assert_eq!(md.stdout.lines().filter(|l| l.starts_with("| `tenants/")).count(), issues.len());
}

#[test]
fn plaintext_is_accepted_only_when_allowed_and_never_in_production() {
    let repo = TestRepo::new();
    repo.write("tenants/plain.json", serde_json::to_string(&tenant_doc("plain")).unwrap());
    repo.commit("plaintext");
    assert_eq!(validate(&repo, &[]).code, 1);
    assert_eq!(validate(&repo, &["--allow-plaintext"]).code, 0);
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_MODE", "production")
        .env("FROSTBYTE_VERIFY_COMMITS", "off")
        .env("FROSTBYTE_CONTROL_DB_URL", "host=/nonexistent")
        .args(["validate", "--allow-plaintext"]);
    let out = output(c);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("allow_plaintext cannot be used in production mode"), "{}", out.stderr);
}

#[test]
fn the_recipient_policy_can_be_turned_off() {
    let repo = TestRepo::new();
    let enc = sops::encrypt(&tenant_doc("nokey"), &[agent_recipient()], &Rules::default(), None).unwrap();
    repo.write("tenants/nokey.json", sops::serialize(Format::Json, &enc).unwrap());
    repo.commit("agent only");
    assert_eq!(validate(&repo, &[]).code, 1);
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_REQUIRE_TENANT_RECIPIENT", "false").arg("validate");
    assert_eq!(output(c).code, 0);
}

#[test]
fn keys_come_from_sops_age_key_and_several_are_tried() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("one");
    let (stranger, _) = sops::AgeKeys::generate();
    let agent = std::fs::read_to_string(agent_key_file()).unwrap();
    let mut c = command(repo.path(), None);
    c.env_remove("SOPS_AGE_KEY_FILE")
        .env("SOPS_AGE_KEY", format!("{}{}", stranger.secret_text(), agent))
        .arg("validate");
    let out = output(c);
    assert_eq!(out.code, 0, "{}", out.all());
    let mut c = command(repo.path(), None);
    c.env_remove("SOPS_AGE_KEY_FILE").arg("validate");
    let out = output(c);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("(configuration): no age identity is configured"), "{}", out.stdout);
}

#[test]
fn a_terminal_gets_a_progress_bar_and_a_pipe_does_not() {
    let repo = TestRepo::new();
    for i in 0..40 {
        repo.put_tenant(&tenant_doc(&format!("t{i:03}")), Format::Toml);
    }
    repo.commit("forty tenants");
    // `script` gives the command a terminal; FROSTBYTE_LOG keeps the log quiet so only the bar draws.
    let bin = env!("CARGO_BIN_EXE_frostbyte-gitops");
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_LOG", "error").args(["-qec", &format!("{bin} validate"), "/dev/null"]);
    let mut script = std::process::Command::new("script");
    script
        .args(c.get_args())
        .envs(c.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .stdin(std::process::Stdio::null());
    let o = script.output().expect("script(1) from util-linux");
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{tty}");
    assert!(
        tty.contains("decrypting") && tty.contains("/40 tenant files"),
        "no progress bar on a terminal:\n{tty}"
    );
    let piped = validate(&repo, &[]);
    assert!(!piped.all().contains("decrypting"), "{}", piped.all());
    let json = run(&repo, None, &["validate", "--format", "json"]);
    assert!(!json.all().contains("decrypting"));
}

#[test]
fn no_decrypt_checks_what_needs_no_key_and_holds_none() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    repo.put_tenant(&tenant_doc("charlie"), Format::Yaml);
    repo.commit("three valid");
    let keyless = |repo: &TestRepo| {
        let mut c = command(repo.path(), None);
        c.env_remove("SOPS_AGE_KEY_FILE").args(["validate", "--no-decrypt"]);
        output(c)
    };
    let out = keyless(&repo);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("3 file(s) checked, 0 invalid"), "{}", out.stdout);

    let mut bad_plan = tenant_doc("delta");
    bad_plan["config"]["plan"] = json!("platinum");
    repo.put_tenant(&bad_plan, Format::Toml);
    let mut renamed = tenant_doc("echo");
    renamed["tenant_id"] = json!("someone-else");
    repo.write("tenants/echo.json", encrypt(&renamed, Format::Json));
    repo.write("tenants/plain.json", serde_json::to_string(&tenant_doc("plain")).unwrap());
    repo.commit("three bad");
    let out = keyless(&repo);
    assert_eq!(out.code, 1, "{}", out.all());
    for needle in [
        "tenants/delta.toml",
        "/config/plan",
        "tenants/echo.json",
        "does not match the file name",
        "tenants/plain.json: is not encrypted",
    ] {
        assert!(out.stdout.contains(needle), "no {needle:?} in {}", out.stdout);
    }
    assert!(!out.stdout.contains("tenants/alpha.toml"), "{}", out.stdout);
}

#[test]
fn a_missing_key_is_reported_once_before_the_per_file_problems() {
    let repo = TestRepo::new();
    for id in ["alpha", "bravo", "charlie", "delta"] {
        repo.put_tenant(&tenant_doc(id), Format::Json);
    }
    repo.write("tenants/broken.toml", "tenant_id = \"broken\"\nx = [\n");
    repo.commit("four tenants and a broken file");
    let mut c = command(repo.path(), None);
    c.env_remove("SOPS_AGE_KEY_FILE").arg("validate");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    let errors: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "{}", out.stdout);
    assert!(
        errors[0].contains("no age identity is configured") && errors[0].contains("4 encrypted file(s)"),
        "{}",
        out.stdout
    );
    assert!(errors[1].contains("tenants/broken.toml:2: cannot parse"), "{}", out.stdout);
    assert_eq!(out.stdout.matches("no age identity").count(), 1);
}

#[test]
fn an_empty_secret_which_sops_leaves_unencrypted_is_not_a_plaintext_secret() {
    let repo = TestRepo::new();
    let mut doc = tenant_doc("blank");
    doc["config"]["secrets"]["smtp_password"] = json!("");
    repo.put_tenant(&doc, Format::Json);
    repo.commit("an empty secret");
    for args in [&[][..], &["--no-decrypt"]] {
        let out = validate(&repo, args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.all());
    }
}

#[test]
fn validate_names_the_commit_it_checked_and_the_edits_it_did_not() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    let commit = repo.commit("alpha");
    let out = validate(&repo, &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains(&format!("at commit {}", &commit[..12])), "{}", out.stdout);
    assert!(!out.stderr.contains("note:"), "a clean work tree: {}", out.stderr);

    let mut edited = tenant_doc("alpha");
    edited["config"]["plan"] = json!("platinum");
    repo.put_tenant(&edited, Format::Toml);
    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    let out = validate(&repo, &[]);
    assert_eq!(out.code, 0, "the commit is valid: {}", out.all());
    assert!(
        out.stderr
            .contains("note: 2 tenant file(s) in the work tree differ from the commit checked (tenants/alpha.toml, tenants/bravo.json): `validate --worktree`"),
        "{}",
        out.stderr
    );
    let json: Value = serde_json::from_str(&validate(&repo, &["--format", "json"]).stdout).unwrap();
    assert_eq!(json["commit"], json!(commit));
    let disk = validate(&repo, &["--worktree"]);
    assert_eq!(disk.code, 1, "the edit on disk is invalid: {}", disk.all());
    assert!(disk.stdout.contains("at the work tree") && !disk.stderr.contains("note:"), "{}", disk.all());
}

#[test]
fn a_git_error_reads_as_a_sentence_without_libgit2s_codes() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    let out = validate(&repo, &["--ref", "no-such-branch"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("cannot resolve revision \"no-such-branch\""), "{}", out.stderr);
    assert!(!out.stderr.contains("class=") && !out.stderr.contains("code="), "{}", out.stderr);
}

#[test]
fn a_plan_that_fails_does_not_say_it_applied_nothing_and_a_sync_does() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.write("tenants/broken.json", "{");
    repo.commit("a broken file");
    let plan = run(&repo, Some(&db), &["plan"]);
    assert_eq!(plan.code, 1, "{}", plan.all());
    assert!(plan.stderr.contains("1 problem(s) in 1 file(s) at commit"), "{}", plan.stderr);
    assert!(!plan.stderr.contains("nothing was applied"), "a plan applies nothing anyway: {}", plan.stderr);
    let sync = run(&repo, Some(&db), &["sync"]);
    assert_eq!(sync.code, 1, "{}", sync.all());
    assert!(sync.stderr.contains("nothing was applied"), "{}", sync.stderr);
}
