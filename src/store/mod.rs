//! PostgreSQL: migrations, the tenants table, audit events and the agent's own records.

use crate::domain::audit::{AuditEvent, CommitInfo};
use crate::domain::json::{JsonText, SecretPaths};
use crate::domain::plan::{self as domain_plan, ActualTenant, AppliedRecord, Packed, Plan, TenantPlan};
use crate::domain::tenant::{DesiredTenant, Parked, ParkedTenant, TenantMeta};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rand::RngCore;
use rayon::prelude::*;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, Transaction};

mod audit;
pub mod conninfo;
pub mod lease;
pub mod locks;
mod migrate;
pub mod port;
pub mod respell;
mod write;

pub use audit::{AuditReport, VersionMismatch, verify_audit};
pub use migrate::{MIGRATIONS, check_migrated, checksum, migrate};
pub use port::{Db, Tx};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0}")]
    Url(String),
    /// `cause` is the innermost error's text: the layers above it repeat it.
    #[error("cannot connect to PostgreSQL{}: {cause}", if target.is_empty() { String::new() } else { format!(" at {target}") })]
    Connect { target: String, cause: String },
    #[error("cannot get a connection from the pool")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("{context}")]
    Query {
        context: String,
        #[source]
        source: DbFailure,
    },
    #[error(
        "migration {name} was changed after it was applied (checksum {applied} in the database, {now} in this build); restore it and add a new migration instead"
    )]
    ChecksumMismatch { name: String, applied: String, now: String },
    #[error("the database has migration {version} ({name}), which this build does not know; upgrade frostbyte-gitops")]
    UnknownMigration { version: i32, name: String },
    #[error("the database is not migrated (run `frostbyte-gitops migrate`): {0}")]
    NotMigrated(String),
    #[error("tenant {tenant}: {message}")]
    BadRow { tenant: String, message: String },
    #[error("tenant {tenant} changed while applying: {message}; nothing was applied")]
    Conflict { tenant: String, message: String },
    #[error("app role {role:?} refused: {why}")]
    AppRole { role: String, why: String },
    /// The database's own words: they name the tenant and both states.
    #[error("{0}")]
    Transition(String),
    #[error("keeping the created tenants' plans in a temporary file (TMPDIR); nothing was applied")]
    Spill(#[source] std::io::Error),
    #[error("tenant {tenant}: reading back its decoded document from a temporary file (TMPDIR); nothing was applied")]
    Parked {
        tenant: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where an apply puts the plans of the tenants it creates, a chunk at a time as it writes them.
pub trait CreatedSink: Send {
    fn take(&mut self, chunk: Packed) -> std::io::Result<()>;
}

impl StoreError {
    pub fn parked(tenant: &str, source: std::io::Error) -> StoreError {
        StoreError::Parked {
            tenant: tenant.to_string(),
            source,
        }
    }
}

/// Where a run keeps the documents it parked outside memory until their write.
pub trait ParkedDocuments: Sync {
    fn fetch(&self, at: Parked) -> std::io::Result<JsonText>;
}

/// The error of a statement, with what it was doing.
pub(crate) fn q(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Query {
        context,
        source: source.into(),
    }
}

/// A driver error as people see it. The server's DETAIL and WHERE are left out: for a violated
/// constraint or a bad value they quote the row (`Failing row contains (...)`), and a tenant's row
/// holds its decrypted config.
pub struct DbFailure(tokio_postgres::Error);

impl From<tokio_postgres::Error> for DbFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        DbFailure(e)
    }
}

impl std::fmt::Display for DbFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => {
                write!(f, "{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code())?;
                match db.hint() {
                    Some(hint) => write!(f, "; hint: {hint}"),
                    None => Ok(()),
                }
            }
            None => self.0.fmt(f),
        }
    }
}

/// The derived Debug would print every field of the server's error, DETAIL included.
impl std::fmt::Debug for DbFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbFailure({self})")
    }
}

impl std::error::Error for DbFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // A server error's own source is the full DbError; anything else (I/O, TLS) is safe to chain.
        match self.0.as_db_error() {
            Some(_) => None,
            None => std::error::Error::source(&self.0),
        }
    }
}

fn any_tcp_host(cfg: &tokio_postgres::Config) -> bool {
    cfg.get_hosts().iter().any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)))
}

/// TLS for TCP connections (`sslmode=prefer` by default, `require` to insist; unix sockets never
/// use it). Certificates are verified against the system's roots plus, if set, the CA file in
/// PGSSLROOTCERT (libpq's variable).
pub fn tls() -> Result<postgres_native_tls::MakeTlsConnector, StoreError> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = std::env::var_os("PGSSLROOTCERT") {
        let pem = std::fs::read(&path).map_err(|e| StoreError::Url(format!("reading PGSSLROOTCERT {}: {e}", path.to_string_lossy())))?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| StoreError::Url(format!("PGSSLROOTCERT {}: {e}", path.to_string_lossy())))?;
        builder.add_root_certificate(cert);
    }
    let connector = builder.build().map_err(|e| StoreError::Url(format!("setting up TLS: {e}")))?;
    Ok(postgres_native_tls::MakeTlsConnector::new(connector))
}

