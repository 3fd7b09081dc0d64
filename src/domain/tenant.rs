//! The tenant document: what one file declares, and the checks that need no I/O.

use super::issue::Issue;
use super::json::{self, JsonText, SecretPaths};
use super::secret_paths;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

/// The fields of a tenant file besides `tenant_id`; they form the document that is diffed and stored.
pub const DOCUMENT_FIELDS: [&str; 3] = ["age_public_key", "endpoints", "config"];

pub use super::document::MAX_DEPTH;

pub const STATES: [&str; 6] = ["pending", "provisioning", "active", "suspended", "decommissioning", "decommissioned"];

/// What a tenant's file says besides its document: the same whether the document is in memory
/// or parked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantMeta {
    pub tenant_id: String,
    /// Path of the file inside the repository, as shown to people.
    pub file: String,
    /// Pointers into the document of the values that were encrypted in the file; tenants whose
    /// files encrypt the same paths share one set (see [`SharedPaths`]).
    pub secrets: Arc<SecretPaths>,
    /// `config.embedding.endpoint`, when the file sets one.
    pub embedding_endpoint: Option<String>,
}

/// A tenant as git declares it, its document `D` in memory ([`JsonText`], the default) or parked
/// outside it ([`Parked`]): which one is a type, so nothing can read a document that is not there.
///
/// The document is `{"age_public_key", "endpoints", "config"}`, decrypted, as JSON text: as
/// serde_json trees the documents were most of a run's memory (about 6 KB a tenant for 1 KB of
/// text), so whoever needs the tree parses it for the moment. An apply parks each document until
/// it is compared or written; a sync that reports no drift after applying moves a created tenant's
/// document out for the write ([`DesiredTenant::take_document`]), leaving `null`.
#[derive(Clone, PartialEq)]
pub struct DesiredTenant<D = JsonText> {
    meta: TenantMeta,
    document: D,
}

/// Where a run parked a document outside memory: the run that parked it knows where that is, and
/// nothing here does I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parked {
    pub offset: u64,
    pub len: u32,
}

/// A tenant whose document waits outside memory.
pub type ParkedTenant = DesiredTenant<Parked>;

/// A decoded tenant of a run that parks documents: parked, or kept when parking failed.
pub enum Held {
    Here(DesiredTenant),
    Parked(ParkedTenant),
}

impl<D> std::ops::Deref for DesiredTenant<D> {
    type Target = TenantMeta;
    fn deref(&self) -> &TenantMeta {
        &self.meta
    }
}

impl<D> std::ops::DerefMut for DesiredTenant<D> {
    fn deref_mut(&mut self) -> &mut TenantMeta {
        &mut self.meta
    }
}

impl Held {
    /// Puts a parked tenant's document, fetched back, in its place.
    pub fn unpark(&mut self, document: JsonText) {
        if let Held::Parked(t) = self {
            let meta = std::mem::take(&mut t.meta);
            *self = Held::Here(DesiredTenant { meta, document });
        }
    }
}

impl std::ops::Deref for Held {
    type Target = TenantMeta;
    fn deref(&self) -> &TenantMeta {
        match self {
            Held::Here(t) => t,
            Held::Parked(t) => t,
        }
    }
}

/// Without the document: it holds decrypted values.
impl<D> std::fmt::Debug for DesiredTenant<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredTenant")
            .field("tenant_id", &self.tenant_id)
            .field("file", &self.file)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

impl DesiredTenant {
    pub fn new(tenant_id: String, file: String, document: &Value, secrets: SecretPaths) -> DesiredTenant {
        DesiredTenant {
            meta: TenantMeta {
                embedding_endpoint: document.pointer("/config/embedding/endpoint").and_then(Value::as_str).map(str::to_string),
                tenant_id,
                file,
                secrets: Arc::new(secrets),
            },
            document: JsonText::of(document),
        }
    }

    pub fn document(&self) -> &JsonText {
        &self.document
    }

    /// Moves the document out, leaving `null`: for a write after which nothing reads it.
    pub fn take_document(&mut self) -> JsonText {
        std::mem::replace(&mut self.document, JsonText::null())
    }

    /// What the file says besides the document, and the document.
    pub fn into_parts(self) -> (TenantMeta, JsonText) {
        (self.meta, self.document)
    }

    /// The tenant once its document was parked at `at`; the document is dropped from memory.
    pub fn park(self, at: Parked) -> ParkedTenant {
        DesiredTenant { meta: self.meta, document: at }
    }
}

impl ParkedTenant {
    pub fn at(&self) -> Parked {
        self.document
    }

