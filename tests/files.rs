//! `secrets encrypt|decrypt|edit|updatekeys` and `tenant new`, through the binary.

mod common;
use common::*;
use frostbyte_gitops::sops::{self, Format};
use std::path::Path;

/// A tenant repository with a .sops.yaml like example-repo's, naming the agent's test key.
fn repo_with_rules() -> TestRepo {
    let repo = TestRepo::new();
    repo.write(
        ".sops.yaml",
        format!(
            "creation_rules:\n  - path_regex: ^tenants/[^/]+\\.(toml|json|ya?ml)$\n    encrypted_regex: ^secrets$\n    age: {}\n",
            agent_recipient()
        ),
    );
    repo
}

fn secrets(repo: &TestRepo, args: &[&str], editor: Option<&str>) -> Out {
    let mut c = command(repo.path(), None);
    c.current_dir(repo.path()).arg("secrets").args(args);
    if let Some(e) = editor {
        c.env("EDITOR", e);
    }
    output(c)
}

fn recipients(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = sops::parse(Format::from_path(&path.to_string_lossy()).unwrap(), &text).unwrap();
    sops::recipients_and_rules(&doc).unwrap().0
}

#[test]
fn encrypt_then_decrypt_round_trips_in_every_format_with_tenant_and_agent_keys() {
    let repo = repo_with_rules();
    for (format, ext) in [(Format::Toml, "toml"), (Format::Json, "json"), (Format::Yaml, "yaml")] {
        let id = format!("t-{ext}");
        let rel = format!("tenants/{id}.{ext}");
        let plain = sops::serialize(format, &tenant_doc(&id)).unwrap();
        repo.write(&rel, &plain);
        let out = secrets(&repo, &["encrypt", &rel], None);
        assert_eq!(out.code, 0, "{}", out.all());
        let path = repo.path().join(&rel);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&format!("pw-{id}-s3cret")), "{ext}: the secret is still in the clear");
        assert!(text.contains("Tenant t-"), "{ext}: only secrets are encrypted under this rule");
        assert_eq!(recipients(&path), [agent_recipient(), tenant_recipient()]);
        let out = secrets(&repo, &["decrypt", &rel], None);
        assert_eq!(out.code, 0, "{}", out.all());
        assert_eq!(sops::parse(format, &out.stdout).unwrap(), sops::parse(format, &plain).unwrap(), "{ext}");
        assert_eq!(secrets(&repo, &["encrypt", &rel], None).code, 1, "a second encrypt is refused");
    }
    repo.commit("encrypted by the helpers");
    assert_eq!(run(&repo, None, &["validate"]).code, 0);
}

#[test]
fn edit_reencrypts_changes_and_leaves_the_file_alone_otherwise() {
    let repo = repo_with_rules();
    let rel = "tenants/acme.toml";
    repo.write(rel, sops::serialize(Format::Toml, &tenant_doc("acme")).unwrap());
    assert_eq!(secrets(&repo, &["encrypt", rel], None).code, 0);
    let path = repo.path().join(rel);
    let original = std::fs::read_to_string(&path).unwrap();

    // An editor that saves nothing new.
    let out = secrets(&repo, &["edit", rel], Some("true"));
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stderr.contains("no changes"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original, "byte for byte");

    // A scripted edit of a plain value and a secret; the editor checks its file is private.
    let script = repo.path().join("editor.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$(stat -c %a \"$1\")\" = 600 ] || { echo 'plaintext file is not private' >&2; exit 1; }\nsed -i -e 's/plan = \"pro\"/plan = \"enterprise\"/' -e 's/pw-acme-s3cret/rotated-by-editor/' \"$1\"\n",
    )
    .unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&script).status().unwrap();
    let out = secrets(&repo, &["edit", rel], Some(script.to_str().unwrap()));
    assert_eq!(out.code, 0, "{}", out.all());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("plan = \"enterprise\"") && !text.contains("rotated-by-editor"), "{text}");
    let plain = secrets(&repo, &["decrypt", rel], None).stdout;
    assert!(plain.contains("rotated-by-editor") && plain.contains("enterprise"), "{plain}");
    // The data key is kept, as sops does on edit.
    let key_of = |t: &str| sops::data_key(&sops::parse(Format::Toml, t).unwrap(), &keys("test.agekey")).unwrap();
    assert_eq!(key_of(&text), key_of(&original));

    // An edit that breaks the schema is refused and the file stays as it was.
    let before = std::fs::read_to_string(&path).unwrap();
    let out = secrets(&repo, &["edit", rel], Some("sed -i -e 's/plan = \"enterprise\"/plan = \"platinum\"/'"));
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains("not a valid tenant file") && out.stderr.contains("/config/plan"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("rotated-by-editor"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    // ... and the edit is not lost: it is kept where only its owner can read it, and the next
    // edit goes on from it.
    let kept = out
        .stderr
        .split("Your edit is kept in ")
        .nth(1)
        .and_then(|rest| rest.split(" (mode 0600").next())
        .unwrap_or_else(|| panic!("no kept edit named: {}", out.stderr))
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&kept).unwrap().contains("plan = \"platinum\""));
    let fixed = secrets(&repo, &["edit", rel, "--from", &kept], Some("sed -i -e 's/platinum/starter/'"));
    assert_eq!(fixed.code, 0, "{}", fixed.all());
    assert!(secrets(&repo, &["decrypt", rel], None).stdout.contains("plan = \"starter\""));
    std::fs::remove_dir_all(Path::new(&kept).parent().unwrap()).unwrap();
}

