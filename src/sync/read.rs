//! Tenant files to desired state: decrypt, parse and check each file (on all cores), then the
//! checks across files.

use super::park::Parking;
use super::{Ctx, Desired, SyncError, snapshot_of};
use crate::config::{Mode, SourceConfig};
use crate::domain::audit::CommitInfo;
use crate::domain::issue::Issue;
use crate::domain::json::SecretPaths;
use crate::domain::tenant::{Checked, DesiredTenant, Held, SharedPaths, TenantMeta, check_document};
use crate::ports::{ReadBody, TenantSource};
use crate::sops::{self, AgeKeys, Format};
use crate::source::{Body, Snapshot, SourceError, SourceFile};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::io::IsTerminal;

pub struct ReadOptions<'a> {
    pub keys: &'a AgeKeys,
    /// False for `validate --no-decrypt`: check what can be checked without a key (names,
    /// structure, sops metadata, the schema of the plaintext parts, recipients).
    pub decrypt: bool,
    pub allow_plaintext: bool,
    pub require_tenant_recipient: bool,
    pub progress: bool,
    /// Keep each decoded document (false for `validate`, which reports problems only).
    pub keep_documents: bool,
}

impl<'a> ReadOptions<'a> {
    pub fn from_ctx(ctx: &'a Ctx) -> Self {
        ReadOptions {
            keys: &ctx.keys,
            decrypt: true,
            allow_plaintext: ctx.cfg.allow_plaintext && ctx.cfg.mode == Mode::Dev,
            require_tenant_recipient: ctx.cfg.require_tenant_recipient,
            progress: ctx.progress,
            keep_documents: true,
        }
    }
}

/// Decrypts and checks every file (on all cores), then the checks across files.
pub fn read_snapshot(snapshot: Snapshot, opts: &ReadOptions<'_>) -> Desired {
    read_snapshot_subset(snapshot, opts, None)
}

/// As [`read_snapshot`], decrypting only the files in `only` (all when None); the checks across
/// files still see every file. The files' bodies must have been read.
pub fn read_snapshot_subset(snapshot: Snapshot, opts: &ReadOptions<'_>, only: Option<&BTreeSet<String>>) -> Desired {
    let listing = Listing::of(&snapshot);
    let to_read = to_read(&snapshot, only);
    let bar = progress(opts, to_read.len());
    let (tenants, issues) = decode_files(to_read, opts, bar.as_ref(), |_| Ok(()), |t| t).expect("no file is read");
    listing.finish(snapshot.commit, tenants, issues, bar)
}

/// The files of `snapshot` in `only` (all when None), borrowed: a copy of a listing of 100,000
/// files is 14 MB.
fn to_read<'s>(snapshot: &'s Snapshot, only: Option<&BTreeSet<String>>) -> Vec<&'s SourceFile> {
    snapshot.files.iter().filter(|f| only.is_none_or(|o| o.contains(&f.path))).collect()
}

/// As [`read_snapshot_subset`], each file's body read from `source` by the thread that decodes it
/// and dropped once decoded: what a run holds is the decoded documents, never every file's bytes
/// as well, and reading git overlaps with decrypting.
pub fn decode_from(source: &impl TenantSource, snapshot: &Snapshot, opts: &ReadOptions<'_>, only: Option<&BTreeSet<String>>) -> Result<Desired, SourceError> {
    decode_into(source, snapshot, opts, only, |t| t)
}

/// As [`decode_from`], each document parked in `parking` as soon as it is decoded (an apply's,
/// which holds them until they are compared or written); one that cannot be parked (a full disk,
/// say) stays in memory.
pub(super) fn decode_parked(
    source: &impl TenantSource,
    snapshot: &Snapshot,
    opts: &ReadOptions<'_>,
    only: Option<&BTreeSet<String>>,
    parking: Option<&Parking>,
) -> Result<Desired<Held>, SourceError> {
    decode_into(source, snapshot, opts, only, |t| match parking.map(|p| p.park(t.document())) {
        Some(Ok(at)) => Held::Parked(t.park(at)),
        _ => Held::Here(t),
    })
}

fn decode_into<T: Send + std::ops::Deref<Target = TenantMeta>>(
    source: &impl TenantSource,
    snapshot: &Snapshot,
    opts: &ReadOptions<'_>,
    only: Option<&BTreeSet<String>>,
    keep: impl Fn(DesiredTenant) -> T + Sync,
) -> Result<Desired<T>, SourceError> {
    let listing = Listing::of(snapshot);
    let to_read = to_read(snapshot, only);
    let bar = progress(opts, to_read.len());
    let reader = source.body_reader();
    let (tenants, issues) = decode_files(to_read, opts, bar.as_ref(), |f| reader.read(f), keep)?;
    Ok(listing.finish(snapshot.commit.clone(), tenants, issues, bar))
}

