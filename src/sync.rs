//! Orchestration: snapshot -> decrypt -> validate -> load actual -> plan -> apply.

use crate::config::{Config, DriftPolicy, Mode, SourceConfig};
use crate::domain::audit::CommitInfo;
use crate::domain::drift::{TenantDrift, drift};
use crate::domain::issue::Issue;
use crate::domain::json::SecretPaths;
use crate::domain::plan::{Action, ActualTenant, Plan, PlanOptions, TenantPlan, plan, stale_reasons};
use crate::domain::render::Header;
use crate::domain::tenant::{DesiredTenant, check_document};
use crate::localpg::{self, LocalPgError};
use crate::sops::{self, AgeKeys, Format};
use crate::source::{Body, Snapshot, Source, SourceError, SourceFile, SourceSpec};
use crate::store::{self, ApplyContext, StoreError};
use deadpool_postgres::Pool;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;

pub const ACTOR: &str = concat!("frostbyte-gitops/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    LocalPg(#[from] LocalPgError),
    #[error("{} problem(s) in {} file(s) at {at}; nothing was applied:\n{}", issues.len(), files_with_issues(issues), issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid { at: String, issues: Vec<Issue> },
    #[error(
        "commit {new} does not descend from the last applied commit {old} (history was rewritten, or the branch was reset); nothing was applied. Pass --allow-non-fast-forward to apply it anyway"
    )]
    NonFastForward { new: String, old: String },
    #[error("the saved plan is stale; nothing was applied:\n  {}", .0.join("\n  "))]
    Stale(Vec<String>),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Refused(#[from] crate::verify::Refused),
    #[error("source {name}: {why}")]
    MassPrune { name: String, why: String },
}

fn files_with_issues(issues: &[Issue]) -> usize {
    issues.iter().filter(|i| !i.is_configuration()).map(|i| &i.file).collect::<BTreeSet<_>>().len()
}

/// What every command gets: the resolved configuration, the age identities and the trusted
/// commit signers.
pub struct Ctx {
    pub cfg: Config,
    pub keys: AgeKeys,
    pub signers: crate::verify::TrustedSigners,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

impl Ctx {
    pub fn source_spec(&self, src: &SourceConfig) -> SourceSpec {
        SourceSpec {
            repo: src.repo.clone(),
            auth: self.cfg.git_auth.clone(),
            path: src.path.clone(),
            cache_dir: self.cfg.data_dir.join("git-cache"),
        }
    }

    /// The source named `only`, or every configured one.
    pub fn sources(&self, only: Option<&str>) -> Result<Vec<&SourceConfig>, SyncError> {
        match only {
            None => Ok(self.cfg.sources.iter().collect()),
            Some(name) => match self.cfg.sources.iter().find(|s| s.name == name) {
                Some(s) => Ok(vec![s]),
                None => Err(SyncError::Usage(format!(
                    "no source named {name:?} (configured: {})",
                    self.cfg.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ))),
            },
        }
    }

    /// The first configured source also reports the rows no source owns (made by hand, or before
    /// ownership was recorded), so that every row is some source's concern.
    fn adopts_unowned(&self, src: &SourceConfig) -> bool {
        self.cfg.sources.first().is_some_and(|f| f.name == src.name)
    }
}

/// The tenant files at one revision, decrypted and checked.
#[derive(Debug, Clone)]
pub struct Desired {
    pub commit: Option<CommitInfo>,
    pub tenants: Vec<DesiredTenant>,
    pub issues: Vec<Issue>,
    pub files: usize,
}

impl Desired {
    pub fn at(&self) -> String {
        self.commit
            .as_ref()
            .map_or_else(|| "the work tree".to_string(), |c| format!("commit {}", &c.id[..12.min(c.id.len())]))
    }
}

pub struct ReadOptions<'a> {
    pub keys: &'a AgeKeys,
    /// False for `validate --no-decrypt`: check what can be checked without a key (names,
    /// structure, sops metadata, the schema of the plaintext parts, recipients).
    pub decrypt: bool,
    pub allow_plaintext: bool,
    pub require_tenant_recipient: bool,
    pub progress: bool,
}

impl<'a> ReadOptions<'a> {
    pub fn from_ctx(ctx: &'a Ctx) -> Self {
        ReadOptions {
            keys: &ctx.keys,
            decrypt: true,
            allow_plaintext: ctx.cfg.allow_plaintext && ctx.cfg.mode == Mode::Dev,
            require_tenant_recipient: ctx.cfg.require_tenant_recipient,
            progress: ctx.progress,
        }
    }
}

/// Decrypts and checks every file (on all cores), then the checks across files.
pub fn read_snapshot(snapshot: Snapshot, opts: &ReadOptions<'_>) -> Desired {
    read_snapshot_subset(snapshot, opts, None)
}

