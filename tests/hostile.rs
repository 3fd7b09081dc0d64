//! Files an attacker can push, without any age key: each is refused by `validate` within seconds,
//! naming the file, and a `sync` of it writes nothing.

mod common;
use common::*;
use frostbyte_gitops::sops::{self, Format, Rules};
use serde_json::json;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs the binary, killing it if it outlives `limit` (a hang is a failure, not a stuck suite).
fn bounded(repo: &TestRepo, db: Option<&TestDb>, args: &[&str], limit: Duration) -> (Out, Duration) {
    let mut c = command(repo.path(), db);
    c.args(args);
    bounded_command(c, limit)
}

fn bounded_command(mut c: std::process::Command, limit: Duration) -> (Out, Duration) {
    let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    c.env("FROSTBYTE_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c.spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let (mut a, mut b) = (String::new(), String::new());
        let _ = out.read_to_string(&mut a);
        let _ = err.read_to_string(&mut b);
        (a, b)
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("frostbyte-gitops {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = reader.join().unwrap();
    (
        Out {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        },
        started.elapsed(),
    )
}

/// One good tenant and the hostile file, committed; validate refuses it naming `file`, and a sync
/// against a fresh database writes nothing at all. Returns validate's output.
fn refused(file: &str, bytes: impl AsRef<[u8]>, needle: &str) -> Out {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("good"), Format::Toml);
    repo.write(file, bytes);
    repo.commit("hostile file");
    let (out, took) = bounded(&repo, None, &["validate"], Duration::from_secs(30));
    assert_eq!(out.code, 1, "{file}: {}", out.all());
    assert!(took < Duration::from_secs(10), "{file}: validate took {took:?}");
    assert!(out.stdout.contains(file), "{file} not named: {}", out.stdout);
    assert!(out.stdout.contains(needle), "{file}: no {needle:?} in {}", out.stdout);
    assert!(!out.all().contains('\x1b'), "raw escape in the output: {:?}", out.all());

    let db = TestDb::new();
    let (sync, _) = bounded(&repo, Some(&db), &["sync"], Duration::from_secs(60));
    assert_eq!(sync.code, 1, "{}", sync.all());
    assert!(sync.stderr.contains("nothing was applied"), "{}", sync.stderr);
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0, "sync wrote a tenant");
    assert_eq!(db.count("SELECT 1 FROM audit_events"), 0, "sync wrote an event");
    out
}

/// An encrypted tenant file as anyone can write it: the recipients are public.
fn encrypted(doc: &serde_json::Value, format: Format) -> String {
    encrypt(doc, format)
}

#[test]
fn an_empty_key_is_refused_instead_of_spinning() {
    let text = format!("\"\" = \"x\"\n{}", encrypted(&tenant_doc("emptykey"), Format::Toml));
    let out = refused("tenants/emptykey.toml", text, "empty key names are not allowed");
    assert!(out.stdout.contains("tenants/emptykey.toml:1:"), "{}", out.stdout);
}

