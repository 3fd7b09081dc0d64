//! The agent's HTTP listener: /healthz, /readyz, /metrics and the webhook `POST /sync`.

use super::metrics::Metrics;
use super::schedule::Trigger;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Mutex<Metrics>>,
    pub pool: Pool,
    pub triggers: mpsc::Sender<Trigger>,
    pub token: Option<String>,
}

/// Longest a client may take to send its first byte and its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one connection may live: one request and its response (connections are not kept
/// alive, so none sits idle).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Connections served at once; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 512;

/// Serves `app` until `stop` turns true, each connection in its own task and bounded in time, so
/// a flood of slow or half-open connections neither starves the others nor stays.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router, mut stop: tokio::sync::watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = async { drop(stop.wait_for(|s| *s).await) } => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(max = MAX_CONNECTIONS, "too many connections; closing a new one");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's header timeout starts at the first byte; a client that sends none is
            // bounded here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)).await, Ok(Ok(n)) if n > 0) {
                return;
            }
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/sync", post(webhook))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let db = tokio::time::timeout(Duration::from_secs(2), async {
        let c = s.pool.get().await.map_err(|e| e.to_string())?;
        crate::store::ping(&c).await
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    let (checked, leader, last_ok, last_err, transient) = {
        let m = s.metrics.lock().expect("metrics lock");
        (m.lease_checked, m.leader, m.last_sync_ok, m.last_sync_error.clone(), m.last_sync_transient)
    };
    match (db, leader, last_ok) {
        (Err(e), _, _) => (StatusCode::SERVICE_UNAVAILABLE, format!("database unreachable: {e}\n")),
        _ if !checked => (StatusCode::SERVICE_UNAVAILABLE, "starting: no sync has run yet\n".to_string()),
        // A standby is ready when it can reach the database; it takes over when the leader goes.
        (Ok(()), false, _) => (StatusCode::OK, "ready (standby)\n".to_string()),
        (Ok(()), true, Some(true)) => (StatusCode::OK, "ready\n".to_string()),
        (Ok(()), true, None) => (StatusCode::SERVICE_UNAVAILABLE, "no sync has completed yet\n".to_string()),
        (Ok(()), true, Some(false)) => {
            let state = match transient {
                true => "last sync failed (retrying with backoff)",
                false => "last sync refused (waits for a new commit or a changed setting)",
            };
            (StatusCode::SERVICE_UNAVAILABLE, format!("{state}: {}\n", last_err.unwrap_or_default()))
        }
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let body = s.metrics.lock().expect("metrics lock").render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Compares digests, so the time taken says nothing about how much of the token matched.
fn token_matches(given: &str, want: &str) -> bool {
    Sha256::digest(given.as_bytes()) == Sha256::digest(want.as_bytes())
}

async fn webhook(State(s): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let Some(want) = &s.token else {
        return (StatusCode::NOT_FOUND, "the webhook is off: set webhook_token to turn it on\n");
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token_matches(given, want) {
        return (StatusCode::UNAUTHORIZED, "bad or missing bearer token\n");
    }
    // A full channel already holds a pending trigger: this one collapses into it.
    let _ = s.triggers.try_send(Trigger::Webhook);
    (StatusCode::ACCEPTED, "sync queued\n")
}