/// As [`read_snapshot`], decrypting only the files in `only` (all when None); the checks across
/// files still see every file.
pub fn read_snapshot_subset(snapshot: Snapshot, opts: &ReadOptions<'_>, only: Option<&BTreeSet<String>>) -> Desired {
    let to_read: Vec<&SourceFile> = snapshot.files.iter().filter(|f| only.is_none_or(|o| o.contains(&f.path))).collect();
    let bar = (opts.progress && to_read.len() > 20 && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(to_read.len() as u64);
        pb.set_style(indicatif::ProgressStyle::with_template("{spinner} decrypting {pos}/{len} tenant files {bar:40} {eta}").expect("valid template"));
        pb
    });
    let results: Vec<Result<DesiredTenant, Vec<Issue>>> = to_read
        .par_iter()
        .map(|f| {
            let r = decode_file(f, opts);
            if let Some(b) = &bar {
                b.inc(1);
            }
            r
        })
        .collect();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut tenants = Vec::new();
    let mut issues = Vec::new();
    for r in results {
        match r {
            Ok(t) => tenants.push(t),
            Err(mut i) => issues.append(&mut i),
        }
    }
    // One tenant, one file: `acme.toml` and `acme.json` would both claim `acme`.
    let mut by_stem: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in &snapshot.files {
        by_stem.entry(f.stem.as_str()).or_default().push(f.path.as_str());
    }
    for (stem, paths) in by_stem.iter().filter(|(_, p)| p.len() > 1) {
        for p in paths {
            let others: Vec<&str> = paths.iter().filter(|o| *o != p).copied().collect();
            issues.push(Issue::new(*p, format!("duplicate tenant_id {stem:?}: also defined in {}", others.join(", "))));
        }
    }
    collapse_configuration_problems(&mut issues);
    let dup: BTreeSet<&str> = by_stem.iter().filter(|(_, p)| p.len() > 1).map(|(s, _)| *s).collect();
    tenants.retain(|t| !dup.contains(t.tenant_id.as_str()));
    tenants.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    issues.sort();
    Desired {
        commit: snapshot.commit,
        tenants,
        issues,
        files: snapshot.files.len(),
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

/// One file to one tenant, or every problem found in it. No message carries a decrypted value.
pub fn decode_file(f: &SourceFile, opts: &ReadOptions<'_>) -> Result<DesiredTenant, Vec<Issue>> {
    let err = |m: String| vec![Issue::new(&f.path, m)];
    let bytes = match &f.body {
        Body::Symlink => return Err(err("is a symbolic link; tenant files must be regular files".into())),
        Body::TooLarge(n) => return Err(err(format!("is {n} bytes; the limit is {} bytes", crate::source::MAX_FILE_BYTES))),
        Body::Bytes(b) => b,
        Body::Unread(_) => return Err(err("was listed but not read (internal error)".into())),
        Body::Refused(why) => return Err(err(why.clone())),
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
        vec![Issue::new(&f.path, format!("is not valid UTF-8 (first bad byte at offset {at})")).line(Some(line))]
    })?;
    let format = Format::from_path(&f.path).ok_or_else(|| err("has an unknown extension".into()))?;
    let doc = sops::parse(format, text).map_err(|e| match e {
        sops::SopsError::Parse { line, pointer: None, message } => vec![Issue::new(&f.path, format!("cannot parse: {message}")).line(line)],
        sops::SopsError::Parse {
            line,
            pointer: Some(pointer),
            message,
        } => {
            let issue = Issue::new(&f.path, format!("refused: {message}")).line(line);
            vec![if pointer.is_empty() { issue } else { issue.at(pointer) }]
        }
        other => err(other.to_string()),
    })?;
    let (value, secrets, recipients) = if sops::is_encrypted(&doc) && !opts.decrypt {
        let (recipients, _) = sops::recipients_and_rules(&doc).map_err(|e| err(e.to_string()))?;
        if recipients.is_empty() {
            return Err(err("has no age recipients in its sops metadata".into()));
        }
        let mut value = doc;
        value.as_object_mut().map(|m| m.shift_remove("sops"));
        let mut secrets = SecretPaths::new();
        encrypted_leaves(&value, "", &mut secrets);
        // An encrypted tenant_id cannot be compared with the file name without the key.
        if secrets.remove("/tenant_id") {
            value["tenant_id"] = serde_json::Value::String(f.stem.clone());
        }
        (value, secrets, Some(recipients))
    } else if sops::is_encrypted(&doc) {
        let d = sops::decrypt(doc, opts.keys).map_err(|e| match e {
            sops::SopsError::Value { ref pointer, .. } => {
                vec![
                    Issue::new(&f.path, e.to_string())
                        .at(pointer.clone())
                        .line(crate::domain::json::locate_line(text, pointer)),
                ]
            }
            other => err(other.to_string()),
        })?;
        // tenant_id is the file's name: never a secret, whatever the encryption rules said.
        let secrets: SecretPaths = d.encrypted.into_iter().filter(|p| p != "/tenant_id").collect();
        (d.value, secrets, Some(d.recipients))
    } else if opts.allow_plaintext {
        (doc, SecretPaths::new(), None)
    } else {
        return Err(err(
            "is not encrypted (no sops metadata); encrypt it with `frostbyte-gitops secrets encrypt`, or set allow_plaintext in dev mode".into(),
        ));
    };
    let mut issues = Vec::new();
    if let (true, Some(recipients), Some(own)) = (opts.require_tenant_recipient, &recipients, value.get("age_public_key").and_then(|v| v.as_str()))
        && crate::domain::tenant::is_age_recipient(own)
        && !recipients.iter().any(|r| r.trim() == own)
    {
        issues.push(Issue::new(&f.path, format!("is not encrypted to the tenant's own age_public_key {own} (re-encrypt with `frostbyte-gitops secrets updatekeys`, or set require_tenant_recipient = false)")));
    }
    let encrypted = (!opts.decrypt).then(|| secrets.clone());
    match check_document(&f.path, &f.stem, text, value, secrets) {
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
            if issues.is_empty() {
                return Err(vec![]);
            }
            Err(issues)
        }
    }
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

