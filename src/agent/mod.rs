//! `frostbyte-gitops run`: the long-running agent. Triggers (interval, file watch, webhook) all
//! mean "sync the current revision once"; one replica at a time holds the apply lease.

pub mod http;
pub mod lease;
pub mod metrics;
pub mod schedule;

use crate::compose::{self, Database};
use crate::config::DriftPolicy;
use crate::domain::drift::{DriftClass, counts};
use crate::domain::plan::Entries;
use crate::notify::Notification;
use crate::source::Source;
use crate::store::runs::RunTrigger;
use crate::sync::{self, Ctx, Run, SyncError};
use metrics::{Metrics, NotificationOutcome, RunOutcome};
use notify::Watcher;
use schedule::{Cause, Failed, Timing, Trigger, reconcile_loop};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the status page would be open to anyone who reaches {addr}, which is not a loopback address: set status_token (16 bytes or more), listen on 127.0.0.1, or set status_page = false"
    )]
    StatusPageExposed { addr: String },
    #[error("cannot watch {path}")]
    Watch {
        path: String,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    Sync(#[from] SyncError),
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
    if ctx.cfg.status_page && ctx.cfg.status_token.is_none() && !addr.ip().is_loopback() {
        return Err(AgentError::StatusPageExposed { addr: addr.to_string() });
    }
    tracing::info!(%addr, "listening");
    let mut app = http::router(http::AppState {
        metrics: metrics.clone(),
        pool: db.pool.clone(),
        triggers: trigger_tx.clone(),
        token: ctx.cfg.webhook_token.clone(),
    });
    if ctx.cfg.status_page {
        let pages = crate::web::PageState::new(db.pool.clone(), ctx.cfg.sources.clone(), ctx.cfg.status_token.clone());
        app = app.merge(crate::web::routes(pages));
    }
    let server = tokio::spawn(http::serve(listener, app, stop_rx.clone()));

    let _watcher = watch_source(&ctx, trigger_tx.clone())?;
    tokio::spawn(signals(stop_tx));

    // The session holding the leases names this replica: `status` reads who holds a source.
    let mut lease_session = crate::store::session_config(&db.url, db.tls_policy).map_err(SyncError::from)?;
    lease_session.application_name(format!("{}{}", crate::store::runs::REPLICA_PREFIX, compose::replica()));
    let lease = Arc::new(tokio::sync::Mutex::new(lease::Leases::new(lease_session)));
    let prepared = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reconcile = |cause: Cause| {
        let (ctx, db, metrics, lease, prepared) = (ctx.clone(), db.clone(), metrics.clone(), lease.clone(), prepared.clone());
        let span = tracing::info_span!("sync", commit = tracing::field::Empty);
        let trigger = match cause {
            Cause::Interval => RunTrigger::Interval,
            Cause::Retry => RunTrigger::Retry,
            Cause::Trigger(Trigger::Watch) => RunTrigger::Watch,
            Cause::Trigger(Trigger::Webhook) => RunTrigger::Webhook,
        };
        async move {
            let outcome = reconcile_once(&ctx, &db, &metrics, &lease, &prepared, trigger).await;
            release_freed_memory();
            outcome
        }
        .instrument(span)
    };
    reconcile_loop(timing, trigger_rx, stop_rx, reconcile).await;
    tracing::info!("stopping");
    let _ = server.await;
    Ok(())
}

/// A run frees what it read (at a full resync, every decoded file), but glibc keeps freed memory
/// mapped until asked to return it: between runs an agent then holds its largest run's peak.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn reconcile_once(
    ctx: &Ctx,
    db: &Database,
    metrics: &Arc<Mutex<Metrics>>,
    lease: &tokio::sync::Mutex<lease::Leases>,
    prepared: &std::sync::atomic::AtomicBool,
    trigger: RunTrigger,
) -> Result<(), Failed> {
    let started = Instant::now();
    let held = take_leases(ctx, metrics, lease, started).await.map_err(Failed::transient)?;
    if held.is_empty() {
        tracing::debug!("standby: other replicas hold every source's lease");
        return Ok(());
    }
    if !prepared.load(std::sync::atomic::Ordering::Relaxed) {
        if let Err(e) = compose::prepare(&ctx.cfg, db).await {
            let transient = e.retry() == sync::Retry::Backoff;
            return Err(Failed {
                message: record_failure(metrics, None, started, e),
                transient,
            });
        }
        prepared.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // A full run at start and every full_resync_interval: the safety net under the incremental
    // reads, for edits no trigger stamped.
    let full = metrics
        .lock()
        .expect("metrics lock")
        .last_full
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(ctx.cfg.full_resync_secs));
    // Each source on its own: one that fails does not hold back the others.
    let mut tally = Tally::default();
    for src in ctx.cfg.sources.iter().filter(|s| held.contains(&s.name)) {
        let one = Instant::now();
        let opts = sync::RunOptions {
            want_drift: true,
            full,
            ..Default::default()
        };
        let span = tracing::info_span!("source", source = %src.name);
        match compose::sync_recorded(ctx, db, src, Run::Apply { allow_non_fast_forward: false }, opts, trigger)
            .instrument(span)
            .await
        {
            Ok(o) => {
                announce_success(ctx, metrics, &src.name, &o);
                tally.success(metrics, &src.name, &o, one);
                if o.applied > 0 || full {
                    tracing::info!(source = %src.name, applied = o.applied, seconds = one.elapsed().as_secs_f64(), "sync finished");
                }
            }
            Err(e) => tally.failure(ctx, metrics, &src.name, e, one),
        }
    }
    tally.finish(ctx, metrics, started, full)
}

