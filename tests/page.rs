//! The status page in a real browser (Debian's chromium, driven over WebDriver by fantoccini)
//! against an agent syncing a temporary repository into a real PostgreSQL; and its HTTP rules
//! (methods, headers, the token) without a browser.

mod common;
use common::agent::*;
use common::*;
use fantoccini::{ClientBuilder, Locator};
use frostbyte_gitops::sops::Format;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PAYLOAD: &str = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";

/// chromedriver on a free port, or None when the machine has no browser (then the browser tests
/// skip, unless FROSTBYTE_REQUIRE_BROWSER=1 makes that a failure).
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Option<Driver> {
        let found = ["/usr/bin/chromium", "/usr/bin/chromedriver"].iter().all(|p| std::path::Path::new(p).exists());
        if !found {
            assert!(
                std::env::var("FROSTBYTE_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "FROSTBYTE_REQUIRE_BROWSER=1 but chromium or chromedriver is missing: apt-get install chromium chromium-driver"
            );
            eprintln!("skipped: no chromium and chromedriver (apt-get install chromium chromium-driver)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).ok()).expect("chromedriver did not start");
        Some(Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn browser(&self, profile: &std::path::Path) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1600",
                         format!("--user-data-dir={}", profile.display())]
            }),
        );
        ClientBuilder::native().capabilities(caps).connect(&self.url).await.expect("a browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// alpha, bravo, and a tenant whose display name is markup; synced by an agent that leaves hand
/// edits alone (drift policy warn), so they show as drift.
fn synced_by_an_agent() -> (TestRepo, TestDb, Agent) {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    let mut evil = tenant_doc("evil");
    evil["config"]["display_name"] = json!(PAYLOAD);
    repo.put_tenant(&evil, Format::Yaml);
    repo.commit("three tenants");
    let agent = Agent::start(&repo, &db.url, &[("FROSTBYTE_DRIFT_POLICY", "warn")]);
    let synced = wait_for(Duration::from_secs(30), || (db.count_once_migrated("SELECT 1 FROM tenants") == 3).then_some(()));
    assert!(synced.is_some(), "{}", agent.log());
    (repo, db, agent)
}

fn status_json(repo: &TestRepo, db: &TestDb) -> Value {
    let out = run(repo, Some(db), &["status", "--format", "json"]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.all()))
}

#[test]
fn an_operator_follows_drift_and_history_in_a_real_browser() {
    let Some(driver) = Driver::start() else { return };
    let (repo, db, agent) = synced_by_an_agent();
    // Git changes alpha; someone edits bravo's row by hand.
    let mut alpha = tenant_doc("alpha");
    alpha["config"]["plan"] = json!("enterprise");
    repo.put_tenant(&alpha, Format::Toml);
    repo.commit("alpha goes enterprise");
    db.exec("UPDATE tenants SET config = jsonb_set(config, '{plan}', '\"free\"') WHERE tenant_id = 'bravo'");
    // Until the agent has applied alpha and reported bravo modified.
    let settled = wait_for(Duration::from_secs(30), || {
        let s = status_json(&repo, &db);
        let drift = &s["sources"][0]["drift"];
        (drift["modified"] == json!(1) && db.count("SELECT 1 FROM tenants WHERE tenant_id = 'alpha' AND config_version = 2") == 1).then_some(s)
    });
    let status = settled.unwrap_or_else(|| panic!("the agent did not settle:\n{}", agent.log()));
    let base = format!("http://127.0.0.1:{}", agent.port);
    let profile = tempfile::tempdir().unwrap();

    block_on(async {
        let b = driver.browser(profile.path()).await;
        b.goto(&format!("{base}/")).await.unwrap();
        assert_eq!(b.title().await.unwrap(), "Overview · frostbyte-gitops");
        // The overview's counts are status's.
        for (class, n) in status["sources"][0]["drift"].as_object().unwrap() {
            let link = b.find(Locator::Css(&format!("a.drift-{class}"))).await.unwrap();
            assert_eq!(link.text().await.unwrap(), format!("{class} {n}"));
        }
        let page = b.source().await.unwrap();
        assert!(page.contains("healthy") || page.contains("drifted"), "{page}");
        let shot = b.screenshot().await.unwrap();
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("status-page.png"), &shot).unwrap();

        // Follow the modified tenant to its page: git's value beside the database's.
        b.find(Locator::Css("a.drift-modified")).await.unwrap().click().await.unwrap();
        b.find(Locator::LinkText("bravo")).await.unwrap().click().await.unwrap();
        assert_eq!(b.title().await.unwrap(), "Tenant bravo · frostbyte-gitops");
        let drift_row = b.find(Locator::XPath("//table[.//th='Git']//tr[td]")).await.unwrap().text().await.unwrap();
        assert!(
            drift_row.contains("/config/plan") && drift_row.contains("\"pro\"") && drift_row.contains("\"free\""),
            "{drift_row}"
        );
        let body = b.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
        assert!(!body.contains("s3cret"), "a secret on the page: {body}");

        // alpha's history: the last change, old -> new.
        b.goto(&format!("{base}/tenants/alpha")).await.unwrap();
        let newest = b.find(Locator::Css("ol.versions > li")).await.unwrap().text().await.unwrap();
        assert!(
            newest.contains("version 2") && newest.contains("~ /config/plan: \"pro\" -> \"enterprise\""),
            "{newest}"
        );

        // Markup in a tenant's values is text, and nothing runs.
        b.goto(&format!("{base}/tenants/evil")).await.unwrap();
        assert_eq!(b.title().await.unwrap(), "Tenant evil · frostbyte-gitops", "a script ran");
        let document = b.find(Locator::Css("pre")).await.unwrap().text().await.unwrap();
        assert!(
            document.contains(&serde_json::to_string(PAYLOAD).unwrap()),
            "the markup, as JSON text: {document}"
        );
        assert!(b.find_all(Locator::Css("main img, main script")).await.unwrap().is_empty());
        b.close().await.unwrap();
    });
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    assert!(std::fs::metadata(docs).unwrap().len() > 10_000);
}

