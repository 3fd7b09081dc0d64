//! Helpers that keep tenant files encrypted: `secrets encrypt|decrypt|edit|updatekeys` and
//! `tenant new`. Recipients come from `.sops.yaml` creation rules, as with the sops CLI, plus the
//! tenant's own `age_public_key`.

use crate::domain::tenant::{check_document, is_age_recipient};
use crate::sops::{self, AgeKeys, Format, Rules};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn ferr(path: &Path, message: impl Into<String>) -> FileError {
    FileError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Deserialize)]
struct SopsYaml {
    #[serde(default)]
    creation_rules: Vec<CreationRule>,
}

#[derive(Debug, Deserialize, Clone, Default)]
pub struct CreationRule {
    pub path_regex: Option<String>,
    /// Comma-separated recipients, or a list.
    pub age: Option<Value>,
    pub encrypted_regex: Option<String>,
    pub unencrypted_regex: Option<String>,
    pub encrypted_suffix: Option<String>,
    pub unencrypted_suffix: Option<String>,
    #[serde(default)]
    pub mac_only_encrypted: bool,
}

impl CreationRule {
    pub fn recipients(&self) -> Vec<String> {
        match &self.age {
            Some(Value::String(s)) => s.split(',').map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).collect(),
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str()).map(|r| r.trim().to_string()).collect(),
            _ => vec![],
        }
    }

    pub fn rules(&self) -> Rules {
        let any = self.encrypted_regex.is_some() || self.unencrypted_regex.is_some() || self.encrypted_suffix.is_some() || self.unencrypted_suffix.is_some();
        Rules {
            // sops's default when no rule is given.
            unencrypted_suffix: if any { self.unencrypted_suffix.clone() } else { Some("_unencrypted".into()) },
            encrypted_suffix: self.encrypted_suffix.clone(),
            unencrypted_regex: self.unencrypted_regex.clone(),
            encrypted_regex: self.encrypted_regex.clone(),
            mac_only_encrypted: self.mac_only_encrypted,
        }
    }
}

/// The first creation rule of the nearest `.sops.yaml` above `file` whose `path_regex` matches.
pub fn creation_rule(file: &Path) -> Result<CreationRule, FileError> {
    let abs = std::path::absolute(file).map_err(io(file))?;
    let mut dir = abs.parent();
    while let Some(d) = dir {
        let cfg = d.join(".sops.yaml");
        if cfg.is_file() {
            let text = std::fs::read_to_string(&cfg).map_err(io(&cfg))?;
            let tree = crate::parse::yaml(&text).map_err(|e| ferr(&cfg, format!("line {}: {e}", e.line.unwrap_or(0))))?;
            let parsed: SopsYaml = serde_json::from_value(tree).map_err(|e| ferr(&cfg, e.to_string()))?;
            let rel = abs.strip_prefix(d).unwrap_or(&abs).to_string_lossy().to_string();
            for rule in parsed.creation_rules {
                let matches = match &rule.path_regex {
                    None => true,
                    Some(r) => regex::Regex::new(r).map_err(|e| ferr(&cfg, format!("path_regex {r:?}: {e}")))?.is_match(&rel),
                };
                if matches {
                    return Ok(rule);
                }
            }
            return Err(ferr(file, format!("no creation rule in {} matches this file", cfg.display())));
        }
        dir = d.parent();
    }
    Err(ferr(file, "no .sops.yaml found in this directory or above it"))
}

fn format_of(path: &Path) -> Result<Format, FileError> {
    Format::from_path(&path.to_string_lossy()).ok_or_else(|| ferr(path, "unknown extension (use .toml, .json, .yaml or .yml)"))
}

/// The recipients a tenant file must be encrypted to: the creation rule's, then the tenant's own.
fn wanted_recipients(rule: &CreationRule, plain: &Value) -> Vec<String> {
    let mut r = rule.recipients();
    if let Some(own) = plain.get("age_public_key").and_then(Value::as_str).filter(|k| is_age_recipient(k))
        && !r.iter().any(|x| x == own)
    {
        r.push(own.to_string());
    }
    r
}

/// The file an edit started from: its encrypted document, whose unchanged values and stanzas are
/// kept (under its own data key), and its text, whose layout is kept.
struct Previous<'a> {
    doc: &'a Value,
    text: &'a str,
}

