//! The documentation against the binary: every command of the README's shell blocks runs as
//! written against example-repo (into a real PostgreSQL), and every JSON layout docs/json-output.md
//! shows has the fields and format_version the binary prints. A command or a field the docs
//! promise cannot stop working unnoticed.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The lines of the README's ```sh blocks, without comments.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in readme.lines() {
        match (inside, line.trim_start().starts_with("```")) {
            (false, true) => inside = line.trim() == "```sh",
            (true, true) => inside = false,
            (true, false) => {
                let command = line.split(" #").next().unwrap_or("").trim();
                if !command.is_empty() && !command.starts_with('#') {
                    out.push(command.to_string());
                }
            }
            (false, false) => {}
        }
    }
    out
}

/// `cargo run [-q] -- ARGS` as the built binary; `cargo test` is this run itself.
fn shim(dir: &Path) {
    let script = dir.join("cargo");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = run ] || exit 0\nshift\n[ \"$1\" = -q ] && shift\n[ \"$1\" = -- ] && shift\nexec \"$FROSTBYTE_BIN\" \"$@\"\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&script).status().unwrap();
}

fn shell(line: &str, bin_dir: &Path, db: &TestDb, data: &Path) -> Out {
    let mut c = Command::new("sh");
    for (k, _) in std::env::vars() {
        if k.starts_with("FROSTBYTE_") || k.starts_with("SOPS_") {
            c.env_remove(k);
        }
    }
    c.arg("-c")
        .arg(line)
        .current_dir(root())
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("FROSTBYTE_BIN", env!("CARGO_BIN_EXE_frostbyte-gitops"))
        .env("FROSTBYTE_CONTROL_DB_URL", &db.url)
        .env("FROSTBYTE_DATA_DIR", data)
        // "Against the example (with SOPS_AGE_KEY_FILE=example-repo/keys/demo.agekey exported)".
        .env("SOPS_AGE_KEY_FILE", "example-repo/keys/demo.agekey");
    output(c)
}

#[test]
fn every_command_the_readme_shows_runs_as_written() {
    let commands = readme_commands();
    assert!(commands.len() >= 8, "{commands:?}");
    let (db, tmp) = (TestDb::new(), tempfile::tempdir().unwrap());
    shim(tmp.path());
    let data = tmp.path().join("data");
    let mut ran = 0;
    for line in &commands {
        // A local cluster of its own, and the test suite: not for a test to start.
        if line.contains("db start") || line == "cargo test" {
            continue;
        }
        let out = shell(line, tmp.path(), &db, &data);
        assert!(out.code == 0 || out.code == 2, "README: `{line}` exited {}:\n{}", out.code, out.all());
        ran += 1;
    }
    assert!(ran >= 8, "{ran} of {commands:?}");
    // The first block says a second sync prints "No changes".
    let sync = commands.iter().find(|c| c.contains(" sync ")).expect("the README syncs the example");
    let again = shell(sync, tmp.path(), &db, &data);
    assert!(again.stdout.starts_with("No changes"), "{}", again.all());
}

/// The JSON blocks of docs/json-output.md, by the heading above them.
fn documented_layouts() -> Vec<(String, Value)> {
    let doc = std::fs::read_to_string(root().join("docs/json-output.md")).unwrap();
    let mut out = Vec::new();
    let (mut heading, mut block): (String, Option<String>) = (String::new(), None);
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            heading = h.to_string();
        } else if line == "```json" {
            block = Some(String::new());
        } else if line == "```" {
            if let Some(text) = block.take() {
                // The docs elide long values as "…": those stay strings.
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{heading}: {e}\n{text}"));
                out.push((heading.clone(), v));
            }
        } else if let Some(b) = block.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    out
}