/// Opens the source and reads the desired state at the configured revision (or `rev`).
/// `decrypt` false: `validate --no-decrypt`, for jobs that must not hold a key.
pub fn read_desired(source: &Source, src: &SourceConfig, ctx: &Ctx, worktree: bool, decrypt: bool) -> Result<Desired, SyncError> {
    let mut snapshot = snapshot_of(source, src.git_ref.as_deref(), worktree)?;
    source.read_bodies(&mut snapshot, None)?;
    let opts = ReadOptions {
        decrypt,
        ..ReadOptions::from_ctx(ctx)
    };
    Ok(read_snapshot(snapshot, &opts))
}

/// The configured database: a pool, and the connection string for the agent's leader lease.
#[derive(Clone)]
pub struct Database {
    pub pool: Pool,
    pub url: String,
    pub tls_policy: store::TlsPolicy,
}

impl Database {
    /// A connection error, with where it tried to connect.
    pub fn named(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Connect { target, cause } if target.is_empty() => StoreError::Connect {
                target: store::target_of(&self.url),
                cause,
            },
            other => other,
        }
    }
}

/// The configured database; in dev mode with none configured, the agent's own cluster.
pub async fn connect(cfg: &Config) -> Result<Database, SyncError> {
    let url = match &cfg.database_url {
        Some(url) => url.clone(),
        None if cfg.mode == Mode::Production => {
            return Err(SyncError::Usage(
                "production mode needs a database: set FROSTBYTE_CONTROL_DB_URL (the local PostgreSQL is for dev mode only)".into(),
            ));
        }
        None => {
            let dir = cfg.data_dir.join("pgdata");
            let cluster = tokio::task::spawn_blocking(move || localpg::ensure(&dir, &[]))
                .await
                .expect("local PostgreSQL start panicked")?;
            let admin = store::pool(&cluster.conninfo("postgres"), store::TlsPolicy::AsGiven)?;
            store::create_database(&**store::client(&admin).await?, "frostbyte").await?;
            cluster.conninfo("frostbyte")
        }
    };
    let policy = if cfg.mode == Mode::Production {
        store::TlsPolicy::RequireForTcp
    } else {
        store::TlsPolicy::AsGiven
    };
    Ok(Database {
        pool: store::pool(&url, policy)?,
        url,
        tls_policy: policy,
    })
}

/// Dev mode migrates on the way in; production expects `migrate` to have run.
pub async fn prepare(cfg: &Config, db: &Database) -> Result<(), SyncError> {
    let mut client = store::client(&db.pool).await.map_err(|e| db.named(e))?;
    // Dev mode migrates unless it need not: the agent may run as an app role that cannot.
    if cfg.mode == Mode::Dev && store::check_migrated(&**client).await.is_err() {
        store::migrate(&mut client).await?;
    } else {
        store::check_migrated(&**client).await?;
    }
    Ok(())
}

/// A plan saved by `plan --out`, applied later by `apply FILE`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format_version: u32,
    pub source: String,
    /// The configured name of `source` (plans saved before sources had names have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_name: Option<String>,
    pub commit: String,
    pub created_at: String,
    pub plan: Plan,
}

pub enum Run {
    Plan,
    Apply { allow_non_fast_forward: bool },
    ApplySaved { saved: Box<SavedPlan>, allow_non_fast_forward: bool },
}

pub struct Outcome {
    pub header: Header,
    pub plan: Plan,
    pub applied: usize,
    pub source: String,
    /// The configured name of `source`.
    pub source_name: String,
    /// Drift after the run, when asked for.
    pub drift: Option<Vec<TenantDrift>>,
    pub commit_time: Option<String>,
}

/// Plans against the database and, unless `run` is `Plan`, applies in one transaction under the
/// apply lock: the plan is made from what the database holds once the lock is ours, so two
/// concurrent runs never apply a change twice.
/// How a run reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Report drift after the run.
    pub want_drift: bool,
    /// Read every file and every row, whatever the incremental state says (`--full`): what an
    /// edit made with triggers off, a restore, or a clock that stepped back needs to be seen.
    pub full: bool,
    /// Prune whatever the source's setting says (`--prune`).
    pub prune: bool,
    /// Prune past the source's prune_max_fraction (`--allow-mass-prune`).
    pub allow_mass_prune: bool,
}

