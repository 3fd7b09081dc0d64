//! What every run shares: the settings, the keys and signers, and the desired state it reads.

use super::SyncError;
use crate::config::{Config, SourceConfig};
use crate::domain::audit::CommitInfo;
use crate::domain::issue::Issue;
use crate::domain::tenant::DesiredTenant;
use crate::sops::AgeKeys;
use crate::source::SourceSpec;

/// What every command gets: the resolved configuration, the age identities and the trusted
/// commit signers.
pub struct Ctx {
    pub cfg: Config,
    pub keys: AgeKeys,
    pub signers: crate::verify::TrustedSigners,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// The receivers of `[[notifications]]`, keys read.
    pub notifier: std::sync::Arc<crate::notify::Notifier>,
}

impl Ctx {
    /// Where the age identities came from, for messages: the key file, SOPS_AGE_KEY, or both.
    pub fn key_origin(&self) -> String {
        let file = self.cfg.age_key_file.as_ref().map(|p| p.display().to_string());
        let env = self.cfg.age_key.as_ref().map(|_| "SOPS_AGE_KEY".to_string());
        let named: Vec<String> = file.into_iter().chain(env).collect();
        match named.is_empty() {
            true => "(no key file)".into(),
            false => named.join(" and "),
        }
    }

    pub fn source_spec(&self, src: &SourceConfig) -> SourceSpec {
        SourceSpec {
            repo: src.repo.clone(),
            auth: self.cfg.git_auth.clone(),
            path: src.path.clone(),
            cache_dir: self.cfg.data_dir.join("git-cache"),
        }
    }

    /// The source named `only`, or every configured one.
    pub fn sources(&self, only: Option<&str>) -> Result<Vec<&SourceConfig>, SyncError> {
        match only {
            None => Ok(self.cfg.sources.iter().collect()),
            Some(name) => match self.cfg.sources.iter().find(|s| s.name == name) {
                Some(s) => Ok(vec![s]),
                None => Err(SyncError::Usage(format!(
                    "no source named {name:?} (configured: {})",
                    self.cfg.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ))),
            },
        }
    }

    /// The first configured source also reports the rows no source owns (made by hand, or before
    /// ownership was recorded), so that every row is some source's concern.
    pub(super) fn adopts_unowned(&self, src: &SourceConfig) -> bool {
        self.cfg.sources.first().is_some_and(|f| f.name == src.name)
    }
}

/// The tenant files at one revision, decrypted and checked.
/// `T`: each tenant, its document in memory unless the run parks them ([`crate::domain::tenant::Held`]).
#[derive(Debug, Clone)]
pub struct Desired<T = DesiredTenant> {
    pub commit: Option<CommitInfo>,
    pub tenants: Vec<T>,
    pub issues: Vec<Issue>,
    pub files: usize,
}

impl<T> Desired<T> {
    pub fn at(&self) -> String {
        self.commit
            .as_ref()
            .map_or_else(|| "the work tree".to_string(), |c| format!("commit {}", &c.id[..12.min(c.id.len())]))
    }
}
