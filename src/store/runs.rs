//! The run history: a record of each sync, kept per source up to a bound, and what `status`
//! reads of it, of the leases and of the last audit verification.

use super::{StoreError, locks, q};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunTrigger {
    /// `sync` or `apply` on the command line.
    Command,
    /// The agent's schedule.
    Interval,
    /// The agent trying again after a failure.
    Retry,
    /// A new commit or an edited file seen by the agent's watcher.
    Watch,
    /// `POST /sync`.
    Webhook,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// It wrote changes.
    Applied,
    /// The database already equalled the commit.
    InSync,
    /// It failed and will be tried again (a database or network error, say).
    Failed,
    /// It was refused until something changes (an invalid file, a signature, a mass prune).
    Refused,
}

macro_rules! words {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }

            fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$v),)* _ => None }
            }
        }
    };
}

words!(RunTrigger { Command => "command", Interval => "interval", Retry => "retry", Watch => "watch", Webhook => "webhook" });
words!(RunOutcome { Applied => "applied", InSync => "in_sync", Failed => "failed", Refused => "refused" });

/// One run of one source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    pub source_name: String,
    /// The source's id (repository without credentials, '#', path), where the run got that far.
    pub source: Option<String>,
    /// RFC 3339.
    pub started_at: String,
    pub duration_ms: u64,
    pub trigger: RunTrigger,
    pub commit_fetched: Option<String>,
    /// The commit the database equals once the run ended; none when it failed.
    pub commit_applied: Option<String>,
    pub outcome: RunOutcome,
    /// The first line of the error.
    pub error: Option<String>,
    pub signature: Option<String>,
    pub created: u32,
    pub updated: u32,
    pub decommissioned: u32,
    pub conflicts: u32,
    /// Drift counts per class after the run, when it reported drift.
    pub drift: Option<BTreeMap<String, u64>>,
    pub replica: String,
}

/// Records `run`, and deletes the source's runs older than its newest `keep`.
pub async fn record_run(client: &impl GenericClient, run: &RunRecord, keep: u64) -> Result<(), StoreError> {
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let drift = run.drift.as_ref().map(|d| serde_json::to_value(d).expect("counts serialise"));
    client
        .execute(
            "INSERT INTO gitops_runs (source_name, source, started_at, duration_ms, trigger, commit_fetched, commit_applied,
                                      outcome, error, signature, created, updated, decommissioned, conflicts, drift, replica)
             VALUES ($1, $2, $3::text::timestamptz, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            &[
                &run.source_name,
                &run.source,
                &run.started_at,
                &i64::try_from(run.duration_ms).unwrap_or(i64::MAX),
                &run.trigger.as_str(),
                &run.commit_fetched,
                &run.commit_applied,
                &run.outcome.as_str(),
                &run.error,
                &run.signature,
                &count(run.created),
                &count(run.updated),
                &count(run.decommissioned),
                &count(run.conflicts),
                &drift,
                &run.replica,
            ],
        )
        .await
        .map_err(q("recording the run"))?;
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    client
        .execute(
            "DELETE FROM gitops_runs WHERE source_name = $1 AND run_id <=
                (SELECT run_id FROM gitops_runs WHERE source_name = $1 ORDER BY run_id DESC OFFSET $2 LIMIT 1)",
            &[&run.source_name, &keep],
        )
        .await
        .map_err(q("deleting old runs"))?;
    Ok(())
}

/// The newest `limit` runs of the source named `name`, newest first.
pub async fn recent_runs(client: &impl GenericClient, name: &str, limit: i64) -> Result<Vec<RunRecord>, StoreError> {
    let rows = client
        .query(
            "SELECT source_name, source, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), duration_ms,
                    trigger, commit_fetched, commit_applied, outcome, error, signature, created, updated,
                    decommissioned, conflicts, drift, replica
               FROM gitops_runs WHERE source_name = $1 ORDER BY run_id DESC LIMIT $2",
            &[&name, &limit],
        )
        .await
        .map_err(q("reading the run history"))?;
    rows.iter().map(run_from_row).collect()
}

