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

/// The ```sh blocks of `doc`, each a list of its commands without their comments.
fn shell_blocks(doc: &str) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root().join(doc)).unwrap();
    let (mut out, mut block): (Vec<Vec<String>>, Option<Vec<String>>) = (Vec::new(), None);
    for line in text.lines() {
        match (block.is_some(), line.trim_start().starts_with("```")) {
            (false, true) if line.trim() == "```sh" => block = Some(Vec::new()),
            (true, true) => out.extend(block.take()),
            (true, false) => {
                let command = line.split(" #").next().unwrap_or("").trim();
                if !command.is_empty() && !command.starts_with('#') {
                    block.as_mut().expect("inside a block").push(command.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

/// A block as one script, so that what a line exports the next one sees: each line must end in 0
/// or 2 (changes or drift), or the script stops and says which line it was.
fn script(block: &[String]) -> String {
    let mut out = String::new();
    for (n, line) in block.iter().enumerate() {
        // A local cluster of its own, and the test suite: not for a test to start.
        if line.contains("db start") || line.contains("db stop") || line == "cargo test" {
            continue;
        }
        out.push_str(&format!(
            "{line}\nrc=$?; if [ $rc -ne 0 ] && [ $rc -ne 2 ]; then echo \"line {n} exited $rc\" >&2; exit 1; fi\n"
        ));
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
        if k.starts_with("FROSTBYTE_") || k.starts_with("SOPS_") || k == "TOUR" {
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
        .env("TOUR", bin_dir.join("tour"))
        // docs/commands.md: "Against the example (with SOPS_AGE_KEY_FILE=example-repo/keys/demo.agekey exported)".
        .env("SOPS_AGE_KEY_FILE", "example-repo/keys/demo.agekey");
    output(c)
}

#[test]
fn every_command_the_readme_and_the_command_reference_show_runs_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    shim(tmp.path());
    let data = tmp.path().join("data");
    // A database for the example, which the README's first block syncs and the command
    // reference reads, and one for the tour, which brings its own.
    let (example, tour) = (TestDb::new(), TestDb::new());
    let mut lines = 0;
    for doc in ["README.md", "docs/commands.md"] {
        for block in shell_blocks(doc) {
            let db = if block.iter().any(|l| l.contains("$TOUR")) { &tour } else { &example };
            let out = shell(&script(&block), tmp.path(), db, &data);
            assert_eq!(out.code, 0, "{doc}, the block {block:#?}:\n{}", out.all());
            lines += block.len();
        }
    }
    assert!(lines >= 20, "{lines} lines");
    // The README says a second sync of the example prints "No changes".
    let again = shell("cargo run -- sync --repo example-repo", tmp.path(), &example, &data);
    assert!(again.stdout.starts_with("No changes"), "{}", again.all());
    // The tour left acme-corp at version 2, on the pro plan.
    let moved = "SELECT 1 FROM tenants WHERE tenant_id = 'acme-corp' AND config_version = 2 AND config->>'plan' = 'pro'";
    assert_eq!(tour.count(moved), 1);
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
