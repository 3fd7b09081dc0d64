//! Desired state against actual state: what a sync would do, as data.

use super::json::{self, JsonText, SecretPaths, child};
use super::secret_paths::{self, covers_encrypted, hides};
use super::tenant::{DesiredTenant, TenantMeta};
use hmac::{Hmac, Mac};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// What the agent recorded when it last wrote a tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedRecord {
    pub commit_id: String,
    /// The file it was read from.
    pub file: String,
    pub config_version: i64,
    /// [`digest`] of the document it wrote.
    pub digest: String,
    /// [`seal`] of the document it wrote: secrets replaced by keyed digests.
    pub sealed: JsonText,
    pub secret_paths: SecretPaths,
}

/// A tenant as the database (or, for `plan --against-ref`, another revision) has it.
#[derive(Clone, Debug, PartialEq)]
pub struct ActualTenant {
    pub tenant_id: String,
    pub state: String,
    pub config_version: i64,
    /// As JSON text, like [`DesiredTenant::document`]: a full read holds every row.
    pub document: JsonText,
    pub applied: Option<AppliedRecord>,
    /// Paths known to hold secrets: from the applied record, or from the base revision's file.
    pub known_secrets: SecretPaths,
    /// When the row last changed (RFC 3339), where known.
    pub updated_at: Option<String>,
}

/// Secret leaves replaced by an HMAC of their value, so that documents can be compared and stored
/// for drift detection without keeping or showing a secret. The key never leaves the database.
pub fn seal(key: &[u8], doc: &Value, secrets: &SecretPaths) -> Value {
    let mut sealed = doc.clone();
    // Leaves under a declared secret path that the file did not encrypt (a row edited by hand, a
    // plaintext file in dev) are sealed too; a document whose secrets were all encrypted has none,
    // so its digest is what it always was.
    let plaintext = secret_paths::plaintext_under_declared(doc, secrets);
    // In order, so that a secret object is sealed whole before any path inside it is looked at
    // (which then no longer resolves).
    for pointer in secrets.iter().chain(&plaintext) {
        if let Some(v) = sealed.pointer_mut(pointer) {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
            mac.update(pointer.as_bytes());
            mac.update(&[0]);
            mac.update(json::canonical(v).as_bytes());
            *v = Value::String(format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes())));
        }
    }
    sealed
}

pub fn digest(key: &[u8], doc: &Value, secrets: &SecretPaths) -> String {
    hex::encode(Sha256::digest(json::canonical(&seal(key, doc, secrets)).as_bytes()))
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Unchanged,
    Orphaned,
    /// Git changed the tenant and so did someone outside git, under the `warn` drift policy:
    /// neither change wins until the policy is `correct` or the row is put back.
    Conflict,
    /// Its file was deleted from the source that owns it, and that source prunes: the row moves
    /// to state `decommissioning` (it is never deleted).
    Decommission,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum SecretChange {
    Added,
    Changed,
    Removed,
}

/// The RFC 6902 operations a plan uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Add,
    Remove,
    Replace,
}

/// One RFC 6902 operation. Secret values are replaced by [`json::REDACTED`]; `secret` says what
/// happened to a secret leaf (a member RFC 6902 tells appliers to ignore).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PatchOp {
    pub op: Op,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<JsonText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretChange>,
    /// For `replace` and `remove`: the value it had, redacted like `value` (format_version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<JsonText>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TenantPlan {
    pub tenant_id: String,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The `config_version` the plan saw (none: no row).
    #[serde(default)]
    pub current_version: Option<i64>,
    #[serde(default)]
    pub next_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patch: Vec<PatchOp>,
    /// Fields changed in the database since the agent last wrote them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub out_of_band: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_digest: Option<String>,
    /// The embedding endpoint services will use for this tenant, and where it comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_endpoint: Option<Effective>,
}

/// A value readers resolve, and its origin.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub value: String,
    pub from: EffectiveFrom,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EffectiveFrom {
    /// `config.embedding.endpoint` in the tenant's file.
    TenantFile,
    /// The platform's `embedding_endpoint` setting, resolved by readers.
    PlatformDefault,
}