fn encrypt_value(path: &Path, plain: &Value, rule: &CreationRule, data_key: Option<&[u8]>, previous: Option<Previous<'_>>) -> Result<String, FileError> {
    let format = format_of(path)?;
    let recipients = wanted_recipients(rule, plain);
    if recipients.is_empty() {
        return Err(ferr(path, "no age recipients: the creation rule names none and the file has no age_public_key"));
    }
    let plain = sops::normalize(format, plain).map_err(|e| ferr(path, e.to_string()))?;
    let enc = sops::encrypt_keeping(&plain, &recipients, &rule.rules(), data_key, previous.as_ref().map(|p| p.doc)).map_err(|e| ferr(path, e.to_string()))?;
    match previous {
        Some(p) => sops::serialize_like(format, &enc, p.text),
        None => sops::serialize(format, &enc),
    }
    .map_err(|e| ferr(path, e.to_string()))
}

fn write_atomic(path: &Path, text: &str) -> Result<(), FileError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(path))?;
    std::fs::write(tmp.path(), text).map_err(io(path))?;
    tmp.persist(path).map_err(|e| FileError::Io {
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

/// Encrypts a plaintext file in place.
pub fn encrypt_file(path: &Path) -> Result<(), FileError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let plain = sops::parse(format_of(path)?, &text).map_err(|e| ferr(path, e.to_string()))?;
    if sops::is_encrypted(&plain) {
        return Err(ferr(path, "is already encrypted"));
    }
    let rule = creation_rule(path)?;
    write_atomic(path, &encrypt_value(path, &plain, &rule, None, None)?)
}

/// The plaintext of an encrypted file, in its own format.
pub fn decrypt_file(path: &Path, keys: &AgeKeys) -> Result<String, FileError> {
    let format = format_of(path)?;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let doc = sops::parse(format, &text).map_err(|e| ferr(path, e.to_string()))?;
    let d = sops::decrypt(doc, keys).map_err(|e| ferr(path, e.to_string()))?;
    sops::serialize_like(format, &d.value, &text).map_err(|e| ferr(path, e.to_string()))
}

/// What `edit_file` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Edited {
    Unchanged,
    Saved,
}

/// Opens `editor` on the plaintext in a private temporary file, then re-encrypts under the same
/// data key. The file is left as it was when nothing changed or when the result is not a valid
/// tenant file.
/// `from`: an edit an earlier call kept, to start from instead of the file's plaintext.
pub fn edit_file(path: &Path, keys: &AgeKeys, editor: &str, from: Option<&Path>) -> Result<Edited, FileError> {
    let format = format_of(path)?;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let doc = sops::parse(format, &text).map_err(|e| ferr(path, e.to_string()))?;
    let data_key = sops::data_key(&doc, keys).map_err(|e| ferr(path, e.to_string()))?;
    let (_, rules) = sops::recipients_and_rules(&doc).map_err(|e| ferr(path, e.to_string()))?;
    let previous = doc.clone();
    let d = sops::decrypt(doc, keys).map_err(|e| ferr(path, e.to_string()))?;
    let before = sops::serialize_like(format, &d.value, &text).map_err(|e| ferr(path, e.to_string()))?;

    // A 0700 directory and a 0600 file: only we can read the plaintext.
    let dir = tempfile::Builder::new().prefix("frostbyte-edit-").tempdir().map_err(io(path))?;
    let tmp = dir.path().join(path.file_name().unwrap_or("tenant".as_ref()));
    // What the editor was last given: saved unchanged after a problem, it means "give up".
    let mut shown = match from {
        Some(kept) => std::fs::read_to_string(kept).map_err(io(kept))?,
        None => before.clone(),
    };
    write_private(&tmp, &shown)?;
    loop {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&tmp)
            .status()
            .map_err(io(path))?;
        let raw = std::fs::read_to_string(&tmp).map_err(io(&tmp))?;
        let after = without_problems(&raw);
        if !status.success() {
            return Err(kept(path, dir, &tmp, after != before, format!("the editor exited with {status}")));
        }
        if after == before {
            return Ok(Edited::Unchanged);
        }
        let problems = match checked_edit(path, format, &after, &d.encrypted) {
            Ok(edited) => {
                let rule = creation_rule(path).unwrap_or_else(|_| rule_from_metadata(&d.recipients, &rules));
                let previous = Previous { doc: &previous, text: &text };
                write_atomic(path, &encrypt_value(path, &edited, &rule, Some(&data_key), Some(previous))?)?;
                return Ok(Edited::Saved);
            }
            Err(problems) => problems,
        };
        // As `kubectl edit`: back into the editor with the problems on top, while someone is
        // there to fix them and the format has comments to carry them.
        let again = std::io::IsTerminal::is_terminal(&std::io::stdin()) && format != Format::Json && raw != shown;
        if !again {
            return Err(kept(
                path,
                dir,
                &tmp,
                true,
                format!("the edit is not a valid tenant file:\n{}", problems.join("\n")),
            ));
        }
        eprintln!("The edit has problems; they are at the top of the file, which opens again. Save it unchanged to give up.");
        shown = format!("{}{after}", problems_header(&problems));
        write_private(&tmp, &shown)?;
    }
}

