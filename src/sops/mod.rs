//! The SOPS file format over age keys: parse TOML/JSON/YAML into one tree, decrypt it (checking the
//! MAC) and encrypt it again, byte-compatible with the `sops` CLI for JSON and YAML and with `rops`
//! for TOML. Written here rather than taken from `rops` because rops reads keys only from its own
//! environment variables and rejects the empty strings that sops leaves unencrypted.

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use regex::Regex;
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha512};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::str::FromStr;

use crate::domain::json::child;

mod x25519;

type Cipher = AesGcm<Aes256, U32>;

/// sha256("sops"): the digest starts with it when `mac_only_encrypted` is set (sops.go).
const MAC_ONLY_ENCRYPTED_INIT: [u8; 32] = [
    0x8a, 0x3f, 0xd2, 0xad, 0x54, 0xce, 0x66, 0x52, 0x7b, 0x10, 0x34, 0xf3, 0xd1, 0x47, 0xbe, 0x0b, 0x0b, 0x97, 0x5b, 0x3b, 0xf4, 0x4f, 0x72, 0xc6, 0xfd, 0xad,
    0xec, 0x81, 0x76, 0xf2, 0x7d, 0x69,
];

/// The sops version we say wrote a file.
const SOPS_VERSION: &str = "3.9.4";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
    Yaml,
}

impl Format {
    pub fn from_path(path: &str) -> Option<Format> {
        let ext = path.rsplit_once('.')?.1;
        match ext {
            "toml" => Some(Format::Toml),
            "json" => Some(Format::Json),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SopsError {
    #[error("{}{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default(), pointer.as_ref().filter(|p| !p.is_empty()).map(|p| format!("{p}: ")).unwrap_or_default())]
    Parse {
        line: Option<usize>,
        pointer: Option<String>,
        message: String,
    },
    #[error("the file has no sops metadata (it is not encrypted)")]
    NotEncrypted,
    #[error("invalid sops metadata: {0}")]
    Metadata(String),
    #[error("no age identity is configured (set SOPS_AGE_KEY_FILE, SOPS_AGE_KEY or --age-key-file)")]
    NoIdentities,
    #[error("none of the configured age identities can decrypt this file; it is encrypted to: {0}")]
    NoMatchingKey(String),
    #[error("cannot decrypt the data key: {0}")]
    DataKey(String),
    #[error("the data key sits behind more than {MAX_AGE_STANZAS} age stanzas addressed to our identities; refused unread (sops writes one per recipient)")]
    StanzaBudget,
    #[error("cannot decrypt the value at {pointer}: {reason}")]
    Value { pointer: String, reason: String },
    #[error("MAC mismatch: the file was changed after it was encrypted, or was not written by sops")]
    MacMismatch,
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
}

fn parse_err(line: Option<usize>, message: impl Into<String>) -> SopsError {
    SopsError::Parse {
        line,
        pointer: None,
        message: message.into(),
    }
}

/// Parses a file into a tree with keys in file order (the MAC depends on that order), under the
/// rules and budgets of `domain::document`. Errors carry the line, never the line's text (it may
/// be a plaintext secret).
pub fn parse(format: Format, text: &str) -> Result<Value, SopsError> {
    let parsed = match format {
        Format::Json => crate::parse::json(text),
        Format::Yaml => crate::parse::yaml(text),
        Format::Toml => crate::parse::toml(text),
    };
    parsed.map_err(|e| SopsError::Parse {
        line: e.line,
        pointer: e.pointer,
        message: e.message,
    })
}

/// The key order a document will have after a trip through `format`: TOML writes a table's plain
/// values before its sub-tables, and the MAC covers values in file order, so encryption must see
/// the document in the order it will be read back.
pub fn normalize(format: Format, value: &Value) -> Result<Value, SopsError> {
    match format {
        Format::Toml => parse(Format::Toml, &serialize(Format::Toml, value)?),
        _ => Ok(value.clone()),
    }
}

/// As [`serialize`], laid out as `like` is where the format's writer can follow it (YAML's
/// indentation): an edited file stays in its own layout.
pub fn serialize_like(format: Format, value: &Value, like: &str) -> Result<String, SopsError> {
    match format {
        Format::Yaml => Ok(crate::parse::to_yaml_styled(value, crate::parse::YamlStyle::of(like))),
        _ => serialize(format, value),
    }
}

/// Writes a tree in a format. TOML has no null: a null is refused.
pub fn serialize(format: Format, value: &Value) -> Result<String, SopsError> {
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(value).map_err(|e| SopsError::Encrypt(e.to_string()))? + "\n"),
        Format::Yaml => Ok(crate::parse::to_yaml(value)),
        Format::Toml => toml::to_string_pretty(value).map_err(|e| SopsError::Encrypt(format!("as TOML: {e}"))),
    }
}

/// The age identities the agent decrypts with, each beside its recipient: deriving a recipient
/// is a scalar multiplication, and every file's data key is matched against them.
#[derive(Clone, Default)]
pub struct AgeKeys {
    identities: Vec<AgeKey>,
}

#[derive(Clone)]
struct AgeKey {
    /// age's own: what a key file holds.
    identity: age::x25519::Identity,
    unwrapper: x25519::Unwrapper,
    recipient: String,
}

impl AgeKey {
    fn new(identity: age::x25519::Identity) -> AgeKey {
        AgeKey {
            unwrapper: x25519::Unwrapper::new(&identity),
            recipient: identity.to_public().to_string(),
            identity,
        }
    }
}

impl std::fmt::Debug for AgeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgeKeys({:?})", self.recipients())
    }
}

