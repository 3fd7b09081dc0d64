//! PostgreSQL: migrations, the tenants table, audit events and the agent's own records. Here:
//! the errors, and a run's apply; the rest in a file each.

use crate::domain::audit::CommitInfo;
use crate::domain::json::JsonText;
use crate::domain::plan::{self as domain_plan, Packed, Plan, TenantPlan};
use crate::domain::tenant::{DesiredTenant, Parked, ParkedTenant, TenantMeta};
use serde_json::{Value, json};
use tokio_postgres::Transaction;

mod audit;
mod connect;
pub mod conninfo;
pub mod history;
pub mod lease;
mod lifecycle;
pub mod locks;
mod migrate;
pub mod pages;
pub mod port;
mod read;
pub mod respell;
mod roles;
pub mod runs;
mod write;

pub use audit::{AuditReport, ChainRow, VersionMismatch, audit_head_and_versions, emit_audit_event, emit_audit_events, for_each_audit_event, verify_audit};
pub use connect::{DbFailure, SESSION_OPTIONS, TlsPolicy, client, create_database, first_response, ping, pool, session_config, target_of, tls};
pub use lifecycle::{move_tenant, transition_tenant_state};
pub use migrate::{MIGRATIONS, check_migrated, checksum, migrate};
pub use port::{Db, Tx};
pub use read::{Owner, RowIndex, digest_key, foreign_owners, last_applied_commit, load_actual, load_actual_for, load_index};
pub use roles::grant_app_role;

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

/// Serialises the appliers of one source until the transaction ends.
pub async fn lock_apply(tx: &Transaction<'_>, source: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&locks::apply(source)])
        .await
        .map_err(q("taking the apply lock"))
        .map(|_| ())
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
