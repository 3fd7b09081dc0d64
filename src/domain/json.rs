//! JSON helpers the rest of the domain builds on: pointers, canonical form, redaction.

use serde_json::{Map, Value};
use std::fmt::Write;

/// What a secret value is replaced with wherever a document leaves the process.
pub const REDACTED: &str = "[REDACTED]";

pub use super::secret_paths::{SecretPaths, is_within};
use super::secret_paths::{hides, touches};

pub fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

pub fn unescape_token(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

pub fn child(pointer: &str, token: &str) -> String {
    let mut out = String::with_capacity(pointer.len() + 1 + token.len());
    out.push_str(pointer);
    push_token(&mut out, token);
    out
}

/// Appends `/token` to `pointer`, escaped; one allocation at most, none for a plain token (this
/// runs for every node of every document a run reads, seals, redacts or diffs).
fn push_token(pointer: &mut String, token: &str) {
    pointer.push('/');
    match token.contains(['~', '/']) {
        true => pointer.push_str(&escape_token(token)),
        false => pointer.push_str(token),
    }
}

/// Whether the value at `pointer` is a secret or holds one (encrypted or declared secret).
pub fn touches_secret(pointer: &str, secrets: &SecretPaths) -> bool {
    touches(secrets, pointer)
}

/// A JSON value kept as its compact text. A plan holds one per operation, and a created tenant's
/// operations carry its whole document: as a tree that is five times the memory of the text, and
/// the plan of a first sync of 10,000 tenants held 42 MB of them.
#[derive(Clone, Debug)]
pub struct JsonText(Box<serde_json::value::RawValue>);

impl JsonText {
    pub fn of(value: &Value) -> JsonText {
        JsonText(serde_json::value::to_raw_value(value).expect("a Value serialises"))
    }

    /// `value` (found at `pointer`) with every secret leaf written as [`REDACTED`], without an
    /// intermediate copy.
    pub fn redacted(value: &Value, pointer: &str, secrets: &SecretPaths) -> JsonText {
        let r = Redacted {
            value,
            pointer: pointer.to_string(),
            secrets,
        };
        JsonText(serde_json::value::to_raw_value(&r).expect("a Value serialises"))
    }

    /// Text read from elsewhere (PostgreSQL's jsonb, say), checked without building a tree.
    pub fn from_text(text: String) -> Result<JsonText, String> {
        Self::from_raw(serde_json::value::RawValue::from_string(text).map_err(|e| e.to_string())?)
    }

    /// A raw value serde_json accepted, which it checks with no depth limit: one nested deeper
    /// than [`MAX_NESTING`] is refused here, since it could not be read back into a tree.
    pub fn from_raw(raw: Box<serde_json::value::RawValue>) -> Result<JsonText, String> {
        match nesting(raw.get()) {
            n if n > MAX_NESTING => Err(format!("JSON nested {n} levels deep (at most {MAX_NESTING} are read)")),
            _ => Ok(JsonText(raw)),
        }
    }

    /// `null`, what a document moved out of its owner leaves behind.
    pub fn null() -> JsonText {
        JsonText(serde_json::value::RawValue::NULL.to_owned())
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("written by serde_json")
    }

    /// A copy with `f` applied to the value.
    #[cfg(test)]
    pub fn edited(&self, f: impl FnOnce(&mut Value)) -> JsonText {
        let mut v = self.value();
        f(&mut v);
        JsonText::of(&v)
    }
}

/// The deepest nesting serde_json parses (its recursion limit).
pub const MAX_NESTING: usize = 127;

/// How deep arrays and objects nest in JSON text (strings skipped).
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text.as_bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
            (false, _, _) => {}
        }
    }
    deepest
}

/// Equal values, whatever their text (key order, number spelling).
impl PartialEq for JsonText {
    fn eq(&self, other: &JsonText) -> bool {
        self.as_str() == other.as_str() || self.value() == other.value()
    }
}

/// As the value it holds, not its text verbatim: a pretty-printed plan indents it like the rest.
/// Inside [`raw`], as its text.
impl serde::Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match RAW.get() {
            true => self.0.serialize(s),
            false => self.value().serialize(s),
        }
    }
}

/// Through a `Value`: a saved plan may be read from a tree, which a raw value cannot borrow from.
/// Inside [`raw`], as the text it finds, which must then come from JSON text.
impl<'de> serde::Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<JsonText, D::Error> {
        match RAW.get() {
            true => Ok(JsonText(Box::<serde_json::value::RawValue>::deserialize(d)?)),
            false => Ok(JsonText::of(&Value::deserialize(d)?)),
        }
    }
}

