//! `audit verify`: the chain recomputed outside the database.

use super::{StoreError, q};
use crate::domain::audit::AuditEvent;
use crate::store;
use serde::Serialize;
use tokio_postgres::{GenericClient, Transaction};

/// A tenant whose `config_version` differs from its number of `TENANT_CONFIG_UPDATED` events.
#[derive(Debug, Clone, Serialize)]
pub struct VersionMismatch {
    pub tenant_id: String,
    pub config_version: i64,
    pub config_events: i64,
}

/// What `audit verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub events: u64,
    /// The newest event's seq and hash (hex): what `--anchor` records for the next verification.
    pub head_seq: i64,
    pub head_hash: String,
    pub broken: Option<crate::domain::audit::ChainBreak>,
    pub version_mismatches: Vec<VersionMismatch>,
}

impl AuditReport {
    pub fn intact(&self) -> bool {
        self.broken.is_none() && self.version_mismatches.is_empty()
    }
}

/// Recomputes the audit chain outside the database, and checks every tenant's config_version
/// against its config events. `anchor`: an event (seq, hash) an earlier verification recorded.
pub async fn verify_audit(client: &tokio_postgres::Client, anchor: Option<(i64, Vec<u8>)>) -> Result<AuditReport, StoreError> {
    use crate::domain::audit::{ChainBreak, ChainVerifier};
    // One snapshot for the events, the head and the versions.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(store::q("starting a read-only transaction"))?;
    let mut verifier = ChainVerifier::new(anchor);
    let mut broken: Option<ChainBreak> = None;
    store::for_each_audit_event(client, |row| {
        if broken.is_none()
            && let Err(b) = verifier.push(row.seq, &row.event_id, &row.fields, &row.prev_hash, &row.chain_hash)
        {
            broken = Some(b);
        }
        Ok(())
    })
    .await?;
    let (head, versions) = store::audit_head_and_versions(client).await?;
    let _ = client.batch_execute("COMMIT").await;
    let events = verifier.events;
    let (head_seq, head_hash) = match broken {
        Some(_) => (0, String::new()),
        None => match verifier.finish(head) {
            Ok((seq, hash)) => (seq, hex::encode(hash)),
            Err(b) => {
                broken = Some(b);
                (0, String::new())
            }
        },
    };
    let version_mismatches = versions
        .into_iter()
        .filter(|(_, version, count)| version != count)
        .map(|(tenant_id, config_version, config_events)| VersionMismatch {
            tenant_id,
            config_version,
            config_events,
        })
        .collect();
    Ok(AuditReport {
        events,
        head_seq,
        head_hash,
        broken,
        version_mismatches,
    })
}

pub(super) const EMIT_AUDIT_EVENTS: &str = "SELECT emit_audit_events($1::text[], $2::text[], $3::text[], $4::jsonb[])";

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