/// The plaintext to the editor, readable by us alone.
fn write_private(tmp: &Path, text: &str) -> Result<(), FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io(tmp))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io(tmp))
}

/// The edited text parsed and checked, or every problem with it, one a line.
fn checked_edit(path: &Path, format: Format, after: &str, encrypted: &crate::domain::json::SecretPaths) -> Result<Value, Vec<String>> {
    let edited = sops::parse(format, after).map_err(|e| vec![format!("  the edited text does not parse: {e}")])?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    check_document(&path.display().to_string(), &stem, after, edited.clone(), encrypted.clone())
        .map(|_| edited)
        .map_err(|issues| issues.iter().map(|i| format!("  {i}")).collect())
}

/// Lines the editor shows above the text, each marked so that they come off again.
const PROBLEM_MARK: &str = "#~ ";

fn problems_header(problems: &[String]) -> String {
    let mut out = format!(
        "{PROBLEM_MARK}frostbyte-gitops: fix these and save (lines starting \"{}\" are removed):\n",
        PROBLEM_MARK.trim_end()
    );
    for p in problems {
        for line in p.lines() {
            out.push_str(&format!("{PROBLEM_MARK}{}\n", line.trim()));
        }
    }
    out
}

fn without_problems(text: &str) -> String {
    let mut rest = text;
    while let Some(line_end) = rest.starts_with(PROBLEM_MARK.trim_end()).then(|| rest.find('\n')).flatten() {
        rest = &rest[line_end + 1..];
    }
    rest.to_string()
}

/// The file is left as it was; an edit that changed anything is kept, readable by its owner
/// alone, and the error says where.
fn kept(path: &Path, dir: tempfile::TempDir, tmp: &Path, changed: bool, why: String) -> FileError {
    if !changed {
        return ferr(path, format!("{why}; the file is unchanged"));
    }
    let at = tmp.display().to_string();
    let _ = dir.keep();
    ferr(
        path,
        format!(
            "{why}\nThe file is unchanged. Your edit is kept in {at} (mode 0600, only you can read it): go on from it with `frostbyte-gitops secrets edit {} --from {at}`, and delete it once done.",
            path.display()
        ),
    )
}

/// The encryption a file already has, as a creation rule: its recipients and its rules.
fn rule_from_metadata(recipients: &[String], rules: &sops::Rules) -> CreationRule {
    CreationRule {
        age: Some(Value::String(recipients.join(","))),
        encrypted_regex: rules.encrypted_regex.clone(),
        unencrypted_regex: rules.unencrypted_regex.clone(),
        encrypted_suffix: rules.encrypted_suffix.clone(),
        unencrypted_suffix: rules.unencrypted_suffix.clone(),
        mac_only_encrypted: rules.mac_only_encrypted,
        path_regex: None,
    }
}

/// One file's recipient change, for `secrets updatekeys`.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyUpdate {
    pub path: PathBuf,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Whether the data key was replaced (it is whenever a recipient is removed).
    pub rotated: bool,
}

