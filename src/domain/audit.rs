//! Audit event payloads. Built from redacted plans only, so they cannot carry a secret.

use super::plan::{Action, TenantPlan};
use serde::Serialize;
use serde_json::{Value, json};

pub const TENANT_CREATED: &str = "TENANT_CREATED";
pub const TENANT_PROVISION_STARTED: &str = "TENANT_PROVISION_STARTED";
pub const TENANT_PROVISIONED: &str = "TENANT_PROVISIONED";
pub const TENANT_CONFIG_UPDATED: &str = "TENANT_CONFIG_UPDATED";

/// The commit a change comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CommitInfo {
    pub id: String,
    /// RFC 3339.
    pub time: String,
    pub author: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    pub tenant_id: String,
    pub event_type: &'static str,
    pub actor: String,
    pub details: Value,
}

/// The events one applied change writes: `TENANT_CREATED` for a new tenant, then always one
/// `TENANT_CONFIG_UPDATED` carrying the redacted patch from the old version to the new.
pub fn events_for(change: &TenantPlan, commit: &CommitInfo, source: &str, actor: &str) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    if change.action == Action::Create {
        out.push(AuditEvent {
            tenant_id: change.tenant_id.clone(),
            event_type: TENANT_CREATED,
            actor: actor.to_string(),
            details: json!({"state": "pending", "commit": commit.id, "file": change.file, "source": source}),
        });
    }
    if matches!(change.action, Action::Create | Action::Update) {
        let mut details = json!({
            "from_version": change.current_version.unwrap_or(0),
            "to_version": change.next_version,
            "commit": commit.id,
            "commit_time": commit.time,
            "commit_author": commit.author,
            "file": change.file,
            "source": source,
            "patch": change.patch,
        });
        if !change.out_of_band.is_empty() {
            details["corrected_out_of_band_changes"] = json!(change.out_of_band);
        }
        out.push(AuditEvent {
            tenant_id: change.tenant_id.clone(),
            event_type: TENANT_CONFIG_UPDATED,
            actor: actor.to_string(),
            details,
        });
    }
    out
}