#[test]
fn updatekeys_rewraps_to_the_recipients_the_rules_name_now() {
    let repo = repo_with_rules();
    for id in ["alpha", "bravo"] {
        let rel = format!("tenants/{id}.json");
        repo.write(&rel, serde_json::to_string_pretty(&tenant_doc(id)).unwrap());
        assert_eq!(secrets(&repo, &["encrypt", &rel], None).code, 0);
    }
    let (_, extra) = sops::AgeKeys::generate();
    repo.write(
        ".sops.yaml",
        format!(
            "creation_rules:\n  - path_regex: ^tenants/\n    encrypted_regex: ^secrets$\n    age: >-\n      {},\n      {extra}\n",
            agent_recipient()
        ),
    );
    let path = repo.path().join("tenants/alpha.json");
    let before = std::fs::read_to_string(&path).unwrap();
    let dry = {
        let mut c = command(repo.path(), None);
        c.current_dir(repo.path()).args(["--path", "tenants", "secrets", "updatekeys", "--dry-run"]);
        output(c)
    };
    assert_eq!(dry.code, 0, "{}", dry.all());
    assert_eq!(dry.stdout.matches("would update").count(), 2, "{}", dry.stdout);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before, "a dry run writes nothing");
    let out = secrets(&repo, &["updatekeys", "tenants/alpha.json"], None);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains(&format!("+[{extra}]")), "{}", out.stdout);
    assert_eq!(recipients(&path), [agent_recipient(), extra.clone(), tenant_recipient()]);
    assert!(secrets(&repo, &["updatekeys", "tenants/alpha.json"], None).stdout.contains("up to date"));
    // Values and MAC are untouched: the file still decrypts, and the data key is the same.
    repo.commit("rewrapped");
    assert_eq!(run(&repo, None, &["validate"]).code, 0);
}

#[test]
fn tenant_new_writes_a_valid_encrypted_skeleton() {
    let repo = repo_with_rules();
    let mut c = command(repo.path(), None);
    c.current_dir(repo.path())
        .args(["tenant", "new", "newco", "--age-public-key", &tenant_recipient(), "--format", "yaml"]);
    let out = output(c);
    assert_eq!(out.code, 0, "{}", out.all());
    let text = std::fs::read_to_string(repo.path().join("tenants/newco.yaml")).unwrap();
    assert!(text.contains("sops:") && !text.contains("change-me"), "{text}");
    repo.commit("newco");
    assert_eq!(run(&repo, None, &["validate"]).code, 0);
}

