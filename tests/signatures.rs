//! Commit signatures: real `git commit -S` with SSH keys and with GnuPG, verified in process.

mod common;
use common::*;
use frostbyte_gitops::sops::Format;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Signing identities of their own, in a directory of their own.
struct Signers {
    dir: tempfile::TempDir,
}

impl Signers {
    fn new() -> Signers {
        let s = Signers {
            dir: tempfile::tempdir().unwrap(),
        };
        for name in ["alice", "mallory"] {
            sh(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("{name}@example.com"), "-f"])
                .arg(s.dir.path().join(name)));
        }
        let alice = std::fs::read_to_string(s.dir.path().join("alice.pub")).unwrap();
        std::fs::write(s.allowed(), format!("alice@example.com namespaces=\"git\" {alice}")).unwrap();
        std::fs::create_dir_all(s.gnupg()).unwrap();
        sh(Command::new("chmod").arg("700").arg(s.gnupg()));
        sh(s.gpg().args(["--quick-gen-key", "Bob <bob@example.com>", "ed25519", "sign", "never"]));
        let armored = sh(s.gpg().args(["--armor", "--export", "bob@example.com"]));
        std::fs::write(s.pgp(), armored).unwrap();
        s
    }

    fn allowed(&self) -> PathBuf {
        self.dir.path().join("allowed_signers")
    }
    fn pgp(&self) -> PathBuf {
        self.dir.path().join("trusted.asc")
    }
    fn gnupg(&self) -> PathBuf {
        self.dir.path().join("gnupg")
    }
    fn gpg(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", self.gnupg())
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""]);
        c
    }
    fn ssh_fingerprint(&self, name: &str) -> String {
        let out = sh(Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(self.dir.path().join(format!("{name}.pub"))));
        out.split_whitespace().nth(1).unwrap().to_string()
    }

    /// Commits the work tree with `git commit`, signed as `who` ("alice"/"mallory" by SSH, "bob"
    /// by GnuPG, "nobody" unsigned). Returns the commit id.
    fn commit(&self, repo: &Path, who: &str, message: &str) -> String {
        let git = |args: &[&str]| {
            let mut c = Command::new("git");
            c.arg("-C").arg(repo).args(["-c", "user.name=Test", "-c", "user.email=test@example.com"]);
            c.env("GNUPGHOME", self.gnupg()).args(args);
            c
        };
        sh(&mut git(&["add", "-A"]));
        let key = self.dir.path().join(who);
        let sign: Vec<String> = match who {
            "nobody" => vec![],
            "bob" => vec!["-c".into(), "gpg.format=openpgp".into(), "-c".into(), "user.signingkey=bob@example.com".into()],
            _ => vec!["-c".into(), "gpg.format=ssh".into(), "-c".into(), format!("user.signingkey={}", key.display())],
        };
        let mut args: Vec<&str> = sign.iter().map(String::as_str).collect();
        args.extend(["commit", "-q", "-m", message]);
        if who != "nobody" {
            args.push("-S");
        }
        sh(&mut git(&args));
        sh(&mut git(&["rev-parse", "HEAD"]))
    }

    fn env(&self, c: &mut Command, mode: &str) {
        c.env("FROSTBYTE_VERIFY_COMMITS", mode)
            .env("FROSTBYTE_ALLOWED_SIGNERS", self.allowed())
            .env("FROSTBYTE_TRUSTED_PGP_KEYS", self.pgp());
    }
}

fn verified(signers: &Signers, repo: &TestRepo, db: Option<&TestDb>, mode: &str, args: &[&str]) -> Out {
    let mut c = command(repo.path(), db);
    signers.env(&mut c, mode);
    c.args(args);
    output(c)
}

fn last_signer(db: &TestDb, tenant: &str) -> serde_json::Value {
    db.scalar(&format!(
        "SELECT details->'commit_signer' AS s FROM audit_events WHERE tenant_id = '{tenant}' AND event_type = 'TENANT_CONFIG_UPDATED' ORDER BY event_seq DESC LIMIT 1"
    ))
}