pub async fn run(ctx: &Ctx, pool: &Pool, src: &SourceConfig, run: Run, opts: RunOptions) -> Result<Outcome, SyncError> {
    let want_drift = opts.want_drift;
    // git and decryption block; on the multi-threaded runtime, say so instead of starving it.
    let source = blocking(|| Source::open(&ctx.source_spec(src)))?;
    let worktree = ctx.cfg.worktree;
    let rev = match &run {
        Run::ApplySaved { saved, .. } => {
            if saved.source != source.id {
                return Err(SyncError::Usage(format!(
                    "the saved plan was made for source {}, not {}; nothing was applied",
                    saved.source, source.id
                )));
            }
            Some(saved.commit.clone())
        }
        _ => src.git_ref.clone(),
    };
    if worktree && !matches!(run, Run::Plan) && ctx.cfg.mode == Mode::Production {
        return Err(SyncError::Usage(
            "--worktree cannot apply in production mode: apply commits, not uncommitted files".into(),
        ));
    }
    let from_saved = matches!(run, Run::ApplySaved { .. });
    let mut client = store::client(pool).await?;
    let snapshot = snapshot_for(&source, rev.as_deref(), worktree && !from_saved, &**client).await?;
    let commit = snapshot.commit.clone().unwrap_or_else(|| CommitInfo {
        id: "worktree".into(),
        time: chrono::Utc::now().to_rfc3339(),
        author: "work tree".into(),
    });

    let applying = !matches!(run, Run::Plan);
    let allow_non_fast_forward = match &run {
        Run::Apply { allow_non_fast_forward } | Run::ApplySaved { allow_non_fast_forward, .. } => *allow_non_fast_forward,
        Run::Plan => true,
    };
    let key = store::digest_key(&**client).await?;
    // Decrypting and checking files is the slow part, and a hostile file can make it slower: it
    // happens before the apply lock, from what the database held then. Under the lock the
    // selection is made again; if another run moved the database meanwhile so that a file not
    // yet decoded is needed, the lock is let go and the missing files are decoded outside it.
    let mut decoded = Decoded::default();
    let mut verified: Option<Verified> = None;
    let mut attempts = 0;
    let (
        tx,
        last,
        State {
            desired,
            actual,
            unchanged,
            owned,
            claims,
        },
    ) = loop {
        attempts += 1;
        let last = store::last_applied_commit(&**client, &source.id).await?;
        if verified.as_ref().is_none_or(|v| !v.holds_for(ctx, last.as_deref())) {
            verified = Some(blocking(|| Verified::check(ctx, &source, &snapshot, last.as_deref())));
        }
        if applying && let Some(Verified { result: Err(refused), .. }) = &verified {
            return Err(refused.clone().into());
        }
        let scope = scope_of(ctx, src, &source, &snapshot, &**client).await?;
        let index = scope.index(&**client, &snapshot).await?;
        let selection = select(&source, &snapshot, &scope, last.as_deref(), index, opts.full)?;
        decoded.extend(ctx, &source, &snapshot, &selection)?;

        let tx = client.transaction().await.map_err(|e| StoreError::Query {
            context: "starting a transaction".into(),
            source: e,
        })?;
        if applying {
            store::lock_apply(&tx, &source.id).await?;
        }
        let last = store::last_applied_commit(&*tx, &source.id).await?;
        if applying
            && snapshot.commit.is_some()
            && let Some(last) = &last
            && !allow_non_fast_forward
            && !source.descends_from(commit_oid(&commit.id), last)?
        {
            return Err(SyncError::NonFastForward {
                new: commit.id.clone(),
                old: last.clone(),
            });
        }
        let scope = scope_of(ctx, src, &source, &snapshot, &*tx).await?;
        let index = scope.index(&*tx, &snapshot).await?;
        let selection = select(&source, &snapshot, &scope, last.as_deref(), index, opts.full)?;
        if decoded.covers(&selection) && verified.as_ref().is_some_and(|v| v.holds_for(ctx, last.as_deref())) {
            let state = decoded.state(&*tx, &snapshot, selection).await?;
            break (tx, last, state);
        }
        if attempts == 3 {
            return Err(SyncError::Usage(
                "other runs kept changing the database while this one decoded files; nothing was applied (try again)".into(),
            ));
        }
        tx.rollback().await.map_err(|e| StoreError::Query {
            context: "rolling back".into(),
            source: e,
        })?;
    };
    let popts = PlanOptions {
        key: &key,
        correct_drift: ctx.cfg.drift_policy == DriftPolicy::Correct,
    };
    let mut fresh = plan(&desired.tenants, &actual, popts);
    fresh.tenants.extend(
        unchanged
            .iter()
            .map(|u| TenantPlan::unchanged(u.tenant_id.clone(), u.file.clone(), u.config_version, u.digest.clone())),
    );
    fresh.tenants.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    crate::domain::plan::annotate_embedding(&mut fresh, &desired.tenants, ctx.cfg.embedding_endpoint.as_deref());
    if src.prune || opts.prune {
        let states: BTreeMap<&str, &str> = actual.iter().map(|a| (a.tenant_id.as_str(), a.state.as_str())).collect();
        fresh.prune(|id| owned.get(id).cloned(), |id| states.get(id).map(|s| s.to_string()));
        let refusal = crate::domain::plan::mass_prune_refusal(fresh.summary().decommission, owned.len(), src.prune_max_fraction);
        if let (Some(why), false) = (refusal, opts.allow_mass_prune) {
            return Err(SyncError::MassPrune { name: src.name.clone(), why });
        }
    }
    if let Run::ApplySaved { saved, .. } = &run {
        let reasons = stale_reasons(&saved.plan, &fresh);
        if !reasons.is_empty() {
            return Err(SyncError::Stale(reasons));
        }
    }
    let mut applied = 0;
    if applying {
        let actx = ApplyContext {
            source: &source.id,
            source_name: &src.name,
            commit: &commit,
            actor: ACTOR,
            key: &key,
            // Only when it moves: an upsert that changes nothing still locks the row, and a
            // transaction that wrote must wait for its WAL to reach the disk.
            record_commit: desired.commit.as_ref().is_some_and(|c| last.as_deref() != Some(c.id.as_str())),
            signer: verified
                .as_ref()
                .and_then(|v| v.result.as_ref().ok().cloned().flatten())
                .map_or(serde_json::Value::Null, |s| serde_json::to_value(s).expect("serialisable")),
            claims,
        };
        applied = store::apply(&tx, &fresh, &desired.tenants, &actx).await?;
    }
    let drift_report = if want_drift {
        let after = if applied > 0 {
            let ids: BTreeSet<String> = actual
                .iter()
                .map(|a| a.tenant_id.clone())
                .chain(desired.tenants.iter().map(|d| d.tenant_id.clone()))
                .collect();
            store::load_actual_for(&*tx, &ids.into_iter().collect::<Vec<_>>()).await?
        } else {
            actual
        };
        Some(with_unchanged(drift(&desired.tenants, &after, &key), &unchanged))
    } else {
        None
    };
    tx.commit().await.map_err(|e| StoreError::Query {
        context: "committing".into(),
        source: e,
    })?;
    if applied > 0 {
        tracing::info!(commit = %commit.id, applied, "applied");
    }
    Ok(Outcome {
        header: Header {
            commit: desired.commit.as_ref().map(|c| c.id.clone()),
            against: "the database".into(),
            signature: verified.as_ref().and_then(|v| v.describe(ctx.cfg.verify_commits)),
        },
        plan: fresh,
        applied,
        source: source.id,
        source_name: src.name.clone(),
        drift: drift_report,
        commit_time: desired.commit.map(|c| c.time),
    })
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn snapshot_of(source: &Source, rev: Option<&str>, worktree: bool) -> Result<Snapshot, SyncError> {
    Ok(if worktree {
        source.worktree_snapshot()?
    } else {
        source.snapshot(source.resolve(rev)?)?
    })
}

/// As [`snapshot_of`], for a source that has applied before: its tenant directory gone is every
/// tenant gone (which prune's safety limit is for), not a configuration mistake.
async fn snapshot_for(source: &Source, rev: Option<&str>, worktree: bool, client: &impl tokio_postgres::GenericClient) -> Result<Snapshot, SyncError> {
    match blocking(|| snapshot_of(source, rev, worktree)) {
        Err(SyncError::Source(SourceError::NoTenantDir { .. })) if !worktree && store::last_applied_commit(client, &source.id).await?.is_some() => {
            Ok(blocking(|| source.empty_snapshot(source.resolve(rev)?))?)
        }
        other => other,
    }
}

/// A tenant whose file git did not change since the last applied commit and whose row did not
/// change since the agent wrote it: it is as git says, without being read.
pub struct Unchanged {
    pub tenant_id: String,
    pub file: String,
    pub config_version: i64,
    pub digest: String,
}

/// What a run works from.
struct State {
    /// The files that may differ from what was applied, decrypted and checked.
    desired: Desired,
    /// The rows of every tenant that is not `unchanged` (orphans included), in full.
    actual: Vec<ActualTenant>,
    unchanged: Vec<Unchanged>,
    owned: BTreeMap<String, String>,
    claims: Vec<(String, String)>,
}

/// A commit's signature check, and the last applied commit it was made against (strict mode
/// checks every commit since it).
struct Verified {
    against: Option<String>,
    result: Result<Option<crate::verify::CommitSigner>, crate::verify::Refused>,
}

impl Verified {
    fn check(ctx: &Ctx, source: &Source, snapshot: &Snapshot, last: Option<&str>) -> Verified {
        let result = match &snapshot.commit {
            None => Ok(None),
            Some(c) => source.verify(ctx.cfg.verify_commits, last, commit_oid(&c.id), &ctx.signers),
        };
        Verified {
            against: last.map(str::to_string),
            result,
        }
    }

    fn holds_for(&self, ctx: &Ctx, last: Option<&str>) -> bool {
        ctx.cfg.verify_commits != crate::verify::VerifyMode::Strict || self.against.as_deref() == last
    }

    /// For a plan's header.
    fn describe(&self, mode: crate::verify::VerifyMode) -> Option<String> {
        signature_words(mode, &self.result)
    }
}

/// A signature check in words, for a plan's header (none when verification is off).
pub fn signature_words(mode: crate::verify::VerifyMode, result: &Result<Option<crate::verify::CommitSigner>, crate::verify::Refused>) -> Option<String> {
    match result {
        _ if mode == crate::verify::VerifyMode::Off => None,
        Ok(Some(s)) => Some(format!(
            "verified ({mode}): {} key {} of {}",
            if s.kind == crate::verify::SignerKind::Ssh { "SSH" } else { "OpenPGP" },
            s.fingerprint,
            s.principal
        )),
        Ok(None) => Some("not checked: the work tree has no commit".into()),
        Err(r) => Some(format!("REFUSED ({mode}): signer {}: {}; a sync would apply nothing", r.signer, r.reason)),
    }
}

/// What a run must read: only what can differ from what the agent last applied, i.e. the files git
/// changed since the last applied commit and those of tenants without a record or whose row moved
/// since. So a sync's cost follows what changed, not the number of tenants. Without a usable last
/// commit (the first run, a rewritten history, the work tree) everything is read.
struct Selection {
    /// Files to decode; None: all of them.
    read: Option<BTreeSet<String>>,
    /// The rows of this source's tenants to load in full.
    rows: Vec<String>,
    unchanged: Vec<Unchanged>,
    /// The tenants this source owns, with the file each was claimed from.
    owned: BTreeMap<String, String>,
    /// Files of tenants that exist and nobody owns yet: this source claims them when it applies.
    claims: Vec<(String, String)>,
}

/// Which rows a run over one source works on.
struct Scope<'a> {
    id: &'a str,
    name: &'a str,
    adopts_unowned: bool,
    /// Tenants other sources own.
    foreign: BTreeMap<String, store::Owner>,
}

