//! Why a run stopped, and what the agent does about it.

use crate::domain::issue::Issue;
use crate::localpg::LocalPgError;
use crate::source::SourceError;
use crate::store::StoreError;
use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    LocalPg(#[from] LocalPgError),
    #[error("{} problem(s) in {} file(s) at {at}; nothing was applied:\n{}", issues.len(), files_with_issues(issues), issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid { at: String, issues: Vec<Issue> },
    #[error(
        "commit {new} does not descend from the last applied commit {old} (history was rewritten, or the branch was reset); nothing was applied. Pass --allow-non-fast-forward to apply it anyway"
    )]
    NonFastForward { new: String, old: String },
    #[error(
        "commit {new} cannot be shown to descend from the last applied commit {old}: the repository is a shallow clone whose history stops before it; nothing was applied. Fetch the history (git fetch --unshallow), or pass --allow-non-fast-forward to apply it anyway"
    )]
    ShallowClone { new: String, old: String },
    #[error("the saved plan is stale; nothing was applied:\n  {}", .0.join("\n  "))]
    Stale(Vec<String>),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Refused(#[from] crate::verify::Refused),
    #[error("source {name}: {why}")]
    MassPrune { name: String, why: String },
    #[error(
        "the age identities from {keys} open none of source {name}'s files (tried {file}: {why}); nothing was applied. The key may have been rotated or the wrong file given"
    )]
    Keys { keys: String, name: String, file: String, why: String },
}

pub(super) fn files_with_issues(issues: &[Issue]) -> usize {
    issues.iter().filter(|i| !i.is_configuration()).map(|i| &i.file).collect::<BTreeSet<_>>().len()
}

/// What the agent does after a failed run, decided by the kind of failure (kube-runtime's
/// `error_policy`): a refusal is the same at every retry until something changes; an outage
/// passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry with capped exponential backoff: the database or the git remote did not answer.
    Backoff,
    /// Retrying cannot help: invalid files, an untrusted commit, a rewritten history, a mass
    /// prune, a key that opens nothing. The next commit, trigger or interval runs again.
    AwaitChange,
}

impl SyncError {
    pub fn retry(&self) -> Retry {
        match self {
            SyncError::Source(_) | SyncError::Store(_) | SyncError::LocalPg(_) => Retry::Backoff,
            SyncError::Invalid { .. }
            | SyncError::NonFastForward { .. }
            | SyncError::ShallowClone { .. }
            | SyncError::Stale(_)
            | SyncError::Usage(_)
            | SyncError::Refused(_)
            | SyncError::MassPrune { .. }
            | SyncError::Keys { .. } => Retry::AwaitChange,
        }
    }

    /// The commit the run was at when it stopped, where the error knows it (an invalid file's
    /// commit is the short form its message gives).
    pub fn commit(&self) -> Option<String> {
        match self {
            SyncError::NonFastForward { new, .. } | SyncError::ShallowClone { new, .. } => Some(new.clone()),
            SyncError::Refused(r) => Some(r.commit.clone()),
            SyncError::Invalid { at, .. } => at.strip_prefix("commit ").map(str::to_string),
            _ => None,
        }
    }

    /// A run declined on policy (an untrusted commit, a rewritten history, a mass prune) is
    /// `refused`; anything else that stopped it is `failed`.
    pub fn notify_event(&self) -> crate::notify::Event {
        match self {
            SyncError::Refused(_) | SyncError::NonFastForward { .. } | SyncError::ShallowClone { .. } | SyncError::MassPrune { .. } => {
                crate::notify::Event::Refused
            }
            _ => crate::notify::Event::Failed,
        }
    }
}