fn progress(opts: &ReadOptions<'_>, files: usize) -> Option<indicatif::ProgressBar> {
    (opts.progress && files > 20 && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(files as u64);
        pb.set_style(indicatif::ProgressStyle::with_template("{spinner} decrypting {pos}/{len} tenant files {bar:40} {eta}").expect("valid template"));
        pb
    })
}

/// Decodes files on all cores; a file whose body is not read yet is read by `read` into a copy,
/// dropped once decoded. Documents are kept (as `keep` makes them) only when
/// `opts.keep_documents` (validate needs the problems, not the documents). A file that cannot be
/// read at all (a git error) ends the whole read.
fn decode_files<T: Send>(
    files: Vec<&SourceFile>,
    opts: &ReadOptions<'_>,
    bar: Option<&indicatif::ProgressBar>,
    read: impl Fn(&mut SourceFile) -> Result<(), SourceError> + Sync,
    keep: impl Fn(DesiredTenant) -> T + Sync,
) -> Result<(Vec<T>, Vec<Issue>), SourceError> {
    // Folded into each thread's lists as decoded, not collected into a slot per file first: for
    // `validate` of 100,000 files those slots were most of its memory.
    type Lists<T> = (Vec<T>, Vec<Issue>);
    let shared = SharedPaths::default();
    let join = |(mut t, mut i): Lists<T>, (t2, i2): Lists<T>| -> Result<Lists<T>, SourceError> {
        t.extend(t2);
        i.extend(i2);
        Ok((t, i))
    };
    files
        .into_par_iter()
        .try_fold(
            || (Vec::new(), Vec::new()),
            |(mut tenants, mut issues): Lists<T>, f| {
                let read_now;
                let f = match f.body {
                    Body::Unread(_) => {
                        let mut copy = f.clone();
                        read(&mut copy)?;
                        read_now = copy;
                        &read_now
                    }
                    _ => f,
                };
                match decode_file(f, opts) {
                    Ok(checked) if opts.keep_documents => {
                        let mut t = checked.into_tenant(&f.path);
                        t.secrets = shared.share(t.secrets.clone());
                        tenants.push(keep(t));
                    }
                    Ok(_) => {}
                    Err(mut i) => issues.append(&mut i),
                }
                if let Some(b) = bar {
                    b.inc(1);
                }
                Ok((tenants, issues))
            },
        )
        .try_reduce(|| (Vec::new(), Vec::new()), join)
}

/// What the checks across files found, taken from the listing before its files are decoded (so
/// that no copy of every path is held while they are).
struct Listing {
    files: usize,
    /// Stems claimed by more than one file, and the problems that say so.
    duplicated: BTreeSet<String>,
    issues: Vec<Issue>,
}

impl Listing {
    /// One tenant, one file: `acme.toml` and `acme.json` (or `eu/acme.toml`) would both claim `acme`.
    fn of(snapshot: &Snapshot) -> Listing {
        // Sorted pairs, not a map of lists: no allocation per file.
        let mut by_stem: Vec<(&str, &str)> = snapshot.files.iter().map(|f| (f.stem(), f.path.as_str())).collect();
        by_stem.sort_unstable();
        let (mut issues, mut duplicated) = (Vec::new(), BTreeSet::new());
        for group in by_stem.chunk_by(|a, b| a.0 == b.0).filter(|g| g.len() > 1) {
            let stem = group[0].0;
            duplicated.insert(stem.to_string());
            if stem.is_empty() {
                continue;
            }
            for (_, p) in group {
                let others: Vec<&str> = group.iter().map(|(_, o)| *o).filter(|o| o != p).collect();
                issues.push(Issue::new(*p, format!("duplicate tenant_id {stem:?}: also defined in {}", others.join(", "))));
            }
        }
        Listing {
            files: snapshot.files.len(),
            duplicated,
            issues,
        }
    }

