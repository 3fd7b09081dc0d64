//! Shared by the benchmarks: a git repository of N generated, encrypted tenant files, a database,
//! and an in-process context. N comes from FROSTBYTE_BENCH_TENANTS (default 10,000).
#![allow(dead_code)]

use frostbyte_gitops::config::{Config, Flags};
use frostbyte_gitops::sops::{self, AgeKeys, Format, Rules};
use frostbyte_gitops::sync::Ctx;
use rayon::prelude::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn tenants() -> usize {
    std::env::var("FROSTBYTE_BENCH_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn keys(name: &str) -> AgeKeys {
    let mut k = AgeKeys::default();
    k.add_text(&std::fs::read_to_string(fixtures().join("keys").join(name)).unwrap(), name).unwrap();
    k
}

pub fn id(i: usize) -> String {
    format!("tenant-{i:05}")
}

pub fn doc(i: usize, revision: u32) -> Value {
    let plan = ["free", "starter", "pro", "enterprise"][i % 4];
    let region = ["eu-west-1", "us-east-1", "ap-southeast-2"][i % 3];
    json!({
        "tenant_id": id(i),
        "age_public_key": keys("other.agekey").recipients()[0],
        "endpoints": {"api": format!("https://{}.api.example.com", id(i))},
        "config": {
            "schema_version": 1,
            "display_name": format!("Tenant {i} r{revision}"),
            "plan": plan,
            "region": region,
            "limits": {"max_users": 10 + i % 1000, "storage_gb": 5 + i % 500, "requests_per_minute": 600},
            "features": {"sso": i.is_multiple_of(2), "audit_export": i.is_multiple_of(3), "semantic_search": true},
            "retention": {"data_days": 365, "audit_log_days": 365},
            "contacts": [{"name": "Ops", "email": format!("ops@t{i}.example.com"), "role": "owner"}],
            "secrets": {"db_password": format!("bench-pw-{i}-{revision}"), "api_key": format!("bench-key-{i}")}
        }
    })
}

pub fn format_of(i: usize) -> Format {
    [Format::Toml, Format::Json, Format::Yaml][i % 3]
}

pub fn ext(f: Format) -> &'static str {
    match f {
        Format::Toml => "toml",
        Format::Json => "json",
        Format::Yaml => "yaml",
    }
}

pub fn encrypt(doc: &Value, format: Format) -> String {
    let recipients = [keys("test.agekey").recipients()[0].clone(), keys("other.agekey").recipients()[0].clone()];
    let rules = Rules {
        encrypted_regex: Some("^secrets$".into()),
        ..Rules::default()
    };
    sops::serialize(
        format,
        &sops::encrypt(&sops::normalize(format, doc).unwrap(), &recipients, &rules, None).unwrap(),
    )
    .unwrap()
}

pub struct Repo {
    pub dir: tempfile::TempDir,
    repo: git2::Repository,
}

impl Repo {
    /// N encrypted tenant files, committed.
    pub fn generate(n: usize) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
        let r = Repo { dir, repo };
        r.write((0..n).collect(), 0);
        r.commit("generated tenants");
        r
    }

    /// Rewrites the given tenants at `revision` (encrypting in parallel).
    pub fn write(&self, which: Vec<usize>, revision: u32) {
        let root = self.dir.path().to_path_buf();
        which.par_iter().for_each(|&i| {
            let f = format_of(i);
            std::fs::write(root.join(format!("tenants/{}.{}", id(i), ext(f))), encrypt(&doc(i, revision), f)).unwrap();
        });
    }

    pub fn commit(&self, message: &str) {
        let mut index = self.repo.index().unwrap();
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("Bench", "bench@example.com").unwrap();
        let parents: Vec<git2::Commit> = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok()).into_iter().collect();
        let refs: Vec<&git2::Commit> = parents.iter().collect();
        self.repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &refs).unwrap();
    }

    pub fn ctx(&self, database_url: Option<&str>) -> Ctx {
        let mut flags = Flags::default();
        flags.0.insert("repo", self.dir.path().display().to_string());
        if let Some(url) = database_url {
            flags.0.insert("database_url", url.to_string());
        }
        let cfg = Config::resolve(&flags, &|_| None, None, None).unwrap();
        Ctx {
            cfg,
            keys: keys("test.agekey"),
            signers: Default::default(),
            progress: false,
        }
    }
}

/// A fresh database on FROSTBYTE_BENCH_DATABASE_URL's server, or on a cluster of the benchmarks'
/// own with PostgreSQL's default durability (fsync, synchronous_commit and full_page_writes on:
/// the write cost users pay). FROSTBYTE_BENCH_RELAXED=1 uses the test suite's relaxed cluster.
pub fn database() -> String {
    let relaxed = std::env::var("FROSTBYTE_BENCH_RELAXED").is_ok_and(|v| v == "1");
    let admin = match std::env::var("FROSTBYTE_BENCH_DATABASE_URL") {
        Ok(u) => u,
        Err(_) if relaxed => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/pg/pgdata");
            frostbyte_gitops::localpg::ensure(&dir, &["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=400"])
                .unwrap()
                .conninfo("postgres")
        }
        Err(_) => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/pg-durable/pgdata");
            frostbyte_gitops::localpg::ensure(&dir, &["max_connections=100"]).unwrap().conninfo("postgres")
        }
    };
    println!(
        "database: {}",
        if relaxed {
            "relaxed durability (FROSTBYTE_BENCH_RELAXED=1)"
        } else {
            "default durability (fsync on)"
        }
    );
    let name = format!("bench_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    });
    if admin.contains("://") {
        let (head, rest) = admin.split_once("://").unwrap();
        format!("{head}://{}/{name}", rest.split('/').next().unwrap())
    } else {
        format!("{admin} dbname={name}")
    }
}

pub fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed())
}

pub fn report(label: &str, d: Duration, files: usize) {
    println!(
        "{label:<48} {:>9.1} ms   {:>9.0} files/s",
        d.as_secs_f64() * 1e3,
        files as f64 / d.as_secs_f64()
    );
}