    /// The tenant with its document fetched back from where it was parked.
    pub fn unpark(self, document: JsonText) -> DesiredTenant {
        DesiredTenant { meta: self.meta, document }
    }
}

/// The distinct sets of secret paths of one read: nearly every tenant file encrypts the same
/// paths, and a set of its own per tenant (a B-tree node and its strings, about 280 bytes) was a
/// fifth of a first sync's memory at 100,000 tenants.
#[derive(Default)]
pub struct SharedPaths(Mutex<HashSet<Arc<SecretPaths>>>);

impl SharedPaths {
    /// The set equal to `paths` seen first, or `paths`, now the one shared.
    pub fn share(&self, paths: Arc<SecretPaths>) -> Arc<SecretPaths> {
        let mut seen = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.get(&*paths) {
            Some(shared) => shared.clone(),
            None => {
                seen.insert(paths.clone());
                paths
            }
        }
    }
}

pub fn is_valid_tenant_id(id: &str) -> bool {
    let b = id.as_bytes();
    (3..=63).contains(&b.len()) && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-') && b[0] != b'-' && b[b.len() - 1] != b'-'
}

const BECH32_CHARSET: &str = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";

/// An age X25519 recipient: `age1` and 58 bech32 characters (the checksum is checked by the age
/// crate when the key is used; this is the shape the database CHECK enforces too).
pub fn is_age_recipient(key: &str) -> bool {
    key.len() == 62 && key.starts_with("age1") && key[4..].chars().all(|c| BECH32_CHARSET.contains(c))
}

static SCHEMA_TEXT: &str = include_str!("../schema/tenant-config.schema.json");

static ENDPOINTS_SCHEMA_TEXT: &str = include_str!("../schema/endpoints.schema.json");

fn compile(text: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(text).expect("a shipped schema is valid JSON");
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .expect("a shipped schema compiles")
}

static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| compile(SCHEMA_TEXT));
static ENDPOINTS_VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| compile(ENDPOINTS_SCHEMA_TEXT));

pub fn config_schema() -> &'static str {
    SCHEMA_TEXT
}

/// A document that passed every check: what a [`DesiredTenant`] is made of, for the callers that
/// keep it (`validate` only wants to know, and skips writing its text).
pub struct Checked {
    pub tenant_id: String,
    /// `{"age_public_key", "endpoints", "config"}`.
    pub document: Value,
    pub secrets: SecretPaths,
}

/// Without the document: it holds decrypted values.
impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked").field("tenant_id", &self.tenant_id).finish_non_exhaustive()
    }
}

impl Checked {
    pub fn into_tenant(self, file: &str) -> DesiredTenant {
        DesiredTenant::new(self.tenant_id, file.to_string(), &self.document, self.secrets)
    }
}

/// Checks a decrypted file, or says everything wrong with it. `text` is the file as committed,
/// used only to find line numbers. No message quotes a secret value.
pub fn check_document(file: &str, stem: &str, text: &str, doc: Value, secrets: SecretPaths) -> Result<Checked, Vec<Issue>> {
    let Value::Object(mut map) = doc else {
        return Err(vec![Issue::new(file, "the document must be a mapping at the top level")]);
    };
    if map.values().map(json::depth).max().unwrap_or(0) + 1 > MAX_DEPTH {
        return Err(vec![Issue::new(file, format!("nesting is deeper than {MAX_DEPTH} levels"))]);
    }
    let at = Place { file, text };
    let mut issues = Vec::new();
    let tenant_id = take_tenant_id(&mut map, stem, &at, &mut issues);
    field_issues(&map, &secrets, &at, &mut issues);
    for (field, pointer, validator) in [("config", "/config", &*VALIDATOR), ("endpoints", "/endpoints", &*ENDPOINTS_VALIDATOR)] {
        if let Some(value) = map.get(field).filter(|v| v.is_object()) {
            let found = schema_issues(validator, pointer, value, &secrets);
            issues.extend(found.into_iter().map(|(pointer, message)| at.issue(&pointer, message)));
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    let document = Value::Object(
        DOCUMENT_FIELDS
            .iter()
            .filter_map(|f| map.shift_remove(*f).map(|v| (f.to_string(), v)))
            .collect::<Map<_, _>>(),
    );
    Ok(Checked { tenant_id, document, secrets })
}

/// Where a problem of a file is: the file, and its text to find a pointer's line in.
struct Place<'a> {
    file: &'a str,
    text: &'a str,
}

impl Place<'_> {
    fn issue(&self, pointer: &str, message: String) -> Issue {
        Issue::new(self.file, message).at(pointer).line(json::locate_line(self.text, pointer))
    }
}