fn run_from_row(r: &tokio_postgres::Row) -> Result<RunRecord, StoreError> {
    let name: String = r.get(0);
    let bad = |what: &str| StoreError::BadRow {
        tenant: format!("(run of source {name})"),
        message: format!("unknown {what}"),
    };
    let count = |i| u32::try_from(r.get::<_, i32>(i)).unwrap_or(0);
    let drift: Option<serde_json::Value> = r.get(14);
    Ok(RunRecord {
        source: r.get(1),
        started_at: r.get(2),
        duration_ms: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
        trigger: RunTrigger::parse(r.get(4)).ok_or_else(|| bad("trigger"))?,
        commit_fetched: r.get(5),
        commit_applied: r.get(6),
        outcome: RunOutcome::parse(r.get(7)).ok_or_else(|| bad("outcome"))?,
        error: r.get(8),
        signature: r.get(9),
        created: count(10),
        updated: count(11),
        decommissioned: count(12),
        conflicts: count(13),
        drift: drift.and_then(|d| serde_json::from_value(d).ok()),
        replica: r.get(15),
        source_name: name,
    })
}

/// Which replica holds the lease of the source named `name` now, by the application name of the
/// session holding it.
pub async fn lease_holder(client: &impl GenericClient, name: &str) -> Result<Option<String>, StoreError> {
    let row = client
        .query_opt(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
              LIMIT 1",
            &[&locks::lease(name)],
        )
        .await
        .map_err(q("reading who holds the source's lease"))?;
    Ok(row
        .map(|r| r.get::<_, String>(0))
        .map(|a| a.strip_prefix(REPLICA_PREFIX).map_or(a.clone(), str::to_string)))
}

/// Sessions that hold leases name themselves this, then the replica.
pub const REPLICA_PREFIX: &str = "frostbyte-gitops ";

/// When the last applied commit of each recorded source was applied, by source id.
pub async fn applied_at(client: &impl GenericClient) -> Result<BTreeMap<String, (String, Option<String>)>, StoreError> {
    let rows = client
        .query(
            "SELECT source, last_applied_commit, to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM gitops_sources",
            &[],
        )
        .await
        .map_err(q("reading gitops_sources"))?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// The result of one `audit verify`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditCheck {
    pub checked_at: String,
    pub events: i64,
    pub head_seq: i64,
    pub head_hash: String,
    pub intact: bool,
    pub problem: Option<String>,
}

pub async fn record_audit_check(client: &impl GenericClient, events: i64, head_seq: i64, head_hash: &str, problem: Option<&str>) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO gitops_audit_checks (events, head_seq, head_hash, intact, problem) VALUES ($1, $2, $3, $4, $5)",
            &[&events, &head_seq, &head_hash, &problem.is_none(), &problem],
        )
        .await
        .map_err(q("recording the audit verification"))?;
    Ok(())
}

pub async fn last_audit_check(client: &impl GenericClient) -> Result<Option<AuditCheck>, StoreError> {
    let row = client
        .query_opt(
            "SELECT to_char(checked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), events, head_seq, head_hash, intact, problem
               FROM gitops_audit_checks ORDER BY checked_at DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(q("reading the last audit verification"))?;
    Ok(row.map(|r| AuditCheck {
        checked_at: r.get(0),
        events: r.get(1),
        head_seq: r.get(2),
        head_hash: r.get(3),
        intact: r.get(4),
        problem: r.get(5),
    }))
}

/// The audit chain's head now: the newest event's sequence number and chain hash (hex).
pub async fn audit_head(client: &impl GenericClient) -> Result<Option<(i64, String)>, StoreError> {
    let row = client
        .query_opt("SELECT last_seq, last_hash FROM audit_chain_head", &[])
        .await
        .map_err(q("reading audit_chain_head"))?;
    Ok(row.map(|r| (r.get(0), hex::encode(r.get::<_, Vec<u8>>(1)))))
}
