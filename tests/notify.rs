//! Notifications through the binary, to a local HTTP receiver: signed bodies for a sync that
//! applied, one that was refused and a drift report; a receiver that is down or failing costs a
//! bounded retry and never the run.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "receiver-shared-secret";

#[derive(Clone, Debug)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A receiver answering every request with `status`, recording what it got.
fn receiver(status: u16) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/frostbyte", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            sink.lock().unwrap().push(Received { headers, body });
            let mut stream = stream;
            let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

fn configured(repo: &TestRepo, url: &str) -> std::path::PathBuf {
    let key = repo.path().join("hook.key");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    let config = repo.path().join("frostbyte.toml");
    std::fs::write(
        &config,
        format!("[[notifications]]\nurl = {url:?}\nsecret_file = {:?}\n", key.display().to_string()),
    )
    .unwrap();
    config
}

fn run_with(repo: &TestRepo, db: &TestDb, config: &std::path::Path, args: &[&str]) -> Out {
    let mut c = command(repo.path(), Some(db));
    c.env("FROSTBYTE_CONFIG", config).args(args);
    output(c)
}

fn signed(r: &Received) -> bool {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(&r.body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    r.header("x-frostbyte-signature-256") == Some(want.as_str())
}

#[test]
fn applied_refused_and_drift_are_posted_signed_and_without_secrets() {
    let (url, got) = receiver(200);
    let (repo, db) = (TestRepo::new(), TestDb::new());
    for id in ["alpha", "bravo", "charlie"] {
        repo.put_tenant(&tenant_doc(id), Format::Toml);
    }
    repo.commit("three tenants");
    let config = configured(&repo, &url);

    let out = run_with(&repo, &db, &config, &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let applied = got.lock().unwrap().last().cloned().expect("an applied notification");
    assert!(signed(&applied), "{:?}", applied.headers);
    assert_eq!(applied.header("x-frostbyte-event"), Some("applied"));
    let body = applied.json();
    assert_eq!(body["event"], json!("applied"));
    assert_eq!(body["source"], json!("default"));
    assert_eq!(body["counts"]["created"], json!(3));
    assert_eq!(body["tenants"][0], json!({"tenant_id": "alpha", "action": "create"}));
    assert_eq!(body["commit"].as_str().map(str::len), Some(40));

    // Nothing to do: nothing to say.
    assert_eq!(run_with(&repo, &db, &config, &["sync"]).code, 0);
    assert_eq!(got.lock().unwrap().len(), 1);

    // A force-push is refused; the receiver hears why, and at which commit.
    let rewritten = repo.rewrite_history("rewritten");
    let out = run_with(&repo, &db, &config, &["sync"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let refused = got.lock().unwrap().last().cloned().unwrap();
    assert!(signed(&refused));
    assert_eq!(refused.json()["event"], json!("refused"));
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("does not descend from the last applied commit"),
        "{:?}",
        refused.json()
    );
    assert_eq!(refused.json()["commit"], json!(rewritten));

    // A hand edit, secret included, and a drift report.
    db.exec("UPDATE tenants SET config = jsonb_set(config, '{secrets,db_password}', '\"typed-by-hand\"') WHERE tenant_id = 'bravo'");
    let out = run_with(&repo, &db, &config, &["drift"]);
    assert_eq!(out.code, 2, "{}", out.all());
    let drift = got.lock().unwrap().last().cloned().unwrap();
    assert!(signed(&drift));
    assert_eq!(drift.json()["event"], json!("drift"));
    assert!(
        drift.json()["tenants"]
            .as_array()
            .unwrap()
            .contains(&json!({"tenant_id": "bravo", "action": "modified"})),
        "{:?}",
        drift.json()
    );

    for r in got.lock().unwrap().iter() {
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("pw-") && !text.contains("typed-by-hand") && !text.contains("key-"),
            "a secret in {text}"
        );
    }
}

#[test]
fn a_receiver_that_is_down_or_failing_never_fails_or_holds_a_sync() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    // Nothing listens on a port just let go.
    let down = format!("http://{}/hook", TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let config = configured(&repo, &down);
    let started = Instant::now();
    let out = run_with(&repo, &db, &config, &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    assert!(out.stderr.contains("1 of 1 notification(s) could not be delivered"), "{}", out.stderr);
    assert!(
        out.stderr.contains("could not connect") && out.stderr.contains("Connection refused"),
        "the cause is named: {}",
        out.stderr
    );
    assert_eq!(db.count("SELECT 1 FROM tenants"), 1);

    // A receiver answering 500 is tried three times, then given up.
    let (failing, got) = receiver(500);
    let config = configured(&repo, &failing);
    let mut doc = tenant_doc("alpha");
    doc["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&doc, Format::Toml);
    repo.commit("enterprise");
    let out = run_with(&repo, &db, &config, &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(got.lock().unwrap().len(), 3, "three attempts");
    assert!(!out.stderr.contains("/hooks/frostbyte"), "the receiver's path is not logged: {}", out.stderr);
}