    fn finish<T: std::ops::Deref<Target = TenantMeta>>(
        self,
        commit: Option<CommitInfo>,
        mut tenants: Vec<T>,
        mut issues: Vec<Issue>,
        bar: Option<indicatif::ProgressBar>,
    ) -> Desired<T> {
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        issues.extend(self.issues);
        collapse_configuration_problems(&mut issues);
        tenants.retain(|t| !self.duplicated.contains(&t.tenant_id));
        // One tenant per id now, so an unstable sort gives the same order without a buffer of
        // half the list; and the list loses what its growth left spare (a quarter, at 100,000).
        tenants.sort_unstable_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
        tenants.shrink_to_fit();
        issues.sort();
        Desired {
            commit,
            tenants,
            issues,
            files: self.files,
        }
    }
}

/// A problem of the configuration, not of the files (no age identity at all), is said once, before
/// the per-file problems, instead of once for every file.
fn collapse_configuration_problems(issues: &mut Vec<Issue>) {
    let no_identity = sops::SopsError::NoIdentities.to_string();
    let before = issues.len();
    issues.retain(|i| i.message != no_identity);
    let files = before - issues.len();
    if files > 0 {
        issues.push(Issue::new(
            crate::domain::issue::CONFIGURATION,
            format!("{no_identity}; {files} encrypted file(s) could not be decrypted"),
        ));
    }
}

/// One file checked, or every problem found in it. No message carries a decrypted value.
pub fn decode_file(f: &SourceFile, opts: &ReadOptions<'_>) -> Result<Checked, Vec<Issue>> {
    let text = body_text(f)?;
    let doc = parse_file(f, text)?;
    let Opened { value, secrets, recipients } = open_document(f, text, doc, opts)?;
    let mut issues: Vec<Issue> = recipient_issue(f, opts, recipients.as_deref(), &value, &secrets).into_iter().collect();
    if recipients.is_some() {
        issues.extend(plaintext_secret_issues(f, text, &value, &secrets));
    }
    let encrypted = (!opts.decrypt).then(|| secrets.clone());
    match check_document(&f.path, f.stem(), text, value, secrets) {
        Ok(t) if issues.is_empty() => Ok(t),
        Ok(_) => Err(issues),
        Err(mut more) => {
            // Without the key an encrypted value's type and content are unknown: only problems
            // elsewhere count.
            if let Some(encrypted) = &encrypted {
                more.retain(|i| {
                    i.pointer
                        .as_ref()
                        .is_none_or(|p| !encrypted.iter().any(|e| crate::domain::json::is_within(p, e)))
                });
            }
            issues.append(&mut more);
            Err(issues)
        }
    }
}

fn one_issue(f: &SourceFile, message: String) -> Vec<Issue> {
    vec![Issue::new(&f.path, message)]
}

/// The file's bytes as text, or why there are none to read.
fn body_text(f: &SourceFile) -> Result<&str, Vec<Issue>> {
    let bytes = match &f.body {
        Body::Symlink => return Err(one_issue(f, "is a symbolic link; tenant files must be regular files".into())),
        Body::TooLarge(n) => return Err(one_issue(f, format!("is {n} bytes; the limit is {} bytes", crate::source::MAX_FILE_BYTES))),
        Body::Bytes(b) => b,
        Body::Unread(_) => return Err(one_issue(f, "was listed but not read (internal error)".into())),
        Body::Refused(why) => return Err(one_issue(f, why.clone())),
    };
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
        vec![Issue::new(&f.path, format!("is not valid UTF-8 (first bad byte at offset {at})")).line(Some(line))]
    })
}

/// The file parsed in the format its extension names, bounded as `sops::parse` bounds it.
fn parse_file(f: &SourceFile, text: &str) -> Result<serde_json::Value, Vec<Issue>> {
    let format = Format::from_path(&f.path).ok_or_else(|| one_issue(f, "has an unknown extension".into()))?;
    sops::parse(format, text).map_err(|e| match e {
        sops::SopsError::Parse { line, pointer: None, message } => vec![Issue::new(&f.path, format!("cannot parse: {message}")).line(line)],
        sops::SopsError::Parse {
            line,
            pointer: Some(pointer),
            message,
        } => {
            let issue = Issue::new(&f.path, format!("refused: {message}")).line(line);
            vec![if pointer.is_empty() { issue } else { issue.at(pointer) }]
        }
        other => one_issue(f, other.to_string()),
    })
}

/// A parsed file made ready for the checks: decrypted, or (without the key) its encrypted
/// values marked, or taken as it is where plaintext is allowed.
struct Opened {
    value: serde_json::Value,
    secrets: SecretPaths,
    recipients: Option<Vec<String>>,
}