#[test]
fn the_page_takes_get_and_head_only_and_sends_its_policy() {
    let (repo, db, agent) = synced_by_an_agent();
    let (code, head, body) = request(agent.port, "GET", "/tenants?drift=in-sync", &[], "");
    assert_eq!(code, 200, "{head}");
    for want in [
        "content-security-policy: default-src 'none'",
        "frame-ancestors 'none'",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.to_ascii_lowercase().contains(want), "{want}: {head}");
    }
    assert!(!body.contains("<script"), "no script on the page");
    assert_eq!(request(agent.port, "POST", "/", &[], "").0, 405);
    assert_eq!(request(agent.port, "DELETE", "/tenants/alpha", &[], "").0, 405);
    assert_eq!(request(agent.port, "HEAD", "/", &[], "").0, 200);
    // The JSON twin says what status says, and escapes nothing it need not.
    let (code, _, json) = request(agent.port, "GET", "/api/v1/tenants/evil", &[], "");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["document"]["config"]["display_name"], json!(PAYLOAD));
    assert_eq!(v["document"]["config"]["secrets"]["db_password"], json!("[REDACTED]"));
    let (_, _, overview) = request(agent.port, "GET", "/api/v1/overview", &[], "");
    let overview: Value = serde_json::from_str(&overview).unwrap();
    assert_eq!(overview["status"]["sources"][0]["name"], status_json(&repo, &db)["sources"][0]["name"]);
    assert_eq!(overview["hours"].as_array().unwrap().len(), 168);
    assert_eq!(request(agent.port, "GET", "/tenants/nobody", &[], "").0, 404);
    assert_eq!(request(agent.port, "GET", "/tenants?drift=bogus", &[], "").0, 400);
}

#[test]
fn beyond_loopback_the_page_wants_its_token() {
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    let mut c = command(repo.path(), Some(&db));
    c.args(["run", "--listen", "0.0.0.0:0"]);
    let refused = output(c);
    assert_eq!(refused.code, 1, "{}", refused.all());
    assert!(refused.stderr.contains("set status_token"), "{}", refused.stderr);

    let token = "status-token-0123456789";
    let mut c = command(repo.path(), Some(&db));
    c.env("FROSTBYTE_STATUS_PAGE", "false")
        .args(["run", "--listen", "0.0.0.0:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut off = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(off.try_wait().unwrap().is_none(), "with the page off, any listener will do");
    let _ = off.kill();
    let _ = off.wait();

    let agent = Agent::start(&repo, &db.url, &[("FROSTBYTE_STATUS_TOKEN", token), ("FROSTBYTE_LISTEN", "0.0.0.0:0")]);
    assert_eq!(request(agent.port, "GET", "/", &[], "").0, 401);
    assert_eq!(
        request(agent.port, "GET", "/api/v1/overview", &[("Authorization", "Bearer wrong-token-0123456789")], "").0,
        401
    );
    assert_eq!(
        request(agent.port, "GET", "/api/v1/overview", &[("Authorization", &format!("Bearer {token}"))], "").0,
        200
    );
    // The login form sets a session cookie that opens the page, and is not the token.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    assert_eq!(request(agent.port, "POST", "/login", &form, "token=nope").0, 401);
    let (code, head, _) = request(agent.port, "POST", "/login", &form, &format!("token={token}"));
    assert_eq!(code, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l[11..].trim().to_string()))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains(token),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    assert_eq!(request(agent.port, "GET", "/", &[("Cookie", session)], "").0, 200);
}