impl AgeKeys {
    /// Reads `AGE-SECRET-KEY-1...` lines (comments and blank lines skipped), as in an age key file
    /// or `SOPS_AGE_KEY`. `origin` names where the text came from, for errors.
    pub fn add_text(&mut self, text: &str, origin: &str) -> Result<(), String> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // A recipient pasted where its identity belongs is a common slip: say which it is.
            if line.starts_with("age1") {
                return Err(format!(
                    "{origin}, line {}: an age public key (a recipient, age1...), not an identity: give the AGE-SECRET-KEY-1... line it was made from",
                    n + 1
                ));
            }
            let id = age::x25519::Identity::from_str(line).map_err(|e| format!("{origin}, line {}: not an age X25519 identity ({e})", n + 1))?;
            self.identities.push(AgeKey::new(id));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    pub fn recipients(&self) -> Vec<String> {
        self.identities.iter().map(|k| k.recipient.clone()).collect()
    }

    /// A new identity and its recipient (for tests and tools).
    pub fn generate() -> (Self, String) {
        let key = AgeKey::new(age::x25519::Identity::generate());
        let public = key.recipient.clone();
        (AgeKeys { identities: vec![key] }, public)
    }

    /// The identities as an age key file holds them. Secret: for writing a key file, never a log.
    pub fn secret_text(&self) -> String {
        use age::secrecy::ExposeSecret;
        self.identities
            .iter()
            .map(|k| k.identity.to_string().expose_secret().to_string() + "\n")
            .collect()
    }

    fn unwrap_data_key(&self, stanzas: &[(String, String)]) -> Result<Vec<u8>, SopsError> {
        if self.identities.is_empty() {
            return Err(SopsError::NoIdentities);
        }
        let mut last_error = None;
        let budget = std::cell::Cell::new(MAX_AGE_STANZAS);
        // Match on the recipient first: one X25519 operation instead of one per identity and stanza.
        for (recipient, enc) in stanzas {
            for key in &self.identities {
                if key.recipient == recipient.trim() {
                    let budgeted = Budgeted {
                        inner: &key.unwrapper,
                        left: &budget,
                    };
                    match decrypt_age(enc, &budgeted) {
                        Ok(key) => return Ok(key),
                        Err(_) if budget.get() == 0 => return Err(SopsError::StanzaBudget),
                        Err(e) => last_error = Some(e),
                    }
                }
            }
        }
        if let Some(e) = last_error {
            return Err(SopsError::DataKey(e));
        }
        Err(SopsError::NoMatchingKey(stanzas.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(", ")))
    }
}

/// Age stanzas one file's data key may make us try. Each is an X25519 operation, and the
/// recipients are public: anyone can write a file whose key sits behind thousands of stanzas
/// addressed to us, all but the last garbage. sops writes one stanza per recipient.
pub const MAX_AGE_STANZAS: usize = 16;

/// An identity that gives up once a file has cost its budget of stanzas.
struct Budgeted<'a> {
    inner: &'a dyn age::Identity,
    left: &'a std::cell::Cell<usize>,
}

impl age::Identity for Budgeted<'_> {
    fn unwrap_stanza(&self, stanza: &age_core::format::Stanza) -> Option<Result<age_core::format::FileKey, age::DecryptError>> {
        if self.left.get() == 0 {
            return Some(Err(age::DecryptError::NoMatchingKeys));
        }
        self.left.set(self.left.get() - 1);
        self.inner.unwrap_stanza(stanza)
    }
}

fn decrypt_age(armored: &str, id: &dyn age::Identity) -> Result<Vec<u8>, String> {
    let reader = age::armor::ArmoredReader::new(armored.as_bytes());
    // Not `Decryptor::new`: given a plain reader, it parses the header again from its start for
    // every few bytes it reads (a fifth of `validate`'s time went there); buffered, once a line.
    let decryptor = age::Decryptor::new_buffered(reader).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(32);
    decryptor
        .decrypt(std::iter::once(id))
        .map_err(|e| e.to_string())?
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() != 32 {
        return Err(format!("the data key is {} bytes, expected 32", out.len()));
    }
    Ok(out)
}

