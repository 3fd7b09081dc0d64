//! Which values are secrets. A leaf is one when its file encrypted it, and also, whatever any
//! file's sops rules say or wherever the value came from (a file, a database row edited by hand,
//! a saved plan), when it sits under a path the tenant schema declares secret with
//! `"x-frostbyte-secret": true`.

use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::LazyLock;

/// JSON pointers (RFC 6901) of the leaves that were encrypted in a tenant file.
pub type SecretPaths = BTreeSet<String>;

/// The schema's annotation that makes a property secret, with everything below it.
pub const ANNOTATION: &str = "x-frostbyte-secret";

static SCHEMA_TEXT: &str = include_str!("../schema/tenant-config.schema.json");

static DECLARED: LazyLock<Vec<String>> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(SCHEMA_TEXT).expect("a shipped schema is valid JSON");
    let mut out = Vec::new();
    // The schema describes `config`; a tenant document holds it under `/config`.
    declared_in(&schema, "/config", &mut out);
    out
});

/// The pointers of the properties `schema` annotates as secret, below `at`: through `properties`,
/// the only keyword that names a fixed path.
pub fn declared_in(schema: &Value, at: &str, out: &mut Vec<String>) {
    if schema.get(ANNOTATION) == Some(&Value::Bool(true)) {
        out.push(at.to_string());
        return;
    }
    if let Some(Value::Object(props)) = schema.get("properties") {
        for (name, sub) in props {
            declared_in(sub, &super::json::child(at, name), out);
        }
    }
}

/// The paths the tenant schema declares secret.
pub fn declared() -> &'static [String] {
    &DECLARED
}

/// Whether `pointer` names `prefix` itself or something below it.
pub fn is_within(pointer: &str, prefix: &str) -> bool {
    pointer == prefix || (pointer.starts_with(prefix) && pointer.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Whether the value at `pointer` is secret: it, or a collection holding it, was encrypted or is
/// declared secret. A lookup per ancestor, not a scan of the set (this runs for every node a
/// plan, drift report or audit event writes).
pub fn covers(secrets: &SecretPaths, pointer: &str) -> bool {
    if declared().iter().any(|d| is_within(pointer, d)) {
        return true;
    }
    let ancestors = pointer.match_indices('/').map(|(i, _)| &pointer[..i]).skip(1);
    secrets.contains(pointer) || ancestors.into_iter().any(|a| secrets.contains(a))
}

/// Whether the value at `pointer` is a secret or holds one.
pub fn touches(secrets: &SecretPaths, pointer: &str) -> bool {
    covers(secrets, pointer) || secrets.iter().chain(declared().iter()).any(|s| is_within(s, pointer))
}

/// Whether `value`, at `pointer`, is shown as a whole as redacted: it was encrypted, or sits
/// inside something encrypted, or is a leaf under a declared path. (A collection under a declared
/// path is shown with its keys and its leaves redacted, as an encrypted one's leaves are.)
pub fn hides(secrets: &SecretPaths, pointer: &str, value: &Value) -> bool {
    let collection = matches!(value, Value::Object(m) if !m.is_empty()) || matches!(value, Value::Array(a) if !a.is_empty());
    covers_encrypted(secrets, pointer) || (!collection && declared().iter().any(|d| is_within(pointer, d)))
}

/// The leaves below the declared paths in `doc` that `secrets` does not name: values a file left
/// in plaintext where only ciphertext belongs. An empty string or null holds nothing to hide
/// (sops leaves both as they are).
pub fn plaintext_under_declared(doc: &Value, secrets: &SecretPaths) -> Vec<String> {
    let mut out = Vec::new();
    for d in declared() {
        if let Some(v) = doc.pointer(d) {
            leaves(v, d, &mut |p| {
                let empty = match doc.pointer(p) {
                    Some(Value::Null) => true,
                    Some(Value::String(s)) => s.is_empty(),
                    _ => false,
                };
                if !empty && !covers_encrypted(secrets, p) {
                    out.push(p.to_string());
                }
            });
        }
    }
    out
}

/// As [`covers`], by what was encrypted alone.
pub fn covers_encrypted(secrets: &SecretPaths, pointer: &str) -> bool {
    let ancestors = pointer.match_indices('/').map(|(i, _)| &pointer[..i]).skip(1);
    secrets.contains(pointer) || ancestors.into_iter().any(|a| secrets.contains(a))
}

/// Calls `f` with the pointer of every leaf in `v` (found at `at`); an empty collection is a leaf.
pub fn leaves(v: &Value, at: &str, f: &mut dyn FnMut(&str)) {
    match v {
        Value::Object(m) if !m.is_empty() => m.iter().for_each(|(k, c)| leaves(c, &super::json::child(at, k), f)),
        Value::Array(a) if !a.is_empty() => a.iter().enumerate().for_each(|(i, c)| leaves(c, &super::json::child(at, &i.to_string()), f)),
        _ => f(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_schema_declares_config_secrets() {
        assert_eq!(declared(), ["/config/secrets"]);
        let mut out = Vec::new();
        declared_in(
            &json!({"properties": {"a": {"properties": {"b": {ANNOTATION: true}}}, "c": {ANNOTATION: false}}}),
            "",
            &mut out,
        );
        assert_eq!(out, ["/a/b"]);
    }

    #[test]
    fn a_secret_covers_what_is_below_it_and_nothing_beside_it() {
        let secrets: SecretPaths = ["/x/token".to_string(), "/list/1".to_string()].into();
        for (p, want) in [
            ("/x/token", true),
            ("/x/token/inner", true),
            ("/x/tokens", false),
            ("/x", false),
            ("/list/1/k", true),
            ("/list/10", false),
            ("/config/secrets", true),
            ("/config/secrets/anything", true),
            ("/config/secrets-not", false),
            ("/config", false),
        ] {
            assert_eq!(covers(&secrets, p), want, "{p}");
        }
        assert!(touches(&secrets, "/x") && touches(&secrets, "/config") && touches(&secrets, ""));
        assert!(!touches(&secrets, "/y"));
    }

    #[test]
    fn plaintext_below_a_declared_path_is_found() {
        let doc = json!({"config": {"secrets": {"a": "enc", "b": "plain", "c": {"d": 1}}, "plan": "pro"}});
        let secrets: SecretPaths = ["/config/secrets/a".to_string()].into();
        assert_eq!(plaintext_under_declared(&doc, &secrets), ["/config/secrets/b", "/config/secrets/c/d"]);
        let all: SecretPaths = ["/config/secrets".to_string()].into();
        assert!(plaintext_under_declared(&doc, &all).is_empty());
        // sops encrypts neither an empty string nor null: there is nothing in them to hide.
        let doc = json!({"config": {"secrets": {"empty": "", "none": null, "set": "x"}}});
        assert_eq!(plaintext_under_declared(&doc, &SecretPaths::new()), ["/config/secrets/set"]);
    }
}
