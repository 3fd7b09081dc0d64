//! Orchestration: snapshot -> decrypt -> validate -> load actual -> plan -> apply.

use crate::blocking;
use crate::config::{DriftPolicy, Mode, SourceConfig};
use crate::domain::audit::CommitInfo;
use crate::domain::commit::CommitId;
use crate::domain::drift::{TenantDrift, drift};
use crate::domain::json::JsonText;
use crate::domain::plan::{Action, ActualTenant, Plan, PlanOptions, TenantPlan, plan, stale_reasons};
use crate::domain::render::Header;
use crate::domain::tenant::DesiredTenant;
use crate::ports::{Store, StoreTx, TenantSource, TenantStore};
use crate::source::{Snapshot, SourceError};
use crate::store::{self, ApplyContext, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

mod ctx;
mod error;
#[cfg(test)]
mod fake;
mod park;
mod read;
mod select;
mod spill;
#[cfg(test)]
mod tests;

pub use ctx::{Ctx, Desired};
pub use error::{Retry, SyncError};
pub use read::{ReadOptions, decode_file, decode_from, read_desired, read_snapshot, read_snapshot_subset, validate};
pub use select::Unchanged;
use select::{Decoded, State, read_state, scope_of, select};

pub const ACTOR: &str = concat!("frostbyte-gitops/", env!("CARGO_PKG_VERSION"));

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
    /// The plan, but for the tenants an apply created: see [`Outcome::entries`].
    plan: Plan,
    created: spill::Spilled,
    pub applied: usize,
    pub source: String,
    /// The configured name of `source`.
    pub source_name: String,
    /// Drift after the run, when asked for.
    pub drift: Option<Vec<TenantDrift>>,
    pub commit_time: Option<String>,
}

impl Outcome {
    /// The whole plan, in tenant order, the created tenants read back as it goes.
    pub fn entries(&self) -> spill::Merged<'_> {
        spill::Merged {
            plan: &self.plan,
            created: &self.created,
        }
    }

    /// The whole plan as one value, which only a run that created nothing has: an apply's
    /// created tenants are in the spill alone.
    pub fn into_plan(self) -> Option<(Header, Plan)> {
        self.created.is_empty().then_some((self.header, self.plan))
    }

    /// The plan of a run that created nothing (a `plan` run), to save for a later apply.
    pub fn plan(&self) -> Option<&Plan> {
        self.created.is_empty().then_some(&self.plan)
    }
}

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

/// Plans one source against the database and, unless `run` is `Plan`, applies in one transaction
/// under the source's apply lock: the plan is made from what the database holds once the lock is
/// ours, so two concurrent runs never apply a change twice. `source` is `src`, opened.
pub async fn run<S: TenantSource, D: Store>(ctx: &Ctx, source: &S, db: &mut D, src: &SourceConfig, run: Run, opts: RunOptions) -> Result<Outcome, SyncError> {
    let rev = revision(&run, src, source)?;
    let worktree = ctx.cfg.worktree && !matches!(run, Run::ApplySaved { .. });
    if worktree && !matches!(run, Run::Plan) && ctx.cfg.mode == Mode::Production {
        return Err(SyncError::Usage(
            "--worktree cannot apply in production mode: apply commits, not uncommitted files".into(),
        ));
    }
    follow_respelling(src, source.id(), db).await?;
    // git and decryption block; on the multi-threaded runtime, say so instead of starving it.
    let snapshot = snapshot_for(source, rev.as_deref(), worktree, db).await?;
    blocking(|| read::prove_identities(ctx, src, source, &snapshot))?;
    let key = db.digest_key().await?;
    let mut attempts = Attempts {
        ctx,
        src,
        source,
        snapshot: &snapshot,
        run: &run,
        key: &key,
        full: opts.full,
        prunes: src.prune || opts.prune,
        // An apply decodes files before it takes the lock: their documents wait outside memory
        // until they are compared with their rows or written.
        decoded: Decoded::new(matches!(run, Run::Apply { .. })),
        changes: select::Changes::default(),
        verified: None,
    };
    let mut round = 0;
    // Rounds until one holds the lock with every file it needs decoded; files are decoded
    // between rounds, outside the lock.
    let locked = loop {
        round += 1;
        let last = attempts.verify(&*db).await?;
        if round == 1 {
            attempts.decode_likely(last.as_ref())?;
        }
        let tx = db.begin().await?;
        match attempts.lock(tx).await? {
            Round::Locked(locked) => break *locked,
            Round::Decode(selection) => attempts.decode(&selection)?,
            Round::Reverify => {}
        }
        if round == 4 {
            return Err(SyncError::Usage(
                "other runs kept changing the database while this one decoded files; nothing was applied (try again)".into(),
            ));
        }
    };
    attempts.conclude(locked, opts).await
}

