//! Operators' changes to one tenant: its lifecycle state, and the source that owns it.

use super::{StoreError, emit_audit_event, q};
use crate::domain::audit::AuditEvent;
use serde_json::{Value, json};

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