thread_local! {
    static RAW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (on this thread) with every [`JsonText`] written and read as its JSON text, not
/// through a tree: for JSON text this process writes and reads back itself, where the tree is
/// not needed and was most of the work (the spill of an apply's created plans: 870 bytes a plan,
/// 5 to 10 microseconds to write and 8 to 12 to read through trees).
pub fn raw<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RAW.set(self.0);
        }
    }
    let _restore = Restore(RAW.replace(true));
    f()
}

struct Redacted<'a> {
    value: &'a Value,
    pointer: String,
    secrets: &'a SecretPaths,
}

impl serde::Serialize for Redacted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        if hides(self.secrets, &self.pointer, self.value) {
            return s.serialize_str(REDACTED);
        }
        if !touches(self.secrets, &self.pointer) {
            return self.value.serialize(s);
        }
        let at = |value, pointer| Redacted {
            value,
            pointer,
            secrets: self.secrets,
        };
        match self.value {
            Value::Object(map) => {
                let mut m = s.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    m.serialize_entry(k, &at(v, child(&self.pointer, k)))?;
                }
                m.end()
            }
            Value::Array(items) => {
                let mut q = s.serialize_seq(Some(items.len()))?;
                for (i, v) in items.iter().enumerate() {
                    q.serialize_element(&at(v, child(&self.pointer, &i.to_string())))?;
                }
                q.end()
            }
            other => other.serialize(s),
        }
    }
}

/// A copy of `value` (found at `pointer`) with every secret leaf replaced by [`REDACTED`]: the
/// same walk as [`JsonText::redacted`], into a tree.
pub fn redact(value: &Value, pointer: &str, secrets: &SecretPaths) -> Value {
    let r = Redacted {
        value,
        pointer: pointer.to_string(),
        secrets,
    };
    serde_json::to_value(&r).expect("a Value serialises")
}

/// Serialises with object keys sorted, so that equal documents give equal bytes whatever order
/// they were read in (PostgreSQL's jsonb reorders keys).
pub fn canonical(value: &Value) -> String {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("a string always serialises");
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar always serialises"),
    }
}

/// Calls `f` with the pointer and the value of every leaf under `value` (found at `pointer`), in
/// document order; an empty object or array is a leaf. One pointer buffer is grown and cut back
/// on the way, not a string per level.
pub fn for_each_leaf(value: &Value, pointer: &mut String, f: &mut impl FnMut(&str, &Value)) {
    let len = pointer.len();
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                push_token(pointer, k);
                for_each_leaf(v, pointer, f);
                pointer.truncate(len);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                let _ = write!(pointer, "/{i}");
                for_each_leaf(v, pointer, f);
                pointer.truncate(len);
            }
        }
        _ => f(pointer, value),
    }
}

pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Applies an RFC 6902 patch made of `add`, `remove` and `replace` operations.
pub fn apply_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).ok_or("operation without \"op\"")?;
        let path = op.get("path").and_then(Value::as_str).ok_or("operation without \"path\"")?;
        let value = op.get("value").cloned();
        if path.is_empty() {
            match kind {
                "add" | "replace" => *doc = value.ok_or("add without value")?,
                _ => return Err(format!("cannot {kind} the whole document")),
            }
            continue;
        }
        let (parent_ptr, last) = path.rsplit_once('/').ok_or_else(|| format!("bad pointer {path}"))?;
        let last = unescape_token(last);
        let parent = doc.pointer_mut(parent_ptr).ok_or_else(|| format!("{kind} {path}: parent does not exist"))?;
        match (kind, parent) {
            ("add" | "replace", Value::Object(map)) => {
                map.insert(last, value.ok_or("add without value")?);
            }
            ("remove", Value::Object(map)) => {
                map.shift_remove(&last).ok_or_else(|| format!("remove {path}: nothing there"))?;
            }
            (_, Value::Array(items)) => {
                let i: usize = if last == "-" {
                    items.len()
                } else {
                    last.parse().map_err(|_| format!("bad index in {path}"))?
                };
                match kind {
                    "add" if i <= items.len() => items.insert(i, value.ok_or("add without value")?),
                    "replace" if i < items.len() => items[i] = value.ok_or("replace without value")?,
                    "remove" if i < items.len() => {
                        items.remove(i);
                    }
                    _ => return Err(format!("{kind} {path}: index out of range")),
                }
            }
            _ => return Err(format!("{kind} {path}: parent is not a container")),
        }
    }
    Ok(())
}