fn stems(snapshot: &Snapshot) -> Vec<&str> {
    snapshot.files.iter().map(|f| f.stem.as_str()).collect()
}

impl Scope<'_> {
    /// The index of this source's rows, and of the unowned ones it reports or claims.
    async fn index(&self, client: &impl tokio_postgres::GenericClient, snapshot: &Snapshot) -> Result<Vec<store::RowIndex>, SyncError> {
        let unowned = (!self.adopts_unowned).then(|| stems(snapshot));
        Ok(store::load_index(client, self.id, unowned.as_deref()).await?)
    }

    /// A file here whose tenant another source owns is refused, naming both.
    fn claims_refused(&self, snapshot: &Snapshot) -> Vec<Issue> {
        snapshot
            .files
            .iter()
            .filter_map(|f| {
                let o = self.foreign.get(&f.stem)?;
                Some(Issue::new(
                    &f.path,
                    format!(
                        "tenant_id {:?} belongs to source {o} (file {}); this file in source {} ({}) claims it too: nothing of it changes. Delete one, or move the tenant with `frostbyte-gitops tenant move {} --to {}`",
                        f.stem,
                        if o.file.is_empty() { "not recorded" } else { &o.file },
                        self.name,
                        self.id,
                        f.stem,
                        self.name
                    ),
                ))
            })
            .collect()
    }
}