fn encrypt_age(data_key: &[u8], recipient: &str) -> Result<String, SopsError> {
    let r = age::x25519::Recipient::from_str(recipient).map_err(|e| SopsError::Encrypt(format!("recipient {recipient}: {e}")))?;
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient)).map_err(|e| SopsError::Encrypt(e.to_string()))?;
    let mut buf = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut buf, age::armor::Format::AsciiArmor).map_err(|e| SopsError::Encrypt(e.to_string()))?;
    let mut w = encryptor.wrap_output(armor).map_err(|e| SopsError::Encrypt(e.to_string()))?;
    w.write_all(data_key).map_err(|e| SopsError::Encrypt(e.to_string()))?;
    w.finish().and_then(|a| a.finish()).map_err(|e| SopsError::Encrypt(e.to_string()))?;
    String::from_utf8(buf).map_err(|e| SopsError::Encrypt(e.to_string()))
}

/// Which leaves are encrypted: sops's rules, kept in the metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pub unencrypted_suffix: Option<String>,
    pub encrypted_suffix: Option<String>,
    pub unencrypted_regex: Option<String>,
    pub encrypted_regex: Option<String>,
    pub mac_only_encrypted: bool,
}

/// A rule's regex, compiled once per thread and pattern: the files of a repository nearly always
/// carry the same rules, and compiling them for every file was 7% of a run's CPU time.
fn compiled_regex(pattern: &str) -> Result<Regex, regex::Error> {
    const KEPT: usize = 8;
    thread_local! {
        static SEEN: std::cell::RefCell<Vec<(String, Regex)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        if let Some((_, r)) = seen.iter().find(|(p, _)| p == pattern) {
            return Ok(r.clone());
        }
        let r = Regex::new(pattern)?;
        if seen.len() == KEPT {
            seen.remove(0);
        }
        seen.push((pattern.to_string(), r.clone()));
        Ok(r)
    })
}

struct CompiledRules {
    rules: Rules,
    unencrypted_regex: Option<Regex>,
    encrypted_regex: Option<Regex>,
}

impl CompiledRules {
    fn new(rules: Rules) -> Result<Self, SopsError> {
        let compile = |r: &Option<String>, name: &str| {
            r.as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| compiled_regex(s).map_err(|e| SopsError::Metadata(format!("{name}: {e}"))))
                .transpose()
        };
        Ok(CompiledRules {
            unencrypted_regex: compile(&rules.unencrypted_regex, "unencrypted_regex")?,
            encrypted_regex: compile(&rules.encrypted_regex, "encrypted_regex")?,
            rules,
        })
    }

    /// sops.go `shouldBeEncrypted`, less the comment rules (comments are not part of the tree here).
    fn encrypts(&self, path: &[String]) -> bool {
        let mut enc = true;
        if let Some(s) = self.rules.unencrypted_suffix.as_deref().filter(|s| !s.is_empty())
            && path.iter().any(|p| p.ends_with(s))
        {
            enc = false;
        }
        if let Some(s) = self.rules.encrypted_suffix.as_deref().filter(|s| !s.is_empty()) {
            enc = path.iter().any(|p| p.ends_with(s));
        }
        if let Some(r) = &self.unencrypted_regex
            && path.iter().any(|p| r.is_match(p))
        {
            enc = false;
        }
        if let Some(r) = &self.encrypted_regex {
            enc = path.iter().any(|p| r.is_match(p));
        }
        enc
    }
}

struct Metadata {
    age: Vec<(String, String)>,
    last_modified: String,
    mac: String,
    rules: Rules,
    other_keys: Vec<String>,
}