/// The document's tenant_id, which must be the file's name; the name stands in when it is wrong.
fn take_tenant_id(map: &mut Map<String, Value>, stem: &str, at: &Place<'_>, issues: &mut Vec<Issue>) -> String {
    match map.shift_remove("tenant_id") {
        Some(Value::String(id)) => {
            if !is_valid_tenant_id(&id) {
                issues.push(at.issue("/tenant_id", format!("tenant_id {id:?} is not a lowercase DNS label of 3 to 63 characters")));
            } else if id != stem {
                issues.push(at.issue("/tenant_id", format!("tenant_id {id:?} does not match the file name (expected {stem:?})")));
            }
            id
        }
        Some(_) => {
            issues.push(at.issue("/tenant_id", "tenant_id must be a string".into()));
            stem.to_string()
        }
        None => {
            issues.push(Issue::new(at.file, "missing required field tenant_id"));
            stem.to_string()
        }
    }
}

/// The top-level fields besides tenant_id: the age key's form, the required mappings, no others.
fn field_issues(map: &Map<String, Value>, secrets: &SecretPaths, at: &Place<'_>, issues: &mut Vec<Issue>) {
    match map.get("age_public_key") {
        Some(Value::String(key)) if is_age_recipient(key) => {}
        Some(Value::String(_)) if secrets.contains("/age_public_key") => {
            issues.push(at.issue("/age_public_key", "age_public_key is not an age X25519 recipient (age1...)".into()))
        }
        Some(Value::String(key)) => issues.push(at.issue("/age_public_key", format!("age_public_key {key:?} is not an age X25519 recipient (age1...)"))),
        Some(_) => issues.push(at.issue("/age_public_key", "age_public_key must be a string".into())),
        None => issues.push(Issue::new(at.file, "missing required field age_public_key")),
    }
    for field in ["endpoints", "config"] {
        match map.get(field) {
            Some(Value::Object(_)) => {}
            Some(_) => issues.push(at.issue(&format!("/{field}"), format!("{field} must be a mapping"))),
            None => issues.push(Issue::new(at.file, format!("missing required field {field}"))),
        }
    }
    for key in map.keys().filter(|k| !DOCUMENT_FIELDS.contains(&k.as_str())) {
        issues.push(at.issue(
            &json::child("", key),
            format!("unknown top-level field {key:?} (allowed: tenant_id, {})", DOCUMENT_FIELDS.join(", ")),
        ));
    }
}

