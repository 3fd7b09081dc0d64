//! `audit verify`: the chain recomputed outside the database.

use super::StoreError;
use crate::store;
use serde::Serialize;

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