fn commit_oid(id: &str) -> git2::Oid {
    git2::Oid::from_str(id).expect("a commit id from git")
}

fn select(
    source: &Source,
    snapshot: &Snapshot,
    scope: &Scope<'_>,
    last: Option<&str>,
    index: Vec<store::RowIndex>,
    full: bool,
) -> Result<Selection, SyncError> {
    let stems: BTreeMap<&str, &str> = snapshot.files.iter().map(|f| (f.stem.as_str(), f.path.as_str())).collect();
    let mine = |r: &store::RowIndex| match &r.owner {
        Some(o) => o.source == scope.id,
        None => scope.adopts_unowned || stems.contains_key(r.tenant_id.as_str()),
    };
    let index: Vec<store::RowIndex> = index.into_iter().filter(mine).collect();
    let owned: BTreeMap<String, String> = index
        .iter()
        .filter_map(|r| r.owner.as_ref().map(|o| (r.tenant_id.clone(), o.file.clone())))
        .collect();
    let claims: Vec<(String, String)> = index
        .iter()
        .filter(|r| r.owner.is_none())
        .filter_map(|r| stems.get(r.tenant_id.as_str()).map(|f| (r.tenant_id.clone(), f.to_string())))
        .collect();
    let changed = match (&snapshot.commit, last) {
        _ if full => None,
        (Some(c), Some(last)) => {
            let new = commit_oid(&c.id);
            blocking(|| -> Result<_, SourceError> {
                if source.descends_from(new, last)? {
                    source.changed_files(last, new)
                } else {
                    Ok(None)
                }
            })?
        }
        _ => None,
    };
    let Some(changed) = changed else {
        return Ok(Selection {
            read: None,
            rows: index.into_iter().map(|r| r.tenant_id).collect(),
            unchanged: vec![],
            owned,
            claims,
        });
    };
    let by_id: BTreeMap<&str, &store::RowIndex> = index.iter().map(|r| (r.tenant_id.as_str(), r)).collect();
    let trusted = trusted_records(source, &index, last.expect("a last applied commit when there is a diff"))?;
    let mut read = BTreeSet::new();
    let mut unchanged = Vec::new();
    for f in &snapshot.files {
        let same = by_id.get(f.stem.as_str()).and_then(|r| {
            let (file, version, digest) = r.applied.as_ref()?;
            let from_here = r.applied_from.as_ref().is_some_and(|(_, commit)| trusted.contains(commit.as_str()));
            (from_here && !changed.contains(&f.path) && *file == f.path && !r.touched && *version == r.config_version).then(|| Unchanged {
                tenant_id: r.tenant_id.clone(),
                file: file.clone(),
                config_version: r.config_version,
                digest: digest.clone(),
            })
        });
        match same {
            Some(u) => unchanged.push(u),
            None => {
                read.insert(f.path.clone());
            }
        }
    }
    let skip: BTreeSet<&str> = unchanged.iter().map(|u| u.tenant_id.as_str()).collect();
    let rows = index
        .iter()
        .filter(|r| !skip.contains(r.tenant_id.as_str()))
        .map(|r| r.tenant_id.clone())
        .collect();
    tracing::debug!(decrypting = read.len(), unchanged = unchanged.len(), "incremental read");
    Ok(Selection {
        read: Some(read),
        rows,
        unchanged,
        owned,
        claims,
    })
}

/// The commits of applied records that can stand for what git has without a read: records this
/// source wrote from the last applied commit or one of its ancestors. A record from the work tree
/// (`apply --worktree`), another source or a history that was rewritten is not trusted.
fn trusted_records<'a>(source: &Source, index: &'a [store::RowIndex], last: &str) -> Result<BTreeSet<&'a str>, SyncError> {
    let last_oid = commit_oid(last);
    let commits: BTreeSet<&str> = index
        .iter()
        .filter_map(|r| r.applied_from.as_ref())
        .filter(|(from, _)| *from == source.id)
        .map(|(_, commit)| commit.as_str())
        .collect();
    let mut trusted = BTreeSet::new();
    for commit in commits {
        if commit == last || blocking(|| source.descends_from(last_oid, commit))? {
            trusted.insert(commit);
        }
    }
    Ok(trusted)
}