/// Schema problems of the value at `at` as (pointer into the document, message). Where the value
/// at fault is or holds a secret, the message names only the rule, since the validator quotes values.
fn schema_issues(validator: &jsonschema::Validator, at: &str, value: &Value, secrets: &SecretPaths) -> Vec<(String, String)> {
    // The valid case, nearly every file, without building the error iterator's state.
    if validator.is_valid(value) {
        return Vec::new();
    }
    let mut out: BTreeMap<(String, String), ()> = BTreeMap::new();
    for error in validator.iter_errors(value) {
        let pointer = format!("{at}{}", error.instance_path().as_str());
        let message = match error.kind() {
            // About key names, never values: said in full even for an object that holds secrets.
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                let names: Vec<String> = unexpected.iter().map(|k| format!("{k:?}")).collect();
                format!("unknown key {} (the schema allows no other keys here)", names.join(", "))
            }
            jsonschema::error::ValidationErrorKind::Required { property } => format!("missing the required key {property}"),
            kind if secret_paths::covers(secrets, &pointer) => {
                format!(
                    "value does not satisfy the schema's {:?} rule (value not shown: it is a secret)",
                    kind.keyword()
                )
            }
            kind if json::touches_secret(&pointer, secrets) => {
                format!(
                    "value does not satisfy the schema's {:?} rule (value not shown: it holds a secret)",
                    kind.keyword()
                )
            }
            _ => error.to_string(),
        };
        out.insert((pointer, message), ());
    }
    out.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn good() -> Value {
        json!({
            "tenant_id": "acme",
            "age_public_key": KEY,
            "endpoints": {"api": "https://acme.example.com"},
            "config": {"schema_version": 1, "display_name": "Acme", "plan": "pro", "region": "eu-west-1",
                       "secrets": {"db_password": "hunter2hunter2"}}
        })
    }

    #[test]
    fn tenant_ids() {
        for ok in ["abc", "acme-corp", "a1b", &"a".repeat(63)] {
            assert!(is_valid_tenant_id(ok), "{ok}");
        }
        for bad in ["ab", "-abc", "abc-", "ABC", "a_b", &"a".repeat(64), "a.b"] {
            assert!(!is_valid_tenant_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_good_document_passes() {
        let t = check_document("tenants/acme.json", "acme", "", good(), SecretPaths::new())
            .unwrap()
            .into_tenant("tenants/acme.json");
        assert_eq!(t.tenant_id, "acme");
        assert_eq!(
            t.document().value().as_object().unwrap().keys().collect::<Vec<_>>(),
            ["age_public_key", "endpoints", "config"]
        );
    }

    /// What `{:?}` prints of a checked document or a tenant names it, never its values.
    #[test]
    fn debug_output_leaves_the_document_out() {
        let secrets: SecretPaths = ["/config/secrets/db_password".to_string()].into_iter().collect();
        let checked = check_document("tenants/acme.json", "acme", "", good(), secrets).unwrap();
        let shown = format!("{checked:?}");
        assert!(shown.contains("acme") && !shown.contains("hunter2"), "{shown}");
        let shown = format!("{:?}", checked.into_tenant("tenants/acme.json"));
        assert!(
            shown.contains("tenants/acme.json") && !shown.contains("hunter2") && !shown.contains("eu-west-1"),
            "{shown}"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let mut doc = good();
        doc["tenant_id"] = json!("other");
        doc["age_public_key"] = json!("not-a-key");
        doc["config"]["plan"] = json!("platinum");
        doc["extra"] = json!(1);
        let issues = check_document("tenants/acme.json", "acme", "", doc, SecretPaths::new()).unwrap_err();
        let text: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
        assert_eq!(issues.len(), 4, "{text:#?}");
        assert!(issues.iter().all(|i| i.file == "tenants/acme.json"));
        assert!(text.iter().any(|t| t.contains("/config/plan")));
        assert!(text.iter().any(|t| t.contains("does not match the file name")));
    }

    #[test]
    fn schema_errors_on_secrets_do_not_quote_them() {
        let mut doc = good();
        doc["config"]["secrets"]["db_password"] = json!(12345678);
        let secrets: SecretPaths = ["/config/secrets/db_password".to_string()].into();
        let issues = check_document("t/acme.json", "acme", "", doc, secrets).unwrap_err();
        assert_eq!(issues.len(), 1);
        assert!(!issues[0].message.contains("12345678"), "{}", issues[0].message);
        assert_eq!(issues[0].pointer.as_deref(), Some("/config/secrets/db_password"));
    }

    #[test]
    fn a_misspelt_key_is_named_and_secret_only_where_the_value_is_one() {
        let mut doc = good();
        doc["config"]["regoin"] = json!("eu-west-1");
        let secrets: SecretPaths = ["/config/secrets/db_password".to_string()].into();
        let issues = check_document("t/acme.json", "acme", "", doc, secrets.clone()).unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].pointer.as_deref(), Some("/config"));
        assert!(issues[0].message.contains("unknown key \"regoin\""), "{}", issues[0].message);
        assert!(!issues[0].message.contains("secret"), "{}", issues[0].message);
        let mut doc = good();
        doc["config"].as_object_mut().unwrap().remove("region");
        let issues = check_document("t/acme.json", "acme", "", doc, secrets.clone()).unwrap_err();
        assert!(issues[0].message.contains("missing the required key \"region\""), "{}", issues[0].message);
        // A rule broken by a whole object that holds a secret: the rule, never the object.
        let mut doc = good();
        doc["config"]["secrets"]["n"] = json!(5);
        let issues = check_document("t/acme.json", "acme", "", doc, secrets).unwrap_err();
        assert_eq!(issues[0].pointer.as_deref(), Some("/config/secrets/n"));
        assert!(
            issues[0].message.contains("it is a secret") && !issues[0].message.contains('5'),
            "{}",
            issues[0].message
        );
    }

    #[test]
    fn too_deep_is_refused() {
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!({"x": deep});
        }
        let mut doc = good();
        doc["config"]["deep"] = deep;
        let issues = check_document("t/acme.json", "acme", "", doc, SecretPaths::new()).unwrap_err();
        assert!(issues[0].message.contains("nesting"));
    }

    #[test]
    fn equal_sets_of_secret_paths_are_shared() {
        let set = |paths: &[&str]| Arc::new(paths.iter().map(|p| p.to_string()).collect::<SecretPaths>());
        let shared = SharedPaths::default();
        let first = shared.share(set(&["/config/secrets/a", "/config/secrets/b"]));
        let again = shared.share(set(&["/config/secrets/a", "/config/secrets/b"]));
        let other = shared.share(set(&["/config/secrets/a"]));
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(*other, *set(&["/config/secrets/a"]));
    }
}
