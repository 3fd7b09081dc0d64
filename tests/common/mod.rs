//! Shared by the integration tests: a real PostgreSQL database per test, a temporary git
//! repository of encrypted tenant files, and the built binary.
#![allow(dead_code)]

pub mod agent;

use frostbyte_gitops::sops::{self, AgeKeys, Format, Rules};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The agent's key in tests.
pub fn agent_key_file() -> PathBuf {
    fixtures().join("keys/test.agekey")
}

pub fn keys(name: &str) -> AgeKeys {
    let mut k = AgeKeys::default();
    k.add_text(&std::fs::read_to_string(fixtures().join("keys").join(name)).unwrap(), name).unwrap();
    k
}

pub fn agent_recipient() -> String {
    keys("test.agekey").recipients().remove(0)
}

/// The tenants' own key in tests.
pub fn tenant_recipient() -> String {
    keys("other.agekey").recipients().remove(0)
}

// ---------- PostgreSQL ----------

/// Admin connection string: FROSTBYTE_TEST_DATABASE_URL, or a cluster of our own, started once
/// (by whichever test process comes first) under target/tmp.
fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("FROSTBYTE_TEST_DATABASE_URL") {
            return url;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pg");
        let settings = ["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=400"];
        let cluster = frostbyte_gitops::localpg::ensure(&dir.join("pgdata"), &settings).expect("starting the test PostgreSQL cluster");
        cluster.conninfo("postgres")
    })
}

/// The connection string for database `name` on the server `base` points to.
fn with_dbname(base: &str, name: &str) -> String {
    if let Some((head, rest)) = base.split_once("://") {
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, format!("?{q}")),
            None => (rest, String::new()),
        };
        let host = authority.split('/').next().unwrap_or(authority);
        format!("{head}://{host}/{name}{query}")
    } else {
        format!("{base} dbname={name}")
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of this test's own, dropped at the end.
pub struct TestDb {
    pub url: String,
    name: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = server().to_string();
        block_on(async {
            let c = connect(&admin).await;
            c.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        });
        TestDb {
            url: with_dbname(&admin, &name),
            name,
        }
    }

    /// Runs statements; panics on error.
    pub fn exec(&self, sql: &str) {
        let url = self.url.clone();
        let sql = sql.to_string();
        block_on(async move { connect(&url).await.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")) })
    }

    /// Runs a statement and returns the error text, if any.
    pub fn try_exec(&self, sql: &str) -> Result<(), String> {
        let url = self.url.clone();
        let sql = sql.to_string();
        block_on(async move {
            connect(&url)
                .await
                .batch_execute(&sql)
                .await
                .map_err(|e| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()))
        })
    }

    /// Rows of one query, each as a JSON object (the query is wrapped in `to_jsonb`).
    pub fn rows(&self, sql: &str) -> Vec<Value> {
        self.try_rows(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    fn try_rows(&self, sql: &str) -> Result<Vec<Value>, tokio_postgres::Error> {
        let url = self.url.clone();
        let wrapped = format!("SELECT to_jsonb(q) FROM ({sql}) q");
        block_on(async move {
            let rows = connect(&url).await.query(&wrapped, &[]).await?;
            Ok(rows.iter().map(|r| r.get::<_, Value>(0)).collect())
        })
    }

    pub fn scalar(&self, sql: &str) -> Value {
        let rows = self.rows(sql);
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0].as_object().unwrap().values().next().cloned().unwrap()
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.scalar(&format!("SELECT count(*) AS n FROM ({sql}) c")).as_i64().unwrap()
    }

    /// `count` for a poll that may start before an agent's first sync has migrated the
    /// database: a table not created yet counts as empty.
    pub fn count_once_migrated(&self, sql: &str) -> i64 {
        match self.try_rows(&format!("SELECT count(*) AS n FROM ({sql}) c")) {
            Ok(rows) => rows[0]["n"].as_i64().unwrap(),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
            Err(e) => panic!("{sql}: {e:?}"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = server().to_string();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // A fresh thread: Drop may run inside a test's own runtime.
        let _ = std::thread::spawn(move || block_on(async move { connect(&admin).await.batch_execute(&sql).await })).join();
    }
}

// ---------- git ----------

/// A plaintext tenant document that passes validation.
pub fn tenant_doc(id: &str) -> Value {
    json!({
        "tenant_id": id,
        "age_public_key": tenant_recipient(),
        "endpoints": {"api": format!("https://{id}.api.example.com")},
        "config": {
            "schema_version": 1,
            "display_name": format!("Tenant {id}"),
            "plan": "pro",
            "region": "eu-west-1",
            "limits": {"max_users": 50, "storage_gb": 10},
            "features": {"sso": true, "beta": false},
            "contacts": [{"name": "Ops", "email": format!("ops@{id}.example.com"), "role": "owner"}],
            "secrets": {"db_password": format!("pw-{id}-s3cret"), "api_key": format!("key-{id}-hidden")}
        }
    })
}

/// Encrypts a tenant document the way the example repository's creation rule does.
pub fn encrypt(doc: &Value, format: Format) -> String {
    let rules = Rules {
        encrypted_regex: Some("^secrets$".into()),
        ..Rules::default()
    };
    let plain = sops::normalize(format, doc).unwrap();
    let enc = sops::encrypt(&plain, &[agent_recipient(), tenant_recipient()], &rules, None).unwrap();
    sops::serialize(format, &enc).unwrap()
}

pub fn ext(format: Format) -> &'static str {
    match format {
        Format::Toml => "toml",
        Format::Json => "json",
        Format::Yaml => "yaml",
    }
}

pub struct TestRepo {
    pub dir: tempfile::TempDir,
    repo: git2::Repository,
    tick: std::cell::Cell<i64>,
}

impl TestRepo {
    pub fn new() -> TestRepo {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
        TestRepo {
            dir,
            repo,
            tick: std::cell::Cell::new(1_700_000_000),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.path().join(rel)).unwrap();
    }

    /// Writes `tenants/<id>.<ext>` encrypted.
    pub fn put_tenant(&self, doc: &Value, format: Format) -> String {
        let rel = format!("tenants/{}.{}", doc["tenant_id"].as_str().unwrap(), ext(format));
        self.write(&rel, encrypt(doc, format));
        rel
    }

    /// Commits the whole work tree; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        let mut index = self.repo.index().unwrap();
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
        index.update_all(["*"], None).unwrap();
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        self.tick.set(self.tick.get() + 60);
        let sig = git2::Signature::new("Test Author", "author@example.com", &git2::Time::new(self.tick.get(), 0)).unwrap();
        let parents: Vec<git2::Commit> = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok()).into_iter().collect();
        let parent_refs: Vec<&git2::Commit> = parents.iter().collect();
        self.repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parent_refs).unwrap().to_string()
    }

    /// Replaces the branch with a new root commit of the current work tree (a force-push).
    pub fn rewrite_history(&self, message: &str) -> String {
        let mut index = self.repo.index().unwrap();
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
        index.update_all(["*"], None).unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::new("Rewriter", "rw@example.com", &git2::Time::new(1_800_000_000, 0)).unwrap();
        let oid = self.repo.commit(None, &sig, &sig, message, &tree, &[]).unwrap();
        let head = self.repo.head().unwrap();
        let name = head.name().unwrap().to_string();
        self.repo.reference(&name, oid, true, "rewrite").unwrap();
        oid.to_string()
    }
}