/// Bounds on every session the agent opens, so that a stuck lock or statement fails the run (and
/// the agent retries) instead of holding the apply lock or a replica forever. A URL that sets
/// `options` itself keeps its own. See docs/limits.md.
pub const SESSION_OPTIONS: &str = "-c statement_timeout=120s -c lock_timeout=60s -c idle_in_transaction_session_timeout=300s";

/// Whether a TCP connection may go without TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// As the URL says (`sslmode=prefer` when it says nothing).
    AsGiven,
    /// `sslmode=require` for TCP unless the URL asks for `disable` or a stricter mode (production).
    RequireForTcp,
}

/// A session's settings: the URL's, plus the timeouts and the TLS policy.
pub fn session_config(url: &str, tls_policy: TlsPolicy) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
    if cfg.get_options().is_none() {
        cfg.options(SESSION_OPTIONS);
    }
    let tcp = any_tcp_host(&cfg);
    // From the parsed settings, never the text: "sslmode" may sit in a password or an application
    // name. `prefer`, named or not, would send the password to a server that declines TLS.
    if tls_policy == TlsPolicy::RequireForTcp && tcp && cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    Ok(cfg)
}

/// A pool whose connections, handshakes and waits for a free connection each end at `deadline`:
/// a server that accepts and never answers fails the command instead of hanging it (the URL's
/// `connect_timeout` bounds only the TCP connect).
pub fn pool(url: &str, tls_policy: TlsPolicy, deadline: std::time::Duration) -> Result<Pool, StoreError> {
    let cfg = session_config(url, tls_policy)?;
    let manager = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    // Loading the system's roots takes tens of milliseconds, and a unix socket never uses them.
    let tcp = any_tcp_host(&cfg);
    let mgr = match tcp {
        true => Manager::from_config(cfg, tls()?, manager),
        false => Manager::from_config(cfg, tokio_postgres::NoTls, manager),
    };
    let timeouts = deadpool_postgres::Timeouts {
        wait: Some(deadline),
        create: Some(deadline),
        recycle: Some(deadline),
    };
    Pool::builder(mgr)
        .max_size(4)
        .timeouts(timeouts)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Url(e.to_string()))
}

/// A round trip within `deadline`: a server that finished the handshake but answers nothing is
/// caught before any real work waits on it.
pub async fn first_response(client: &tokio_postgres::Client, deadline: std::time::Duration) -> Result<(), StoreError> {
    match tokio::time::timeout(deadline, client.simple_query("SELECT 1")).await {
        Ok(answer) => answer.map(|_| ()).map_err(q("asking the server its first question")),
        Err(_) => Err(StoreError::Connect {
            target: String::new(),
            cause: format!("connected, but no answer to a first query within {} s (db_timeout)", deadline.as_secs()),
        }),
    }
}

/// Whether the server answers a trivial query (the agent's readiness check).
pub async fn ping(client: &tokio_postgres::Client) -> Result<(), String> {
    client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| e.to_string())
}

pub async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Timeout(kind) => StoreError::Connect {
            target: String::new(),
            cause: format!(
                "no answer within the deadline (db_timeout) while {}",
                match kind {
                    deadpool_postgres::TimeoutType::Wait => "waiting for a free connection",
                    deadpool_postgres::TimeoutType::Create => "connecting (TCP, TLS and login)",
                    deadpool_postgres::TimeoutType::Recycle => "checking a pooled connection",
                }
            ),
        },
        deadpool_postgres::PoolError::Backend(e) => {
            let mut cause: &dyn std::error::Error = &e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            StoreError::Connect {
                target: String::new(),
                cause: cause.to_string(),
            }
        }
        other => StoreError::Pool(other),
    })
}

/// Where a URL or conninfo points, without credentials: `host:port` or the socket directory, for
/// error messages.
pub fn target_of(url: &str) -> String {
    let Ok(cfg) = tokio_postgres::Config::from_str(url) else {
        return "(an invalid URL)".into();
    };
    let ports = cfg.get_ports();
    cfg.get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(host) => format!("{host}:{port}"),
                tokio_postgres::config::Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Serialises the appliers of one source until the transaction ends.
pub async fn lock_apply(tx: &Transaction<'_>, source: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&locks::apply(source)])
        .await
        .map_err(q("taking the apply lock"))
        .map(|_| ())
}

/// Which source owns a tenant, and the file it claimed it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub source: String,
    /// Its configured name when it claimed the tenant.
    pub name: Option<String>,
    pub file: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ({})", self.source),
            None => write!(f, "{}", self.source),
        }
    }
}

