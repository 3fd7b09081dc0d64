//! The binary's edge, where adapters meet orchestration: the configured database (or in dev mode
//! the agent's own local cluster) connected and migrated, and a run of a source wired to its
//! repository and a connection. Commands and the agent start here; `sync` never sees a pool.

use crate::config::{Config, Mode, SourceConfig};
use crate::domain::drift::TenantDrift;
use crate::domain::plan::Entries;
use crate::domain::render::Header;
use crate::localpg;
use crate::source::Source;
use crate::store::runs::{RunOutcome, RunRecord, RunTrigger};
use crate::store::{self, Db, StoreError};
use crate::sync::{self, Ctx, Outcome, Retry, Run, RunOptions, SyncError};
use deadpool_postgres::Pool;

/// The configured database: a pool, and the connection string for the agent's leader lease.
#[derive(Clone)]
pub struct Database {
    pub pool: Pool,
    pub url: String,
    pub tls_policy: store::TlsPolicy,
}

impl Database {
    /// A connection that has answered a first query within the deadline, or an error naming
    /// where the database is.
    pub async fn client(&self, cfg: &Config) -> Result<deadpool_postgres::Object, StoreError> {
        let client = store::client(&self.pool).await.map_err(|e| self.named(e))?;
        store::first_response(&client, std::time::Duration::from_secs(cfg.db_timeout_secs))
            .await
            .map_err(|e| self.named(e))?;
        Ok(client)
    }

    /// A connection error, with where it tried to connect.
    pub fn named(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Connect { target, cause } if target.is_empty() => StoreError::Connect {
                target: store::target_of(&self.url),
                cause,
            },
            other => other,
        }
    }
}

/// The configured database; in dev mode with none configured, the agent's own cluster.
pub async fn connect(cfg: &Config) -> Result<Database, SyncError> {
    let deadline = std::time::Duration::from_secs(cfg.db_timeout_secs);
    let url = match &cfg.database_url {
        Some(url) => url.clone(),
        None if cfg.mode == Mode::Production => {
            return Err(SyncError::Usage(
                "production mode needs a database: set FROSTBYTE_CONTROL_DB_URL (the local PostgreSQL is for dev mode only)".into(),
            ));
        }
        None => {
            let dir = cfg.data_dir.join("pgdata");
            let cluster = tokio::task::spawn_blocking(move || localpg::ensure(&dir, &[]))
                .await
                .expect("local PostgreSQL start panicked")?;
            let admin = store::pool(&cluster.conninfo("postgres"), store::TlsPolicy::AsGiven, deadline)?;
            store::create_database(&**store::client(&admin).await?, "frostbyte").await?;
            cluster.conninfo("frostbyte")
        }
    };
    let policy = if cfg.mode == Mode::Production {
        store::TlsPolicy::RequireForTcp
    } else {
        store::TlsPolicy::AsGiven
    };
    Ok(Database {
        pool: store::pool(&url, policy, deadline)?,
        url,
        tls_policy: policy,
    })
}

/// Dev mode migrates on the way in; production expects `migrate` to have run.
pub async fn prepare(cfg: &Config, db: &Database) -> Result<(), SyncError> {
    let mut client = db.client(cfg).await?;
    // Dev mode migrates unless it need not: the agent may run as an app role that cannot.
    if cfg.mode == Mode::Dev && store::check_migrated(&**client).await.is_err() {
        store::migrate(&mut client).await?;
    } else {
        store::check_migrated(&**client).await?;
    }
    Ok(())
}

/// Opens `src`'s repository; a remote one is cloned or fetched first, so this blocks.
pub fn open_source(ctx: &Ctx, src: &SourceConfig) -> Result<Source, SyncError> {
    crate::blocking(|| Ok(Source::open(&ctx.source_spec(src))?))
}

/// One run of `src` against the database.
pub async fn run(ctx: &Ctx, db: &Database, src: &SourceConfig, run: Run, opts: RunOptions) -> Result<Outcome, SyncError> {
    let source = open_source(ctx, src)?;
    let mut store = Db::new(store::client(&db.pool).await?);
    sync::run(ctx, &source, &mut store, src, run, opts).await
}

/// The drift report of `src` at its configured revision.
pub async fn drift(ctx: &Ctx, db: &Database, src: &SourceConfig, full: bool) -> Result<(Header, Vec<TenantDrift>), SyncError> {
    let source = open_source(ctx, src)?;
    let mut store = Db::new(store::client(&db.pool).await?);
    sync::drift_report(ctx, &source, &mut store, src, full).await
}