/// A source whose repository is spelled another way than when it claimed its tenants (a path
/// for a `file://` URL, ssh for https) is the same source: its records follow the new spelling.
async fn follow_respelling(src: &SourceConfig, id: &str, db: &mut impl Store) -> Result<(), SyncError> {
    for old in db.other_spellings(&src.name, id).await? {
        if crate::location::same_source(&old, id) {
            let moved = db.respell(&old, id).await?;
            tracing::info!(source = %src.name, was = %old, now = %id, tenants = moved, "the source's repository is spelled another way; its records follow");
        }
    }
    Ok(())
}

/// The revision a run reads: a saved plan's commit (refused if it was made for another source),
/// or the source's ref.
fn revision(run: &Run, src: &SourceConfig, source: &impl TenantSource) -> Result<Option<String>, SyncError> {
    match run {
        Run::ApplySaved { saved, .. } if saved.source != source.id() => Err(SyncError::Usage(format!(
            "the saved plan was made for source {}, not {}; nothing was applied",
            saved.source,
            source.id()
        ))),
        Run::ApplySaved { saved, .. } => Ok(Some(saved.commit.clone())),
        _ => Ok(src.git_ref.clone()),
    }
}

/// A run's transaction, holding the source's apply lock when it applies, with the state read
/// under it.
struct Locked<T> {
    tx: T,
    last: Option<CommitId>,
    state: State,
    verified: Verified,
}

/// Decrypting and checking files is the slow part, and a hostile file can make it slower, so it
/// never happens under the apply lock. First the files git changed since the last applied commit
/// are decoded; then a round takes the lock, reads the index and chooses what to read. When every
/// file it needs is decoded (nearly always: only rows edited since they were applied add files) it
/// goes on under the lock, and otherwise it lets go, decodes what is missing, and tries again
/// (another run may have moved the database meanwhile).
struct Attempts<'r, S> {
    ctx: &'r Ctx,
    src: &'r SourceConfig,
    source: &'r S,
    snapshot: &'r Snapshot,
    run: &'r Run,
    key: &'r [u8],
    full: bool,
    prunes: bool,
    decoded: Decoded,
    changes: select::Changes,
    verified: Option<Verified>,
}

