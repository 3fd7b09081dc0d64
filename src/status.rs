//! What an operator asks first: for each source, what it applied and when, who syncs it, how its
//! last run ended and how far the database has drifted; and the audit trail's head and last check.
//! Read from the database alone, so it holds with no agent running; the `status` command prints
//! it and the status page shows it.

use crate::config::SourceConfig;
use crate::store::StoreError;
use crate::store::runs::{self, AuditCheck, RunOutcome, RunRecord};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

/// Runs read back to find the last one that reported drift.
const DRIFT_LOOKBACK: i64 = 50;

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub name: String,
    /// Without credentials.
    pub repository: String,
    /// The ref it follows; none: the default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub path: String,
    pub last_applied_commit: Option<String>,
    /// When that commit was applied (RFC 3339).
    pub applied_at: Option<String>,
    /// The last good run's signature check, in words (with the signer); none when verification is off.
    pub signature: Option<String>,
    /// The replica holding the source's lease now; none when no agent holds it.
    pub lease_holder: Option<String>,
    pub last_run: Option<RunRecord>,
    /// Drift per class, from the newest run that reported it.
    pub drift: Option<BTreeMap<String, u64>>,
}

impl SourceStatus {
    /// Whether it needs someone's attention: never synced, a last run that failed or was
    /// refused or left conflicts, or drift.
    pub fn attention(&self) -> Option<String> {
        let Some(run) = &self.last_run else {
            return Some("never synced".into());
        };
        if matches!(run.outcome, RunOutcome::Failed | RunOutcome::Refused) {
            return Some(format!("last run {}", run.outcome.as_str()));
        }
        if run.conflicts > 0 {
            return Some(format!("{} tenant(s) in conflict", run.conflicts));
        }
        let drifted: u64 = self.drift.iter().flatten().filter(|(class, _)| *class != "in-sync").map(|(_, n)| n).sum();
        (drifted > 0).then(|| format!("{drifted} tenant(s) drifted"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditStatus {
    pub head_seq: Option<i64>,
    pub head_hash: Option<String>,
    pub last_check: Option<AuditCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub sources: Vec<SourceStatus>,
    pub audit: AuditStatus,
}

impl Status {
    pub fn healthy(&self) -> bool {
        self.sources.iter().all(|s| s.attention().is_none())
    }
}

/// The status of `sources` as the database has it.
pub async fn gather(client: &impl GenericClient, sources: &[&SourceConfig]) -> Result<Status, StoreError> {
    let applied = runs::applied_at(client).await?;
    let mut out = Vec::with_capacity(sources.len());
    for src in sources {
        let recent = runs::recent_runs(client, &src.name, DRIFT_LOOKBACK).await?;
        // The id comes from the runs: working it out again would open (for a remote, fetch) the
        // repository, and status reads the database alone.
        let id = recent.iter().find_map(|r| r.source.clone());
        let last_good = recent.iter().find(|r| matches!(r.outcome, RunOutcome::Applied | RunOutcome::InSync));
        let (last_applied_commit, applied_at) = match id.as_ref().and_then(|id| applied.get(id)) {
            Some((commit, at)) => (Some(commit.clone()), at.clone()),
            None => (None, None),
        };
        out.push(SourceStatus {
            name: src.name.clone(),
            repository: src.repo.to_string(),
            git_ref: src.git_ref.clone(),
            path: src.path.clone(),
            last_applied_commit,
            applied_at,
            signature: last_good.and_then(|r| r.signature.clone()),
            lease_holder: runs::lease_holder(client, &src.name).await?,
            drift: recent.iter().find_map(|r| r.drift.clone()),
            last_run: recent.into_iter().next(),
        });
    }
    let head = runs::audit_head(client).await?;
    Ok(Status {
        sources: out,
        audit: AuditStatus {
            head_seq: head.as_ref().map(|h| h.0),
            head_hash: head.map(|h| h.1),
            last_check: runs::last_audit_check(client).await?,
        },
    })
}