/// A sync of `src`, recorded in the run history however it ends; a record that cannot be written
/// is logged, and the run's result stands.
pub async fn sync_recorded(ctx: &Ctx, db: &Database, src: &SourceConfig, how: Run, opts: RunOptions, trigger: RunTrigger) -> Result<Outcome, SyncError> {
    let (started, clock) = (chrono::Utc::now(), std::time::Instant::now());
    let result = run(ctx, db, src, how, opts).await;
    let record = RunRecord {
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        duration_ms: u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX),
        ..run_record(&src.name, &result, trigger)
    };
    let written = async {
        let mut client = store::client(&db.pool).await?;
        store::runs::record_run(&**client, &record, ctx.cfg.run_history).await?;
        // The drifted tenants as this run found them, for the status page.
        if let Ok(Outcome { drift: Some(report), .. }) = &result {
            store::pages::record_drift(&mut client, &src.name, report).await?;
        }
        Ok::<_, StoreError>(())
    };
    if let Err(e) = written.await {
        tracing::warn!(source = %src.name, error = %first_line(&e), "the run could not be recorded in the run history");
    }
    result
}

/// What a run's result says for the run history (its times are the caller's).
pub fn run_record(name: &str, result: &Result<Outcome, SyncError>, trigger: RunTrigger) -> RunRecord {
    let mut record = RunRecord {
        source_name: name.to_string(),
        source: None,
        started_at: String::new(),
        duration_ms: 0,
        trigger,
        commit_fetched: None,
        commit_applied: None,
        outcome: RunOutcome::Failed,
        error: None,
        signature: None,
        created: 0,
        updated: 0,
        decommissioned: 0,
        conflicts: 0,
        drift: None,
        replica: replica(),
    };
    match result {
        Ok(o) => {
            let summary = o.entries().summary();
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            record.source = Some(o.source.clone());
            record.commit_fetched = o.header.commit.clone();
            record.commit_applied = o.header.commit.clone();
            record.outcome = if o.applied > 0 { RunOutcome::Applied } else { RunOutcome::InSync };
            record.signature = o.header.signature.clone();
            (record.created, record.updated) = (count(summary.create), count(summary.update));
            (record.decommissioned, record.conflicts) = (count(summary.decommission), count(summary.conflict));
            record.drift = o.drift.as_deref().map(|d| {
                crate::domain::drift::counts(d)
                    .into_iter()
                    .map(|(class, n)| (class.as_str().to_string(), n as u64))
                    .collect()
            });
        }
        Err(e) => {
            record.outcome = match e.retry() {
                Retry::Backoff => RunOutcome::Failed,
                Retry::AwaitChange => RunOutcome::Refused,
            };
            record.error = Some(first_line(e));
        }
    }
    record
}

/// An error and its causes, joined with ": ", as `{:#}` prints them.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// An error and its causes on one line, as long as a status line can show.
pub fn first_line(e: &(dyn std::error::Error + 'static)) -> String {
    let text = chain(e);
    // A list follows a line ending in ':' (the problems of invalid files): its first item too.
    let mut lines = text.lines();
    let mut line = lines.next().unwrap_or_default().to_string();
    if let (true, Some(next)) = (line.ends_with(':'), lines.next()) {
        line = format!("{line} {}", next.trim());
    }
    match line.char_indices().nth(400) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line,
    }
}

/// This process as run records and lease sessions name it: its host and process id.
pub fn replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host} (pid {})", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::issue::Issue;

    #[test]
    fn a_failure_on_one_line_carries_the_first_problem_and_its_commit() {
        let mut first = Issue::new("tenants/acme.toml", "\"platinum\" is not one of the plans").at("/config/plan");
        first.line = Some(7);
        let e = SyncError::Invalid {
            at: "commit 377f5f3efb24".into(),
            issues: vec![first, Issue::new("tenants/globex.json", "duplicate tenant_id")],
        };
        let line = first_line(&e);
        assert!(line.starts_with("2 problem(s) in 2 file(s) at commit 377f5f3efb24"), "{line}");
        assert!(
            line.ends_with(": tenants/acme.toml:7: /config/plan: \"platinum\" is not one of the plans"),
            "{line}"
        );
        assert!(!line.contains('\n') && !line.contains("globex"), "{line}");
        assert_eq!(e.commit().as_deref(), Some("377f5f3efb24"));
        let long = SyncError::Usage("x".repeat(1000));
        assert_eq!(first_line(&long).chars().count(), 403, "400 characters and an ellipsis of three dots");
    }
}