fn metadata(v: &Value) -> Result<Metadata, SopsError> {
    let m = v.as_object().ok_or_else(|| SopsError::Metadata("`sops` must be a mapping".into()))?;
    let text = |k: &str| -> Result<Option<String>, SopsError> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(SopsError::Metadata(format!("`{k}` must be a string"))),
        }
    };
    if m.get("key_groups").is_some_and(|g| !g.is_null()) {
        return Err(SopsError::Metadata("key_groups (Shamir secret sharing) is not supported".into()));
    }
    let mut age = Vec::new();
    if let Some(list) = m.get("age").filter(|v| !v.is_null()) {
        for (i, item) in list
            .as_array()
            .ok_or_else(|| SopsError::Metadata("`age` must be a list".into()))?
            .iter()
            .enumerate()
        {
            let r = item.get("recipient").and_then(Value::as_str);
            let e = item.get("enc").and_then(Value::as_str);
            match (r, e) {
                (Some(r), Some(e)) => age.push((r.to_string(), e.to_string())),
                _ => return Err(SopsError::Metadata(format!("age entry {i} needs `recipient` and `enc`"))),
            }
        }
    }
    let other_keys = ["kms", "gcp_kms", "azure_kv", "hc_vault", "pgp"]
        .into_iter()
        .filter(|k| m.get(*k).and_then(Value::as_array).is_some_and(|a| !a.is_empty()))
        .map(str::to_string)
        .collect();
    let mac_only_encrypted = match m.get("mac_only_encrypted") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => parse_go_bool(s).ok_or_else(|| SopsError::Metadata("`mac_only_encrypted` is not a boolean".into()))?,
        Some(_) => return Err(SopsError::Metadata("`mac_only_encrypted` is not a boolean".into())),
    };
    Ok(Metadata {
        age,
        last_modified: text("lastmodified")?.ok_or_else(|| SopsError::Metadata("`lastmodified` is missing".into()))?,
        mac: text("mac")?.ok_or_else(|| SopsError::Metadata("`mac` is missing".into()))?,
        rules: Rules {
            unencrypted_suffix: text("unencrypted_suffix")?,
            encrypted_suffix: text("encrypted_suffix")?,
            unencrypted_regex: text("unencrypted_regex")?,
            encrypted_regex: text("encrypted_regex")?,
            mac_only_encrypted,
        },
        other_keys,
    })
}

fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A decrypted file.
#[derive(Debug, Clone)]
pub struct Decrypted {
    /// The document without its `sops` section.
    pub value: Value,
    /// Pointers of the values that were encrypted.
    pub encrypted: BTreeSet<String>,
    /// The age recipients the data key is encrypted to.
    pub recipients: Vec<String>,
    pub rules: Rules,
}

/// Whether a parsed document carries sops metadata.
pub fn is_encrypted(doc: &Value) -> bool {
    doc.get("sops").is_some_and(Value::is_object)
}

pub fn decrypt(doc: Value, keys: &AgeKeys) -> Result<Decrypted, SopsError> {
    let Value::Object(mut map) = doc else {
        return Err(parse_err(None, "the document must be a mapping at the top level"));
    };
    let meta = metadata(&map.shift_remove("sops").ok_or(SopsError::NotEncrypted)?)?;
    if meta.age.is_empty() {
        let others = if meta.other_keys.is_empty() {
            "none".to_string()
        } else {
            meta.other_keys.join(", ")
        };
        return Err(SopsError::Metadata(format!(
            "the file has no age recipients (key types present: {others}); only age is supported"
        )));
    }
    let data_key = keys.unwrap_data_key(&meta.age)?;
    let rules = CompiledRules::new(meta.rules.clone())?;
    let mut w = Walker {
        key: &data_key,
        rules: &rules,
        hash: Sha512::new(),
        encrypted: BTreeSet::new(),
        previous: None,
    };
    if meta.rules.mac_only_encrypted {
        w.hash.update(MAC_ONLY_ENCRYPTED_INIT);
    }
    let mut value = Value::Object(map);
    w.decrypt(&mut value, &mut Vec::new(), "")?;
    let computed = hex::encode_upper(w.hash.finalize());
    let stored = match decrypt_value(&meta.mac, &data_key, &meta.last_modified) {
        Ok(Value::String(s)) => s,
        _ => return Err(SopsError::MacMismatch),
    };
    if !stored.eq_ignore_ascii_case(&computed) {
        return Err(SopsError::MacMismatch);
    }
    Ok(Decrypted {
        value,
        encrypted: w.encrypted,
        recipients: meta.age.into_iter().map(|(r, _)| r).collect(),
        rules: meta.rules,
    })
}

struct Walker<'a> {
    key: &'a [u8],
    rules: &'a CompiledRules,
    hash: Sha512,
    encrypted: BTreeSet<String>,
    /// The encrypted document an edit started from, whose unchanged values keep their ciphertext.
    previous: Option<&'a Value>,
}