impl<S: TenantSource> Attempts<'_, S> {
    /// Before the lock: the commit's signature, against the last applied commit (strict mode
    /// walks every commit since it), which it returns.
    async fn verify(&mut self, client: &impl TenantStore) -> Result<Option<CommitId>, SyncError> {
        let Attempts { ctx, source, snapshot, .. } = *self;
        let last = client.last_applied(source.id()).await?;
        self.verified = Some(match self.verified.take() {
            Some(v) if v.holds_for(ctx, last.as_ref()) => v,
            _ => blocking(|| Verified::check(ctx, source, snapshot, last.as_ref())),
        });
        if let (false, Some(Verified { result: Err(refused), .. })) = (matches!(self.run, Run::Plan), &self.verified) {
            return Err(refused.clone().into());
        }
        Ok(last)
    }

    /// Under the lock: the state, or (rolled back) what must be decoded first, or None when the
    /// signature check no longer holds for the last applied commit.
    async fn lock<T: StoreTx>(&mut self, tx: T) -> Result<Round<T>, SyncError> {
        let Attempts {
            ctx,
            src,
            source,
            snapshot,
            run,
            full,
            prunes,
            ..
        } = *self;
        if !matches!(run, Run::Plan) {
            tx.lock_apply(source.id()).await?;
        }
        let last = tx.last_applied(source.id()).await?;
        if let (
            Run::Apply { allow_non_fast_forward: false }
            | Run::ApplySaved {
                allow_non_fast_forward: false, ..
            },
            Some(new),
            Some(old),
        ) = (run, snapshot.commit.as_ref().and_then(|c| CommitId::parse(&c.id)), &last)
            && !TenantSource::descends_from(source, &new, old)?
        {
            let (new, old) = (new.to_string(), old.to_string());
            return Err(match TenantSource::is_shallow(source) {
                true => SyncError::ShallowClone { new, old },
                false => SyncError::NonFastForward { new, old },
            });
        }
        let scope = scope_of(ctx, src, source, snapshot, &tx, prunes).await?;
        let index = scope.index(&tx, snapshot).await?;
        let selection = select(source, snapshot, &scope, last.as_ref(), index, full, &mut self.changes)?;
        let holds = self.verified.as_ref().is_some_and(|v| v.holds_for(ctx, last.as_ref()));
        if self.decoded.covers(&selection) && holds {
            let state = self.decoded.state(&tx, snapshot, selection, self.key).await?;
            let verified = self.verified.take().expect("checked above");
            return Ok(Round::Locked(Box::new(Locked { tx, last, state, verified })));
        }
        tx.rollback().await?;
        Ok(if holds { Round::Decode(selection) } else { Round::Reverify })
    }

    /// Under the lock: plans, applies unless `run` is `Plan`, reports drift when asked, and
    /// commits.
    async fn conclude<T: StoreTx>(&self, mut locked: Locked<T>, opts: RunOptions) -> Result<Outcome, SyncError> {
        let Attempts {
            ctx, src, source, run, key, ..
        } = *self;
        // Moved into the plan, unless the drift report after the apply needs them too.
        let unchanged = match opts.want_drift {
            true => locked.state.unchanged.clone(),
            false => std::mem::take(&mut locked.state.unchanged),
        };
        let (mut fresh, to_create) = plan_run(ctx, src, &locked, key, unchanged, run, opts)?;
        let mut spill = spill::Spill::default();
        let applied = match run {
            Run::Plan => 0,
            _ => self.apply(&mut locked, &fresh, &to_create, opts, &mut spill).await?,
        };
        let Locked { tx, mut state, verified, .. } = locked;
        // The creates were annotated as they were planned, while writing.
        crate::domain::plan::annotate_embedding(&mut fresh, &state.desired.tenants, ctx.cfg.embedding_endpoint.as_deref());
        let created = spill.finish().map_err(StoreError::Spill)?;
        let drift_report = match opts.want_drift {
            true => {
                self.decoded.unpark_all(&mut state.desired.tenants, std::mem::take(&mut state.parked))?;
                Some(drift_after(&tx, &mut state, applied, key).await?)
            }
            false => None,
        };
        tx.commit().await?;
        if applied > 0 {
            let commit = state.desired.commit.as_ref().map_or("the work tree", |c| c.id.as_str());
            tracing::info!(source = %src.name, commit, applied, "applied");
        }
        Ok(Outcome {
            header: Header {
                commit: state.desired.commit.as_ref().map(|c| c.id.clone()),
                against: "the database".into(),
                signature: verified.describe(ctx.cfg.verify_commits),
            },
            plan: fresh,
            created,
            applied,
            source: source.id().to_string(),
            source_name: src.name.clone(),
            drift: drift_report,
            commit_time: state.desired.commit.map(|c| c.time),
        })
    }

    /// Applies `fresh` and creates the tenants at `to_create` in the locked transaction; the
    /// created tenants' plans go to `spill`.
    async fn apply<T: StoreTx>(
        &self,
        locked: &mut Locked<T>,
        fresh: &Plan,
        to_create: &[usize],
        opts: RunOptions,
        spill: &mut spill::Spill,
    ) -> Result<usize, SyncError> {
        let Attempts {
            ctx, source, snapshot, key, ..
        } = *self;
        let Locked { tx, last, state, verified } = locked;
        let commit = snapshot.commit.clone().unwrap_or_else(CommitInfo::worktree);
        let actx = ApplyContext {
            source: source.id(),
            source_name: &self.src.name,
            commit: &commit,
            actor: ACTOR,
            key,
            // Only when it moves: an upsert that changes nothing still locks the row, and a
            // transaction that wrote must wait for its WAL to reach the disk.
            record_commit: state
                .desired
                .commit
                .as_ref()
                .is_some_and(|c| last.as_ref().map(CommitId::as_str) != Some(c.id.as_str())),
            signer: verified
                .result
                .as_ref()
                .ok()
                .cloned()
                .flatten()
                .map_or(serde_json::Value::Null, |s| serde_json::to_value(s).expect("serialisable")),
            claims: state.claims.clone(),
            embedding_default: ctx.cfg.embedding_endpoint.as_deref(),
            parked: self.decoded.parking().map(|p| p as &dyn store::ParkedDocuments),
        };
        // Nothing reads a created tenant's document after its write unless drift is reported:
        // then it stays, otherwise the write takes it and drops it once written.
        // A parked document is fetched as its chunk is built.
        let moved: Vec<Option<JsonText>> = to_create
            .iter()
            .map(|&i| (!opts.want_drift).then(|| state.desired.tenants[i].take_document()))
            .collect();
        let mut creates: Vec<store::Create> = to_create
            .iter()
            .zip(moved)
            .map(|(&i, moved)| {
                let tenant = &state.desired.tenants[i];
                match moved {
                    Some(doc) => store::Create::Moved(tenant, doc),
                    None => store::Create::Kept(tenant),
                }
            })
            .chain(state.parked.iter().map(store::Create::Parked))
            .collect();
        creates.sort_unstable_by(|a, b| a.tenant().tenant_id.cmp(&b.tenant().tenant_id));
        Ok(tx.apply(fresh, &state.desired.tenants, creates, spill, &actx).await?)
    }

    /// Before the first round, once the commit is verified against `last`: what git changed since
    /// it, so that a run whose rows are as it left them takes the lock and reads the index once.
    fn decode_likely(&mut self, last: Option<&CommitId>) -> Result<(), SyncError> {
        match select::likely(self.source, self.snapshot, last, self.full, &mut self.changes)? {
            Some(selection) => self.decode(&selection),
            None => Ok(()),
        }
    }

    /// Outside the lock: decodes what a round found missing.
    fn decode(&mut self, selection: &select::Selection) -> Result<(), SyncError> {
        self.decoded.extend(self.ctx, self.source, self.snapshot, selection)
    }
}

