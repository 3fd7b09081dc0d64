//! Drift: how the database differs from git and from what the agent last wrote.

use super::json::{SecretPaths, redact};
use super::plan::{ActualTenant, PatchOp, diff, digest, modified_paths, seal};
use super::tenant::DesiredTenant;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum DriftClass {
    InSync,
    /// Git has a change the database has not received.
    Pending,
    /// The row differs from what the agent last wrote.
    Modified,
    /// In git, not in the database.
    Missing,
    /// In the database, not in git.
    Orphaned,
}

impl DriftClass {
    pub const ALL: [DriftClass; 5] = [Self::InSync, Self::Pending, Self::Modified, Self::Missing, Self::Orphaned];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InSync => "in-sync",
            Self::Pending => "pending",
            Self::Modified => "modified",
            Self::Missing => "missing",
            Self::Orphaned => "orphaned",
        }
    }
}

impl FromStr for DriftClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown drift class {s:?} (one of: pending, modified, missing, orphaned, in-sync)"))
    }
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct TenantDrift {
    pub tenant_id: String,
    pub classes: Vec<DriftClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_applied_commit: Option<String>,
    /// Paths changed in the database since the agent wrote them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modified_paths: Vec<String>,
    /// Paths git would change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_paths: Vec<String>,
    /// For each modified path, what git has and what the database has.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modified: Vec<FieldDrift>,
    /// When the row last changed, for a modified tenant (the database records no author).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// One field changed outside git.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct FieldDrift {
    pub path: String,
    /// What git has there (none: absent); secrets inside it as `[REDACTED]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git: Option<Value>,
    /// What the database has there (none: absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<Value>,
    /// The field is a secret: the values differ, and neither is shown.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

impl TenantDrift {
    pub fn in_sync(&self) -> bool {
        self.classes == [DriftClass::InSync]
    }

    /// A tenant known to be in sync without comparing its documents (see `TenantPlan::unchanged`).
    pub fn known_in_sync(tenant_id: String, file: String, config_version: i64, last_applied_commit: Option<String>) -> Self {
        TenantDrift {
            tenant_id,
            classes: vec![DriftClass::InSync],
            file: Some(file),
            config_version: Some(config_version),
            last_applied_commit,
            modified_paths: vec![],
            pending_paths: vec![],
            modified: vec![],
            updated_at: None,
        }
    }
}

pub fn drift(desired: &[DesiredTenant], actual: &[ActualTenant], key: &[u8]) -> Vec<TenantDrift> {
    let want: BTreeMap<&str, &DesiredTenant> = desired.iter().map(|d| (d.tenant_id.as_str(), d)).collect();
    let have: BTreeMap<&str, &ActualTenant> = actual.iter().map(|a| (a.tenant_id.as_str(), a)).collect();
    let ids: BTreeSet<&str> = want.keys().chain(have.keys()).copied().collect();
    ids.into_iter()
        .map(|id| {
            let d = want.get(id).copied();
            let a = have.get(id).copied();
            let mut t = TenantDrift {
                tenant_id: id.to_string(),
                classes: vec![],
                file: d.map(|d| d.file.clone()),
                config_version: a.map(|a| a.config_version),
                last_applied_commit: a.and_then(|a| a.applied.as_ref()).map(|r| r.commit_id.clone()),
                modified_paths: vec![],
                pending_paths: vec![],
                modified: vec![],
                updated_at: None,
            };
            match (d, a) {
                (Some(_), None) => t.classes.push(DriftClass::Missing),
                (None, Some(_)) => t.classes.push(DriftClass::Orphaned),
                (Some(d), Some(a)) => {
                    let (doc, actual) = (d.document().value(), a.document.value());
                    t.pending_paths = pending_paths(d, &doc, a, &actual, key);
                    if !t.pending_paths.is_empty() {
                        t.classes.push(DriftClass::Pending);
                    }
                    t.modified_paths = modified_paths(a, &actual, key);
                    if !t.modified_paths.is_empty() {
                        t.classes.push(DriftClass::Modified);
                        t.modified = t.modified_paths.iter().map(|p| field_drift(p, d, &doc, a, &actual)).collect();
                        t.updated_at = a.updated_at.clone();
                    }
                }
                (None, None) => unreachable!(),
            }
            if t.classes.is_empty() {
                t.classes.push(DriftClass::InSync);
            }
            t
        })
        .collect()
}

/// What git and the database have at `path`, secrets withheld.
fn field_drift(path: &str, d: &DesiredTenant, doc: &Value, a: &ActualTenant, actual: &Value) -> FieldDrift {
    if path == "/config_version" {
        return FieldDrift {
            path: path.into(),
            git: a.applied.as_ref().map(|r| Value::from(r.config_version)),
            database: Some(Value::from(a.config_version)),
            secret: false,
        };
    }
    let secrets: SecretPaths = d.secrets.union(&a.known_secrets).cloned().collect();
    if crate::domain::secret_paths::covers(&secrets, path) {
        return FieldDrift {
            path: path.into(),
            git: None,
            database: None,
            secret: true,
        };
    }
    let at = |doc: &Value| doc.pointer(path).map(|v| redact(v, path, &secrets));
    FieldDrift {
        path: path.into(),
        git: at(doc),
        database: at(actual),
        secret: false,
    }
}

/// Paths where git differs from what was last applied (or, with no record, from the row).
fn pending_paths(d: &DesiredTenant, doc: &Value, a: &ActualTenant, actual: &Value, key: &[u8]) -> Vec<String> {
    let mut ops: Vec<PatchOp> = Vec::new();
    let none = SecretPaths::new();
    match &a.applied {
        Some(rec) if rec.digest == digest(key, doc, &d.secrets) => {}
        Some(rec) => diff(&rec.sealed.value(), &seal(key, doc, &d.secrets), "", &none, &none, &mut ops),
        None if doc != actual => diff(&seal(key, actual, &d.secrets), &seal(key, doc, &d.secrets), "", &none, &none, &mut ops),
        None => {}
    }
    ops.into_iter().map(|o| o.path).collect()
}

/// Counts per class; a tenant in two classes counts in both.
pub fn counts(report: &[TenantDrift]) -> BTreeMap<DriftClass, usize> {
    let mut out: BTreeMap<DriftClass, usize> = DriftClass::ALL.into_iter().map(|c| (c, 0)).collect();
    for t in report {
        for c in &t.classes {
            *out.entry(*c).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::json::JsonText;
    use crate::domain::plan::AppliedRecord;
    use serde_json::{Value, json};

    const KEY: &[u8] = b"k";

    fn d(id: &str, config: Value) -> DesiredTenant {
        DesiredTenant::new(
            id.into(),
            format!("tenants/{id}.json"),
            &json!({"age_public_key": "age1x", "endpoints": {}, "config": config}),
            ["/config/secrets/k".to_string()].into(),
        )
    }

    fn applied(t: &DesiredTenant) -> ActualTenant {
        ActualTenant {
            tenant_id: t.tenant_id.clone(),
            state: "pending".into(),
            config_version: 1,
            document: t.document().clone(),
            applied: Some(AppliedRecord {
                commit_id: "c1".into(),
                file: t.file.clone(),
                config_version: 1,
                digest: digest(KEY, &t.document().value(), &t.secrets),
                sealed: JsonText::of(&seal(KEY, &t.document().value(), &t.secrets)),
                secret_paths: (*t.secrets).clone(),
            }),
            known_secrets: (*t.secrets).clone(),
            updated_at: None,
        }
    }

    /// A full read keeps of a row in step only what planning and drift would say of it anyway.
    #[test]
    fn a_row_in_step_plans_and_drifts_as_an_unchanged_tenant() {
        use crate::domain::plan::{PlanOptions, TenantPlan, in_step, plan};
        let t = d("acme", json!({"plan": "pro", "secrets": {"k": "v"}}));
        let a = applied(&t);
        assert!(in_step(&t, &a, KEY));
        let digest = a.applied.as_ref().map(|r| r.digest.clone()).unwrap();
        for correct_drift in [false, true] {
            let p = plan(std::slice::from_ref(&t), std::slice::from_ref(&a), PlanOptions { key: KEY, correct_drift });
            assert_eq!(p.tenants, [TenantPlan::unchanged("acme".into(), t.file.clone(), 1, digest.clone())]);
        }
        assert_eq!(
            drift(std::slice::from_ref(&t), std::slice::from_ref(&a), KEY),
            [TenantDrift::known_in_sync("acme".into(), t.file.clone(), 1, Some("c1".into()))]
        );

        let with = |f: &dyn Fn(&mut ActualTenant)| {
            let mut a = applied(&t);
            f(&mut a);
            a
        };
        // A value under a declared secret path is sealed whether or not the file encrypted it;
        // one elsewhere that the record sealed and git no longer encrypts is a change.
        let plan_was_secret = DesiredTenant::new(
            "acme".into(),
            t.file.clone(),
            &t.document().value(),
            ["/config/secrets/k".to_string(), "/config/plan".to_string()].into(),
        );
        let unsealed = DesiredTenant::new("acme".into(), t.file.clone(), &t.document().value(), Default::default());
        assert!(in_step(&unsealed, &applied(&t), KEY), "declared secret either way");
        let out_of_step = [
            (
                "edited by hand",
                t.clone(),
                with(&|a| a.document = a.document.edited(|v| v["config"]["plan"] = json!("free"))),
            ),
            (
                "a secret edited by hand",
                t.clone(),
                with(&|a| a.document = a.document.edited(|v| v["config"]["secrets"]["k"] = json!("w"))),
            ),
            ("its version moved by hand", t.clone(), with(&|a| a.config_version = 2)),
            ("never applied", t.clone(), with(&|a| a.applied = None)),
            ("changed in git", d("acme", json!({"plan": "team", "secrets": {"k": "v"}})), applied(&t)),
            ("a secret changed in git", d("acme", json!({"plan": "pro", "secrets": {"k": "w"}})), applied(&t)),
            ("no longer a secret in git", t.clone(), applied(&plan_was_secret)),
        ];
        for (why, t, a) in out_of_step {
            assert!(!in_step(&t, &a, KEY), "{why}");
        }
    }

    #[test]
    fn every_class() {
        let same = d("same", json!({"plan": "pro"}));
        let pend_old = d("pend", json!({"plan": "pro"}));
        let pend_new = d("pend", json!({"plan": "enterprise"}));
        let modi = d("modi", json!({"secrets": {"k": "v"}}));
        let mut modi_row = applied(&modi);
        modi_row.document = modi_row.document.edited(|v| v["config"]["secrets"]["k"] = json!("hand-edited"));
        let both_old = d("both", json!({"plan": "pro", "region": "eu-west-1"}));
        let both_new = d("both", json!({"plan": "free", "region": "eu-west-1"}));
        let mut both_row = applied(&both_old);
        both_row.document = both_row.document.edited(|v| v["config"]["region"] = json!("us-east-1"));
        let miss = d("miss", json!({}));
        let orph = d("orph", json!({}));
        let report = drift(
            &[same.clone(), pend_new, modi, both_new, miss],
            &[applied(&same), applied(&pend_old), modi_row, both_row, applied(&orph)],
            KEY,
        );
        let got: Vec<(&str, Vec<DriftClass>)> = report.iter().map(|t| (t.tenant_id.as_str(), t.classes.clone())).collect();
        use DriftClass::*;
        assert_eq!(
            got,
            [
                ("both", vec![Pending, Modified]),
                ("miss", vec![Missing]),
                ("modi", vec![Modified]),
                ("orph", vec![Orphaned]),
                ("pend", vec![Pending]),
                ("same", vec![InSync]),
            ]
        );
        let modi = report.iter().find(|t| t.tenant_id == "modi").unwrap();
        assert_eq!(modi.modified_paths, ["/config/secrets/k"]);
        assert!(!serde_json::to_string(&report).unwrap().contains("hand-edited"));
        let both = report.iter().find(|t| t.tenant_id == "both").unwrap();
        assert_eq!(
            (both.pending_paths.as_slice(), both.modified_paths.as_slice()),
            (&["/config/plan".to_string()][..], &["/config/region".to_string()][..])
        );
        assert_eq!(counts(&report)[&Pending], 2);
    }
}