/// Says, for every tenant a plan writes, which embedding endpoint will serve it: its own, or the
/// platform default that readers fall back to (none when neither is set).
pub fn annotate_embedding(plan: &mut Plan, desired: &[DesiredTenant], platform_default: Option<&str>) {
    let by_id: BTreeMap<&str, &DesiredTenant> = desired.iter().map(|d| (d.tenant_id.as_str(), d)).collect();
    for t in plan.tenants.iter_mut().filter(|t| shows_embedding(t.action)) {
        let own = by_id.get(t.tenant_id.as_str()).and_then(|d| d.embedding_endpoint.as_deref());
        t.annotate_embedding(own, platform_default);
    }
}

/// The entries that show the embedding endpoint: those whose config the plan writes or reports.
fn shows_embedding(action: Action) -> bool {
    matches!(action, Action::Create | Action::Update | Action::Conflict)
}

impl TenantPlan {
    /// A create of a tenant whose row was deleted outside git after `config_events` versions:
    /// its version goes on from them, so that it still counts its config events.
    pub fn continue_from(&mut self, config_events: i64) {
        if self.action == Action::Create && config_events > 0 {
            self.current_version = Some(config_events);
            self.next_version = Some(config_events + 1);
        }
    }

    /// The embedding endpoint that will serve this tenant, if the plan writes it: `own` (its
    /// file's), else the platform default.
    pub fn annotate_embedding(&mut self, own: Option<&str>, platform_default: Option<&str>) {
        if !shows_embedding(self.action) {
            return;
        }
        self.embedding_endpoint = match (own, platform_default) {
            (Some(v), _) => Some(Effective {
                value: v.to_string(),
                from: EffectiveFrom::TenantFile,
            }),
            (None, Some(v)) => Some(Effective {
                value: v.to_string(),
                from: EffectiveFrom::PlatformDefault,
            }),
            (None, None) => None,
        };
    }

