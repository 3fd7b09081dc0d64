//! A commit's id as the orchestration handles it: checked once, then passed around instead of
//! strings that might be anything ("worktree", a ref name, a truncated id).

use serde::Serialize;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitId(String);

impl CommitId {
    /// A full SHA-1 or SHA-256 object id in hex; anything else is not a commit id.
    pub fn parse(s: &str) -> Option<CommitId> {
        ((s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| CommitId(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 characters, as people quote commits.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which commits must carry a trusted signature before a run applies them (`verify_commits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Off,
    /// The commit being applied must carry a good signature by a trusted signer.
    Head,
    /// Every commit since the last applied one (or the first applied commit itself) must.
    Strict,
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifyMode::Off => "off",
            VerifyMode::Head => "head",
            VerifyMode::Strict => "strict",
        })
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(VerifyMode::Off),
            "head" => Ok(VerifyMode::Head),
            "strict" => Ok(VerifyMode::Strict),
            other => Err(format!("{other:?} is not off, head or strict")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_hex_object_ids_are_commit_ids() {
        let id = "377F5F3EFB2413FB8E9181A28BA48503DFDD2DB3";
        let c = CommitId::parse(id).unwrap();
        assert_eq!((c.as_str(), c.short()), ("377f5f3efb2413fb8e9181a28ba48503dfdd2db3", "377f5f3efb24"));
        for bad in ["worktree", "", "377f5f3", "main", &"g".repeat(40)] {
            assert_eq!(CommitId::parse(bad), None, "{bad:?}");
        }
    }
}
