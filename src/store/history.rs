//! A tenant's audit events and row, for its history, its versions and the status page.

use super::{StoreError, q};
use crate::domain::history::StoredEvent;
use tokio_postgres::GenericClient;

/// Every audit event of `tenant`, in the order written.
pub async fn tenant_events(client: &impl GenericClient, tenant: &str) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = client
        .query(
            "SELECT event_seq, event_type, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), actor, details
               FROM audit_events WHERE tenant_id = $1 ORDER BY event_seq",
            &[&tenant],
        )
        .await
        .map_err(q(format!("reading the audit events of tenant {tenant}")))?;
    Ok(rows
        .iter()
        .map(|r| StoredEvent {
            seq: r.get(0),
            event_type: r.get(1),
            occurred_at: r.get(2),
            actor: r.get(3),
            details: r.get(4),
        })
        .collect())
}

/// A tenant's lifecycle: its state and when it moved along.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lifecycle {
    pub state: String,
    pub config_version: i64,
    pub created_at: String,
    pub updated_at: String,
    pub provisioning_started_at: Option<String>,
    pub provisioned_at: Option<String>,
}

pub async fn lifecycle(client: &impl GenericClient, tenant: &str) -> Result<Option<Lifecycle>, StoreError> {
    const TIME: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";
    let row = client
        .query_opt(
            &format!(
                "SELECT state, config_version, to_char(created_at AT TIME ZONE 'UTC', {TIME}), to_char(updated_at AT TIME ZONE 'UTC', {TIME}),
                        to_char(provisioning_started_at AT TIME ZONE 'UTC', {TIME}), to_char(provisioned_at AT TIME ZONE 'UTC', {TIME})
                   FROM tenants WHERE tenant_id = $1"
            ),
            &[&tenant],
        )
        .await
        .map_err(q(format!("reading tenant {tenant}")))?;
    Ok(row.map(|r| Lifecycle {
        state: r.get(0),
        config_version: r.get(1),
        created_at: r.get(2),
        updated_at: r.get(3),
        provisioning_started_at: r.get(4),
        provisioned_at: r.get(5),
    }))
}