/// How a round under the lock ended.
enum Round<T> {
    Locked(Box<Locked<T>>),
    /// Rolled back: these files must be decoded first.
    Decode(select::Selection),
    /// Rolled back: the last applied commit moved, and strict verification must run again.
    Reverify,
}

/// The plan of a locked run: the fresh plan, the unchanged tenants, prune and its safety limit,
/// and a saved plan's staleness. An apply leaves out the tenants it creates (returned by their
/// position in the desired tenants): they are planned as they are written, a chunk at a time
/// while the server writes the chunk before, instead of all of them before the first write.
/// `unchanged` becomes the plan's entries for them.
fn plan_run(
    ctx: &Ctx,
    src: &SourceConfig,
    locked: &Locked<impl StoreTx>,
    key: &[u8],
    unchanged: Vec<Unchanged>,
    run: &Run,
    opts: RunOptions,
) -> Result<(Plan, Vec<usize>), SyncError> {
    let State { desired, actual, owned, .. } = &locked.state;
    let popts = PlanOptions {
        key,
        correct_drift: ctx.cfg.drift_policy == DriftPolicy::Correct,
    };
    let rows: BTreeSet<&str> = actual.iter().map(|a| a.tenant_id.as_str()).collect();
    let later = |d: &DesiredTenant| matches!(run, Run::Apply { .. }) && !rows.contains(d.tenant_id.as_str());
    let to_create: Vec<usize> = (0..desired.tenants.len()).filter(|&i| later(&desired.tenants[i])).collect();
    let mut fresh = plan(desired.tenants.iter().filter(|d| !later(d)), actual, popts);
    fresh.tenants.extend(
        unchanged
            .into_iter()
            .map(|u| TenantPlan::unchanged(u.tenant_id, u.file, u.config_version, u.digest)),
    );
    // One entry per tenant, so an unstable sort gives the same order, without a buffer the size
    // of the plan.
    fresh.tenants.sort_unstable_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    if let Some(owned) = owned {
        let states: BTreeMap<&str, &str> = actual.iter().map(|a| (a.tenant_id.as_str(), a.state.as_str())).collect();
        fresh.prune(|id| owned.get(id).cloned(), |id| states.get(id).map(|s| s.to_string()));
        let refusal = crate::domain::plan::mass_prune_refusal(fresh.summary().decommission, owned.len(), src.prune_max_fraction);
        if let (Some(why), false) = (refusal, opts.allow_mass_prune) {
            return Err(SyncError::MassPrune { name: src.name.clone(), why });
        }
    }
    if let Run::ApplySaved { saved, .. } = run {
        let reasons = stale_reasons(&saved.plan, &fresh);
        if !reasons.is_empty() {
            return Err(SyncError::Stale(reasons));
        }
    }
    Ok((fresh, to_create))
}