/// Every member the documented object has, the printed one has too, recursively into objects;
/// a documented array's first element is looked for among the printed array's elements.
fn has_documented_fields(doc: &Value, got: &Value, at: &str) -> Vec<String> {
    let mut missing = Vec::new();
    match (doc, got) {
        (Value::Object(d), Value::Object(g)) => {
            for (k, v) in d {
                match g.get(k) {
                    None => missing.push(format!("{at}/{k}")),
                    Some(gv) => missing.extend(has_documented_fields(v, gv, &format!("{at}/{k}"))),
                }
            }
        }
        (Value::Array(d), Value::Array(g)) if !d.is_empty() && !g.is_empty() => {
            let best = g.iter().map(|e| has_documented_fields(&d[0], e, &format!("{at}/0"))).min_by_key(Vec::len);
            missing.extend(best.unwrap_or_default());
        }
        _ => {}
    }
    missing
}

/// example-repo copied into a repository of its own, so that a test can commit to it.
fn example_copy(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("example");
    assert!(
        Command::new("cp")
            .arg("-r")
            .arg(root().join("example-repo"))
            .arg(&repo)
            .status()
            .unwrap()
            .success()
    );
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "the example"]);
    repo
}

fn git(repo: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(args)
        .current_dir(repo)
        .env("GIT_AUTHOR_NAME", "Docs")
        .env("GIT_AUTHOR_EMAIL", "docs@example.com")
        .env("GIT_COMMITTER_NAME", "Docs")
        .env("GIT_COMMITTER_EMAIL", "docs@example.com")
        .status()
        .unwrap();
    assert!(ok.success(), "git {args:?}");
}

#[test]
fn the_documented_json_layouts_are_what_the_binary_prints() {
    let (db, tmp) = (TestDb::new(), tempfile::tempdir().unwrap());
    shim(tmp.path());
    let data = tmp.path().join("data");
    let repo = example_copy(tmp.path());
    let at = repo.display().to_string();
    let sh = |line: String| shell(&line, tmp.path(), &db, &data);
    let json = |args: &str| -> Value {
        let out = sh(format!("cargo run -- {args} --repo {at} --format json"));
        assert!(out.code == 0 || out.code == 2, "{args}: {}", out.all());
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{args}: {e}: {}", out.stdout))
    };
    // A database with every kind of history: synced, one tenant edited by hand and changed in git
    // since (pending and modified), the trail verified.
    assert_eq!(sh(format!("cargo run -- sync --repo {at}")).code, 0);
    db.exec("UPDATE tenants SET config = jsonb_set(config, '{display_name}', '\"Globex, edited by hand\"') WHERE tenant_id = 'globex'");
    let edit = sh(format!(
        "EDITOR=\"sed -i -e 's/plan = \\\"pro\\\"/plan = \\\"enterprise\\\"/'\" cargo run -- secrets edit {at}/tenants/globex.toml"
    ));
    assert_eq!(edit.code, 0, "{}", edit.all());
    git(&repo, &["commit", "-q", "-am", "globex goes enterprise"]);
    assert_eq!(sh(format!("cargo run -- audit verify --repo {at}")).code, 0);
    let layouts = documented_layouts();
    assert!(layouts.len() >= 5, "{layouts:?}");
    for (heading, doc) in &layouts {
        let command = heading.trim_matches('`').split('`').next().unwrap().replace(" --format json", "");
        let got = match command.as_str() {
            "validate" => json("validate"),
            "plan" => json("plan"),
            "drift" => json("drift"),
            "status" => json("status"),
            "tenant history ID" => json("tenant history acme-corp"),
            other => panic!("docs/json-output.md documents {other:?}, which this test does not run: add it"),
        };
        assert_eq!(doc["format_version"], got["format_version"], "{heading}");
        // status's sources carry runs this database did not make: compare what it did make.
        let missing: Vec<String> = has_documented_fields(doc, &got, "")
            .into_iter()
            .filter(|m| !(command == "status" && m.starts_with("/sources/0/last_run")))
            .collect();
        assert!(missing.is_empty(), "{heading}: documented but not printed: {missing:?}\n{got:#}");
    }
}