/// The tenant files decoded so far in a run.
#[derive(Default)]
struct Decoded {
    all: bool,
    files: BTreeSet<String>,
    tenants: Vec<DesiredTenant>,
}

impl Decoded {
    /// Decodes the files `selection` needs that are not decoded yet. Any problem in any of them
    /// ends the run: nothing is applied.
    fn extend(&mut self, ctx: &Ctx, source: &Source, snapshot: &Snapshot, selection: &Selection) -> Result<(), SyncError> {
        if self.covers(selection) {
            return Ok(());
        }
        let missing: Option<BTreeSet<String>> = selection.read.as_ref().map(|r| r.difference(&self.files).cloned().collect());
        tracing::debug!(files = missing.as_ref().map_or(snapshot.files.len(), BTreeSet::len), "decoding tenant files");
        let mut files = snapshot.clone();
        blocking(|| source.read_bodies(&mut files, missing.as_ref()))?;
        let desired = blocking(|| read_snapshot_subset(files, &ReadOptions::from_ctx(ctx), missing.as_ref()));
        if !desired.issues.is_empty() {
            return Err(SyncError::Invalid {
                at: desired.at(),
                issues: desired.issues,
            });
        }
        match missing {
            None => {
                self.all = true;
                self.tenants = desired.tenants;
            }
            Some(missing) => {
                self.files.extend(missing);
                self.tenants.extend(desired.tenants);
            }
        }
        Ok(())
    }

    fn covers(&self, selection: &Selection) -> bool {
        self.all || selection.read.as_ref().is_some_and(|r| r.is_subset(&self.files))
    }

    /// The state a run plans from: the decoded tenants the selection reads, and their rows.
    async fn state(&self, client: &impl tokio_postgres::GenericClient, snapshot: &Snapshot, selection: Selection) -> Result<State, SyncError> {
        let mut tenants: Vec<DesiredTenant> = self
            .tenants
            .iter()
            .filter(|t| selection.read.as_ref().is_none_or(|r| r.contains(&t.file)))
            .cloned()
            .collect();
        tenants.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
        let actual = store::load_actual_for(client, &selection.rows).await?;
        // A duplicate file for an unchanged tenant is an issue when decoding; nothing stands in twice.
        Ok(State {
            desired: Desired {
                commit: snapshot.commit.clone(),
                tenants,
                issues: vec![],
                files: snapshot.files.len(),
            },
            actual,
            unchanged: selection.unchanged,
            owned: selection.owned,
            claims: selection.claims,
        })
    }
}

/// The rows a run over `src` works on, as the database has them now; a file claiming a tenant
/// another source owns is a problem of the run.
async fn scope_of<'a>(
    ctx: &Ctx,
    src: &'a SourceConfig,
    source: &'a Source,
    snapshot: &Snapshot,
    client: &impl tokio_postgres::GenericClient,
) -> Result<Scope<'a>, SyncError> {
    let scope = Scope {
        id: &source.id,
        name: &src.name,
        adopts_unowned: ctx.adopts_unowned(src),
        foreign: store::foreign_owners(client, &source.id, &stems(snapshot)).await?,
    };
    let refused = scope.claims_refused(snapshot);
    if !refused.is_empty() {
        return Err(SyncError::Invalid {
            at: snapshot
                .commit
                .as_ref()
                .map_or_else(|| "the work tree".into(), |c| format!("commit {}", &c.id[..12])),
            issues: refused,
        });
    }
    Ok(scope)
}

/// The state without the apply lock, for reports.
async fn read_state(
    ctx: &Ctx,
    src: &SourceConfig,
    source: &Source,
    snapshot: &Snapshot,
    client: &impl tokio_postgres::GenericClient,
    full: bool,
) -> Result<State, SyncError> {
    let last = store::last_applied_commit(client, &source.id).await?;
    let scope = scope_of(ctx, src, source, snapshot, client).await?;
    let index = scope.index(client, snapshot).await?;
    let selection = select(source, snapshot, &scope, last.as_deref(), index, full)?;
    let mut decoded = Decoded::default();
    decoded.extend(ctx, source, snapshot, &selection)?;
    decoded.state(client, snapshot, selection).await
}

fn with_unchanged(mut report: Vec<TenantDrift>, unchanged: &[Unchanged]) -> Vec<TenantDrift> {
    report.extend(
        unchanged
            .iter()
            .map(|u| TenantDrift::known_in_sync(u.tenant_id.clone(), u.file.clone(), u.config_version)),
    );
    report.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    report
}