#[test]
fn a_yaml_alias_bomb_is_refused_before_it_expands() {
    // Nine levels of nine aliases: 9^9 (387 million) strings from a file of a few hundred bytes.
    let mut text = String::from("a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(",");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    // And the same bomb at full file size, in case a parser counted only alias jumps.
    let big = text.repeat(700_000 / text.len()).replace("a0:", "b0:");
    let out = refused("tenants/bomb.yaml", &text, "YAML anchors are not allowed");
    assert!(out.stdout.contains("tenants/bomb.yaml:1:"), "{}", out.stdout);
    refused("tenants/bigbomb.yaml", big, "YAML anchors are not allowed");
}

#[test]
fn a_nul_in_a_value_is_refused_plain_or_encrypted() {
    // Plaintext in the file: refused by the parser.
    let text = encrypted(&tenant_doc("nulplain"), Format::Json).replace("\"plan\": \"pro\"", "\"plan\": \"p\\u0000ro\"");
    refused("tenants/nulplain.json", text, "U+0000");
    // Inside an encrypted value: only decryption can see it, and it refuses it too.
    let mut doc = tenant_doc("nulsecret");
    doc["config"]["secrets"]["db_password"] = json!("hunter2\u{0}xyzzy");
    let out = refused("tenants/nulsecret.json", encrypted(&doc, Format::Json), "U+0000");
    assert!(out.stdout.contains("/config/secrets/db_password"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("hunter2") && !out.stdout.contains("xyzzy"),
        "a secret in the output: {}",
        out.stdout
    );
}

#[test]
fn duplicate_keys_are_refused_in_json_and_yaml() {
    let text = encrypted(&tenant_doc("dupjson"), Format::Json).replace("\"plan\": \"pro\",", "\"plan\": \"pro\",\n    \"plan\": \"enterprise\",");
    refused("tenants/dupjson.json", text, "/config/plan: refused: duplicate key");
    let text = encrypted(&tenant_doc("dupyaml"), Format::Yaml).replace("    plan: pro\n", "    plan: pro\n    plan: free\n");
    refused("tenants/dupyaml.yaml", text, "duplicate key");
}

#[test]
fn non_finite_numbers_are_refused() {
    let text = encrypted(&tenant_doc("nanfile"), Format::Toml).replace("storage_gb = 10", "storage_gb = nan");
    refused("tenants/nanfile.toml", text, "NaN");
}

#[test]
fn control_characters_in_key_names_are_refused_and_never_printed() {
    let text = encrypted(&tenant_doc("esckey"), Format::Json).replace("\"sso\": true", "\"\\u001b[2J\\u001b[Hsso\": true");
    refused("tenants/esckey.json", text, "control characters (found U+001B)");
}

#[test]
fn escapes_and_markdown_syntax_in_file_names_stay_inert() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("good"), Format::Toml);
    repo.write("tenants/a|b`\u{1b}[31m.toml", encrypted(&tenant_doc("good"), Format::Toml));
    repo.commit("odd name");
    let (out, _) = bounded(&repo, None, &["validate", "--format", "markdown"], Duration::from_secs(30));
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(!out.stdout.contains('\x1b'), "{:?}", out.stdout);
    let rows: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('|')).collect();
    // Header, separator, and one row per problem: each row has exactly four cells.
    for row in &rows {
        let cells = row.replace("\\|", "").matches('|').count();
        assert_eq!(cells, 5, "a forged column in {row:?}");
    }
    let (text, _) = bounded(&repo, None, &["validate"], Duration::from_secs(30));
    assert!(!text.stdout.contains('\x1b') && text.stdout.contains("\\u{1b}[31m"), "{:?}", text.stdout);
}

#[test]
fn endpoints_must_be_named_https_urls() {
    let mut doc = tenant_doc("badendpoint");
    doc["endpoints"] = json!({"api": "http://plain.example.com", "Bad Name": "https://x.example.com"});
    let out = refused("tenants/badendpoint.json", encrypted(&doc, Format::Json), "/endpoints/api");
    assert!(out.stdout.contains("/endpoints"), "{}", out.stdout);
}

#[test]
fn a_directory_named_like_a_tenant_file_or_a_non_utf8_name_is_reported() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("good"), Format::Toml);
    repo.write("tenants/sneaky.toml/inner.txt", "x");
    use std::os::unix::ffi::OsStrExt;
    let latin1 = repo.path().join("tenants").join(std::ffi::OsStr::from_bytes(b"caf\xe9.toml"));
    std::fs::write(latin1, encrypted(&tenant_doc("good"), Format::Toml)).unwrap();
    repo.commit("a directory named like a tenant file, a name that is not UTF-8");
    let (out, _) = bounded(&repo, None, &["validate"], Duration::from_secs(30));
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("tenants/sneaky.toml: is a directory named like a tenant file"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("the file name is not valid UTF-8"), "{}", out.stdout);
}

#[test]
fn a_ref_that_is_both_a_branch_and_a_tag_is_refused() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("good"), Format::Toml);
    let first = repo.commit("one");
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git").arg("-C").arg(repo.path()).args(args).output().unwrap();
        assert!(ok.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&ok.stderr));
    };
    git(&["tag", "release", &first]);
    repo.put_tenant(&tenant_doc("other"), Format::Toml);
    let second = repo.commit("two");
    git(&["branch", "release", &second]);
    let (out, _) = bounded(&repo, None, &["validate", "--ref", "release"], Duration::from_secs(30));
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("names both a branch and a tag"), "{}", out.stderr);
    let (out, _) = bounded(&repo, None, &["validate", "--ref", "refs/tags/release"], Duration::from_secs(30));
    assert_eq!(out.code, 0, "a fully qualified ref is fine: {}", out.all());
}

#[test]
fn url_credentials_never_reach_output_or_the_clone_cache() {
    let repo = TestRepo::new();
    // Port 9 on loopback refuses at once: the fetch fails without any network.
    let url = "https://deploy-bot:ghp_SuperSecretToken42@127.0.0.1:9/org/tenants.git";
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_GITOPS_REPO", url).env("FROSTBYTE_LOG", "debug").args(["validate"]);
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("https://127.0.0.1:9/org/tenants.git"), "{}", out.all());
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_GITOPS_REPO", url).args(["config"]);
    let config = output(c);
    for text in [out.all(), config.all()] {
        assert!(!text.contains("ghp_SuperSecretToken42") && !text.contains("deploy-bot:"), "{text}");
    }
    let cache = repo.path().join(".frostbyte/git-cache");
    let mut stored = String::new();
    for entry in std::fs::read_dir(&cache).unwrap() {
        stored += &std::fs::read_to_string(entry.unwrap().path().join("config")).unwrap_or_default();
    }
    assert!(stored.contains("127.0.0.1:9") && !stored.contains("ghp_SuperSecretToken42"), "{stored}");
}