/// Which of `ids` other sources own (rows deleted by hand included).
pub async fn foreign_owners(client: &impl GenericClient, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError> {
    // Most databases have one source: two probes of the source index say so, where sending every
    // id of a large source costs the server a parse of the whole array (70 ms at 100,000).
    let others = client
        .query_one("SELECT EXISTS (SELECT 1 FROM gitops_owners WHERE source < $1 OR source > $1)", &[&source])
        .await
        .map_err(q("reading gitops_owners"))?;
    if !others.get::<_, bool>(0) {
        return Ok(BTreeMap::new());
    }
    let rows = client
        .query(
            "SELECT tenant_id, source, source_name, file_path FROM gitops_owners WHERE tenant_id = ANY($2) AND source <> $1",
            &[&source, &ids],
        )
        .await
        .map_err(q("reading gitops_owners"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let owner = Owner {
                source: r.get(1),
                name: r.get(2),
                file: r.get(3),
            };
            (r.get(0), owner)
        })
        .collect())
}

/// `tenant move`: gives a tenant to another source, with its audit event, in one transaction.
pub async fn move_tenant(client: &mut tokio_postgres::Client, tenant: &str, to: &str, to_name: &str, actor: &str) -> Result<uuid::Uuid, StoreError> {
    let tx = client.transaction().await.map_err(q("starting a transaction"))?;
    let from: Option<(String, String)> = tx
        .query_opt("SELECT source, file_path FROM gitops_owners WHERE tenant_id = $1 FOR UPDATE", &[&tenant])
        .await
        .map_err(q("reading gitops_owners"))?
        .map(|r| (r.get(0), r.get(1)));
    let exists = tx
        .query_opt("SELECT 1 FROM tenants WHERE tenant_id = $1", &[&tenant])
        .await
        .map_err(q("reading tenants"))?
        .is_some();
    if !exists && from.is_none() {
        return Err(StoreError::Transition(format!("tenant {tenant} does not exist")));
    }
    if from.as_ref().is_some_and(|(s, _)| s == to) {
        return Err(StoreError::Transition(format!("tenant {tenant} already belongs to source {to_name}")));
    }
    tx.execute(
        "INSERT INTO gitops_owners (tenant_id, source, source_name, file_path) VALUES ($1, $2, $3, '')
         ON CONFLICT (tenant_id) DO UPDATE SET source = EXCLUDED.source, source_name = EXCLUDED.source_name, file_path = '', claimed_at = now()",
        &[&tenant, &to, &to_name],
    )
    .await
    .map_err(q("moving the tenant"))?;
    let details = json!({
        "from_source": from.as_ref().map(|f| &f.0),
        "from_file": from.as_ref().map(|f| &f.1),
        "to_source": to,
        "to_source_name": to_name,
    });
    let event = AuditEvent {
        tenant_id: tenant.to_string(),
        event_type: crate::domain::audit::TENANT_SOURCE_CHANGED,
        actor: actor.to_string(),
        details,
    };
    let id = emit_audit_event(&tx, &event).await?;
    tx.commit().await.map_err(q("committing"))?;
    Ok(id)
}

/// The per-database key for sealing secrets; made on first use.
pub async fn digest_key(client: &impl GenericClient) -> Result<Vec<u8>, StoreError> {
    if let Some(row) = client
        .query_opt("SELECT digest_key FROM gitops_settings", &[])
        .await
        .map_err(q("reading gitops_settings"))?
    {
        return Ok(row.get(0));
    }
    let mut key = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    client
        .execute("INSERT INTO gitops_settings (digest_key) VALUES ($1) ON CONFLICT DO NOTHING", &[&key])
        .await
        .map_err(q("creating the digest key"))?;
    let row = client
        .query_one("SELECT digest_key FROM gitops_settings", &[])
        .await
        .map_err(q("reading gitops_settings"))?;
    Ok(row.get(0))
}

