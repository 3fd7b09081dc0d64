//! Audit event payloads. Built from redacted plans only, so they cannot carry a secret.

use super::plan::{Action, TenantPlan};
use serde::Serialize;
use serde_json::{Value, json};

pub const TENANT_CREATED: &str = "TENANT_CREATED";
pub const TENANT_PROVISION_STARTED: &str = "TENANT_PROVISION_STARTED";
pub const TENANT_PROVISIONED: &str = "TENANT_PROVISIONED";
pub const TENANT_CONFIG_UPDATED: &str = "TENANT_CONFIG_UPDATED";
// Written by transition_tenant_state() (migration 005), never by a sync.
pub const TENANT_SUSPENDED: &str = "TENANT_SUSPENDED";
pub const TENANT_RESUMED: &str = "TENANT_RESUMED";
pub const TENANT_DECOMMISSION_REQUESTED: &str = "TENANT_DECOMMISSION_REQUESTED";
pub const TENANT_DECOMMISSIONED: &str = "TENANT_DECOMMISSIONED";
/// `tenant move`: the tenant now belongs to another source.
pub const TENANT_SOURCE_CHANGED: &str = "TENANT_SOURCE_CHANGED";

/// The commit a change comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CommitInfo {
    pub id: String,
    /// RFC 3339.
    pub time: String,
    pub author: String,
}

impl CommitInfo {
    /// What a `--worktree` run records in place of a commit.
    pub fn worktree() -> CommitInfo {
        CommitInfo {
            id: "worktree".into(),
            time: chrono::Utc::now().to_rfc3339(),
            author: "work tree".into(),
        }
    }
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
/// `signer`: the verified signer of the commit, as JSON (`{"type", "fingerprint", "principal"}`),
/// or null when verification is off.
pub fn events_for(change: &TenantPlan, commit: &CommitInfo, source: &str, actor: &str, signer: &Value) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    if change.action == Action::Create {
        let mut details = json!({"state": "pending", "commit": commit.id, "file": change.file, "source": source});
        if let Some(before) = change.current_version {
            details["recreated"] = json!({
                "reason": "its row was deleted outside git; the version goes on from the audit trail",
                "previous_version": before,
            });
        }
        out.push(AuditEvent {
            tenant_id: change.tenant_id.clone(),
            event_type: TENANT_CREATED,
            actor: actor.to_string(),
            details,
        });
    }
    if matches!(change.action, Action::Create | Action::Update) {
        let mut details = json!({
            "from_version": change.current_version.unwrap_or(0),
            "to_version": change.next_version,
            "commit": commit.id,
            "commit_time": commit.time,
            "commit_author": commit.author,
            "commit_signer": signer,
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

// ---------- the tamper-evident chain (migration 004) ----------

/// What the chain hash of an event covers, built the way `audit_event_content()` builds it in
/// SQL: each field length-prefixed, so no two events share a content string.
pub fn chain_content(fields: &[String]) -> String {
    fields.iter().map(|f| format!("{}:{f}", f.len())).collect::<Vec<_>>().join("|")
}

pub fn chain_hash(prev_hash: &[u8], fields: &[String]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(chain_content(fields).as_bytes());
    h.finalize().to_vec()
}

/// Where the chain first fails, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChainBreak {
    /// The event's content or hash no longer match each other.
    Edited { seq: i64, event_id: String },
    /// The event does not follow the one before it: an event was deleted before it, or it (or
    /// one before it) was inserted or moved.
    Relinked { seq: i64, event_id: String },
    /// The newest events are gone: the head records a later event than the last one present.
    HeadMismatch { head_seq: i64, last_seq: i64 },
    /// An event recorded in an anchor from an earlier verification is gone or different.
    Anchor { seq: i64 },
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainBreak::Edited { seq, event_id } => write!(f, "event {seq} ({event_id}) was edited: its content does not match its hash"),
            ChainBreak::Relinked { seq, event_id } => write!(
                f,
                "event {seq} ({event_id}) does not follow the event before it: an event was deleted, inserted or reordered just before it"
            ),
            ChainBreak::HeadMismatch { head_seq, last_seq } => {
                write!(
                    f,
                    "the chain head records event {head_seq}, but the last event is {last_seq}: the newest events were deleted or added"
                )
            }
            ChainBreak::Anchor { seq } => write!(f, "event {seq}, recorded in the anchor, is gone or was rewritten"),
        }
    }
}

/// Checks events one at a time, in event_seq order, so a long trail needs no memory.
pub struct ChainVerifier {
    expected_prev: Vec<u8>,
    last_seq: i64,
    pub events: u64,
    anchor: Option<(i64, Vec<u8>)>,
    anchor_seen: bool,
}

impl ChainVerifier {
    /// `anchor`: an event (seq, hash) recorded by an earlier verification, which must still be there.
    pub fn new(anchor: Option<(i64, Vec<u8>)>) -> Self {
        ChainVerifier {
            expected_prev: vec![0; 32],
            last_seq: 0,
            events: 0,
            anchor,
            anchor_seen: false,
        }
    }