#[test]
fn an_empty_webhook_token_in_a_config_file_is_refused_at_start() {
    let repo = TestRepo::new();
    repo.write("frostbyte.toml", "webhook_token = \"\"\n");
    let mut c = command(repo.path(), None);
    c.args(["--config", repo.path().join("frostbyte.toml").to_str().unwrap(), "config"]);
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("webhook_token (from config file)"), "{}", out.stderr);
}

#[test]
fn a_recipient_removed_by_updatekeys_gets_a_new_data_key() {
    let repo = TestRepo::new();
    let (_, extra) = sops::AgeKeys::generate();
    let rule = |recipients: &str| format!("creation_rules:\n  - path_regex: tenants/.*\n    encrypted_regex: ^secrets$\n    age: {recipients}\n");
    repo.write(".sops.yaml", rule(&format!("{},{extra}", agent_recipient())));
    let path = repo.path().join("tenants/rot.json");
    let enc = sops::encrypt(
        &tenant_doc("rot"),
        &[agent_recipient(), extra.clone(), tenant_recipient()],
        &Rules {
            encrypted_regex: Some("^secrets$".into()),
            ..Rules::default()
        },
        None,
    )
    .unwrap();
    std::fs::write(&path, sops::serialize(Format::Json, &enc).unwrap()).unwrap();
    let keys = keys("test.agekey");
    let before = sops::data_key(&enc, &keys).unwrap();

    repo.write(".sops.yaml", rule(&agent_recipient()));
    let out = run(&repo, None, &["secrets", "updatekeys", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("(new data key)"), "{}", out.stdout);
    let after_doc = sops::parse(Format::Json, &std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_ne!(
        sops::data_key(&after_doc, &keys).unwrap(),
        before,
        "the removed reader's data key still opens the file"
    );
    let (recipients, _) = sops::recipients_and_rules(&after_doc).unwrap();
    assert!(!recipients.contains(&extra), "{recipients:?}");
    assert_eq!(sops::decrypt(after_doc, &keys).unwrap().value, tenant_doc("rot"));

    let out = run(&repo, None, &["secrets", "rotate", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.all());
    let rotated = sops::parse(Format::Json, &std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(sops::recipients_and_rules(&rotated).unwrap().0, recipients, "rotate keeps the recipients");
    let rotated_key = sops::data_key(&rotated, &keys).unwrap();
    assert_eq!(sops::decrypt(rotated, &keys).unwrap().value, tenant_doc("rot"));
    let again = sops::parse(Format::Json, &std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(sops::data_key(&again, &keys).unwrap(), rotated_key);
}

/// Whether any advisory lock is held in the test's database right now.
fn advisory_locks(db: &TestDb) -> i64 {
    db.count("SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()")
}

fn signal(pid: u32, sig: &str) {
    assert!(
        std::process::Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn a_run_decoding_files_holds_no_lock_and_blocks_no_other_run() {
    let repo = TestRepo::new();
    for i in 0..300 {
        repo.put_tenant(&tenant_doc(&format!("tenant-{i:03}")), Format::Json);
    }
    repo.commit("many tenants");
    // A stop lands in the decoding phase unless decoding ended first; then try again.
    for attempt in 1..=5 {
        let db = TestDb::new();
        // Migrated first, so that both runs go straight to work.
        assert_eq!(run(&repo, Some(&db), &["migrate"]).code, 0);
        let mut slow = command(repo.path(), Some(&db));
        slow.args(["sync"]).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut slow = slow.spawn().unwrap();
        let mut stderr = std::io::BufReader::new(slow.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
                panic!("the run ended without decoding: {seen}");
            }
            seen.push_str(&line);
            if line.contains("decoding tenant files") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        signal(slow.id(), "STOP");
        let held = advisory_locks(&db);
        if held > 0 {
            signal(slow.id(), "CONT");
            let _ = slow.wait();
            eprintln!("attempt {attempt}: stopped after decoding; again");
            continue;
        }
        // Stopped mid-decoding with no lock held: another run goes through untouched.
        let (other, took) = bounded(&repo, Some(&db), &["sync"], Duration::from_secs(60));
        assert_eq!(other.code, 0, "{}", other.all());
        assert!(took < Duration::from_secs(30), "the other run waited {took:?}");
        assert_eq!(db.count("SELECT 1 FROM tenants"), 300);
        signal(slow.id(), "CONT");
        let status = slow.wait().unwrap();
        assert!(status.success(), "the resumed run failed: {seen}");
        assert_eq!(
            db.count("SELECT 1 FROM audit_events WHERE event_type = 'TENANT_CREATED'"),
            300,
            "the resumed run applied again"
        );
        return;
    }
    panic!("every stop landed after decoding: cannot tell where the lock is taken");
}

#[test]
fn a_remote_that_refuses_credentials_is_asked_a_bounded_number_of_times() {
    // Every request gets 401: libgit2 asks for credentials again after each refusal.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let repo = TestRepo::new();
    repo.write("token", "not-the-right-token\n");
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_GITOPS_REPO", format!("http://127.0.0.1:{port}/org/tenants.git"))
        .env("FROSTBYTE_GIT_TOKEN_FILE", repo.path().join("token"))
        .args(["validate"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c.spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("still asking after 30 s ({} requests)", requests.load(std::sync::atomic::Ordering::SeqCst));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("authentication"), "{stderr}");
    assert!(!stderr.contains("not-the-right-token"), "{stderr}");
    let n = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n <= 4, "{n} requests for one fetch");
}

#[test]
fn a_number_past_what_the_database_would_store_exactly_is_refused_in_every_format() {
    let json_text = encrypted(&tenant_doc("bigjson"), Format::Json).replace("\"max_users\": 50", "\"max_users\": 100000000000000000000");
    let out = refused("tenants/bigjson.json", json_text, "/config/limits/max_users");
    assert!(out.stdout.contains("64-bit range"), "{}", out.stdout);
    let yaml_text = encrypted(&tenant_doc("bigyaml"), Format::Yaml).replace("max_users: 50", "max_users: 100000000000000000000");
    let out = refused("tenants/bigyaml.yaml", yaml_text, "/config/limits/max_users");
    assert!(out.stdout.contains("64-bit range"), "{}", out.stdout);
    let toml_text = encrypted(&tenant_doc("bigtoml"), Format::Toml).replace("max_users = 50", "max_users = 100000000000000000000");
    let out = refused("tenants/bigtoml.toml", toml_text, "/config/limits/max_users");
    assert!(out.stdout.contains("64-bit range"), "{}", out.stdout);
    let float = encrypted(&tenant_doc("finefloat"), Format::Json).replace("\"storage_gb\": 10", "\"storage_gb\": 10.000000000000000001");
    refused("tenants/finefloat.json", float, "more digits than a 64-bit float holds");
}

#[test]
fn a_file_whose_own_rules_leave_a_secret_in_plaintext_is_refused() {
    let mut doc = tenant_doc("leaky");
    doc["config"]["secrets"]["api_key_unencrypted"] = json!("plain-sight-key-77");
    // A rule sops offers: a key ending in _unencrypted stays in the clear.
    let rules = Rules {
        unencrypted_suffix: Some("_unencrypted".into()),
        ..Rules::default()
    };
    let enc = sops::encrypt(&doc, &[agent_recipient(), tenant_recipient()], &rules, None).unwrap();
    let text = sops::serialize(Format::Json, &enc).unwrap();
    assert!(text.contains("plain-sight-key-77"), "the file's rules left it in plaintext");
    let out = refused("tenants/leaky.json", text, "/config/secrets/api_key_unencrypted");
    assert!(out.stdout.contains("unencrypted"), "{}", out.stdout);
    assert!(!out.stdout.contains("plain-sight-key-77"), "{}", out.stdout);
}

#[test]
fn a_database_that_accepts_and_never_answers_fails_every_command_within_its_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts, then holds every connection open in silence.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().take(64).flatten() {
            held.push(s);
        }
    });
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    let url = format!("postgres://app:pw@127.0.0.1:{port}/frostbyte?connect_timeout=1");
    for args in [&["sync"][..], &["plan"], &["drift"], &["migrate"], &["audit", "verify"]] {
        let mut c = command(repo.path(), None);
        c.args(args).env("FROSTBYTE_CONTROL_DB_URL", &url).env("FROSTBYTE_DB_TIMEOUT", "2");
        let (out, took) = bounded_command(c, Duration::from_secs(60));
        assert_eq!(out.code, 1, "{args:?}: {}", out.all());
        assert!(took < Duration::from_secs(20), "{args:?} took {took:?}");
        assert!(
            out.stderr.contains(&format!("127.0.0.1:{port}")),
            "{args:?}: host:port not named: {}",
            out.stderr
        );
        assert!(out.stderr.contains("db_timeout"), "{args:?}: the setting is named: {}", out.stderr);
        assert!(!out.stderr.contains("pw@"), "{}", out.stderr);
    }
}