/// Balances the sources' leases among the replicas: the names of those this one holds now.
async fn take_leases(
    ctx: &Ctx,
    metrics: &Mutex<Metrics>,
    lease: &tokio::sync::Mutex<lease::Leases>,
    started: Instant,
) -> Result<std::collections::BTreeSet<String>, String> {
    let names: Vec<&str> = ctx.cfg.sources.iter().map(|s| s.name.as_str()).collect();
    let held = lease.lock().await.balance(&names).await;
    let mut m = metrics.lock().expect("metrics lock");
    match held {
        Ok(held) => {
            m.leader = !held.is_empty();
            m.lease_checked = true;
            for name in &names {
                m.sources.entry(name.to_string()).or_default().leader = held.contains(*name);
            }
            Ok(held)
        }
        Err(e) => {
            m.leader = false;
            m.sources.values_mut().for_each(|s| s.leader = false);
            m.record_run(RunOutcome::Failure, started.elapsed().as_secs_f64());
            m.last_sync_ok = Some(false);
            m.last_sync_error = Some(e.clone());
            Err(e)
        }
    }
}

/// What one round's syncs of this replica's sources add up to.
#[derive(Default)]
struct Tally {
    first_error: Option<Failed>,
    drift: std::collections::BTreeMap<DriftClass, usize>,
    conflicts: usize,
    oldest_commit: Option<i64>,
}

impl Tally {
    fn success(&mut self, metrics: &Mutex<Metrics>, source: &str, o: &sync::Outcome, started: Instant) {
        let mut m = metrics.lock().expect("metrics lock");
        let sm = m.sources.entry(source.to_string()).or_default();
        sm.runs_ok += 1;
        sm.last_error = None;
        sm.applied += o.applied as u64;
        sm.last_success = Some(chrono::Utc::now().timestamp());
        sm.last_duration = started.elapsed().as_secs_f64();
        m.tenants_applied += o.applied as u64;
        self.conflicts += o.entries().summary().conflict;
        let commit_time = o
            .commit_time
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp());
        self.oldest_commit = match (self.oldest_commit, commit_time) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (k, v) in o.drift.as_deref().map(counts).unwrap_or_default() {
            *self.drift.entry(k).or_insert(0) += v;
        }
    }

    fn failure(&mut self, ctx: &Ctx, metrics: &Arc<Mutex<Metrics>>, source: &str, e: SyncError, started: Instant) {
        let event = e.notify_event();
        let transient = e.retry() == sync::Retry::Backoff;
        let (commit, line) = (e.commit(), compose::first_line(&e));
        let text = record_failure(metrics, Some(source), started, e);
        // Once per distinct error, not at every retry.
        let repeated = {
            let mut m = metrics.lock().expect("metrics lock");
            let sm = m.sources.entry(source.to_string()).or_default();
            sm.last_error.replace(text.clone()).as_ref() == Some(&text)
        };
        if !repeated {
            announce(ctx, metrics, Notification::failed(event, source, commit.as_deref(), &line));
        }
        self.first_error.get_or_insert(Failed {
            message: format!("source {source}: {text}"),
            transient,
        });
    }

    /// The round's metrics; its first error, if a source failed.
    fn finish(self, ctx: &Ctx, metrics: &Mutex<Metrics>, started: Instant, full: bool) -> Result<(), Failed> {
        let seconds = started.elapsed().as_secs_f64();
        let mut m = metrics.lock().expect("metrics lock");
        m.conflicts = self.conflicts;
        if self.conflicts > 0 {
            tracing::warn!(
                conflicts = self.conflicts,
                "tenants changed both in git and outside git are left alone (drift policy warn)"
            );
        }
        let modified = self.drift.get(&DriftClass::Modified).copied().unwrap_or(0);
        if modified > 0 && ctx.cfg.drift_policy == DriftPolicy::Warn {
            tracing::warn!(modified, "tenants changed outside git; drift policy is warn, so they are left as they are");
        }
        m.drift = self.drift;
        m.last_applied_commit_time = self.oldest_commit.or(m.last_applied_commit_time);
        match self.first_error {
            None => {
                if full {
                    m.last_full = Some(Instant::now());
                    tracing::info!("full resync done");
                }
                m.record_run(RunOutcome::Success, seconds);
                m.last_sync_ok = Some(true);
                m.last_sync_error = None;
                m.validation_errors = 0;
                m.commit_refused = false;
                Ok(())
            }
            Some(e) => {
                m.record_run(if e.transient { RunOutcome::Failure } else { RunOutcome::Refused }, seconds);
                m.last_sync_ok = Some(false);
                m.last_sync_transient = e.transient;
                m.last_sync_error = Some(e.message.lines().next().unwrap_or_default().to_string());
                Err(e)
            }
        }
    }
}