pub fn object(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())
}

/// The 1-based line that most likely holds the value at `pointer` in a TOML, JSON or YAML text:
/// the key tokens of the pointer are looked for in order, each after the previous one.
pub fn locate_line(text: &str, pointer: &str) -> Option<usize> {
    if pointer.is_empty() {
        return None;
    }
    let mut from = 0;
    let mut found = None;
    for token in pointer.split('/').skip(1).map(unescape_token) {
        if token.parse::<usize>().is_ok() {
            continue;
        }
        // An empty key would match everywhere without advancing (parsers refuse them; this stays
        // safe for any pointer).
        if token.is_empty() {
            return None;
        }
        let at = find_key(&text[from..], &token)? + from;
        found = Some(at);
        from = at + token.len();
    }
    found.map(|at| text[..at].matches('\n').count() + 1)
}

fn find_key(text: &str, key: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(rel) = text[start..].find(key) {
        let at = start + rel;
        let before = if at == 0 { b'\n' } else { bytes[at - 1] };
        let after_idx = at + key.len();
        let rest = text[after_idx..].trim_start_matches(['"', '\'']).trim_start_matches([' ', '\t']);
        let boundary_before = matches!(before, b'\n' | b' ' | b'\t' | b'"' | b'\'' | b'[' | b'.' | b'{' | b',');
        let boundary_after = rest.starts_with(':') || rest.starts_with('=') || rest.starts_with(']') || rest.starts_with('.');
        if boundary_before && boundary_after {
            return Some(at);
        }
        start = after_idx;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"d": [1, {"y": 2, "x": 1}], "c": null}});
        assert_eq!(canonical(&a), r#"{"a":{"c":null,"d":[1,{"x":1,"y":2}]},"b":1}"#);
    }

    #[test]
    fn a_child_pointer_escapes_its_token() {
        assert_eq!(child("/a", "b"), "/a/b");
        assert_eq!(child("", "x/y~z"), "/x~1y~0z");
        assert_eq!(unescape_token(&child("", "~1/")[1..]), "~1/");
    }

    #[test]
    fn every_leaf_is_visited_in_order_with_its_escaped_pointer() {
        let doc = json!({"a/b": {"c~d": 1, "e": [true, {}]}, "f": [], "g": "x"});
        let mut seen = Vec::new();
        for_each_leaf(&doc, &mut "/root".to_string(), &mut |p, v| seen.push((p.to_string(), v.clone())));
        let want = [
            ("/root/a~1b/c~0d", json!(1)),
            ("/root/a~1b/e/0", json!(true)),
            ("/root/a~1b/e/1", json!({})),
            ("/root/f", json!([])),
            ("/root/g", json!("x")),
        ];
        assert_eq!(seen, want.map(|(p, v)| (p.to_string(), v)));
        for (p, v) in &seen {
            assert_eq!(doc.pointer(&p["/root".len()..]), Some(v), "{p} resolves to its value");
        }
    }

    #[test]
    fn redact_replaces_only_secret_leaves() {
        let secrets: SecretPaths = ["/config/vault/token".to_string(), "/list/1".to_string()].into();
        let doc = json!({"config": {"vault": {"token": "s3cret", "other": "x"}}, "list": ["a", "b"]});
        let red = redact(&doc, "", &secrets);
        assert_eq!(red, json!({"config": {"vault": {"token": REDACTED, "other": "x"}}, "list": ["a", REDACTED]}));
        // Under a path the schema declares secret, every leaf is, encrypted in its file or not.
        let doc = json!({"config": {"secrets": {"typed_by_hand": "x", "nested": {"n": 1}, "empty": {}}}});
        assert_eq!(
            redact(&doc, "", &SecretPaths::new()),
            json!({"config": {"secrets": {"typed_by_hand": REDACTED, "nested": {"n": REDACTED}, "empty": REDACTED}}})
        );
        assert_eq!(
            redact(&doc["config"]["secrets"]["typed_by_hand"], "/config/secrets/typed_by_hand", &SecretPaths::new()),
            json!(REDACTED)
        );
    }

    #[test]
    fn text_is_written_redacted_in_the_order_of_the_tree() {
        let secrets: SecretPaths = ["/d/config/a~1b".to_string(), "/d/list/1/k".to_string(), "/d/whole".to_string()].into();
        let doc = json!({"z": 1, "config": {"a/b": "s3cret", "c": [1.5, null]}, "list": ["a", {"k": "s", "j": true}], "whole": {"x": "y"}});
        let text = JsonText::redacted(&doc, "/d", &secrets);
        assert_eq!(text.as_str(), JsonText::of(&redact(&doc, "/d", &secrets)).as_str());
        assert!(!text.as_str().contains("s3cret") && !text.as_str().contains(r#""s""#), "{}", text.as_str());
        assert_eq!(
            text.as_str(),
            r#"{"z":1,"config":{"a/b":"[REDACTED]","c":[1.5,null]},"list":["a",{"k":"[REDACTED]","j":true}],"whole":"[REDACTED]"}"#
        );
        let back: JsonText = serde_json::from_value(json!({"b": 1, "a": 2})).unwrap();
        assert_eq!(back, JsonText::of(&json!({"a": 2, "b": 1})));
        assert_eq!(serde_json::to_value(&back).unwrap(), json!({"a": 2, "b": 1}));
    }

    #[test]
    fn text_too_deep_to_read_back_is_refused() {
        let deep = |d: usize| format!(r#"{{"s": "[[{{\"]}}", "v": {}1{}}}"#, "[".repeat(d - 1), "]".repeat(d - 1));
        let ok = JsonText::from_text(deep(MAX_NESTING)).unwrap();
        assert!(ok.value().is_object());
        let err = JsonText::from_text(deep(MAX_NESTING + 1)).unwrap_err();
        assert!(err.contains("nested 128 levels deep"), "{err}");
        assert!(serde_json::from_str::<Value>(&deep(MAX_NESTING + 1)).is_err(), "the limit is serde_json's");
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(child("/a", "x/y~z"), "/a/x~1y~0z");
        assert_eq!(unescape_token("x~1y~0z"), "x/y~z");
        assert!(is_within("/a/b", "/a"));
        assert!(!is_within("/ab", "/a"));
    }

    #[test]
    fn patch_add_remove_replace() {
        let mut doc = json!({});
        apply_patch(&mut doc, &[json!({"op": "add", "path": "/config", "value": {"a": 1, "b": [1]}})]).unwrap();
        apply_patch(
            &mut doc,
            &[
                json!({"op": "replace", "path": "/config/a", "value": 2}),
                json!({"op": "remove", "path": "/config/b"}),
            ],
        )
        .unwrap();
        assert_eq!(doc, json!({"config": {"a": 2}}));
    }

    #[test]
    fn locate_line_gives_up_on_an_empty_key_instead_of_spinning() {
        assert_eq!(locate_line("a = 1\n\"\" = 2\n", "/"), None);
        assert_eq!(locate_line("a:\n  x: 1\n", "/a//x"), None);
    }

    #[test]
    fn locate_line_follows_key_order_in_each_format() {
        let toml = "tenant_id = \"x\"\n[config]\nplan = \"pro\"\n[config.limits]\nmax_users = 5\n";
        assert_eq!(locate_line(toml, "/config/limits/max_users"), Some(5));
        let yaml = "config:\n  plan: pro\n  limits:\n    max_users: 5\n";
        assert_eq!(locate_line(yaml, "/config/limits/max_users"), Some(4));
        let json = "{\n \"config\": {\n  \"plan\": \"pro\"\n }\n}";
        assert_eq!(locate_line(json, "/config/plan"), Some(3));
    }

    /// Inside `raw` a text is written and read as it is; outside, as a tree (indented when
    /// pretty-printed), also once `raw` has returned.
    #[test]
    fn raw_mode_keeps_text_as_it_is_only_inside() {
        let t = JsonText::of(&json!({"a": [1, {"b": "x"}]}));
        let pretty = || serde_json::to_string_pretty(&[&t]).unwrap();
        let raw_text = raw(|| serde_json::to_string_pretty(&[&t]).unwrap());
        assert_eq!(raw_text, "[\n  {\"a\":[1,{\"b\":\"x\"}]}\n]");
        assert!(pretty().contains("\n    \"a\": [\n"), "{}", pretty());
        let back: Vec<JsonText> = raw(|| serde_json::from_str(&raw_text).unwrap());
        assert_eq!(back[0].as_str(), t.as_str());
    }
}