pub async fn last_applied_commit(client: &impl GenericClient, source: &str) -> Result<Option<String>, StoreError> {
    let row = client
        .query_opt("SELECT last_applied_commit FROM gitops_sources WHERE source = $1", &[&source])
        .await
        .map_err(q("reading gitops_sources"))?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn load_actual(client: &impl GenericClient) -> Result<Vec<ActualTenant>, StoreError> {
    let rows = client
        .query(
            "SELECT t.tenant_id, t.state, t.config_version, t.age_public_key, t.endpoints, t.config,
                    a.commit_id, a.config_version, a.document_digest, a.sealed_document, a.secret_paths, a.file_path, t.updated_at
               FROM tenants t LEFT JOIN gitops_applied a USING (tenant_id)
              ORDER BY t.tenant_id",
            &[],
        )
        .await
        .map_err(q("loading tenants"))?;
    actual_from_rows(&rows)
}

/// The rows of `ids` in full.
pub async fn load_actual_for(client: &impl GenericClient, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError> {
    let rows = client
        .query(
            "SELECT t.tenant_id, t.state, t.config_version, t.age_public_key, t.endpoints, t.config,
                    a.commit_id, a.config_version, a.document_digest, a.sealed_document, a.secret_paths, a.file_path, t.updated_at
               FROM tenants t LEFT JOIN gitops_applied a USING (tenant_id)
              WHERE t.tenant_id = ANY($1)
              ORDER BY t.tenant_id",
            &[&ids],
        )
        .await
        .map_err(q("loading tenants"))?;
    actual_from_rows(&rows)
}

/// A row's bookkeeping, without its documents: enough to tell that it is as the agent left it.
#[derive(Debug, Clone)]
pub struct RowIndex {
    pub tenant_id: String,
    pub config_version: i64,
    /// From the applied record: file, config_version and document digest.
    pub applied: Option<(String, i64, String)>,
    /// The commit the applied record came from, when this source wrote it: one string for the
    /// rows of one commit (after a first sync every row names the same one).
    pub applied_commit: Option<Arc<str>>,
    /// Changed since the agent wrote it (its trigger-kept updated_at is newer).
    pub touched: bool,
    /// Whether this source owns it (if not, nobody does: made by hand, or before sources were
    /// recorded). The index holds no rows another source owns.
    pub owned: bool,
    /// The file this source owns it by, where that is not the applied record's (nearly never).
    pub owned_by_other_file: Option<String>,
}

impl RowIndex {
    /// The file this source owns it by; None when nobody owns it. Read before the applied record
    /// is taken from the row.
    pub fn owned_file(&self) -> Option<&str> {
        let applied = || self.applied.as_ref().map(|(file, ..)| file.as_str());
        self.owned.then(|| self.owned_by_other_file.as_deref().or_else(applied).unwrap_or_default())
    }
}

/// The index of the rows a run over `source` works on: those it owns, and those nobody owns
/// (all of them, or only those of `unowned_ids`). Driven from the owner index, so a run's cost
/// follows its own source's size, not the table's.
pub async fn load_index(client: &impl GenericClient, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError> {
    // Compared here rather than sent: at 100,000 rows every column is megabytes to read. An owner
    // is always this source, and its file is nearly always the applied record's.
    const COLUMNS: &str = "t.tenant_id, t.config_version, a.file_path, a.config_version, a.document_digest,
        (a.applied_at IS NULL OR t.updated_at > a.applied_at), CASE WHEN a.source = $1 THEN a.commit_id END,
        o.source IS NOT NULL, NULLIF(o.file_path, a.file_path)";
    use futures_util::TryStreamExt;
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let (sql, params): (String, Vec<Param<'_>>) = match &unowned_ids {
        // Every unowned row: one pass over the table (an anti-join costs twice as much).
        None => (
            format!(
                "SELECT {COLUMNS} FROM tenants t LEFT JOIN gitops_owners o USING (tenant_id) LEFT JOIN gitops_applied a USING (tenant_id)
                  WHERE o.source = $1 OR o.source IS NULL"
            ),
            vec![&source],
        ),
        // Its own rows through the owner index, and the unowned rows it has files for.
        Some(ids) => (
            format!(
                "SELECT {COLUMNS} FROM gitops_owners o JOIN tenants t USING (tenant_id) LEFT JOIN gitops_applied a USING (tenant_id)
                  WHERE o.source = $1
                 UNION ALL
                 SELECT {COLUMNS} FROM tenants t LEFT JOIN gitops_owners o USING (tenant_id) LEFT JOIN gitops_applied a USING (tenant_id)
                  WHERE t.tenant_id = ANY($2) AND o.source IS NULL"
            ),
            vec![&source, ids],
        ),
    };
    // Streamed: each row becomes its index entry as it arrives, instead of every row's message
    // being held until the last one has.
    let rows = client.query_raw(&sql, params).await.map_err(q("indexing tenants"))?;
    futures_util::pin_mut!(rows);
    let (mut index, mut commit) = (Vec::new(), None);
    while let Some(r) = rows.try_next().await.map_err(q("indexing tenants"))? {
        index.push(index_from_row(&r, &mut commit)?);
    }
    Ok(index)
}

/// `commit`: the last row's applied commit, which this row shares when it names the same one.
fn index_from_row(r: &tokio_postgres::Row, commit: &mut Option<Arc<str>>) -> Result<RowIndex, StoreError> {
    let tenant_id: String = r.get(0);
    let bad = |e: tokio_postgres::Error| StoreError::BadRow {
        tenant: tenant_id.clone(),
        message: e.to_string(),
    };
    let file: Option<String> = r.try_get(2).map_err(bad)?;
    let (owned, owned_by_other_file) = (r.try_get(7).map_err(bad)?, r.try_get(8).map_err(bad)?);
    let applied = match file {
        Some(f) => Some((f, r.try_get(3).map_err(bad)?, r.try_get(4).map_err(bad)?)),
        None => None,
    };
    let applied_commit = match r.try_get::<_, Option<&str>>(6).map_err(bad)? {
        Some(c) if commit.as_deref() != Some(c) => Some(commit.insert(Arc::from(c)).clone()),
        Some(_) => commit.clone(),
        None => None,
    };
    let (config_version, touched) = (r.try_get(1).map_err(bad)?, r.try_get(5).map_err(bad)?);
    Ok(RowIndex {
        owned,
        owned_by_other_file,
        applied_commit,
        config_version,
        touched,
        applied,
        tenant_id,
    })
}

/// Each row is two documents to parse (its config, and the sealed copy last applied), most of the
/// time a full read takes: they are parsed on every core.
fn actual_from_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<ActualTenant>, StoreError> {
    crate::blocking(|| rows.par_iter().map(actual_from_row).collect())
}

fn actual_from_row(row: &tokio_postgres::Row) -> Result<ActualTenant, StoreError> {
    let tenant: String = row.try_get(0).map_err(|e| StoreError::BadRow {
        tenant: "?".into(),
        message: e.to_string(),
    })?;
    let bad = |e: tokio_postgres::Error| StoreError::BadRow {
        tenant: tenant.clone(),
        message: e.to_string(),
    };
    // Kept as text (a full read holds every row): jsonb's own text, checked, not parsed into trees.
    let raw = |i| row.try_get::<_, Json<Box<RawValue>>>(i).map(|j| j.0).map_err(bad);
    let text = |s: Result<JsonText, String>| {
        s.map_err(|message| StoreError::BadRow {
            tenant: tenant.clone(),
            message,
        })
    };
    let key = Value::String(row.try_get::<_, String>(3).map_err(bad)?);
    let document = text(JsonText::from_text(format!(
        r#"{{"age_public_key":{key},"endpoints":{},"config":{}}}"#,
        raw(4)?.get(),
        raw(5)?.get()
    )))?;
    let applied = match row.try_get::<_, Option<String>>(6).map_err(bad)? {
        None => None,
        Some(commit_id) => {
            let secret_paths: SecretPaths = row.try_get::<_, Vec<String>>(10).map_err(bad)?.into_iter().collect();
            Some(AppliedRecord {
                commit_id,
                file: row.try_get(11).map_err(bad)?,
                config_version: row.try_get(7).map_err(bad)?,
                digest: row.try_get(8).map_err(bad)?,
                sealed: text(JsonText::from_raw(raw(9)?))?,
                secret_paths,
            })
        }
    };
    let updated_at: Option<chrono::DateTime<chrono::Utc>> = row.try_get(12).map_err(bad)?;
    Ok(ActualTenant {
        updated_at: updated_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        known_secrets: applied.as_ref().map(|a| a.secret_paths.clone()).unwrap_or_default(),
        state: row.try_get(1).map_err(bad)?,
        config_version: row.try_get(2).map_err(bad)?,
        tenant_id: tenant.clone(),
        document,
        applied,
    })
}

const EMIT_AUDIT_EVENTS: &str = "SELECT emit_audit_events($1::text[], $2::text[], $3::text[], $4::jsonb[])";

/// The one code path that writes audit events, inside the caller's transaction: all of them, in
/// order, through `emit_audit_events`, the set-based variant of `emit_audit_event` (migration 007).
pub async fn emit_audit_events(tx: &Transaction<'_>, events: &[AuditEvent]) -> Result<Vec<uuid::Uuid>, StoreError> {
    if events.is_empty() {
        return Ok(vec![]);
    }
    let tenants: Vec<&str> = events.iter().map(|e| e.tenant_id.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let actors: Vec<&str> = events.iter().map(|e| e.actor.as_str()).collect();
    let details: Vec<&serde_json::Value> = events.iter().map(|e| &e.details).collect();
    let rows = tx
        .query(EMIT_AUDIT_EVENTS, &[&tenants, &types, &actors, &details])
        .await
        .map_err(q(format!("writing {} audit event(s)", events.len())))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn emit_audit_event(tx: &Transaction<'_>, event: &AuditEvent) -> Result<uuid::Uuid, StoreError> {
    Ok(emit_audit_events(tx, std::slice::from_ref(event)).await?.remove(0))
}

pub struct ApplyContext<'a> {
    pub source: &'a str,
    /// Its configured name.
    pub source_name: &'a str,
    pub commit: &'a CommitInfo,
    pub actor: &'a str,
    pub key: &'a [u8],
    /// Record the commit as the source's last applied one (not for work-tree runs).
    pub record_commit: bool,
    /// The commit's verified signer (null when verification is off).
    pub signer: Value,
    /// Tenants of this run nobody owns yet, with their files: the source claims them.
    pub claims: Vec<(String, String)>,
    /// The platform's embedding endpoint, for the plans of the tenants it creates.
    pub embedding_default: Option<&'a str>,
    /// Where the run parked the documents of [`Create::Parked`] creates.
    pub parked: Option<&'a dyn ParkedDocuments>,
}

/// Writes every change of `plan`, and creates the tenants of `creates` (planned here, chunk by
/// chunk while the server writes the chunk before, into `created`), with their audit events, a
/// statement per kind of write whatever the number of tenants. The caller holds the apply lock
/// and commits; an error leaves the transaction to roll back, so a run applies all or nothing.
pub async fn apply(
    tx: &Transaction<'_>,
    plan: &Plan,
    desired: &[DesiredTenant],
    creates: Vec<Create<'_>>,
    created: &mut dyn CreatedSink,
    ctx: &ApplyContext<'_>,
) -> Result<usize, StoreError> {
    let planned = planned_changes(plan, desired)?;
    let count = planned.len() + creates.len();
    let statements = match count == 0 && ctx.claims.is_empty() {
        true => None,
        false => Some(write::Statements::prepare(tx).await?),
    };
    // In tenant order, as the plan lists them: the audit trail gets its events in that order.
    // Both lists are in that order already; merged as the chunks take them, not into a third.
    debug_assert!(
        creates.is_sorted_by(|a, b| a.tenant().tenant_id < b.tenant().tenant_id),
        "creates in tenant order"
    );
    let to_create: Vec<&str> = planned
        .iter()
        .filter(|c| c.planned().is_some_and(|p| p.action == domain_plan::Action::Create))
        .map(|c| c.desired().tenant_id.as_str())
        .chain(creates.iter().map(|c| c.tenant().tenant_id.as_str()))
        .collect();
    let history = write::history(tx, &to_create).await?;
    drop(to_create);
    let changes = in_tenant_order(planned, creates.into_iter().map(Change::Create));
    // The unowned tenants the run has files for are claimed ahead of the first chunk; each chunk
    // claims the tenants it writes.
    if let Some(st) = &statements {
        futures_util::try_join!(claim(tx, st, ctx), write::changes(tx, st, changes, ctx, created, &history))?;
    }
    decommission(tx, plan, ctx).await?;
    if ctx.record_commit {
        let commit_time = chrono::DateTime::parse_from_rfc3339(&ctx.commit.time)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc));
        // Only when it moves: a sync of the applied commit writes nothing.
        tx.execute(
            "INSERT INTO gitops_sources (source, last_applied_commit, commit_time) VALUES ($1, $2, $3)
             ON CONFLICT (source) DO UPDATE SET last_applied_commit = EXCLUDED.last_applied_commit,
                 commit_time = EXCLUDED.commit_time, applied_at = now()
             WHERE gitops_sources.last_applied_commit IS DISTINCT FROM EXCLUDED.last_applied_commit",
            &[&ctx.source, &ctx.commit.id, &commit_time],
        )
        .await
        .map_err(q("recording the applied commit"))?;
    }
    Ok(count + plan.decommissions().count())
}

/// The plan's changes in tenant order, each beside its tenant's file, found by a search of
/// `desired` (in tenant order, as a run's state keeps it) rather than a map of every tenant: a
/// first sync of 100,000 tenants plans no change here and would build the map for nothing.
fn planned_changes<'a>(plan: &'a Plan, desired: &'a [DesiredTenant]) -> Result<Vec<Change<'a>>, StoreError> {
    debug_assert!(desired.is_sorted_by(|a, b| a.tenant_id < b.tenant_id), "desired tenants in tenant order");
    let mut changes = plan
        .changes()
        .map(|change| {
            let i = desired
                .binary_search_by(|d| d.tenant_id.as_str().cmp(&change.tenant_id))
                .map_err(|_| StoreError::Conflict {
                    tenant: change.tenant_id.clone(),
                    message: "the plan changes a tenant that has no file".into(),
                })?;
            Ok(Change::Planned(change, &desired[i]))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    changes.sort_by(|a, b| a.desired().tenant_id.cmp(&b.desired().tenant_id));
    Ok(changes)
}

/// A tenant an apply creates, planned as it is written, and where its document comes from when
/// its chunk is built.
pub enum Create<'a> {
    /// Read from the tenant, which keeps it (for a drift report after the apply).
    Kept(&'a DesiredTenant),
    /// Moved out of the tenant because nothing reads it after the write: dropped once its chunk's
    /// rows are built, so that a first sync does not hold every decoded document beside every
    /// created tenant's plan.
    Moved(&'a TenantMeta, JsonText),
    /// Fetched from where the run parked it ([`ApplyContext::parked`]).
    Parked(&'a ParkedTenant),
}

impl<'a> Create<'a> {
    pub fn tenant(&self) -> &'a TenantMeta {
        match self {
            Create::Kept(t) => t,
            Create::Moved(t, _) => t,
            Create::Parked(t) => t,
        }
    }

    /// The document to write; `parked`: where the run parked documents.
    pub fn into_document(self, parked: Option<&dyn ParkedDocuments>) -> Result<serde_json::Value, StoreError> {
        match self {
            Create::Kept(t) => Ok(t.document().value()),
            Create::Moved(_, doc) => Ok(doc.value()),
            Create::Parked(t) => {
                let fetched = match parked {
                    Some(parked) => parked.fetch(t.at()),
                    None => Err(std::io::Error::other("the run parked no documents")),
                };
                Ok(fetched.map_err(|source| StoreError::parked(&t.tenant_id, source))?.value())
            }
        }
    }
}

/// A tenant a run writes: planned already, or a create planned as it is written.
enum Change<'a> {
    Planned(&'a TenantPlan, &'a DesiredTenant),
    Create(Create<'a>),
}

impl<'a> Change<'a> {
    fn desired(&self) -> &'a TenantMeta {
        match self {
            Change::Planned(_, d) => d,
            Change::Create(c) => c.tenant(),
        }
    }

    fn planned(&self) -> Option<&'a TenantPlan> {
        match self {
            Change::Planned(c, _) => Some(c),
            Change::Create(_) => None,
        }
    }

    /// The document to write; the change is spent.
    fn into_document(self, parked: Option<&dyn ParkedDocuments>) -> Result<serde_json::Value, StoreError> {
        match self {
            Change::Create(c) => c.into_document(parked),
            Change::Planned(_, d) => Ok(d.document().value()),
        }
    }
}

/// Two lists of changes, each in tenant order, merged in that order.
fn in_tenant_order<'a>(a: Vec<Change<'a>>, b: impl Iterator<Item = Change<'a>>) -> impl Iterator<Item = Change<'a>> {
    let (mut a, mut b) = (a.into_iter().peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.desired().tenant_id < x.desired().tenant_id => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// Records this source as the owner of the unowned tenants it has files for; one another source
/// has claimed since the plan was made fails the run before any row is written.
async fn claim(tx: &Transaction<'_>, st: &write::Statements, ctx: &ApplyContext<'_>) -> Result<(), StoreError> {
    if ctx.claims.is_empty() {
        return Ok(());
    }
    let (ids, files): (Vec<&str>, Vec<&str>) = ctx.claims.iter().map(|(id, file)| (id.as_str(), file.as_str())).unzip();
    st.own(tx, &ids, &files, ctx.source, ctx.source_name).await
}

/// Prune: moves each tenant the plan decommissions to `decommissioning` through
/// `transition_tenant_state`, which writes its TENANT_DECOMMISSION_REQUESTED event.
async fn decommission(tx: &Transaction<'_>, plan: &Plan, ctx: &ApplyContext<'_>) -> Result<(), StoreError> {
    let (ids, details): (Vec<&str>, Vec<Value>) = plan
        .decommissions()
        .map(|t| {
            let why = json!({"reason": "its file was deleted from the source that owns it", "source": ctx.source, "commit": ctx.commit.id, "file": t.file});
            (t.tenant_id.as_str(), why)
        })
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    tx.query(
        "SELECT transition_tenant_state(u.id, 'decommissioning', $3, u.details)
           FROM (SELECT * FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS u(id, details, n) ORDER BY n) u",
        &[&ids, &details, &ctx.actor],
    )
    .await
    .map_err(q(format!("decommissioning {} tenant(s)", ids.len())))?;
    Ok(())
}

/// Grants `role` what the agent needs and nothing more: it reads and writes `tenants` and the
/// agent's own tables, reads the audit trail, and writes events only through `emit_audit_event`.
/// Refused when the role does not exist, is the one migrating, can bypass privileges, or owns
/// anything here (an owner can disable triggers and rewrite history).
pub async fn grant_app_role(client: &impl GenericClient, role: &str) -> Result<(), StoreError> {
    let row = client
        .query_opt(
            "SELECT r.rolsuper OR r.rolbypassrls, r.rolname = current_user,
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relowner = r.oid AND n.nspname NOT IN ('pg_catalog', 'information_schema'))
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE p.proowner = r.oid AND n.nspname NOT IN ('pg_catalog', 'information_schema'))
               FROM pg_roles r WHERE r.rolname = $1",
            &[&role],
        )
        .await
        .map_err(q("looking up the app role"))?;
    let refuse = |why: String| Err(StoreError::AppRole { role: role.to_string(), why });
    let Some(row) = row else {
        return refuse("no such role (create it first, e.g. CREATE ROLE ... LOGIN PASSWORD ...)".into());
    };
    let (privileged, is_migrator, owned): (bool, bool, i64) = (row.get(0), row.get(1), row.get(2));
    if is_migrator {
        return refuse("it is the role running the migrations, which owns the tables; the agent needs a role of its own".into());
    }
    if privileged {
        return refuse("it is a superuser or bypasses row security".into());
    }
    if owned > 0 {
        return refuse(format!("it owns {owned} table(s), view(s) or function(s) in this database"));
    }
    let r = quote_ident(role);
    let sql = format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {r};
         REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {r};
         GRANT USAGE ON SCHEMA public TO {r};
         GRANT SELECT, INSERT, UPDATE ON tenants TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE ON gitops_sources, gitops_applied, gitops_owners TO {r};
         GRANT SELECT, INSERT ON gitops_settings TO {r};
         GRANT SELECT ON schema_migrations, audit_events, audit_chain_head TO {r};
         GRANT EXECUTE ON FUNCTION emit_audit_event(text, text, text, jsonb) TO {r};
         GRANT EXECUTE ON FUNCTION emit_audit_events(text[], text[], text[], jsonb[]) TO {r};
         GRANT EXECUTE ON FUNCTION transition_tenant_state(text, text, text, jsonb) TO {r};"
    );
    client.batch_execute(&sql).await.map_err(q(format!("granting role {role}")))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One event of the audit chain, with its columns as the hash covers them.
pub struct ChainRow {
    pub seq: i64,
    pub event_id: String,
    pub fields: [String; 8],
    pub prev_hash: Vec<u8>,
    pub chain_hash: Vec<u8>,
}

/// Feeds every audit event, in event_seq order, to `each`, streaming (the trail can be long).
pub async fn for_each_audit_event(client: &impl GenericClient, mut each: impl FnMut(ChainRow) -> Result<(), StoreError>) -> Result<(), StoreError> {
    use futures_util::TryStreamExt;
    let rows = client
        .query_raw(
            "SELECT event_seq, event_id::text, tenant_id, event_type,
                    to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    actor, details::text, coalesce(previous_event_id::text, ''), prev_hash, chain_hash
               FROM audit_events ORDER BY event_seq",
            std::iter::empty::<i64>(),
        )
        .await
        .map_err(q("reading audit_events"))?;
    futures_util::pin_mut!(rows);
    while let Some(r) = rows.try_next().await.map_err(q("reading audit_events"))? {
        let seq: i64 = r.get(0);
        let id: String = r.get(1);
        let text = |i: usize| r.get::<_, String>(i);
        each(ChainRow {
            seq,
            fields: [id.clone(), seq.to_string(), text(2), text(3), text(4), text(5), text(6), text(7)],
            event_id: id,
            prev_hash: r.get(8),
            chain_hash: r.get(9),
        })?;
    }
    Ok(())
}

/// The chain head (last event_seq and hash), and each tenant's config_version with its count of
/// TENANT_CONFIG_UPDATED events.
pub async fn audit_head_and_versions(client: &impl GenericClient) -> Result<(Option<(i64, Vec<u8>)>, Vec<(String, i64, i64)>), StoreError> {
    let head = client
        .query_opt("SELECT last_seq, last_hash FROM audit_chain_head", &[])
        .await
        .map_err(q("reading audit_chain_head"))?
        .map(|r| (r.get(0), r.get(1)));
    let versions = client
        .query(
            "SELECT t.tenant_id, t.config_version,
                    (SELECT count(*) FROM audit_events e WHERE e.tenant_id = t.tenant_id AND e.event_type = 'TENANT_CONFIG_UPDATED')
               FROM tenants t ORDER BY t.tenant_id",
            &[],
        )
        .await
        .map_err(q("counting config events"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok((head, versions))
}

/// Moves a tenant to `to_state` through `transition_tenant_state`, the one way a state changes:
/// the legal transitions, the timestamps and the lifecycle event, in one transaction.
pub async fn transition_tenant_state(
    client: &mut tokio_postgres::Client,
    tenant: &str,
    to_state: &str,
    actor: &str,
    details: &Value,
) -> Result<uuid::Uuid, StoreError> {
    let tx = client.transaction().await.map_err(q("starting a transaction"))?;
    let row = tx
        .query_one("SELECT transition_tenant_state($1, $2, $3, $4)", &[&tenant, &to_state, &actor, details])
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db)
                if matches!(
                    db.code(),
                    &tokio_postgres::error::SqlState::CHECK_VIOLATION | &tokio_postgres::error::SqlState::NO_DATA_FOUND
                ) =>
            {
                StoreError::Transition(db.message().to_string())
            }
            _ => StoreError::Query {
                context: format!("moving tenant {tenant} to {to_state}"),
                source: e.into(),
            },
        })?;
    tx.commit().await.map_err(q("committing"))?;
    Ok(row.get(0))
}

/// Creates `name` on the server `admin_url` points to, if it does not exist.
pub async fn create_database(admin: &impl GenericClient, name: &str) -> Result<(), StoreError> {
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(q("looking up the database"))?;
    if exists.is_none() {
        // Identifiers cannot be bound as parameters; quote it.
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(e) = admin.batch_execute(&sql).await
            && e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
        {
            return Err(StoreError::Query {
                context: format!("creating database {name}"),
                source: e.into(),
            });
        }
    }
    Ok(())
}