/// Deliveries in flight at once; past this a notification is dropped (and counted), so that a
/// receiver that is down never holds the agent's memory or its loop.
static IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(16);

/// Sends `n` in the background: the loop goes on whatever the receivers do.
fn announce(ctx: &Ctx, metrics: &Arc<Mutex<Metrics>>, n: Notification) {
    if ctx.notifier.is_empty() {
        return;
    }
    let Ok(permit) = IN_FLIGHT.try_acquire() else {
        tracing::warn!(event = n.event.as_str(), "too many notifications in flight: one dropped");
        *metrics
            .lock()
            .expect("metrics lock")
            .notifications
            .entry(NotificationOutcome::Dropped)
            .or_default() += 1;
        return;
    };
    let (notifier, metrics) = (ctx.notifier.clone(), metrics.clone());
    tokio::spawn(async move {
        let outcomes = notifier.send(&n).await;
        drop(permit);
        let mut m = metrics.lock().expect("metrics lock");
        for d in outcomes {
            *m.notifications.entry(d.into()).or_default() += 1;
        }
    });
}

/// What a successful sync of one source has to say: that it applied, and drift that changed.
fn announce_success(ctx: &Ctx, metrics: &Arc<Mutex<Metrics>>, source: &str, o: &sync::Outcome) {
    if o.applied > 0 && !ctx.notifier.is_empty() {
        match Notification::applied(source, o.header.commit.as_deref(), &o.entries()) {
            Ok(n) => announce(ctx, metrics, n),
            Err(e) => tracing::error!(source, error = %e, "reading back the created tenants' plans: no notification of this apply"),
        }
    }
    let Some(report) = &o.drift else { return };
    let drifted: Vec<(String, Vec<&str>)> = report
        .iter()
        .filter(|t| !t.in_sync())
        .map(|t| (t.tenant_id.clone(), t.classes.iter().map(|c| c.as_str()).collect()))
        .collect();
    let key = format!("{drifted:?}");
    let changed = {
        let mut m = metrics.lock().expect("metrics lock");
        let sm = m.sources.entry(source.to_string()).or_default();
        std::mem::replace(&mut sm.last_drift, key.clone()) != key
    };
    if changed && !drifted.is_empty() {
        announce(ctx, metrics, Notification::drift(source, o.header.commit.as_deref(), report));
    }
}

/// Counts a failed sync of `source` (or of the preparation) and returns its message.
fn record_failure(metrics: &Mutex<Metrics>, source: Option<&str>, started: Instant, e: SyncError) -> String {
    let mut m = metrics.lock().expect("metrics lock");
    if let SyncError::Invalid { issues, .. } = &e {
        m.validation_errors = issues.len();
    }
    m.commit_refused = matches!(e, SyncError::Refused(_));
    if let Some(name) = source {
        let sm = m.sources.entry(name.to_string()).or_default();
        sm.runs_failed += 1;
        sm.last_duration = started.elapsed().as_secs_f64();
    }
    format!("{:#}", anyhow::Error::from(e))
}

/// Watches the repository's refs (a commit, a pull, a checkout) and, with --worktree, the tenant
/// files. Remote sources have nothing local to watch: the interval fetches them.
fn watch_source(ctx: &Ctx, triggers: mpsc::Sender<Trigger>) -> Result<Option<notify::RecommendedWatcher>, AgentError> {
    // Remotes are not even opened: one that cannot be fetched now is a failed sync to retry, not
    // a reason to exit.
    let mut dirs = Vec::new();
    for src in ctx.cfg.sources.iter().filter(|s| !s.repo.is_remote()) {
        let source = Source::open(&ctx.source_spec(src)).map_err(SyncError::from)?;
        dirs.push(source.watch_paths());
    }
    if dirs.is_empty() {
        return Ok(None);
    }
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
        path: dirs[0].0.display().to_string(),
        source,
    })?;
    let mut paths = Vec::new();
    for (git_dir, tenant_dir) in dirs {
        if paths.iter().any(|(p, _)| *p == git_dir) {
            continue;
        }
        paths.push((git_dir.join("refs"), notify::RecursiveMode::Recursive));
        paths.push((git_dir, notify::RecursiveMode::NonRecursive));
        if ctx.cfg.worktree
            && let Some(dir) = tenant_dir
        {
            paths.push((dir, notify::RecursiveMode::Recursive));
        }
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