/// `plan --against-ref`: the change between two revisions, without a database.
pub fn plan_against_ref(ctx: &Ctx, src: &SourceConfig, base_rev: &str) -> Result<(Header, Plan), SyncError> {
    let source = Source::open(&ctx.source_spec(src))?;
    let desired = read_desired(&source, src, ctx, ctx.cfg.worktree, true)?;
    if !desired.issues.is_empty() {
        return Err(SyncError::Invalid {
            at: desired.at(),
            issues: desired.issues,
        });
    }
    let base_commit = source.resolve(Some(base_rev))?;
    let base = match source.snapshot(base_commit) {
        Ok(mut s) => {
            source.read_bodies(&mut s, None)?;
            read_snapshot(s, &ReadOptions::from_ctx(ctx))
        }
        // A base without the tenant directory (the PR adds it) has no tenants.
        Err(SourceError::NoTenantDir { .. }) => Desired {
            commit: None,
            tenants: vec![],
            issues: vec![],
            files: 0,
        },
        Err(e) => return Err(e.into()),
    };
    if !base.issues.is_empty() {
        tracing::warn!(
            problems = base.issues.len(),
            "some tenant files at the base revision are invalid; they are compared as absent"
        );
    }
    let actual: Vec<ActualTenant> = base
        .tenants
        .into_iter()
        .map(|t| ActualTenant {
            tenant_id: t.tenant_id,
            state: String::new(),
            config_version: 0,
            document: t.document,
            applied: None,
            known_secrets: t.secrets,
        })
        .collect();
    // Digests never leave this process here, so any key will do.
    let mut p = plan(
        &desired.tenants,
        &actual,
        PlanOptions {
            key: &[0; 32],
            correct_drift: true,
        },
    );
    crate::domain::plan::annotate_embedding(&mut p, &desired.tenants, ctx.cfg.embedding_endpoint.as_deref());
    for t in &mut p.tenants {
        t.current_version = None;
        t.next_version = None;
        t.desired_digest = None;
        t.actual_digest = None;
        if t.action == Action::Orphaned {
            // Deleted in this revision: reported, never deleted from the database.
            t.file = None;
        }
    }
    // Would the merge pass verification? In strict mode, every commit since the base.
    let signature = match &desired.commit {
        Some(c) => signature_words(
            ctx.cfg.verify_commits,
            &source.verify(ctx.cfg.verify_commits, Some(&base_commit.to_string()), commit_oid(&c.id), &ctx.signers),
        ),
        None => None,
    };
    let header = Header {
        commit: desired.commit.map(|c| c.id),
        against: format!("ref {base_rev} ({})", &base_commit.to_string()[..12]),
        signature,
    };
    Ok((header, p))
}

/// The drift report for the configured revision.
pub async fn drift_report(ctx: &Ctx, pool: &Pool, src: &SourceConfig, full: bool) -> Result<(Header, Vec<TenantDrift>), SyncError> {
    let source = blocking(|| Source::open(&ctx.source_spec(src)))?;
    let client = store::client(pool).await?;
    let snapshot = snapshot_for(&source, src.git_ref.as_deref(), ctx.cfg.worktree, &**client).await?;
    let key = store::digest_key(&**client).await?;
    let State {
        desired, actual, unchanged, ..
    } = read_state(ctx, src, &source, &snapshot, &**client, full).await?;
    let report = with_unchanged(drift(&desired.tenants, &actual, &key), &unchanged);
    Ok((
        Header {
            commit: desired.commit.map(|c| c.id),
            against: "the database".into(),
            signature: None,
        },
        report,
    ))
}

/// A tenant whose `config_version` differs from its number of `TENANT_CONFIG_UPDATED` events.
#[derive(Debug, Clone, Serialize)]
pub struct VersionMismatch {
    pub tenant_id: String,
    pub config_version: i64,
    pub config_events: i64,
}

/// What `audit verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub events: u64,
    /// The newest event's seq and hash (hex): what `--anchor` records for the next verification.
    pub head_seq: i64,
    pub head_hash: String,
    pub broken: Option<crate::domain::audit::ChainBreak>,
    pub version_mismatches: Vec<VersionMismatch>,
}

impl AuditReport {
    pub fn intact(&self) -> bool {
        self.broken.is_none() && self.version_mismatches.is_empty()
    }
}

/// Recomputes the audit chain outside the database, and checks every tenant's config_version
/// against its config events. `anchor`: an event (seq, hash) an earlier verification recorded.
pub async fn verify_audit(pool: &Pool, anchor: Option<(i64, Vec<u8>)>) -> Result<AuditReport, SyncError> {
    use crate::domain::audit::{ChainBreak, ChainVerifier};
    let client = store::client(pool).await?;
    // One snapshot for the events, the head and the versions.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| StoreError::Query {
            context: "starting a read-only transaction".into(),
            source: e,
        })?;
    let mut verifier = ChainVerifier::new(anchor);
    let mut broken: Option<ChainBreak> = None;
    store::for_each_audit_event(&**client, |row| {
        if broken.is_none()
            && let Err(b) = verifier.push(row.seq, &row.event_id, &row.fields, &row.prev_hash, &row.chain_hash)
        {
            broken = Some(b);
        }
        Ok(())
    })
    .await?;
    let (head, versions) = store::audit_head_and_versions(&**client).await?;
    let _ = client.batch_execute("COMMIT").await;
    let events = verifier.events;
    let (head_seq, head_hash) = match broken {
        Some(_) => (0, String::new()),
        None => match verifier.finish(head) {
            Ok((seq, hash)) => (seq, hex::encode(hash)),
            Err(b) => {
                broken = Some(b);
                (0, String::new())
            }
        },
    };
    let version_mismatches = versions
        .into_iter()
        .filter(|(_, version, count)| version != count)
        .map(|(tenant_id, config_version, config_events)| VersionMismatch {
            tenant_id,
            config_version,
            config_events,
        })
        .collect();
    Ok(AuditReport {
        events,
        head_seq,
        head_hash,
        broken,
        version_mismatches,
    })
}