    /// A tenant known to be as git says without reading it: its file did not change since the
    /// agent wrote the row, and the row did not change since.
    pub fn unchanged(tenant_id: String, file: String, config_version: i64, digest: String) -> Self {
        TenantPlan {
            tenant_id,
            action: Action::Unchanged,
            file: Some(file),
            current_version: Some(config_version),
            next_version: None,
            patch: vec![],
            out_of_band: vec![],
            desired_digest: Some(digest.clone()),
            actual_digest: Some(digest),
            embedding_endpoint: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub unchanged: usize,
    pub orphaned: usize,
    #[serde(default)]
    pub conflict: usize,
    #[serde(default)]
    pub decommission: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub tenants: Vec<TenantPlan>,
}

impl Plan {
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        self.tenants.iter().for_each(|t| s.count(t.action));
        s
    }

    /// Whether applying would write anything. Orphans are only reported.
    pub fn has_changes(&self) -> bool {
        self.summary().has_changes()
    }

    pub fn decommissions(&self) -> impl Iterator<Item = &TenantPlan> {
        self.tenants.iter().filter(|t| t.action == Action::Decommission)
    }

    /// Prune: the orphans `owned` says belong to the source being planned, and that are not on
    /// their way out already, become decommissions of the file they came from.
    pub fn prune(&mut self, owned: impl Fn(&str) -> Option<String>, state: impl Fn(&str) -> Option<String>) {
        for t in self.tenants.iter_mut().filter(|t| t.action == Action::Orphaned) {
            let leaving = state(&t.tenant_id).is_some_and(|s| s == "decommissioning" || s == "decommissioned");
            if let (Some(file), false) = (owned(&t.tenant_id), leaving) {
                t.action = Action::Decommission;
                t.file = Some(file);
            }
        }
    }

    pub fn changes(&self) -> impl Iterator<Item = &TenantPlan> {
        self.tenants.iter().filter(|t| matches!(t.action, Action::Create | Action::Update))
    }
}

/// A plan's entries in tenant order, as the reports read them: held in memory, or read back a
/// window at a time from wherever a run put them (the tenants an apply created go to a file as
/// they are written, not into its memory).
pub trait Entries {
    fn summary(&self) -> Summary;
    /// Calls `f` with consecutive windows of the entries, in tenant order.
    fn try_for_each_window(&self, f: &mut dyn FnMut(&[Cow<'_, TenantPlan>]) -> std::io::Result<()>) -> std::io::Result<()>;
}

/// Plan entries as JSON lines, and their counts: how the plans of the tenants an apply creates
/// leave its memory, serialised where they are made (on the threads that build the writes).
#[derive(Default, Debug)]
pub struct Packed {
    pub lines: Vec<u8>,
    pub summary: Summary,
}

impl Packed {
    pub fn push(&mut self, t: &TenantPlan) {
        json::raw(|| serde_json::to_writer(&mut self.lines, t)).expect("a plan serialises");
        self.lines.push(b'\n');
        self.summary.count(t.action);
    }

    /// One line of [`Packed::lines`], without its newline.
    pub fn unpack(line: &[u8]) -> serde_json::Result<TenantPlan> {
        json::raw(|| serde_json::from_slice(line))
    }
}

/// Entries per window: enough to render on every core, few enough to hold.
pub const WINDOW: usize = 4096;

impl Entries for Plan {
    fn summary(&self) -> Summary {
        Plan::summary(self)
    }

    fn try_for_each_window(&self, f: &mut dyn FnMut(&[Cow<'_, TenantPlan>]) -> std::io::Result<()>) -> std::io::Result<()> {
        self.tenants
            .chunks(WINDOW)
            .try_for_each(|w| f(&w.iter().map(Cow::Borrowed).collect::<Vec<_>>()))
    }
}

impl std::ops::AddAssign for Summary {
    fn add_assign(&mut self, o: Summary) {
        self.create += o.create;
        self.update += o.update;
        self.unchanged += o.unchanged;
        self.orphaned += o.orphaned;
        self.conflict += o.conflict;
        self.decommission += o.decommission;
    }
}

impl Summary {
    pub fn count(&mut self, action: Action) {
        match action {
            Action::Create => self.create += 1,
            Action::Update => self.update += 1,
            Action::Unchanged => self.unchanged += 1,
            Action::Orphaned => self.orphaned += 1,
            Action::Conflict => self.conflict += 1,
            Action::Decommission => self.decommission += 1,
        }
    }

    /// Whether applying would write anything. Orphans are only reported.
    pub fn has_changes(&self) -> bool {
        self.create + self.update + self.decommission > 0
    }

    pub fn line(&self) -> String {
        let conflicts = if self.conflict > 0 {
            format!(", {} in conflict (left alone)", self.conflict)
        } else {
            String::new()
        };
        let decommissions = if self.decommission > 0 {
            format!(", {} to decommission", self.decommission)
        } else {
            String::new()
        };
        format!(
            "{} to create, {} to update{decommissions}, {} orphaned{conflicts}",
            self.create, self.update, self.orphaned
        )
    }
}

impl Summary {
    /// The same counts, said of a plan that was applied.
    pub fn past_line(&self) -> String {
        let mut parts = vec![format!("{} created", self.create), format!("{} updated", self.update)];
        if self.decommission > 0 {
            parts.push(format!("{} decommissioned", self.decommission));
        }
        parts.push(format!("{} orphaned", self.orphaned));
        if self.conflict > 0 {
            parts.push(format!("{} in conflict (left alone)", self.conflict));
        }
        parts.join(", ")
    }
}

/// Why a prune may not go ahead: it would decommission more than `max_fraction` of the `owned`
/// tenants of a source, or all of them (an emptied or mis-pointed directory looks just like that).
pub fn mass_prune_refusal(decommission: usize, owned: usize, max_fraction: f64) -> Option<String> {
    if decommission == 0 {
        return None;
    }
    let all = decommission >= owned;
    let over = decommission as f64 > max_fraction * owned as f64;
    (all || over).then(|| {
        format!(
            "would decommission {decommission} of its {owned} tenant(s){}, more than prune_max_fraction = {max_fraction}; nothing was applied. Check the tenant path, or pass --allow-mass-prune",
            if all { " (all of them)" } else { "" }
        )
    })
}

#[derive(Clone, Copy, Debug)]
pub struct PlanOptions<'a> {
    /// Key for [`seal`]/[`digest`].
    pub key: &'a [u8],
    /// Overwrite tenants changed out of band even when git has no new change for them.
    pub correct_drift: bool,
}

pub fn plan<'d>(desired: impl IntoIterator<Item = &'d DesiredTenant>, actual: &[ActualTenant], opts: PlanOptions<'_>) -> Plan {
    let want: BTreeMap<&str, &DesiredTenant> = desired.into_iter().map(|d| (d.tenant_id.as_str(), d)).collect();
    let have: BTreeMap<&str, &ActualTenant> = actual.iter().map(|a| (a.tenant_id.as_str(), a)).collect();
    let ids: BTreeSet<&str> = want.keys().chain(have.keys()).copied().collect();
    // Each tenant's plan stands alone (digests and patches are most of a cold sync's planning).
    let ids: Vec<&str> = ids.into_iter().collect();
    let tenants = ids
        .into_par_iter()
        .map(|id| match (want.get(id), have.get(id)) {
            (Some(d), None) => create(d, &d.document().value(), opts.key),
            (None, Some(a)) => TenantPlan {
                tenant_id: id.to_string(),
                action: Action::Orphaned,
                file: None,
                current_version: Some(a.config_version),
                next_version: None,
                patch: vec![],
                out_of_band: vec![],
                desired_digest: None,
                actual_digest: Some(digest(opts.key, &a.document.value(), &a.known_secrets)),
                embedding_endpoint: None,
            },
            (Some(d), Some(a)) => plan_both(d, a, opts),
            (None, None) => unreachable!("id came from one of the maps"),
        })
        .collect();
    Plan { tenants }
}

/// The plan of a tenant that has no row, `doc` being its document: every field added.
pub fn create(d: &TenantMeta, doc: &Value, key: &[u8]) -> TenantPlan {
    TenantPlan {
        tenant_id: d.tenant_id.clone(),
        action: Action::Create,
        file: Some(d.file.clone()),
        current_version: None,
        next_version: Some(1),
        patch: create_patch(doc, &d.secrets),
        out_of_band: vec![],
        desired_digest: Some(digest(key, doc, &d.secrets)),
        actual_digest: None,
        embedding_endpoint: None,
    }
}

fn plan_both(d: &DesiredTenant, a: &ActualTenant, opts: PlanOptions<'_>) -> TenantPlan {
    plan_parsed(d, &d.document().value(), a, &a.document.value(), opts)
}

/// Whether a tenant's row holds its file's document, as the agent last wrote it: then [`plan`]
/// says no more of it than [`TenantPlan::unchanged`] with the applied record's digest, and drift
/// no more than `TenantDrift::known_in_sync`, so a run that reads every row need not keep it.
pub fn in_step(d: &DesiredTenant, a: &ActualTenant, key: &[u8]) -> bool {
    let Some(rec) = &a.applied else { return false };
    let (doc, actual) = (d.document().value(), a.document.value());
    // With the documents equal the action is `unchanged` under either drift policy.
    let opts = PlanOptions { key, correct_drift: false };
    doc == actual && plan_parsed(d, &doc, a, &actual, opts) == TenantPlan::unchanged(d.tenant_id.clone(), d.file.clone(), a.config_version, rec.digest.clone())
}

fn plan_parsed(d: &DesiredTenant, doc: &Value, a: &ActualTenant, actual: &Value, opts: PlanOptions<'_>) -> TenantPlan {
    let desired_digest = digest(opts.key, doc, &d.secrets);
    let out_of_band = modified_paths(a, actual, opts.key);
    let git_moved = a.applied.as_ref().is_none_or(|r| r.digest != desired_digest);
    let differs = doc != actual;
    let action = if !differs {
        Action::Unchanged
    } else if opts.correct_drift {
        Action::Update
    } else if git_moved && !out_of_band.is_empty() {
        // Under `warn`, writing git's version would overwrite a hand edit in silence.
        Action::Conflict
    } else if git_moved {
        Action::Update
    } else {
        Action::Unchanged
    };
    let mut patch = Vec::new();
    if matches!(action, Action::Update | Action::Conflict) {
        let from_secrets: SecretPaths = a.known_secrets.union(&d.secrets).cloned().collect();
        diff(actual, doc, "", &from_secrets, &d.secrets, &mut patch);
    }
    TenantPlan {
        tenant_id: d.tenant_id.clone(),
        action,
        file: Some(d.file.clone()),
        current_version: Some(a.config_version),
        next_version: (action == Action::Update).then_some(a.config_version + 1),
        patch,
        out_of_band,
        desired_digest: Some(desired_digest),
        actual_digest: Some(digest(opts.key, actual, &a.known_secrets)),
        embedding_endpoint: None,
    }
}

/// Paths at which the row differs from what the agent last wrote (empty without a record).
pub fn modified_paths(a: &ActualTenant, actual: &Value, key: &[u8]) -> Vec<String> {
    let Some(rec) = &a.applied else { return vec![] };
    let mut paths = Vec::new();
    if digest(key, actual, &rec.secret_paths) != rec.digest {
        let now = seal(key, actual, &rec.secret_paths);
        let mut ops = Vec::new();
        diff(&rec.sealed.value(), &now, "", &SecretPaths::new(), &SecretPaths::new(), &mut ops);
        paths.extend(ops.into_iter().map(|op| op.path));
    }
    if a.config_version != rec.config_version {
        paths.push("/config_version".to_string());
    }
    paths
}

/// The patch that builds a new tenant's document from nothing.
pub fn create_patch(document: &Value, secrets: &SecretPaths) -> Vec<PatchOp> {
    let Value::Object(map) = document else { return vec![] };
    map.iter()
        .map(|(k, v)| {
            let path = child("", k);
            PatchOp {
                op: Op::Add,
                secret: secrets.contains(&path).then_some(SecretChange::Added),
                value: Some(JsonText::redacted(v, &path, secrets)),
                old: None,
                path,
            }
        })
        .collect()
}

/// Appends to `ops` the operations that turn `from` into `to`, at `ptr`. Arrays are replaced whole.
pub fn diff(from: &Value, to: &Value, ptr: &str, from_secrets: &SecretPaths, to_secrets: &SecretPaths, ops: &mut Vec<PatchOp>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, vb) in b {
                let p = child(ptr, k);
                match a.get(k) {
                    None => ops.push(PatchOp {
                        op: Op::Add,
                        secret: hides(to_secrets, &p, vb).then_some(SecretChange::Added),
                        value: Some(JsonText::redacted(vb, &p, to_secrets)),
                        old: None,
                        path: p,
                    }),
                    Some(va) if va != vb => diff(va, vb, &p, from_secrets, to_secrets, ops),
                    Some(_) => {}
                }
            }
            for (k, va) in a.iter().filter(|(k, _)| !b.contains_key(*k)) {
                let p = child(ptr, k);
                ops.push(PatchOp {
                    op: Op::Remove,
                    secret: hides(from_secrets, &p, va).then_some(SecretChange::Removed),
                    value: None,
                    old: Some(JsonText::redacted(va, &p, from_secrets)),
                    path: p,
                });
            }
        }
        (Value::Array(a), Value::Array(b)) if a != b && !covers_encrypted(to_secrets, ptr) && !covers_encrypted(from_secrets, ptr) => {
            diff_arrays(a, b, ptr, from_secrets, to_secrets, ops);
        }
        (a, b) if a == b => {}
        (a, b) => {
            let secret = if hides(to_secrets, ptr, b) {
                Some(if hides(from_secrets, ptr, a) {
                    SecretChange::Changed
                } else {
                    SecretChange::Added
                })
            } else if hides(from_secrets, ptr, a) {
                Some(SecretChange::Removed)
            } else {
                None
            };
            ops.push(PatchOp {
                op: Op::Replace,
                path: ptr.to_string(),
                value: Some(JsonText::redacted(b, ptr, to_secrets)),
                secret,
                old: Some(JsonText::redacted(a, ptr, from_secrets)),
            });
        }
    }
}

/// Arrays by element where that reads better than replacing them: entries inserted or removed in
/// one place (a contact added: one added line), or the same length (each changed element diffed).
/// The operations apply in order (removals from the highest index down), as RFC 6902 requires.
fn diff_arrays(a: &[Value], b: &[Value], ptr: &str, from_secrets: &SecretPaths, to_secrets: &SecretPaths, ops: &mut Vec<PatchOp>) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..].iter().rev().zip(b[prefix..].iter().rev()).take_while(|(x, y)| x == y).count();
    let at = |i: usize| child(ptr, &i.to_string());
    if prefix + suffix == a.len() {
        for (i, v) in b.iter().enumerate().take(b.len() - suffix).skip(prefix) {
            let p = at(i);
            ops.push(PatchOp {
                op: Op::Add,
                secret: hides(to_secrets, &p, v).then_some(SecretChange::Added),
                value: Some(JsonText::redacted(v, &p, to_secrets)),
                old: None,
                path: p,
            });
        }
    } else if prefix + suffix == b.len() {
        for i in (prefix..a.len() - suffix).rev() {
            let p = at(i);
            ops.push(PatchOp {
                op: Op::Remove,
                secret: hides(from_secrets, &p, &a[i]).then_some(SecretChange::Removed),
                value: None,
                old: Some(JsonText::redacted(&a[i], &p, from_secrets)),
                path: p,
            });
        }
    } else if a.len() == b.len() {
        for (i, (x, y)) in a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y) {
            diff(x, y, &at(i), from_secrets, to_secrets, ops);
        }
    } else {
        ops.push(PatchOp {
            op: Op::Replace,
            path: ptr.to_string(),
            value: Some(JsonText::redacted(&Value::Array(b.to_vec()), ptr, to_secrets)),
            secret: None,
            old: Some(JsonText::redacted(&Value::Array(a.to_vec()), ptr, from_secrets)),
        });
    }
}