/// The file-writing commands need a checkout: with a remote repository configured they say so,
/// and the URL's credentials stay out of the message.
#[test]
fn file_commands_refuse_a_remote_repository_without_showing_its_credentials() {
    let repo = repo_with_rules();
    for args in [
        &["tenant", "new", "newco", "--age-public-key", &tenant_recipient()][..],
        &["secrets", "updatekeys"],
    ] {
        let mut c = command(repo.path(), None);
        c.current_dir(repo.path())
            .env("FROSTBYTE_GITOPS_REPO", "https://bot:s3cr3t-token@git.example.com/org/tenants.git")
            .args(args);
        let out = output(c);
        assert_eq!(out.code, 1, "{args:?}: {}", out.all());
        assert!(
            out.stderr.contains("repo is a remote URL (https://git.example.com/org/tenants.git)"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!out.all().contains("s3cr3t"), "{args:?}: {}", out.all());
    }
}

#[test]
fn files_the_helpers_write_are_read_by_the_sops_cli() {
    let Some(cli) = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("sops")).find(|p| p.is_file())) else {
        assert!(std::env::var_os("FROSTBYTE_REQUIRE_SOPS_CLI").is_none(), "sops CLI required but not on PATH");
        eprintln!("skipped: no sops CLI on PATH");
        return;
    };
    let repo = repo_with_rules();
    for ext in ["json", "yaml"] {
        let rel = format!("tenants/s-{ext}.{ext}");
        let format = Format::from_path(&rel).unwrap();
        repo.write(&rel, sops::serialize(format, &tenant_doc(&format!("s-{ext}"))).unwrap());
        assert_eq!(secrets(&repo, &["encrypt", &rel], None).code, 0);
        let out = std::process::Command::new(&cli)
            .args(["decrypt", "--output-type", "json"])
            .arg(repo.path().join(&rel))
            .env("SOPS_AGE_KEY_FILE", agent_key_file())
            .env("SOPS_DISABLE_VERSION_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{ext}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, tenant_doc(&format!("s-{ext}")));
    }
}

/// One value changed in each example file is a diff of that value, the MAC and `lastmodified`:
/// the file keeps its layout, the unchanged values their ciphertext, the age stanzas their bytes.
#[test]
fn an_edit_of_one_value_changes_that_line_the_mac_and_lastmodified_only() {
    let tmp = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    assert!(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&example)
            .arg(tmp.path().join("ex"))
            .status()
            .unwrap()
            .success()
    );
    let repo = tmp.path().join("ex");
    let key = example.join("keys/demo.agekey");
    for file in ["acme-corp.toml", "globex.toml", "initech.json", "stark-labs.yaml"] {
        let path = repo.join("tenants").join(file);
        let before = std::fs::read_to_string(&path).unwrap();
        let mut c = command(&repo, None);
        c.current_dir(&repo)
            .env("SOPS_AGE_KEY_FILE", &key)
            .env("EDITOR", "sed -i -e 's/display_name\\(.\\{1,4\\}\\)\\([A-Z]\\)/display_name\\1Renamed \\2/'")
            .args(["secrets", "edit", path.to_str().unwrap()]);
        let out = output(c);
        assert_eq!(out.code, 0, "{file}: {}", out.all());
        let after = std::fs::read_to_string(&path).unwrap();
        let (old, new): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
        assert_eq!(old.len(), new.len(), "{file}: lines came or went:\n{after}");
        let changed: Vec<&str> = new.iter().zip(&old).filter(|(n, o)| n != o).map(|(n, _)| n.trim_start()).collect();
        assert_eq!(changed.len(), 3, "{file}: {changed:#?}");
        assert!(changed[0].contains("display_name") && changed[0].contains("Renamed "), "{file}: {changed:?}");
        assert!(
            changed.iter().any(|l| l.contains("lastmodified")) && changed.iter().any(|l| l.contains("mac")),
            "{file}: {changed:?}"
        );
    }
    // What was written still decrypts and validates.
    let mut c = command(&repo, None);
    c.env("SOPS_AGE_KEY_FILE", &key)
        .args(["validate", "--worktree", "--repo", repo.to_str().unwrap()]);
    assert!(
        std::process::Command::new("git")
            .args(["init", "-q"])
            .current_dir(&repo)
            .status()
            .unwrap()
            .success()
    );
    let out = output(c);
    assert_eq!(out.code, 0, "{}", out.all());
}
