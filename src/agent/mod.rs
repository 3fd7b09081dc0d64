//! `frostbyte-gitops run`: the long-running agent. Triggers (interval, file watch, webhook) all
//! mean "sync the current revision once"; one replica at a time holds the apply lease.

pub mod http;
pub mod metrics;
pub mod schedule;

use crate::config::DriftPolicy;
use crate::domain::drift::counts;
use crate::source::Source;
use crate::sync::{self, Ctx, Database, Run, SyncError};
use metrics::Metrics;
use notify::Watcher;
use schedule::{Timing, Trigger, reconcile_loop};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Session-level advisory lock key ("frostldr"): held by the replica that applies.
const LEADER_LOCK: i64 = 0x66726f73746c6472;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch {path}")]
    Watch {
        path: String,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// A lease check (connect, ask, take) that takes longer fails the run, which is retried.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The apply lease: a session-level advisory lock on a connection of its own. If the holder dies,
/// its session ends, the lock is free, and another replica takes it at its next tick.
struct Lease {
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
}

impl Lease {
    /// Whether this replica holds the lease; an error when the database cannot be asked in time.
    async fn held(&mut self) -> Result<bool, String> {
        tokio::time::timeout(LEASE_CHECK_TIMEOUT, self.check()).await.unwrap_or_else(|_| {
            self.client = None;
            Err(format!("the lease check took longer than {LEASE_CHECK_TIMEOUT:?}"))
        })
    }

    async fn check(&mut self) -> Result<bool, String> {
        if let Some(c) = &self.client {
            if c.simple_query("SELECT 1").await.is_ok() {
                return Ok(true);
            }
            tracing::warn!("lost the connection that held the apply lease");
            self.client = None;
        }
        let tls = crate::store::tls().map_err(|e| e.to_string())?;
        let (client, conn) = self.config.connect(tls).await.map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            .await
            .map_err(|e| format!("taking the apply lease: {e}"))?;
        if row.get::<_, bool>(0) {
            tracing::info!("holding the apply lease: this replica applies");
            self.client = Some(client);
            return Ok(true);
        }
        Ok(false)
    }
}

pub async fn run(ctx: Arc<Ctx>, db: Database) -> Result<(), AgentError> {
    let timing = Timing::new(Duration::from_secs(ctx.cfg.interval_secs), Duration::from_millis(ctx.cfg.debounce_ms));
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let (trigger_tx, trigger_rx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(&ctx.cfg.listen).await.map_err(|source| AgentError::Listen {
        addr: ctx.cfg.listen.clone(),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: ctx.cfg.listen.clone(),
        source,
    })?;
    tracing::info!(%addr, "listening");
    let app = http::router(http::AppState {
        metrics: metrics.clone(),
        pool: db.pool.clone(),
        triggers: trigger_tx.clone(),
        token: ctx.cfg.webhook_token.clone(),
    });
    let server = tokio::spawn(http::serve(listener, app, stop_rx.clone()));

    let _watcher = watch_source(&ctx, trigger_tx.clone())?;
    tokio::spawn(signals(stop_tx));

    let lease = Arc::new(tokio::sync::Mutex::new(Lease {
        config: crate::store::session_config(&db.url, db.tls_policy).map_err(SyncError::from)?,
        client: None,
    }));
    let prepared = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reconcile = || {
        let (ctx, db, metrics, lease, prepared) = (ctx.clone(), db.clone(), metrics.clone(), lease.clone(), prepared.clone());
        let span = tracing::info_span!("sync", commit = tracing::field::Empty);
        async move { reconcile_once(&ctx, &db, &metrics, &lease, &prepared).await }.instrument(span)
    };
    reconcile_loop(timing, trigger_rx, stop_rx, reconcile).await;
    tracing::info!("stopping");
    let _ = server.await;
    Ok(())
}

async fn reconcile_once(
    ctx: &Ctx,
    db: &Database,
    metrics: &Mutex<Metrics>,
    lease: &tokio::sync::Mutex<Lease>,
    prepared: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let started = Instant::now();
    let leader = match lease.lock().await.held().await {
        Ok(l) => l,
        Err(e) => {
            let mut m = metrics.lock().expect("metrics lock");
            m.leader = false;
            m.record_run("failure", started.elapsed().as_secs_f64());
            m.last_sync_ok = Some(false);
            m.last_sync_error = Some(e.clone());
            return Err(e);
        }
    };
    {
        let mut m = metrics.lock().expect("metrics lock");
        m.leader = leader;
        m.lease_checked = true;
    }
    if !leader {
        tracing::debug!("standby: another replica holds the apply lease");
        return Ok(());
    }
    let result = async {
        if !prepared.load(std::sync::atomic::Ordering::Relaxed) {
            sync::prepare(&ctx.cfg, db).await?;
            prepared.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // A full run at start and every full_resync_interval: the safety net under the
        // incremental reads, for edits no trigger stamped.
        let due = metrics
            .lock()
            .expect("metrics lock")
            .last_full
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(ctx.cfg.full_resync_secs));
        let opts = sync::RunOptions { want_drift: true, full: due };
        sync::run(ctx, &db.pool, Run::Apply { allow_non_fast_forward: false }, opts)
            .await
            .map(|o| (o, due))
    }
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let mut m = metrics.lock().expect("metrics lock");
    match result {
        Ok((o, full)) => {
            if full {
                m.last_full = Some(std::time::Instant::now());
                tracing::info!("full resync done");
            }
            if let Some(c) = &o.header.commit {
                tracing::Span::current().record("commit", c.as_str());
            }
            m.record_run("success", seconds);
            m.tenants_applied += o.applied as u64;
            m.last_sync_ok = Some(true);
            m.last_sync_error = None;
            m.validation_errors = 0;
            m.commit_refused = false;
            m.conflicts = o.plan.summary().conflict;
            if m.conflicts > 0 {
                tracing::warn!(
                    conflicts = m.conflicts,
                    "tenants changed both in git and outside git are left alone (drift policy warn)"
                );
            }
            m.last_applied_commit_time = o
                .commit_time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp());
            if let Some(report) = &o.drift {
                m.drift = counts(report).into_iter().map(|(k, v)| (k.as_str(), v)).collect();
                let modified = m.drift.get("modified").copied().unwrap_or(0);
                if modified > 0 && ctx.cfg.drift_policy == DriftPolicy::Warn {
                    tracing::warn!(modified, "tenants changed outside git; drift policy is warn, so they are left as they are");
                }
            }
            tracing::info!(applied = o.applied, seconds, "sync finished");
            Ok(())
        }
        Err(e) => {
            if let SyncError::Invalid { issues, .. } = &e {
                m.validation_errors = issues.len();
            }
            m.commit_refused = matches!(e, SyncError::Refused(_));
            m.record_run("failure", seconds);
            m.last_sync_ok = Some(false);
            let text = format!("{:#}", anyhow::Error::from(e));
            m.last_sync_error = Some(text.lines().next().unwrap_or_default().to_string());
            Err(text)
        }
    }
}

/// Watches the repository's refs (a commit, a pull, a checkout) and, with --worktree, the tenant
/// files. Remote sources have nothing local to watch: the interval fetches them.
fn watch_source(ctx: &Ctx, triggers: mpsc::Sender<Trigger>) -> Result<Option<notify::RecommendedWatcher>, AgentError> {
    // Not even opened: a remote that cannot be fetched now is a failed sync to retry, not a reason to exit.
    if crate::source::is_url(&ctx.cfg.repo) {
        return Ok(None);
    }
    let source = Source::open(&ctx.source_spec()).map_err(SyncError::from)?;
    let (git_dir, tenant_dir) = source.watch_paths();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            // Object writes and lock files come with every commit; the ref update is what counts.
            let relevant = e.paths.iter().any(|p| {
                let s = p.to_string_lossy();
                !s.contains("/objects/") && !s.ends_with(".lock") && !s.ends_with("/index")
            });
            if relevant && !e.kind.is_access() {
                let _ = triggers.try_send(Trigger::Watch);
            }
        }
    })
    .map_err(|source| AgentError::Watch {
        path: git_dir.display().to_string(),
        source,
    })?;
    let mut paths = vec![
        (git_dir.clone(), notify::RecursiveMode::NonRecursive),
        (git_dir.join("refs"), notify::RecursiveMode::Recursive),
    ];
    if ctx.cfg.worktree
        && let Some(dir) = tenant_dir
    {
        paths.push((dir, notify::RecursiveMode::NonRecursive));
    }
    for (path, mode) in paths {
        watcher.watch(&path, mode).map_err(|source| AgentError::Watch {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(Some(watcher))
}

async fn signals(stop: watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the current sync, then exiting"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the current sync, then exiting"),
    }
    let _ = stop.send(true);
}
