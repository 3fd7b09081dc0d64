//! A tenant's versions, replayed from its audit events: each `TENANT_CONFIG_UPDATED` carries the
//! redacted patch from the version before, so replaying them from `{}` gives every version's
//! document with secrets as `[REDACTED]`, and each change's value before and after.

use super::audit::{TENANT_CONFIG_UPDATED, TENANT_CREATED};
use super::json::{self, SecretPaths};
use super::plan::{Op, PatchOp, SecretChange};
use serde::Serialize;
use serde_json::Value;

/// One audit event of a tenant, as stored.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub event_type: String,
    /// RFC 3339.
    pub occurred_at: String,
    pub actor: String,
    pub details: Value,
}

/// One change of a version: a field's value before and after, secrets redacted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
    /// What happened to a secret at `path`, whose values are never shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretChange>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub version: i64,
    pub at: String,
    pub actor: String,
    pub commit: Option<String>,
    pub commit_author: Option<String>,
    pub source: Option<String>,
    pub file: Option<String>,
    pub changes: Vec<Change>,
    /// Fields someone had changed outside git, which this version overwrote.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub corrected_out_of_band: Vec<String>,
    /// The document after this version, secrets redacted.
    #[serde(skip)]
    pub document: Value,
}

/// Every version in `events` (in the order written), or what makes the trail unreadable.
pub fn replay(events: &[StoredEvent]) -> Result<Vec<Version>, String> {
    let mut doc = Value::Object(Default::default());
    let mut out: Vec<Version> = Vec::new();
    for e in events {
        match e.event_type.as_str() {
            // A tenant created again (its row was deleted by hand) starts from nothing.
            TENANT_CREATED => doc = Value::Object(Default::default()),
            TENANT_CONFIG_UPDATED => {
                let version = e.details["to_version"].as_i64().ok_or_else(|| format!("event {}: no to_version", e.seq))?;
                let patch: Vec<PatchOp> = serde_json::from_value(e.details["patch"].clone()).map_err(|err| format!("event {}: its patch: {err}", e.seq))?;
                let changes = apply(&mut doc, &patch).map_err(|err| format!("event {} (version {version}): {err}", e.seq))?;
                let text = |k: &str| e.details[k].as_str().map(str::to_string);
                out.push(Version {
                    version,
                    at: e.occurred_at.clone(),
                    actor: e.actor.clone(),
                    commit: text("commit"),
                    commit_author: text("commit_author"),
                    source: text("source"),
                    file: text("file"),
                    changes,
                    corrected_out_of_band: serde_json::from_value(e.details["corrected_out_of_band_changes"].clone()).unwrap_or_default(),
                    document: doc.clone(),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Applies `patch` to `doc`, and says what each operation changed.
fn apply(doc: &mut Value, patch: &[PatchOp]) -> Result<Vec<Change>, String> {
    let mut changes = Vec::with_capacity(patch.len());
    for op in patch {
        let old = match op.op {
            Op::Add => None,
            Op::Remove | Op::Replace => doc.pointer(&op.path).cloned(),
        };
        let new = op.value.as_ref().map(|v| v.value());
        let raw = serde_json::json!({"op": op.op, "path": op.path, "value": new});
        json::apply_patch(doc, std::slice::from_ref(&raw))?;
        changes.push(Change {
            path: op.path.clone(),
            old: op.old.as_ref().map(|v| v.value()).or(old),
            new: match op.op {
                Op::Remove => None,
                _ => new,
            },
            secret: op.secret,
        });
    }
    Ok(changes)
}

/// Where the row's document (secrets redacted by `secrets`) and the replayed one differ: the
/// paths of fields edited outside git since the version was written. Empty when they agree.
pub fn differences(replayed: &Value, row: &Value, secrets: &SecretPaths) -> Vec<String> {
    let row = json::redact(row, "", secrets);
    let mut ops = Vec::new();
    super::plan::diff(replayed, &row, "", secrets, secrets, &mut ops);
    ops.into_iter().map(|o| o.path).collect()
}

/// One change as a line: `~ /config/plan: "pro" -> "enterprise"`; a secret only as what happened
/// to it. `esc` makes strings from the trail safe for where they are printed.
pub fn change_line(c: &Change, esc: &dyn Fn(&str) -> String) -> String {
    let value = |v: &Value| esc(&super::render::shown(&v.to_string()));
    let path = esc(&c.path);
    match (c.secret, &c.old, &c.new) {
        (Some(SecretChange::Added), ..) => format!("+ {path}: (secret added)"),
        (Some(SecretChange::Changed), ..) => format!("~ {path}: (secret changed)"),
        (Some(SecretChange::Removed), ..) => format!("- {path}: (secret removed)"),
        (None, Some(old), Some(new)) => format!("~ {path}: {} -> {}", value(old), value(new)),
        (None, None, Some(new)) => format!("+ {path}: {}", value(new)),
        (None, Some(old), None) => format!("- {path}: {}", value(old)),
        (None, None, None) => format!("~ {path}"),
    }
}

/// The head line of a version.
pub fn version_line(v: &Version, esc: &dyn Fn(&str) -> String) -> String {
    let commit = v
        .commit
        .as_deref()
        .map_or("no commit".to_string(), |c| format!("commit {}", esc(&c[..12.min(c.len())])));
    let author = v.commit_author.as_deref().map(|a| format!(" by {}", esc(a))).unwrap_or_default();
    let file = v.file.as_deref().map(|f| format!(", {}", esc(f))).unwrap_or_default();
    format!("version {} at {}: {commit}{author}{file} (applied by {})", v.version, v.at, esc(&v.actor))
}

/// A tenant's history as text, newest version first.
pub fn history_text(tenant: &str, versions: &[Version]) -> String {
    let esc = |s: &str| super::escape::text(s).into_owned();
    let mut out = format!("Tenant {}: {} version(s)\n", esc(tenant), versions.len());
    for v in versions.iter().rev() {
        out.push_str(&format!("\n{}\n", version_line(v, &esc)));
        for c in &v.changes {
            out.push_str(&format!("  {}\n", change_line(c, &esc)));
        }
        if !v.corrected_out_of_band.is_empty() {
            out.push_str(&format!(
                "  (overwrote changes made outside git: {})\n",
                esc(&v.corrected_out_of_band.join(", "))
            ));
        }
    }
    out
}

/// A tenant's history as Markdown, newest version first: each change in a code span.
pub fn history_markdown(tenant: &str, versions: &[Version]) -> String {
    let esc = |s: &str| super::escape::md_cell(s);
    let mut out = format!("### Tenant {}: {} version(s)\n", super::escape::md_code(tenant), versions.len());
    for v in versions.iter().rev() {
        out.push_str(&format!("\n**{}**\n\n", version_line(v, &esc)));
        for c in &v.changes {
            out.push_str(&format!("- {}\n", super::escape::md_code(&change_line(c, &|s| s.to_string()))));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: i64, event_type: &str, details: Value) -> StoredEvent {
        StoredEvent {
            seq,
            event_type: event_type.into(),
            occurred_at: format!("2026-12-0{seq}T00:00:00Z"),
            actor: "frostbyte-gitops/test".into(),
            details,
        }
    }

    fn updated(seq: i64, to: i64, patch: Value) -> StoredEvent {
        event(
            seq,
            TENANT_CONFIG_UPDATED,
            json!({"to_version": to, "commit": format!("c{to}"), "patch": patch}),
        )
    }

    #[test]
    fn each_version_is_replayed_with_its_old_and_new_values() {
        let events = [
            event(1, TENANT_CREATED, json!({})),
            updated(
                2,
                1,
                json!([
                    {"op": "add", "path": "/config", "value": {"plan": "pro", "db_password": "[REDACTED]"}},
                    {"op": "add", "path": "/endpoints", "value": {"api": "https://a"}}
                ]),
            ),
            event(3, "TENANT_PROVISION_STARTED", json!({})),
            updated(4, 2, json!([{"op": "replace", "path": "/config/plan", "value": "enterprise"}])),
            updated(5, 3, json!([{"op": "remove", "path": "/endpoints/api"}])),
        ];
        let versions = replay(&events).unwrap();
        assert_eq!(versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            versions[1].changes,
            [Change {
                path: "/config/plan".into(),
                old: Some(json!("pro")),
                new: Some(json!("enterprise")),
                secret: None
            }]
        );
        assert_eq!(versions[2].changes[0].old, Some(json!("https://a")));
        assert_eq!(versions[2].changes[0].new, None);
        assert_eq!(versions[1].commit.as_deref(), Some("c2"));
        assert_eq!(
            versions[2].document,
            json!({"config": {"plan": "enterprise", "db_password": "[REDACTED]"}, "endpoints": {}})
        );
    }

    #[test]
    fn a_tenant_created_again_starts_from_nothing() {
        let events = [
            event(1, TENANT_CREATED, json!({})),
            updated(2, 1, json!([{"op": "add", "path": "/config", "value": {"old_field": 1}}])),
            event(3, TENANT_CREATED, json!({"recreated": {"previous_version": 1}})),
            updated(4, 2, json!([{"op": "add", "path": "/endpoints", "value": {}}])),
        ];
        assert_eq!(replay(&events).unwrap()[1].document, json!({"endpoints": {}}));
    }

    #[test]
    fn a_patch_that_does_not_apply_names_its_event() {
        let events = [updated(7, 1, json!([{"op": "replace", "path": "/nowhere/x", "value": 1}]))];
        let err = replay(&events).unwrap_err();
        assert!(err.contains("event 7 (version 1)"), "{err}");
    }

    #[test]
    fn the_row_is_compared_with_secrets_redacted() {
        let secrets: SecretPaths = ["/config/db_password".to_string()].into();
        let replayed = json!({"config": {"plan": "pro", "db_password": "[REDACTED]"}});
        assert!(differences(&replayed, &json!({"config": {"plan": "pro", "db_password": "s3cret"}}), &secrets).is_empty());
        let edited = json!({"config": {"plan": "free", "db_password": "s3cret"}});
        assert_eq!(differences(&replayed, &edited, &secrets), ["/config/plan"]);
    }
}