/// Drift as the run leaves it: the rows it wrote read again, in its transaction.
async fn drift_after(tx: &impl TenantStore, state: &mut State, applied: usize, key: &[u8]) -> Result<Vec<TenantDrift>, SyncError> {
    let after = if applied > 0 {
        let ids: BTreeSet<String> = state
            .actual
            .iter()
            .map(|a| a.tenant_id.clone())
            .chain(state.desired.tenants.iter().map(|d| d.tenant_id.clone()))
            .collect();
        tx.rows(&ids.into_iter().collect::<Vec<_>>()).await?
    } else {
        state.actual.clone()
    };
    Ok(with_unchanged(drift(&state.desired.tenants, &after, key), std::mem::take(&mut state.unchanged)))
}

fn snapshot_of(source: &impl TenantSource, rev: Option<&str>, worktree: bool) -> Result<Snapshot, SyncError> {
    Ok(if worktree {
        source.worktree()?
    } else {
        source.snapshot_at(&source.commit_of(rev)?)?
    })
}

/// As [`snapshot_of`], for a source that has applied before: its tenant directory gone is every
/// tenant gone (which prune's safety limit is for), not a configuration mistake.
async fn snapshot_for(source: &impl TenantSource, rev: Option<&str>, worktree: bool, db: &impl TenantStore) -> Result<Snapshot, SyncError> {
    match blocking(|| snapshot_of(source, rev, worktree)) {
        Err(SyncError::Source(SourceError::NoTenantDir { .. })) if !worktree && db.last_applied(source.id()).await?.is_some() => {
            Ok(blocking(|| source.empty_at(&source.commit_of(rev)?))?)
        }
        other => other,
    }
}

/// A commit's signature check, and the last applied commit it was made against (strict mode
/// checks every commit since it).
struct Verified {
    against: Option<CommitId>,
    result: Result<Option<crate::verify::CommitSigner>, crate::verify::Refused>,
}

impl Verified {
    fn check(ctx: &Ctx, source: &impl TenantSource, snapshot: &Snapshot, last: Option<&CommitId>) -> Verified {
        let result = match snapshot.commit.as_ref().and_then(|c| CommitId::parse(&c.id)) {
            None => Ok(None),
            Some(new) => source.verify(ctx.cfg.verify_commits, last, &new, &ctx.signers),
        };
        Verified {
            against: last.cloned(),
            result,
        }
    }

    fn holds_for(&self, ctx: &Ctx, last: Option<&CommitId>) -> bool {
        ctx.cfg.verify_commits != crate::domain::commit::VerifyMode::Strict || self.against.as_ref() == last
    }

    /// For a plan's header.
    fn describe(&self, mode: crate::domain::commit::VerifyMode) -> Option<String> {
        signature_words(mode, &self.result)
    }
}