/// Why a saved plan no longer holds, one line per tenant that moved.
pub fn stale_reasons(saved: &Plan, fresh: &Plan) -> Vec<String> {
    let saved_by: BTreeMap<&str, &TenantPlan> = saved.tenants.iter().map(|t| (t.tenant_id.as_str(), t)).collect();
    let fresh_by: BTreeMap<&str, &TenantPlan> = fresh.tenants.iter().map(|t| (t.tenant_id.as_str(), t)).collect();
    let ids: BTreeSet<&str> = saved_by.keys().chain(fresh_by.keys()).copied().collect();
    let mut out = Vec::new();
    for id in ids {
        match (saved_by.get(id), fresh_by.get(id)) {
            (Some(s), Some(f)) => {
                if s.current_version != f.current_version {
                    out.push(format!(
                        "{id}: config_version is {} in the database, the plan expected {}",
                        show(f.current_version),
                        show(s.current_version)
                    ));
                } else if s.actual_digest != f.actual_digest {
                    out.push(format!("{id}: the database row changed since the plan was made (same config_version)"));
                } else if s.desired_digest != f.desired_digest || s.action != f.action {
                    out.push(format!("{id}: the plan said {:?}, it would now be {:?}", s.action, f.action));
                }
            }
            (Some(s), None) => out.push(format!(
                "{id}: the plan said {:?}, the tenant is now neither in git nor in the database",
                s.action
            )),
            (None, Some(f)) => out.push(format!("{id}: not in the plan, it would now be {:?}", f.action)),
            (None, None) => {}
        }
    }
    out
}