    pub fn push(&mut self, seq: i64, event_id: &str, fields: &[String], prev_hash: &[u8], hash: &[u8]) -> Result<(), ChainBreak> {
        if chain_hash(prev_hash, fields) != hash {
            return Err(ChainBreak::Edited {
                seq,
                event_id: event_id.to_string(),
            });
        }
        if prev_hash != self.expected_prev.as_slice() {
            return Err(ChainBreak::Relinked {
                seq,
                event_id: event_id.to_string(),
            });
        }
        if let Some((at, anchored)) = &self.anchor
            && *at == seq
        {
            if anchored.as_slice() != hash {
                return Err(ChainBreak::Anchor { seq });
            }
            self.anchor_seen = true;
        }
        self.expected_prev = hash.to_vec();
        self.last_seq = seq;
        self.events += 1;
        Ok(())
    }

    /// The head (last seq and hash) once every event was pushed.
    pub fn finish(self, head: Option<(i64, Vec<u8>)>) -> Result<(i64, Vec<u8>), ChainBreak> {
        let (head_seq, head_hash) = head.unwrap_or((0, vec![0; 32]));
        if head_seq != self.last_seq || head_hash != self.expected_prev {
            return Err(ChainBreak::HeadMismatch {
                head_seq,
                last_seq: self.last_seq,
            });
        }
        if let Some((seq, _)) = self.anchor
            && !self.anchor_seen
        {
            return Err(ChainBreak::Anchor { seq });
        }
        Ok((self.last_seq, self.expected_prev))
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// seq, event id, fields, prev hash, hash.
    type Row = (i64, String, Vec<String>, Vec<u8>, Vec<u8>);

    fn chain(n: i64) -> Vec<Row> {
        let mut prev = vec![0u8; 32];
        (1..=n)
            .map(|seq| {
                let fields: Vec<String> = vec![format!("id-{seq}"), seq.to_string(), "acme".into(), "TENANT_CONFIG_UPDATED".into()];
                let hash = chain_hash(&prev, &fields);
                let row = (seq, format!("id-{seq}"), fields, prev.clone(), hash.clone());
                prev = hash;
                row
            })
            .collect()
    }

    fn verify(rows: &[Row], head: Option<(i64, Vec<u8>)>) -> Result<(i64, Vec<u8>), ChainBreak> {
        let mut v = ChainVerifier::new(None);
        for (seq, id, fields, prev, hash) in rows {
            v.push(*seq, id, fields, prev, hash)?;
        }
        v.finish(head)
    }

    #[test]
    fn each_kind_of_edit_is_found_at_its_event() {
        let rows = chain(5);
        let head = Some((5, rows[4].4.clone()));
        assert!(verify(&rows, head.clone()).is_ok());

        let mut edited = rows.clone();
        edited[2].2[2] = "globex".into();
        assert_eq!(
            verify(&edited, head.clone()),
            Err(ChainBreak::Edited {
                seq: 3,
                event_id: "id-3".into()
            })
        );

        let mut deleted = rows.clone();
        deleted.remove(1);
        assert_eq!(
            verify(&deleted, head.clone()),
            Err(ChainBreak::Relinked {
                seq: 3,
                event_id: "id-3".into()
            })
        );

        let mut reordered = rows.clone();
        reordered.swap(1, 2);
        assert!(matches!(verify(&reordered, head.clone()), Err(ChainBreak::Relinked { seq: 3, .. })));

        let mut truncated = rows.clone();
        truncated.pop();
        assert_eq!(verify(&truncated, head.clone()), Err(ChainBreak::HeadMismatch { head_seq: 5, last_seq: 4 }));
    }

    #[test]
    fn a_full_rewrite_is_caught_by_an_anchor() {
        let rows = chain(3);
        let mut v = ChainVerifier::new(Some((2, vec![9; 32])));
        for (seq, id, fields, prev, hash) in &rows[..1] {
            v.push(*seq, id, fields, prev, hash).unwrap();
        }
        let (seq, id, fields, prev, hash) = &rows[1];
        assert_eq!(v.push(*seq, id, fields, prev, hash), Err(ChainBreak::Anchor { seq: 2 }));
    }

    #[test]
    fn content_is_length_prefixed() {
        assert_ne!(chain_content(&["a|1:b".into(), "c".into()]), chain_content(&["a".into(), "b|1:c".into()]));
        assert_eq!(chain_content(&["ab".into(), "".into()]), "2:ab|0:");
    }
}