fn open_document(f: &SourceFile, text: &str, doc: serde_json::Value, opts: &ReadOptions<'_>) -> Result<Opened, Vec<Issue>> {
    let encrypted = sops::is_encrypted(&doc);
    if encrypted && !opts.decrypt {
        let (recipients, _) = sops::recipients_and_rules(&doc).map_err(|e| one_issue(f, e.to_string()))?;
        if recipients.is_empty() {
            return Err(one_issue(f, "has no age recipients in its sops metadata".into()));
        }
        let mut value = doc;
        value.as_object_mut().map(|m| m.shift_remove("sops"));
        let mut secrets = SecretPaths::new();
        encrypted_leaves(&value, "", &mut secrets);
        // An encrypted tenant_id cannot be compared with the file name without the key.
        if secrets.remove("/tenant_id") {
            value["tenant_id"] = serde_json::Value::String(f.stem().to_string());
        }
        return Ok(Opened {
            value,
            secrets,
            recipients: Some(recipients),
        });
    }
    if encrypted {
        let d = sops::decrypt(doc, opts.keys).map_err(|e| match e {
            sops::SopsError::Value { ref pointer, .. } => {
                vec![
                    Issue::new(&f.path, e.to_string())
                        .at(pointer.clone())
                        .line(crate::domain::json::locate_line(text, pointer)),
                ]
            }
            other => one_issue(f, other.to_string()),
        })?;
        // tenant_id is the file's name: never a secret, whatever the encryption rules said.
        let secrets: SecretPaths = d.encrypted.into_iter().filter(|p| p != "/tenant_id").collect();
        return Ok(Opened {
            value: d.value,
            secrets,
            recipients: Some(d.recipients),
        });
    }
    match opts.allow_plaintext {
        true => Ok(Opened {
            value: doc,
            secrets: SecretPaths::new(),
            recipients: None,
        }),
        false => Err(one_issue(
            f,
            "is not encrypted (no sops metadata); encrypt it with `frostbyte-gitops secrets encrypt`, or set allow_plaintext in dev mode".into(),
        )),
    }
}

/// An encrypted file must have encrypted every value under a path the schema declares secret,
/// whatever its own sops rules (`encrypted_regex`, `unencrypted_suffix`, ...) chose: otherwise
/// the value is in git in the clear, and would be written to plans and the audit trail.
fn plaintext_secret_issues(f: &SourceFile, text: &str, value: &serde_json::Value, secrets: &SecretPaths) -> Vec<Issue> {
    crate::domain::secret_paths::plaintext_under_declared(value, secrets)
        .into_iter()
        .map(|pointer| {
            let under = crate::domain::secret_paths::declared().iter().find(|d| crate::domain::json::is_within(&pointer, d)).cloned().unwrap_or_default();
            Issue::new(
                &f.path,
                format!("is under {under}, which holds secrets, but the file leaves it unencrypted (value not shown): make its sops rules encrypt it (encrypted_regex, unencrypted_suffix, ...) and encrypt the file again"),
            )
            .line(crate::domain::json::locate_line(text, &pointer))
            .at(pointer)
        })
        .collect()
}

/// With `require_tenant_recipient`, a file must be encrypted to its tenant's own age key. The
/// key is named only when the file holds it in the clear.
fn recipient_issue(f: &SourceFile, opts: &ReadOptions<'_>, recipients: Option<&[String]>, value: &serde_json::Value, secrets: &SecretPaths) -> Option<Issue> {
    let own = value.get("age_public_key").and_then(|v| v.as_str())?;
    let refused =
        opts.require_tenant_recipient && crate::domain::tenant::is_age_recipient(own) && recipients.is_some_and(|rs| !rs.iter().any(|r| r.trim() == own));
    let shown = match secrets.contains("/age_public_key") {
        true => String::new(),
        false => format!(" {own}"),
    };
    refused.then(|| Issue::new(&f.path, format!("is not encrypted to the tenant's own age_public_key{shown} (re-encrypt with `frostbyte-gitops secrets updatekeys`, or set require_tenant_recipient = false)")))
}

/// Pointers of the values still encrypted (`ENC[...]` strings) in a document read without its key.
fn encrypted_leaves(v: &serde_json::Value, pointer: &str, out: &mut SecretPaths) {
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| encrypted_leaves(v, &crate::domain::json::child(pointer, k), out)),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| encrypted_leaves(v, &crate::domain::json::child(pointer, &i.to_string()), out)),
        serde_json::Value::String(s) if s.starts_with("ENC[") => {
            out.insert(pointer.to_string());
        }
        _ => {}
    }
}

