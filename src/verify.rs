//! Who wrote a commit: git commit signatures (SSH and OpenPGP) checked in process against the
//! trusted signers, as Flux's `spec.verify` and Argo CD's `sourceIntegrity` do. SOPS cannot say who
//! wrote a file (its recipients are public), so this is where authorship comes from.

use serde::Serialize;
use std::path::Path;

use crate::domain::commit::VerifyMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerKind {
    Ssh,
    Pgp,
}

/// A verified signer, as recorded in every `TENANT_CONFIG_UPDATED` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommitSigner {
    #[serde(rename = "type")]
    pub kind: SignerKind,
    /// `SHA256:...` for SSH keys, the hex fingerprint for OpenPGP keys.
    pub fingerprint: String,
    /// The allowed_signers principal, or the OpenPGP key's first user id.
    pub principal: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SignersError {
    #[error("reading {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    AllowedSigners { path: String, line: usize, message: String },
    #[error("{path}: {message}")]
    Pgp { path: String, message: String },
}

/// Why a commit is not trusted. `signer` is the key's fingerprint, or "unsigned".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("commit {commit} is refused: signer {signer}: {reason}; nothing was applied")]
pub struct Refused {
    pub commit: String,
    pub signer: String,
    pub reason: String,
}

#[derive(Debug)]
struct AllowedSigner {
    principal: String,
    key: ssh_key::PublicKey,
}

/// The keys whose signatures are trusted.
#[derive(Default)]
pub struct TrustedSigners {
    ssh: Vec<AllowedSigner>,
    pgp: Vec<pgp::composed::SignedPublicKey>,
}

impl TrustedSigners {
    pub fn is_empty(&self) -> bool {
        self.ssh.is_empty() && self.pgp.is_empty()
    }

    /// `allowed_signers`: OpenSSH's format (what `gpg.ssh.allowedSignersFile` reads); `pgp_keys`:
    /// armored OpenPGP public keys. Options that restrict a key in ways not checked here
    /// (`cert-authority`, `valid-after`, `valid-before`) are refused rather than ignored.
    pub fn load(allowed_signers: Option<&Path>, pgp_keys: Option<&Path>) -> Result<Self, SignersError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| SignersError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let mut out = TrustedSigners::default();
        if let Some(path) = allowed_signers {
            let text = read(path)?;
            for (n, line) in text.lines().enumerate() {
                if let Some(signer) = parse_allowed_signer(line).map_err(|message| SignersError::AllowedSigners {
                    path: path.display().to_string(),
                    line: n + 1,
                    message,
                })? {
                    out.ssh.push(signer);
                }
            }
        }
        if let Some(path) = pgp_keys {
            use pgp::composed::Deserializable;
            let text = read(path)?;
            let err = |message: String| SignersError::Pgp {
                path: path.display().to_string(),
                message,
            };
            let (keys, _) = pgp::composed::SignedPublicKey::from_string_many(&text).map_err(|e| err(e.to_string()))?;
            for key in keys {
                let key = key.map_err(|e| err(e.to_string()))?;
                key.verify_bindings().map_err(|e| err(format!("a key's self-signatures do not verify: {e}")))?;
                out.pgp.push(key);
            }
            if out.pgp.is_empty() {
                return Err(err("no OpenPGP public key in it".into()));
            }
        }
        Ok(out)
    }

    /// The trusted signer of `payload` under `signature` (as git stores them in a commit).
    pub fn check(&self, signature: &str, payload: &[u8]) -> Result<CommitSigner, (String, String)> {
        if signature.contains("-----BEGIN SSH SIGNATURE-----") {
            self.check_ssh(signature, payload)
        } else if signature.contains("-----BEGIN PGP SIGNATURE-----") {
            self.check_pgp(signature, payload)
        } else {
            Err(("unknown".into(), "the signature is neither SSH nor OpenPGP (X.509 is not supported)".into()))
        }
    }

    fn check_ssh(&self, signature: &str, payload: &[u8]) -> Result<CommitSigner, (String, String)> {
        let sig = ssh_key::SshSig::from_pem(signature.trim()).map_err(|e| ("unknown".to_string(), format!("unreadable SSH signature: {e}")))?;
        let key = ssh_key::PublicKey::from(sig.public_key().clone());
        let fingerprint = key.fingerprint(ssh_key::HashAlg::Sha256).to_string();
        if sig.namespace() != "git" {
            return Err((fingerprint, format!("the signature's namespace is {:?}, not \"git\"", sig.namespace())));
        }
        let Some(allowed) = self.ssh.iter().find(|a| a.key.key_data() == key.key_data()) else {
            return Err((fingerprint, "the key is not in allowed_signers".into()));
        };
        allowed
            .key
            .verify("git", payload, &sig)
            .map_err(|e| (fingerprint.clone(), format!("the signature does not verify: {e}")))?;
        Ok(CommitSigner {
            kind: SignerKind::Ssh,
            fingerprint,
            principal: allowed.principal.clone(),
        })
    }

    fn check_pgp(&self, signature: &str, payload: &[u8]) -> Result<CommitSigner, (String, String)> {
        use pgp::composed::Deserializable;
        use pgp::types::KeyDetails;
        let (sig, _) =
            pgp::composed::DetachedSignature::from_string(signature).map_err(|e| ("unknown".to_string(), format!("unreadable OpenPGP signature: {e}")))?;
        let issuer = sig
            .signature
            .issuer_fingerprint()
            .first()
            .map(|f| hex::encode(f.as_bytes()))
            .or_else(|| sig.signature.issuer_key_id().first().map(|k| hex::encode(k.as_ref())))
            .unwrap_or_else(|| "unknown".into());
        for key in &self.pgp {
            let principal = key
                .details
                .users
                .first()
                .map(|u| String::from_utf8_lossy(u.id.id()).to_string())
                .unwrap_or_default();
            let primary = hex::encode(key.primary_key.fingerprint().as_bytes());
            if sig.verify(&key.primary_key, payload).is_ok() {
                return Ok(CommitSigner {
                    kind: SignerKind::Pgp,
                    fingerprint: primary,
                    principal,
                });
            }
            for sub in &key.public_subkeys {
                if sig.verify(&sub.key, payload).is_ok() {
                    return Ok(CommitSigner {
                        kind: SignerKind::Pgp,
                        fingerprint: hex::encode(sub.key.fingerprint().as_bytes()),
                        principal,
                    });
                }
            }
        }
        Err((issuer, "no trusted OpenPGP key made this signature".into()))
    }
}

const SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One line of an allowed_signers file: `principals [options] keytype base64 [comment]`.
fn parse_allowed_signer(line: &str) -> Result<Option<AllowedSigner>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let Some(at) = tokens.iter().position(|t| SSH_KEY_TYPES.contains(t)) else {
        return Err("no SSH key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-...) on the line".into());
    };
    if at == 0 || at + 1 >= tokens.len() {
        return Err("expected: principals [options] keytype base64-key".into());
    }
    let options = tokens[1..at].join(" ");
    for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (name, value) = opt.split_once('=').unwrap_or((opt, ""));
        match name.to_ascii_lowercase().as_str() {
            "namespaces" => {
                if !value.trim_matches('"').split(',').any(|n| n == "git") {
                    return Ok(None);
                }
            }
            other => return Err(format!("option {other:?} is not supported (only namespaces=)")),
        }
    }
    let key = ssh_key::PublicKey::from_openssh(&format!("{} {}", tokens[at], tokens[at + 1])).map_err(|e| format!("not an SSH public key: {e}"))?;
    Ok(Some(AllowedSigner {
        principal: tokens[0].to_string(),
        key,
    }))
}

/// Checks the signature git stores in `commit`.
pub fn verify_commit(repo: &git2::Repository, commit: git2::Oid, signers: &TrustedSigners) -> Result<CommitSigner, Refused> {
    let refused = |signer: String, reason: String| Refused {
        commit: commit.to_string(),
        signer,
        reason,
    };
    let (signature, payload) = match repo.extract_signature(&commit, None) {
        Ok(pair) => pair,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Err(refused("unsigned".into(), "the commit is not signed".into())),
        Err(e) => return Err(refused("unknown".into(), format!("reading the signature: {}", e.message()))),
    };
    let signature = String::from_utf8_lossy(&signature).to_string();
    signers.check(&signature, &payload).map_err(|(signer, reason)| refused(signer, reason))
}

/// What `mode` requires of the commits leading to `new`: its own signature (`head`), or that of
/// every commit since `last` (`strict`). Returns the signer of `new`.
pub fn verify_range(
    repo: &git2::Repository,
    mode: VerifyMode,
    last: Option<git2::Oid>,
    new: git2::Oid,
    signers: &TrustedSigners,
) -> Result<Option<CommitSigner>, Refused> {
    if mode == VerifyMode::Off {
        return Ok(None);
    }
    let head = verify_commit(repo, new, signers)?;
    if mode == VerifyMode::Strict
        && let Some(last) = last.filter(|l| *l != new)
    {
        let walk = || -> Result<Vec<git2::Oid>, git2::Error> {
            let mut w = repo.revwalk()?;
            w.push(new)?;
            w.hide(last)?;
            w.collect()
        };
        let commits = walk().map_err(|e| Refused {
            commit: new.to_string(),
            signer: head.fingerprint.clone(),
            reason: format!("listing the commits since {last}: {}", e.message()),
        })?;
        for c in commits.into_iter().filter(|c| *c != new) {
            verify_commit(repo, c, signers)?;
        }
    }
    Ok(Some(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_signers_lines() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let s = parse_allowed_signer(&format!("alice@example.com {key} laptop")).unwrap().unwrap();
        assert_eq!(s.principal, "alice@example.com");
        assert!(parse_allowed_signer(&format!("bob namespaces=\"git\" {key}")).unwrap().is_some());
        assert!(
            parse_allowed_signer(&format!("bob namespaces=\"file\" {key}")).unwrap().is_none(),
            "not for git"
        );
        assert!(parse_allowed_signer(&format!("ca cert-authority {key}")).unwrap_err().contains("not supported"));
        assert!(parse_allowed_signer("# comment").unwrap().is_none());
        assert!(parse_allowed_signer("carol ssh-ed25519 notbase64").is_err());
    }
}