/// Gives `path` the recipients its creation rule (and tenant) name now. Adding a recipient
/// re-wraps the data key (values and MAC stay). Removing one also replaces the data key and
/// re-encrypts every value: a removed reader who kept the old data key could otherwise still read
/// every later edit. Returns None when the recipients are already right.
pub fn update_keys(path: &Path, keys: &AgeKeys, dry_run: bool) -> Result<Option<KeyUpdate>, FileError> {
    let format = format_of(path)?;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut doc = sops::parse(format, &text).map_err(|e| ferr(path, e.to_string()))?;
    let (current, rules) = sops::recipients_and_rules(&doc).map_err(|e| ferr(path, e.to_string()))?;
    let plain = sops::decrypt(doc.clone(), keys).map_err(|e| ferr(path, e.to_string()))?;
    let wanted = wanted_recipients(&creation_rule(path)?, &plain.value);
    let added: Vec<String> = wanted.iter().filter(|r| !current.contains(r)).cloned().collect();
    let removed: Vec<String> = current.iter().filter(|r| !wanted.contains(r)).cloned().collect();
    if added.is_empty() && removed.is_empty() {
        return Ok(None);
    }
    let rotated = !removed.is_empty();
    if !dry_run {
        let out = if rotated {
            encrypt_value(path, &plain.value, &rule_from_metadata(&wanted, &rules), None, None)?
        } else {
            sops::rewrap(&mut doc, keys, &wanted).map_err(|e| ferr(path, e.to_string()))?;
            sops::serialize(format, &doc).map_err(|e| ferr(path, e.to_string()))?
        };
        write_atomic(path, &out)?;
    }
    Ok(Some(KeyUpdate {
        path: path.to_path_buf(),
        added,
        removed,
        rotated,
    }))
}

/// `secrets rotate`: a new data key for `path`, every value re-encrypted under it and the MAC
/// recomputed, for the same recipients and rules (what `sops rotate` does).
pub fn rotate_file(path: &Path, keys: &AgeKeys) -> Result<(), FileError> {
    let format = format_of(path)?;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let doc = sops::parse(format, &text).map_err(|e| ferr(path, e.to_string()))?;
    let (recipients, rules) = sops::recipients_and_rules(&doc).map_err(|e| ferr(path, e.to_string()))?;
    let plain = sops::decrypt(doc, keys).map_err(|e| ferr(path, e.to_string()))?;
    write_atomic(path, &encrypt_value(path, &plain.value, &rule_from_metadata(&recipients, &rules), None, None)?)
}

/// A valid, encrypted skeleton for a new tenant.
pub fn new_tenant(path: &Path, tenant_id: &str, age_public_key: &str) -> Result<(), FileError> {
    if path.exists() {
        return Err(ferr(path, "already exists"));
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    if stem != tenant_id {
        return Err(ferr(
            path,
            format!("the file must be named after the tenant ({tenant_id}.toml, .json or .yaml)"),
        ));
    }
    let plain = json!({
        "tenant_id": tenant_id,
        "age_public_key": age_public_key,
        "endpoints": {"api": format!("https://{tenant_id}.api.frostbyte.example")},
        "config": {
            "schema_version": 1,
            "display_name": tenant_id,
            "plan": "starter",
            "region": "eu-west-1",
            "limits": {"max_users": 25, "storage_gb": 10, "requests_per_minute": 600},
            "features": {"sso": false, "audit_export": false},
            "retention": {"data_days": 365, "audit_log_days": 365},
            "contacts": [],
            "secrets": {"api_signing_key": "change-me"}
        }
    });
    if let Err(issues) = check_document(&path.display().to_string(), &stem, "", plain.clone(), Default::default()) {
        return Err(ferr(path, issues.iter().map(|i| i.message.clone()).collect::<Vec<_>>().join("; ")));
    }
    let rule = creation_rule(path)?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    write_atomic(path, &encrypt_value(path, &plain, &rule, None, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_problems_shown_above_an_edit_come_off_it_and_nothing_else_does() {
        let edit = "# a comment of the file's own\nplan = \"pro\"\n";
        let shown = format!("{}{edit}", problems_header(&["  tenants/a.toml:2: /plan: bad\n  second line".into()]));
        assert!(shown.starts_with("#~ frostbyte-gitops: fix these"), "{shown}");
        assert_eq!(shown.lines().filter(|l| l.starts_with("#~ ")).count(), 3);
        assert_eq!(without_problems(&shown), edit);
        assert_eq!(without_problems(edit), edit);
    }
}