fn show(v: Option<i64>) -> String {
    v.map_or_else(|| "absent (no row)".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_mass_prune_is_refused_with_the_counts() {
        assert_eq!(mass_prune_refusal(0, 0, 0.1), None);
        assert_eq!(mass_prune_refusal(1, 20, 0.1), None);
        assert_eq!(mass_prune_refusal(2, 20, 0.1), None);
        let over = mass_prune_refusal(3, 20, 0.1).unwrap();
        assert!(
            over.contains("would decommission 3 of its 20 tenant(s), more than prune_max_fraction = 0.1"),
            "{over}"
        );
        let all = mass_prune_refusal(1, 1, 1.0).unwrap();
        assert!(all.contains("(all of them)"), "{all}");
    }

    #[test]
    fn prune_decommissions_only_owned_orphans_not_already_leaving() {
        let orphan = |id: &str| TenantPlan {
            tenant_id: id.into(),
            action: Action::Orphaned,
            file: None,
            current_version: Some(1),
            next_version: None,
            patch: vec![],
            out_of_band: vec![],
            desired_digest: None,
            actual_digest: None,
            embedding_endpoint: None,
        };
        let mut p = Plan {
            tenants: vec![orphan("mine"), orphan("theirs"), orphan("going")],
        };
        p.prune(
            |id| (id != "theirs").then(|| format!("tenants/{id}.toml")),
            |id| Some(if id == "going" { "decommissioning" } else { "active" }.to_string()),
        );
        let actions: Vec<(Action, Option<&str>)> = p.tenants.iter().map(|t| (t.action, t.file.as_deref())).collect();
        assert_eq!(
            actions,
            [
                (Action::Decommission, Some("tenants/mine.toml")),
                (Action::Orphaned, None),
                (Action::Orphaned, None)
            ]
        );
        assert!(p.has_changes());
        assert_eq!(p.summary().decommission, 1);
    }

    const KEY: &[u8] = b"test-key";

    fn desired(id: &str, config: Value, secrets: &[&str]) -> DesiredTenant {
        DesiredTenant::new(
            id.into(),
            format!("tenants/{id}.toml"),
            &json!({"age_public_key": "age1x", "endpoints": {}, "config": config}),
            secrets.iter().map(|s| s.to_string()).collect(),
        )
    }

    fn actual_from(d: &DesiredTenant, version: i64) -> ActualTenant {
        ActualTenant {
            tenant_id: d.tenant_id.clone(),
            state: "pending".into(),
            config_version: version,
            document: d.document().clone(),
            applied: Some(AppliedRecord {
                commit_id: "c1".into(),
                file: d.file.clone(),
                config_version: version,
                digest: digest(KEY, &d.document().value(), &d.secrets),
                sealed: JsonText::of(&seal(KEY, &d.document().value(), &d.secrets)),
                secret_paths: (*d.secrets).clone(),
            }),
            known_secrets: (*d.secrets).clone(),
            updated_at: None,
        }
    }

    fn opts() -> PlanOptions<'static> {
        PlanOptions { key: KEY, correct_drift: true }
    }

    #[test]
    fn classifies_create_update_unchanged_orphaned() {
        let a = desired("aaa", json!({"plan": "pro"}), &[]);
        let b_old = desired("bbb", json!({"plan": "pro"}), &[]);
        let b_new = desired("bbb", json!({"plan": "enterprise"}), &[]);
        let c = desired("ccc", json!({}), &[]);
        let d = desired("ddd", json!({}), &[]);
        let p = plan(
            &[a, b_new, c.clone()],
            &[actual_from(&b_old, 3), actual_from(&c, 1), actual_from(&d, 2)],
            opts(),
        );
        let actions: Vec<_> = p.tenants.iter().map(|t| (t.tenant_id.as_str(), t.action)).collect();
        assert_eq!(
            actions,
            [
                ("aaa", Action::Create),
                ("bbb", Action::Update),
                ("ccc", Action::Unchanged),
                ("ddd", Action::Orphaned)
            ]
        );
        assert_eq!(p.summary().line(), "1 to create, 1 to update, 1 orphaned");
        let b = &p.tenants[1];
        assert_eq!((b.current_version, b.next_version), (Some(3), Some(4)));
        assert_eq!(
            b.patch,
            [PatchOp {
                op: Op::Replace,
                path: "/config/plan".into(),
                value: Some(JsonText::of(&json!("enterprise"))),
                secret: None,
                old: Some(JsonText::of(&json!("pro"))),
            }]
        );
    }

    #[test]
    fn secret_changes_are_named_never_shown() {
        let old = desired(
            "aaa",
            json!({"secrets": {"a": "old-a", "b": "same", "gone": "bye"}}),
            &["/config/secrets/a", "/config/secrets/b", "/config/secrets/gone"],
        );
        let new = desired(
            "aaa",
            json!({"secrets": {"a": "new-a", "b": "same", "c": "new-c"}}),
            &["/config/secrets/a", "/config/secrets/b", "/config/secrets/c"],
        );
        let p = plan(&[new], &[actual_from(&old, 1)], opts());
        let patch = &p.tenants[0].patch;
        let text = serde_json::to_string(patch).unwrap();
        for secret in ["old-a", "new-a", "new-c", "bye", "same"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        let kinds: Vec<_> = patch.iter().map(|o| (o.path.as_str(), o.secret)).collect();
        assert_eq!(
            kinds,
            [
                ("/config/secrets/a", Some(SecretChange::Changed)),
                ("/config/secrets/c", Some(SecretChange::Added)),
                ("/config/secrets/gone", Some(SecretChange::Removed)),
            ]
        );
    }

    #[test]
    fn create_patch_replays_to_the_redacted_document() {
        let d = desired("aaa", json!({"plan": "pro", "secrets": {"k": "v"}}), &["/config/secrets/k"]);
        let p = plan(std::slice::from_ref(&d), &[], opts());
        let ops: Vec<Value> = p.tenants[0].patch.iter().map(|o| serde_json::to_value(o).unwrap()).collect();
        let mut doc = json!({});
        json::apply_patch(&mut doc, &ops).unwrap();
        assert_eq!(doc, json::redact(&d.document().value(), "", &d.secrets));
    }

    #[test]
    fn drift_is_corrected_only_when_asked() {
        let d = desired("aaa", json!({"plan": "pro"}), &[]);
        let mut a = actual_from(&d, 2);
        a.document = a.document.edited(|v| v["config"]["plan"] = json!("free"));
        let warn = plan(
            std::slice::from_ref(&d),
            std::slice::from_ref(&a),
            PlanOptions {
                key: KEY,
                correct_drift: false,
            },
        );
        assert_eq!(warn.tenants[0].action, Action::Unchanged);
        assert_eq!(warn.tenants[0].out_of_band, ["/config/plan"]);
        let correct = plan(&[d], &[a], opts());
        assert_eq!(correct.tenants[0].action, Action::Update);
        assert_eq!(correct.tenants[0].out_of_band, ["/config/plan"]);
    }

    #[test]
    fn a_hand_edited_secret_is_a_modified_path_without_its_value() {
        let d = desired("aaa", json!({"secrets": {"k": "v1"}}), &["/config/secrets/k"]);
        let mut a = actual_from(&d, 1);
        a.document = a.document.edited(|v| v["config"]["secrets"]["k"] = json!("v2"));
        assert_eq!(modified_paths(&a, &a.document.value(), KEY), ["/config/secrets/k"]);
    }

    #[test]
    fn stale_plan_names_the_tenant_that_moved() {
        let d = desired("aaa", json!({"plan": "pro"}), &[]);
        let old = desired("aaa", json!({"plan": "free"}), &[]);
        let saved = plan(std::slice::from_ref(&d), &[actual_from(&old, 1)], opts());
        let fresh = plan(std::slice::from_ref(&d), &[actual_from(&old, 2)], opts());
        assert!(stale_reasons(&saved, &saved).is_empty());
        let reasons = stale_reasons(&saved, &fresh);
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].starts_with("aaa: config_version is 2"), "{reasons:?}");
    }
}