/// Files tried before a run gives up proving its identities: a file that cannot be read or is
/// not encrypted proves nothing either way, and its problem is reported when it is decoded.
const PROOF_TRIES: usize = 8;

/// That the configured identities still open this source's files: one data key unwrapped is
/// enough. A run that reads no file (nothing changed since the last applied commit) would
/// otherwise go on saying "no changes" with a key that opens nothing.
pub fn prove_identities(ctx: &Ctx, src: &SourceConfig, source: &impl TenantSource, snapshot: &Snapshot) -> Result<(), SyncError> {
    if ctx.keys.is_empty() {
        return Ok(());
    }
    let reader = source.body_reader();
    let mut failure = None;
    for f in snapshot
        .files
        .iter()
        .filter(|f| matches!(f.body, Body::Unread(_) | Body::Bytes(_)))
        .take(PROOF_TRIES)
    {
        let mut f = f.clone();
        let Ok(()) = reader.read(&mut f) else { continue };
        let (Body::Bytes(bytes), Some(format)) = (&f.body, Format::from_path(&f.path)) else {
            continue;
        };
        let Some(doc) = std::str::from_utf8(bytes).ok().and_then(|t| sops::parse(format, t).ok()) else {
            continue;
        };
        if !sops::is_encrypted(&doc) {
            continue;
        }
        match sops::data_key(&doc, &ctx.keys) {
            Ok(_) => return Ok(()),
            Err(e @ (sops::SopsError::NoMatchingKey(_) | sops::SopsError::DataKey(_))) => {
                failure.get_or_insert((f.path.clone(), e.to_string()));
            }
            Err(_) => continue,
        }
    }
    match failure {
        None => Ok(()),
        Some((file, why)) => Err(SyncError::Keys {
            keys: ctx.key_origin(),
            name: src.name.clone(),
            file,
            why,
        }),
    }
}

/// Opens the source and reads the desired state at the configured revision (or `rev`).
/// `decrypt` false: `validate --no-decrypt`, for jobs that must not hold a key.
pub fn read_desired(source: &impl TenantSource, src: &SourceConfig, ctx: &Ctx, worktree: bool, decrypt: bool) -> Result<Desired, SyncError> {
    let opts = ReadOptions {
        decrypt,
        ..ReadOptions::from_ctx(ctx)
    };
    let snapshot = snapshot_of(source, src.git_ref.as_deref(), worktree)?;
    Ok(decode_from(source, &snapshot, &opts, None)?)
}

/// `validate`: every problem of every file, without keeping the documents.
pub fn validate(source: &impl TenantSource, src: &SourceConfig, ctx: &Ctx, worktree: bool, decrypt: bool) -> Result<Desired, SyncError> {
    let opts = ReadOptions {
        decrypt,
        keep_documents: false,
        ..ReadOptions::from_ctx(ctx)
    };
    let snapshot = snapshot_of(source, src.git_ref.as_deref(), worktree)?;
    Ok(decode_from(source, &snapshot, &opts, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file not encrypted to its tenant's key is refused; the key is quoted only when the file
    /// holds it in the clear, never once decrypted.
    #[test]
    fn the_recipient_problem_names_the_key_only_when_it_is_not_a_secret() {
        let own = "age1mx37mncarh87w9uvcrtyy72nlmrx0r426tgmy09f32qkqtwtw58s7uxngf";
        let f = SourceFile::new("tenants/acme.json".into(), Body::Bytes(vec![]));
        let keys = AgeKeys::default();
        let opts = ReadOptions {
            keys: &keys,
            decrypt: true,
            allow_plaintext: false,
            require_tenant_recipient: true,
            progress: false,
            keep_documents: false,
        };
        let value = serde_json::json!({"age_public_key": own});
        let others = ["age1someoneelse".to_string()];
        let clear = recipient_issue(&f, &opts, Some(&others), &value, &SecretPaths::new()).expect("refused");
        assert!(clear.message.contains(own), "{}", clear.message);
        let secret: SecretPaths = ["/age_public_key".to_string()].into();
        let hidden = recipient_issue(&f, &opts, Some(&others), &value, &secret).expect("refused");
        assert!(!hidden.message.contains(own), "{}", hidden.message);
        assert!(
            hidden.message.contains("is not encrypted to the tenant's own age_public_key ("),
            "{}",
            hidden.message
        );
        assert!(recipient_issue(&f, &opts, Some(&[own.to_string()]), &value, &secret).is_none());
    }
}