/// A signature check in words, for a plan's header (none when verification is off).
pub fn signature_words(
    mode: crate::domain::commit::VerifyMode,
    result: &Result<Option<crate::verify::CommitSigner>, crate::verify::Refused>,
) -> Option<String> {
    match result {
        _ if mode == crate::domain::commit::VerifyMode::Off => None,
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

fn with_unchanged(mut report: Vec<TenantDrift>, unchanged: Vec<Unchanged>) -> Vec<TenantDrift> {
    report.extend(
        unchanged
            .into_iter()
            .map(|u| TenantDrift::known_in_sync(u.tenant_id, u.file, u.config_version, u.applied_commit.as_deref().map(str::to_string))),
    );
    report.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    report
}

/// `plan --against-ref`: the change between two revisions, without a database.
pub fn plan_against_ref(ctx: &Ctx, source: &impl TenantSource, src: &SourceConfig, base_rev: &str) -> Result<(Header, Plan), SyncError> {
    let desired = read_desired(source, src, ctx, ctx.cfg.worktree, true)?;
    if !desired.issues.is_empty() {
        return Err(SyncError::Invalid {
            at: desired.at(),
            issues: desired.issues,
        });
    }
    let base = source.commit_of(Some(base_rev))?;
    let actual = tenants_at(ctx, source, &base)?;
    let p = plan_between_revisions(&desired.tenants, &actual, ctx.cfg.embedding_endpoint.as_deref());
    // Would the merge pass verification? In strict mode, every commit since the base.
    let signature = match desired.commit.as_ref().and_then(|c| CommitId::parse(&c.id)) {
        Some(new) => signature_words(ctx.cfg.verify_commits, &source.verify(ctx.cfg.verify_commits, Some(&base), &new, &ctx.signers)),
        None => None,
    };
    let header = Header {
        commit: desired.commit.map(|c| c.id),
        against: format!("ref {base_rev} ({})", &base.as_str()[..12]),
        signature,
    };
    Ok((header, p))
}

/// The tenants at a base revision, as rows to plan against; its invalid files count as absent.
fn tenants_at(ctx: &Ctx, source: &impl TenantSource, base_commit: &CommitId) -> Result<Vec<ActualTenant>, SyncError> {
    let base = match source.snapshot_at(base_commit) {
        Ok(s) => decode_from(source, &s, &ReadOptions::from_ctx(ctx), None)?,
        // A base without the tenant directory (the PR adds it) has no tenants.
        Err(SourceError::NoTenantDir { .. }) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    if !base.issues.is_empty() {
        tracing::warn!(
            problems = base.issues.len(),
            "some tenant files at the base revision are invalid; they are compared as absent"
        );
    }
    Ok(base
        .tenants
        .into_iter()
        .map(|t| {
            let (meta, document) = t.into_parts();
            ActualTenant {
                document,
                tenant_id: meta.tenant_id,
                state: String::new(),
                config_version: 0,
                applied: None,
                known_secrets: std::sync::Arc::unwrap_or_clone(meta.secrets),
                updated_at: None,
            }
        })
        .collect())
}

/// What merging would change: a plan between two revisions, without the versions and digests
/// that only a database has.
fn plan_between_revisions(desired: &[DesiredTenant], actual: &[ActualTenant], embedding_default: Option<&str>) -> Plan {
    // Digests never leave this process here, so any key will do.
    let options = PlanOptions {
        key: &[0; 32],
        correct_drift: true,
    };
    let mut p = plan(desired, actual, options);
    crate::domain::plan::annotate_embedding(&mut p, desired, embedding_default);
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
    p
}

/// The drift report for the configured revision.
pub async fn drift_report<S: TenantSource>(
    ctx: &Ctx,
    source: &S,
    db: &mut impl Store,
    src: &SourceConfig,
    full: bool,
) -> Result<(Header, Vec<TenantDrift>), SyncError> {
    follow_respelling(src, source.id(), db).await?;
    let snapshot = snapshot_for(source, src.git_ref.as_deref(), ctx.cfg.worktree, db).await?;
    blocking(|| read::prove_identities(ctx, src, source, &snapshot))?;
    let key = db.digest_key().await?;
    let State {
        desired, actual, unchanged, ..
    } = read_state(ctx, src, source, &snapshot, db, full, &key).await?;
    let report = with_unchanged(drift(&desired.tenants, &actual, &key), unchanged);
    Ok((
        Header {
            commit: desired.commit.map(|c| c.id),
            against: "the database".into(),
            signature: None,
        },
        report,
    ))
}