#[test]
fn ssh_and_gnupg_signed_commits_verify_and_their_signer_is_recorded() {
    let signers = Signers::new();
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    signers.commit(repo.path(), "alice", "alpha, signed with SSH");
    let out = verified(&signers, &repo, Some(&db), "head", &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        last_signer(&db, "alpha"),
        json!({"type": "ssh", "fingerprint": signers.ssh_fingerprint("alice"), "principal": "alice@example.com"})
    );

    repo.put_tenant(&tenant_doc("bravo"), Format::Json);
    signers.commit(repo.path(), "bob", "bravo, signed with GnuPG");
    let out = verified(&signers, &repo, Some(&db), "strict", &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let signer = last_signer(&db, "bravo");
    assert_eq!(signer["type"], json!("pgp"), "{signer}");
    assert_eq!(signer["principal"], json!("Bob <bob@example.com>"));
    assert_eq!(signer["fingerprint"].as_str().unwrap().len(), 40, "{signer}");
}

#[test]
fn an_unsigned_or_untrusted_commit_is_refused_naming_commit_and_signer() {
    let signers = Signers::new();
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    let unsigned = signers.commit(repo.path(), "nobody", "unsigned");
    let out = verified(&signers, &repo, Some(&db), "head", &["sync"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains(&format!("commit {unsigned} is refused: signer unsigned")), "{}", out.stderr);
    assert!(out.stderr.contains("nothing was applied"), "{}", out.stderr);
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0);

    repo.put_tenant(&tenant_doc("bravo"), Format::Toml);
    let forged = signers.commit(repo.path(), "mallory", "signed by a key nobody trusts");
    let out = verified(&signers, &repo, Some(&db), "head", &["sync"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let expected = format!(
        "commit {forged} is refused: signer {}: the key is not in allowed_signers",
        signers.ssh_fingerprint("mallory")
    );
    assert!(out.stderr.contains(&expected), "{}", out.stderr);
    assert_eq!(db.count("SELECT 1 FROM tenants"), 0);

    // The pull-request check says so before the merge.
    let plan = verified(&signers, &repo, None, "head", &["plan", "--against-ref", &unsigned, "--format", "markdown"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(plan.stdout.contains("Signature: REFUSED (head)"), "{}", plan.stdout);
    // With verification off, the same commit applies.
    let out = verified(&signers, &repo, Some(&db), "off", &["sync"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(last_signer(&db, "bravo"), json!(null));
}

#[test]
fn strict_mode_checks_every_commit_since_the_last_applied_one() {
    let signers = Signers::new();
    let (repo, db) = (TestRepo::new(), TestDb::new());
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    signers.commit(repo.path(), "alice", "first");
    assert_eq!(verified(&signers, &repo, Some(&db), "strict", &["sync"]).code, 0);
    repo.put_tenant(&tenant_doc("bravo"), Format::Toml);
    let sneaked = signers.commit(repo.path(), "nobody", "unsigned, in the middle");
    repo.put_tenant(&tenant_doc("charlie"), Format::Toml);
    signers.commit(repo.path(), "alice", "signed on top");

    let head = verified(&signers, &repo, None, "head", &["plan", "--against-ref", "HEAD~2"]);
    assert!(head.stdout.contains("Signature: verified (head)"), "{}", head.all());
    let out = verified(&signers, &repo, Some(&db), "strict", &["sync"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains(&format!("commit {sneaked} is refused: signer unsigned")), "{}", out.stderr);
    assert_eq!(db.count("SELECT 1 FROM tenants"), 1);
}

#[test]
fn production_without_a_trusted_signer_does_not_start() {
    let repo = TestRepo::new();
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_MODE", "production").arg("config");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains("verify_commits is head in production but no trusted signer is configured") && out.stderr.contains("FROSTBYTE_ALLOWED_SIGNERS"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_allowed_signers_file_with_no_signer_is_named() {
    let repo = TestRepo::new();
    repo.put_tenant(&tenant_doc("alpha"), Format::Toml);
    repo.commit("alpha");
    let signers = repo.path().join("allowed_signers");
    std::fs::write(&signers, "# nobody yet\n\n").unwrap();
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_VERIFY_COMMITS", "head")
        .env("FROSTBYTE_ALLOWED_SIGNERS", &signers)
        .arg("validate");
    let out = output(c);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains(&format!(
            "verify_commits is head but {} names no trusted signer (it is empty, or only comments)",
            signers.display()
        )),
        "{}",
        out.stderr
    );
}