impl Walker<'_> {
    fn decrypt(&mut self, v: &mut Value, path: &mut Vec<String>, ptr: &str) -> Result<(), SopsError> {
        match v {
            Value::Object(m) => {
                for (k, child_v) in m.iter_mut() {
                    path.push(k.clone());
                    self.decrypt(child_v, path, &child(ptr, k))?;
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.decrypt(item, path, &child(ptr, &i.to_string()))?;
                }
            }
            Value::Null => {}
            leaf => {
                let enc = self.rules.encrypts(path);
                if enc {
                    let Value::String(s) = leaf else {
                        return Err(SopsError::Value {
                            pointer: ptr.to_string(),
                            reason: "the rules say it is encrypted, but it is not an ENC[...] string".into(),
                        });
                    };
                    if !s.is_empty() {
                        let aad = path.join(":") + ":";
                        let plain = decrypt_value(s, self.key, &aad).and_then(|v| match &v {
                            // A decrypted string obeys the same rules as a plaintext one.
                            Value::String(text) => crate::domain::document::check_string(text).map(|()| v),
                            _ => Ok(v),
                        });
                        *leaf = plain.map_err(|reason| SopsError::Value {
                            pointer: ptr.to_string(),
                            reason,
                        })?;
                    }
                    self.encrypted.insert(ptr.to_string());
                }
                if !self.rules.rules.mac_only_encrypted || enc {
                    self.hash.update(mac_bytes(leaf));
                }
            }
        }
        Ok(())
    }

    fn encrypt(&mut self, v: &mut Value, path: &mut Vec<String>, ptr: &str) -> Result<(), SopsError> {
        match v {
            Value::Object(m) => {
                for (k, child_v) in m.iter_mut() {
                    path.push(k.clone());
                    self.encrypt(child_v, path, &child(ptr, k))?;
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.encrypt(item, path, &child(ptr, &i.to_string()))?;
                }
            }
            Value::Null => {}
            leaf => {
                let enc = self.rules.encrypts(path);
                if !self.rules.rules.mac_only_encrypted || enc {
                    self.hash.update(mac_bytes(leaf));
                }
                if enc && leaf.as_str() != Some("") {
                    let aad = path.join(":") + ":";
                    // The same value at the same place under the same key: its old ciphertext.
                    let kept = self
                        .previous
                        .and_then(|p| p.pointer(ptr))
                        .and_then(Value::as_str)
                        .filter(|old| decrypt_value(old, self.key, &aad).is_ok_and(|was| was == *leaf));
                    *leaf = Value::String(match kept {
                        Some(old) => old.to_string(),
                        None => encrypt_value(leaf, self.key, &aad)?,
                    });
                }
            }
        }
        Ok(())
    }
}

/// sops `ToBytes`: what a leaf contributes to the MAC.
fn mac_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Bool(true) => b"True".to_vec(),
        Value::Bool(false) => b"False".to_vec(),
        Value::Number(n) => number_text(n).into_bytes(),
        _ => Vec::new(),
    }
}

/// Go's `strconv.Itoa` for integers and `FormatFloat(f, 'f', -1, 64)` for floats; Rust's `Display`
/// for f64 is the same shortest, exponent-free form.
fn number_text(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        format!("{}", n.as_f64().unwrap_or(0.0))
    }
}