// ---------- the binary ----------

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

pub fn command(repo: &Path, db: Option<&TestDb>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_frostbyte-gitops"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FROSTBYTE_") || k.starts_with("SOPS_") || k == "ROPS_AGE" {
            c.env_remove(k);
        }
    }
    c.env("HOME", repo)
        .env("SOPS_AGE_KEY_FILE", agent_key_file())
        .env("FROSTBYTE_DATA_DIR", repo.join(".frostbyte"))
        .env("FROSTBYTE_GITOPS_REPO", repo)
        .env("FROSTBYTE_LOG", "debug")
        .stdin(Stdio::null());
    if let Some(db) = db {
        c.env("FROSTBYTE_CONTROL_DB_URL", &db.url);
    }
    c
}

pub fn output(mut c: Command) -> Out {
    let o = c.output().expect("running frostbyte-gitops");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// Starts `n` processes with the same arguments at once and waits for all of them.
pub fn run_concurrently(repo: &TestRepo, db: &TestDb, args: &[&str], n: usize) -> Vec<Out> {
    let children: Vec<_> = (0..n)
        .map(|_| {
            let mut c = command(repo.path(), Some(db));
            c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            Out {
                code: o.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&o.stdout).into(),
                stderr: String::from_utf8_lossy(&o.stderr).into(),
            }
        })
        .collect()
}

pub fn run(repo: &TestRepo, db: Option<&TestDb>, args: &[&str]) -> Out {
    let mut c = command(repo.path(), db);
    c.args(args);
    output(c)
}