fn decrypt_value(enc: &str, key: &[u8], aad: &str) -> Result<Value, String> {
    let inner = enc
        .strip_prefix("ENC[AES256_GCM,")
        .and_then(|s| s.strip_suffix(']'))
        .ok_or("not an ENC[AES256_GCM,...] value")?;
    let (mut data, mut iv, mut tag, mut ty) = (None, None, None, None);
    for part in inner.split(',') {
        match part.split_once(':') {
            Some(("data", v)) => data = Some(v),
            Some(("iv", v)) => iv = Some(v),
            Some(("tag", v)) => tag = Some(v),
            Some(("type", v)) => ty = Some(v),
            _ => return Err("malformed ENC[...] value".into()),
        }
    }
    let (Some(data), Some(iv), Some(tag), Some(ty)) = (data, iv, tag, ty) else {
        return Err("ENC[...] value lacks data, iv, tag or type".into());
    };
    let b64 = |s: &str, what: &str| B64.decode(s).map_err(|_| format!("{what} is not base64"));
    let iv = b64(iv, "iv")?;
    if iv.len() != 32 {
        return Err(format!("iv is {} bytes, expected 32", iv.len()));
    }
    let mut msg = b64(data, "data")?;
    msg.extend(b64(tag, "tag")?);
    let cipher = Cipher::new_from_slice(key).map_err(|_| "bad data key length")?;
    let plain = cipher
        .decrypt(
            Nonce::<U32>::from_slice(&iv),
            Payload {
                msg: &msg,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| "authentication failed (wrong key, or the value was moved or altered)")?;
    let text = String::from_utf8(plain).map_err(|_| "decrypted bytes are not UTF-8")?;
    match ty {
        "str" | "bytes" => Ok(Value::String(text)),
        "int" if !crate::domain::document::is_integer_literal(&text) => Err("type int, but not an integer".into()),
        "int" => crate::domain::document::exact_number(&text).map(Value::Number),
        // sops's JSON store reads every number as a float and writes whole ones without a point
        // ("42"); `sops decrypt` prints them back as integers, and so do we.
        "float" if !text.contains(['.', 'e', 'E']) && text.parse::<i64>().is_ok() => Ok(Value::Number(text.parse::<i64>().expect("checked").into())),
        "float" => crate::domain::document::exact_float(&text).map(Value::Number).map_err(|e| match e.as_str() {
            "not a number" => "type float, but not a number".into(),
            _ => e,
        }),
        "bool" => parse_go_bool(&text).map(Value::Bool).ok_or_else(|| "type bool, but not a boolean".into()),
        other => Err(format!("unsupported value type {other:?}")),
    }
}

fn encrypt_value(v: &Value, key: &[u8], aad: &str) -> Result<String, SopsError> {
    let (ty, text) = match v {
        Value::String(s) => ("str", s.clone()),
        // "True"/"False": rops accepts only these, and sops's ParseBool accepts them too.
        Value::Bool(b) => ("bool", if *b { "True".to_string() } else { "False".to_string() }),
        // A whole float keeps its point ("1.0"), so that it decrypts as a float again.
        Value::Number(n) if n.is_f64() => (
            "float",
            n.as_f64().filter(|f| f.fract() == 0.0).map_or_else(|| number_text(n), |f| format!("{f:.1}")),
        ),
        Value::Number(n) => ("int", number_text(n)),
        _ => return Err(SopsError::Encrypt("only scalars can be encrypted".into())),
    };
    let mut iv = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut iv);
    let cipher = Cipher::new_from_slice(key).map_err(|_| SopsError::Encrypt("bad data key length".into()))?;
    let out = cipher
        .encrypt(
            Nonce::<U32>::from_slice(&iv),
            Payload {
                msg: text.as_bytes(),
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| SopsError::Encrypt("AES-GCM failed".into()))?;
    let (data, tag) = out.split_at(out.len() - 16);
    Ok(format!(
        "ENC[AES256_GCM,data:{},iv:{},tag:{},type:{ty}]",
        B64.encode(data),
        B64.encode(iv),
        B64.encode(tag)
    ))
}

/// Encrypts a plaintext document to the given age recipients under `rules`, as `sops encrypt`
/// would. `data_key` reuses a file's existing key (sops keeps it on edit); `None` makes a new one.
pub fn encrypt(plain: &Value, recipients: &[String], rules: &Rules, data_key: Option<&[u8]>) -> Result<Value, SopsError> {
    encrypt_keeping(plain, recipients, rules, data_key, None)
}

/// As [`encrypt`], for an edit of `previous` under its own data key: a value whose plaintext did
/// not change keeps its ciphertext, and the age stanzas stay while the recipients are the same,
/// so that the file's diff is the values that changed, the MAC and `lastmodified`.
pub fn encrypt_keeping(plain: &Value, recipients: &[String], rules: &Rules, data_key: Option<&[u8]>, previous: Option<&Value>) -> Result<Value, SopsError> {
    let Value::Object(map) = plain else {
        return Err(SopsError::Encrypt("the document must be a mapping at the top level".into()));
    };
    if map.contains_key("sops") {
        return Err(SopsError::Encrypt("the document already has a `sops` section".into()));
    }
    if recipients.is_empty() {
        return Err(SopsError::Encrypt("no age recipients".into()));
    }
    let key = match data_key {
        Some(k) => k.to_vec(),
        None => {
            let mut k = vec![0u8; 32];
            rand::thread_rng().fill_bytes(&mut k);
            k
        }
    };
    let compiled = CompiledRules::new(rules.clone())?;
    // Kept only under the key they were made with.
    let previous = previous.filter(|_| data_key.is_some());
    let mut w = Walker {
        key: &key,
        rules: &compiled,
        hash: Sha512::new(),
        encrypted: BTreeSet::new(),
        previous,
    };
    if rules.mac_only_encrypted {
        w.hash.update(MAC_ONLY_ENCRYPTED_INIT);
    }
    let mut value = plain.clone();
    w.encrypt(&mut value, &mut Vec::new(), "")?;
    let last_modified = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mac = encrypt_value(&Value::String(hex::encode_upper(w.hash.finalize())), &key, &last_modified)?;
    let mut sops = Map::new();
    let kept_stanzas = previous.and_then(|p| p.pointer("/sops/age")).filter(|age| {
        age.as_array()
            .is_some_and(|a| a.iter().map(|s| s["recipient"].as_str()).eq(recipients.iter().map(|r| Some(r.as_str()))))
    });
    let age = match kept_stanzas {
        Some(age) => age.clone(),
        None => Value::Array(
            recipients
                .iter()
                .map(|r| Ok(serde_json::json!({"recipient": r, "enc": encrypt_age(&key, r)?})))
                .collect::<Result<_, SopsError>>()?,
        ),
    };
    sops.insert("age".into(), age);
    sops.insert("lastmodified".into(), Value::String(last_modified));
    sops.insert("mac".into(), Value::String(mac));
    for (name, v) in [
        ("unencrypted_suffix", &rules.unencrypted_suffix),
        ("encrypted_suffix", &rules.encrypted_suffix),
        ("unencrypted_regex", &rules.unencrypted_regex),
        ("encrypted_regex", &rules.encrypted_regex),
    ] {
        if let Some(v) = v {
            sops.insert(name.into(), Value::String(v.clone()));
        }
    }
    if rules.mac_only_encrypted {
        sops.insert("mac_only_encrypted".into(), Value::Bool(true));
    }
    sops.insert("version".into(), Value::String(SOPS_VERSION.into()));
    let Value::Object(mut out) = value else { unreachable!("encrypted a mapping") };
    out.insert("sops".into(), Value::Object(sops));
    Ok(Value::Object(out))
}

/// The data key of an encrypted document (for re-encrypting an edited file under the same key).
pub fn data_key(doc: &Value, keys: &AgeKeys) -> Result<Vec<u8>, SopsError> {
    let meta = metadata(doc.get("sops").ok_or(SopsError::NotEncrypted)?)?;
    keys.unwrap_data_key(&meta.age)
}

/// Re-wraps the data key of an encrypted document for a new set of recipients, leaving every value
/// (and the MAC) as it is: what `sops updatekeys` does.
pub fn rewrap(doc: &mut Value, keys: &AgeKeys, recipients: &[String]) -> Result<(), SopsError> {
    let key = data_key(doc, keys)?;
    let age: Vec<Value> = recipients
        .iter()
        .map(|r| Ok(serde_json::json!({"recipient": r, "enc": encrypt_age(&key, r)?})))
        .collect::<Result<_, SopsError>>()?;
    doc["sops"]["age"] = Value::Array(age);
    Ok(())
}

/// The recipients and rules recorded in an encrypted document, without decrypting it.
pub fn recipients_and_rules(doc: &Value) -> Result<(Vec<String>, Rules), SopsError> {
    let meta = metadata(doc.get("sops").ok_or(SopsError::NotEncrypted)?)?;
    Ok((meta.age.into_iter().map(|(r, _)| r).collect(), meta.rules))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys() -> (AgeKeys, String) {
        AgeKeys::generate()
    }

    fn sample() -> Value {
        json!({
            "name": "acme", "empty": "", "count": 42, "ratio": 0.5, "whole": 1.0, "on": true, "off": false,
            "nothing": null, "nested": {"list": [1, "two", {"deep": "x"}], "unicode": "žluťoučký 🐴"},
            "token_unencrypted": "plain"
        })
    }

    /// An age file of a data key for `ours`, behind `decoys` stanzas for other keys, and a sops
    /// document whose `copies` age entries all name `ours` and hold that file.
    fn behind_stanzas(ours: &str, decoys: usize, copies: usize) -> Value {
        let mut to: Vec<Box<dyn age::Recipient>> = (0..decoys)
            .map(|_| Box::new(age::x25519::Identity::generate().to_public()) as Box<dyn age::Recipient>)
            .collect();
        to.push(Box::new(age::x25519::Recipient::from_str(ours).unwrap()));
        let encryptor = age::Encryptor::with_recipients(to.iter().map(|r| r.as_ref() as &dyn age::Recipient)).unwrap();
        let mut buf = Vec::new();
        let armor = age::armor::ArmoredWriter::wrap_output(&mut buf, age::armor::Format::AsciiArmor).unwrap();
        let mut w = encryptor.wrap_output(armor).unwrap();
        w.write_all(&[7; 32]).unwrap();
        w.finish().and_then(|a| a.finish()).unwrap();
        let enc = String::from_utf8(buf).unwrap();
        let entries: Vec<Value> = (0..copies).map(|_| json!({"recipient": ours, "enc": enc})).collect();
        json!({"sops": {"age": entries, "lastmodified": "2024-01-01T00:00:00Z", "mac": "x", "version": "3.9.0"}})
    }

    #[test]
    fn a_data_key_behind_more_stanzas_than_the_budget_is_refused_unread() {
        let (k, r) = keys();
        assert_eq!(data_key(&behind_stanzas(&r, MAX_AGE_STANZAS - 1, 1), &k).unwrap(), vec![7; 32]);
        let e = data_key(&behind_stanzas(&r, MAX_AGE_STANZAS, 1), &k).unwrap_err();
        assert!(matches!(e, SopsError::StanzaBudget), "{e}");
        // The budget is the file's, not each entry's: many entries naming us cost it too.
        let e = data_key(&behind_stanzas(&r, 2, 6), &k);
        assert_eq!(e.unwrap(), vec![7; 32], "the first entry opens it");
        let mut doc = behind_stanzas(&r, 3, 1);
        let garbage = behind_stanzas(&AgeKeys::generate().1, 3, 1)["sops"]["age"][0]["enc"].clone();
        let mut entries = vec![json!({"recipient": r, "enc": garbage}); 5];
        entries.push(doc["sops"]["age"][0].clone());
        doc["sops"]["age"] = Value::Array(entries);
        assert!(
            matches!(data_key(&doc, &k).unwrap_err(), SopsError::StanzaBudget),
            "5 x 4 stanzas tried before the good entry"
        );
    }

    #[test]
    fn round_trip_in_every_format() {
        let (k, r) = keys();
        let rules = Rules {
            unencrypted_suffix: Some("_unencrypted".into()),
            ..Rules::default()
        };
        for format in [Format::Json, Format::Yaml, Format::Toml] {
            let mut plain = sample();
            if format == Format::Toml {
                plain.as_object_mut().unwrap().shift_remove("nothing");
            }
            let plain = normalize(format, &plain).unwrap();
            let enc = encrypt(&plain, std::slice::from_ref(&r), &rules, None).unwrap();
            let text = serialize(format, &enc).unwrap();
            assert!(!text.contains("acme") && !text.contains("žluť"), "{format:?}: plaintext in {text}");
            assert!(text.contains("plain"), "unencrypted suffix not honoured");
            let back = decrypt(parse(format, &text).unwrap(), &k).unwrap();
            assert_eq!(back.value, plain, "{format:?}");
            assert!(back.encrypted.contains("/nested/list/2/deep"));
            assert!(back.encrypted.contains("/empty"));
            assert!(!back.encrypted.contains("/token_unencrypted"));
        }
    }

    #[test]
    fn a_changed_plaintext_value_fails_the_mac() {
        let (k, r) = keys();
        let rules = Rules {
            encrypted_regex: Some("^secret".into()),
            ..Rules::default()
        };
        let mut enc = encrypt(&json!({"plan": "pro", "secret_token": "t"}), &[r], &rules, None).unwrap();
        assert_eq!(enc["plan"], "pro");
        enc["plan"] = json!("enterprise");
        assert_eq!(decrypt(enc, &k).unwrap_err(), SopsError::MacMismatch);
    }

    #[test]
    fn a_moved_value_fails_authentication() {
        let (k, r) = keys();
        let mut enc = encrypt(&json!({"a": "one", "b": "two"}), &[r], &Rules::default(), None).unwrap();
        enc["a"] = enc["b"].clone();
        let err = decrypt(enc, &k).unwrap_err();
        assert!(matches!(err, SopsError::Value { ref pointer, .. } if pointer == "/a"), "{err}");
    }

    #[test]
    fn mac_only_encrypted_lets_plain_values_change() {
        let (k, r) = keys();
        let rules = Rules {
            encrypted_suffix: Some("_secret".into()),
            mac_only_encrypted: true,
            ..Rules::default()
        };
        let mut enc = encrypt(&json!({"plan": "pro", "db_secret": "pw"}), &[r], &rules, None).unwrap();
        enc["plan"] = json!("free");
        let out = decrypt(enc, &k).unwrap();
        assert_eq!(out.value, json!({"plan": "free", "db_secret": "pw"}));
    }

    #[test]
    fn ours_need_not_be_the_first_recipient() {
        let (k, r) = keys();
        let (_, other) = keys();
        let enc = encrypt(&json!({"a": "b"}), &[other.clone(), r], &Rules::default(), None).unwrap();
        assert_eq!(decrypt(enc.clone(), &k).unwrap().value, json!({"a": "b"}));
        let (stranger, _) = keys();
        assert!(matches!(decrypt(enc, &stranger).unwrap_err(), SopsError::NoMatchingKey(list) if list.contains(&other)));
    }

    #[test]
    fn key_text_errors_name_the_line_not_the_key() {
        let mut k = AgeKeys::default();
        let err = k.add_text("# comment\n\nAGE-SECRET-KEY-1NOTAKEY\n", "SOPS_AGE_KEY").unwrap_err();
        assert!(err.starts_with("SOPS_AGE_KEY, line 3"), "{err}");
        assert!(!err.contains("NOTAKEY"), "{err}");
    }

    #[test]
    fn a_public_key_given_as_an_identity_is_called_one() {
        let (_, public) = AgeKeys::generate();
        let err = AgeKeys::default().add_text(&format!("{public}\n"), "keys.txt").unwrap_err();
        assert!(
            err.starts_with("keys.txt, line 1: an age public key (a recipient, age1...), not an identity"),
            "{err}"
        );
        assert!(!err.contains("HRP"), "{err}");
    }

    #[test]
    fn parse_errors_carry_the_line_and_not_the_text() {
        let err = parse(Format::Toml, "a = 1\nb = \"hunter2\n").unwrap_err();
        assert!(matches!(err, SopsError::Parse { line: Some(2), .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"));
        let err = parse(Format::Json, "{\n\"a\": hunter2}").unwrap_err();
        assert!(matches!(err, SopsError::Parse { line: Some(2), .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"));
    }
}
