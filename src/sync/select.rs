//! What a run reads: the rows of its source and the files that can differ from what it last
//! applied, decoded before the apply lock.

use super::park::Parking;
use super::read::decode_parked;
use super::{Ctx, Desired, ReadOptions, SyncError};
use crate::blocking;
use crate::config::SourceConfig;
use crate::domain::commit::CommitId;
use crate::domain::issue::Issue;
use crate::domain::plan::{ActualTenant, in_step};
use crate::domain::tenant::{DesiredTenant, Held, ParkedTenant};
use crate::ports::{TenantSource, TenantStore};
use crate::source::{Snapshot, SourceError};
use crate::store;
use crate::store::ParkedDocuments;
use futures_util::StreamExt;
use rayon::iter::{Either, IntoParallelIterator, IntoParallelRefIterator, ParallelIterator};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A tenant as git says, as the agent wrote it: its file did not change since the last applied
/// commit and its row did not change since (known from the index, without reading either), or
/// both were read and found in step.
#[derive(Clone)]
pub struct Unchanged {
    pub tenant_id: String,
    pub file: String,
    pub config_version: i64,
    pub digest: String,
    /// The commit its applied record names.
    pub applied_commit: Option<Arc<str>>,
}

/// What a run works from.
pub(super) struct State {
    /// The files that may differ from what was applied, decrypted and checked, their documents in
    /// memory: every tenant with a row to compare, and the new ones that were not parked.
    pub desired: Desired,
    /// New tenants whose documents wait outside memory until their write (an apply's), in tenant
    /// order.
    pub parked: Vec<ParkedTenant>,
    /// The rows of every tenant that is not `unchanged` (orphans included), in full.
    pub actual: Vec<ActualTenant>,
    pub unchanged: Vec<Unchanged>,
    /// The tenants this source owns, with the file each was claimed from; only for a run that
    /// prunes (a map of every row, which nothing else reads).
    pub owned: Option<BTreeMap<String, String>>,
    /// Files of tenants that exist and nobody owns yet: this source claims them when it applies.
    pub claims: Vec<(String, String)>,
}

/// What a run must read: only what can differ from what the agent last applied, i.e. the files git
/// changed since the last applied commit and those of tenants without a record or whose row moved
/// since. So a sync's cost follows what changed, not the number of tenants. Without a usable last
/// commit (the first run, a rewritten history, the work tree) everything is read.
pub(super) struct Selection {
    /// Files to decode; None: all of them.
    read: Option<BTreeSet<String>>,
    /// The rows of this source's tenants to load in full.
    rows: Vec<String>,
    unchanged: Vec<Unchanged>,
    /// As in [`State`].
    owned: Option<BTreeMap<String, String>>,
    /// Files of tenants that exist and nobody owns yet: this source claims them when it applies.
    claims: Vec<(String, String)>,
}

/// Which rows a run over one source works on.
pub(super) struct Scope<'a> {
    id: &'a str,
    name: &'a str,
    adopts_unowned: bool,
    /// Whether the run prunes the tenants whose files were deleted.
    prunes: bool,
    /// Tenants other sources own.
    foreign: BTreeMap<String, store::Owner>,
}

fn stems(snapshot: &Snapshot) -> Vec<&str> {
    snapshot.files.iter().map(|f| f.stem()).collect()
}

impl Scope<'_> {
    /// The index of this source's rows, and of the unowned ones it reports or claims.
    pub(super) async fn index(&self, client: &impl TenantStore, snapshot: &Snapshot) -> Result<Vec<store::RowIndex>, SyncError> {
        let unowned = (!self.adopts_unowned).then(|| stems(snapshot));
        Ok(client.index(self.id, unowned.as_deref()).await?)
    }

    /// A file here whose tenant another source owns is refused, naming both.
    fn claims_refused(&self, snapshot: &Snapshot) -> Vec<Issue> {
        snapshot
            .files
            .iter()
            .filter_map(|f| {
                let o = self.foreign.get(f.stem())?;
                Some(Issue::new(
                    &f.path,
                    format!(
                        "tenant_id {:?} belongs to source {o} (file {}); this file in source {} ({}) claims it too: nothing of it changes. Delete one, or move the tenant with `frostbyte-gitops tenant move {} --to {}`",
                        f.stem(),
                        if o.file.is_empty() { "not recorded" } else { &o.file },
                        self.name,
                        self.id,
                        f.stem(),
                        self.name
                    ),
                ))
            })
            .collect()
    }
}

/// The tenant files git changed between a last applied commit and the snapshot's, worked out once
/// for each last applied commit a run is compared with (a diff of a large tenant directory's trees
/// is a tenth of a second).
#[derive(Default)]
pub(super) struct Changes(Option<(CommitId, Option<BTreeSet<String>>)>);

impl Changes {
    /// None when they cannot be told from git: the work tree, a commit that does not descend from
    /// `last`, or `last` unknown here.
    fn since(&mut self, source: &impl TenantSource, snapshot: &Snapshot, last: &CommitId) -> Result<Option<&BTreeSet<String>>, SyncError> {
        if self.0.as_ref().is_none_or(|(seen, _)| seen != last) {
            let changed = match snapshot.commit.as_ref().and_then(|c| CommitId::parse(&c.id)) {
                Some(new) => blocking(|| -> Result<_, SourceError> {
                    match source.descends_from(&new, last)? {
                        true => source.changed_files(last, &new),
                        false => Ok(None),
                    }
                })?,
                None => None,
            };
            self.0 = Some((last.clone(), changed));
        }
        Ok(self.0.as_ref().and_then(|(_, changed)| changed.as_ref()))
    }
}

pub(super) fn select(
    source: &impl TenantSource,
    snapshot: &Snapshot,
    scope: &Scope<'_>,
    last: Option<&CommitId>,
    index: Vec<store::RowIndex>,
    full: bool,
    changes: &mut Changes,
) -> Result<Selection, SyncError> {
    // Looked up only for rows nobody owns: when every row has its owner it is never built.
    let stems = std::cell::LazyCell::new(|| snapshot.files.iter().map(|f| (f.stem(), f.path.as_str())).collect::<BTreeMap<_, _>>());
    let mine = |r: &store::RowIndex| r.owned || scope.adopts_unowned || stems.contains_key(r.tenant_id.as_str());
    let index: Vec<store::RowIndex> = index.into_iter().filter(mine).collect();
    let owned = scope.prunes.then(|| {
        index
            .iter()
            .filter_map(|r| r.owned_file().map(|f| (r.tenant_id.clone(), f.to_string())))
            .collect()
    });
    let claims: Vec<(String, String)> = index
        .iter()
        .filter(|r| !r.owned)
        .filter_map(|r| stems.get(r.tenant_id.as_str()).map(|f| (r.tenant_id.clone(), f.to_string())))
        .collect();
    let changed = match last {
        Some(last) if !full => changes.since(source, snapshot, last)?,
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
    let trusted = trusted_records(source, &index, last.expect("a last applied commit when there is a diff"))?;
    let (read, unchanged, rows) = match_files(snapshot, index, changed, &trusted);
    tracing::debug!(decrypting = read.len(), unchanged = unchanged.len(), "incremental read");
    Ok(Selection {
        read: Some(read),
        rows,
        unchanged,
        owned,
        claims,
    })
}

/// Each file against its row: unchanged when git did not change it since a trusted commit applied
/// it and the row is as that apply left it; otherwise it is read. Gives the files to read, the
/// unchanged rows, and the tenant ids of the rows left.
fn match_files(
    snapshot: &Snapshot,
    mut index: Vec<store::RowIndex>,
    changed: &BTreeSet<String>,
    trusted: &BTreeSet<String>,
) -> (BTreeSet<String>, Vec<Unchanged>, Vec<String>) {
    // Sorted and searched rather than put in a map: a no-op run of a large source does this for
    // every file. Files come in git's order, which is nearly always the stems' order, so the row
    // after the last one found is tried before a search.
    index.sort_unstable_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    let mut taken = vec![false; index.len()];
    let mut read = BTreeSet::new();
    let mut next = 0;
    for f in &snapshot.files {
        let pos = match index.get(next) {
            Some(r) if r.tenant_id == f.stem() => Ok(next),
            _ => index.binary_search_by(|r| r.tenant_id.as_str().cmp(f.stem())),
        };
        next = pos.map_or(next, |p| p + 1);
        let same = pos.ok().filter(|p| {
            let r = &index[*p];
            let from_here = r.applied_commit.as_deref().is_some_and(|commit| trusted.contains(commit));
            !taken[*p]
                && r.applied
                    .as_ref()
                    .is_some_and(|(file, version, _)| from_here && !changed.contains(&f.path) && *file == f.path && !r.touched && *version == r.config_version)
        });
        match same {
            Some(p) => taken[p] = true,
            None => {
                read.insert(f.path.clone());
            }
        }
    }
    // Moved out once the searches are done (an emptied tenant_id would mislead them). The rows
    // left first; then the unchanged ones, collected from the index's own iterator, which builds
    // them in its memory instead of beside it (10 MB at 100,000 rows, at a no-op run's peak).
    let rows = index
        .iter_mut()
        .zip(&taken)
        .filter(|(_, t)| !**t)
        .map(|(r, _)| std::mem::take(&mut r.tenant_id))
        .collect();
    let mut unchanged: Vec<Unchanged> = index
        .into_iter()
        .enumerate()
        .filter(|(i, _)| taken[*i])
        .map(|(_, r)| {
            let (file, config_version, digest) = r.applied.expect("checked above");
            Unchanged {
                tenant_id: r.tenant_id,
                file,
                config_version,
                digest,
                applied_commit: r.applied_commit,
            }
        })
        .collect();
    // The index's buffer, sized for its larger entries: what is not used goes back (8 MB at
    // 100,000 rows, held until the plan's entries were made beside it).
    unchanged.shrink_to_fit();
    (read, unchanged, rows)
}

/// The files a run will most likely decode, known before the lock is taken and without the index:
/// those git changed since the last applied commit (every file for a first run, `--full` or the
/// work tree). The round under the lock reads the index and decodes more only if rows moved since
/// they were applied. None when the commit does not descend from the last applied one: that round
/// decides, and refuses a rewritten history unless asked not to, before anything is decoded.
pub(super) fn likely(
    source: &impl TenantSource,
    snapshot: &Snapshot,
    last: Option<&CommitId>,
    full: bool,
    changes: &mut Changes,
) -> Result<Option<Selection>, SyncError> {
    let read = match last {
        Some(last) if !full && snapshot.commit.is_some() => match changes.since(source, snapshot, last)? {
            Some(changed) => Some(snapshot.files.iter().filter(|f| changed.contains(&f.path)).map(|f| f.path.clone()).collect()),
            None => return Ok(None),
        },
        _ => None,
    };
    Ok(Some(Selection {
        read,
        rows: vec![],
        unchanged: vec![],
        owned: None,
        claims: vec![],
    }))
}

/// The commits of applied records that can stand for what git has without a read: records this
/// source wrote from the last applied commit or one of its ancestors. A record from the work tree
/// (`apply --worktree`), another source or a history that was rewritten is not trusted.
fn trusted_records(source: &impl TenantSource, index: &[store::RowIndex], last: &CommitId) -> Result<BTreeSet<String>, SyncError> {
    let commits: BTreeSet<&str> = index.iter().filter_map(|r| r.applied_commit.as_deref()).collect();
    let mut trusted = BTreeSet::new();
    for commit in commits {
        let Some(id) = CommitId::parse(commit) else { continue };
        if id == *last || blocking(|| source.descends_from(last, &id))? {
            trusted.insert(commit.to_string());
        }
    }
    Ok(trusted)
}

/// The tenant files decoded so far in a run.
#[derive(Default)]
pub(super) struct Decoded {
    all: bool,
    files: BTreeSet<String>,
    tenants: Vec<Held>,
    /// Whether documents are parked: in a file made when the first ones are decoded (a run with
    /// nothing to decode makes none).
    park: bool,
    /// Where the documents wait, when they are parked.
    parking: Option<Parking>,
}

impl Decoded {
    /// With `park`, documents wait outside memory from their decoding until they are needed
    /// (unless no temporary file can be made: then they stay).
    pub(super) fn new(park: bool) -> Decoded {
        Decoded { park, ..Decoded::default() }
    }

    pub(super) fn parking(&self) -> Option<&Parking> {
        self.parking.as_ref()
    }

    /// Decodes the files `selection` needs that are not decoded yet. Any problem in any of them
    /// ends the run: nothing is applied.
    pub(super) fn extend(&mut self, ctx: &Ctx, source: &impl TenantSource, snapshot: &Snapshot, selection: &Selection) -> Result<(), SyncError> {
        if self.covers(selection) {
            return Ok(());
        }
        let missing: Option<BTreeSet<String>> = selection.read.as_ref().map(|r| r.difference(&self.files).cloned().collect());
        tracing::debug!(files = missing.as_ref().map_or(snapshot.files.len(), BTreeSet::len), "decoding tenant files");
        if std::mem::take(&mut self.park) {
            self.parking = Parking::new()
                .inspect_err(|e| tracing::debug!(error = %e, "no temporary file: decoded documents stay in memory"))
                .ok();
        }
        let opts = ReadOptions::from_ctx(ctx);
        let desired = blocking(|| decode_parked(source, snapshot, &opts, missing.as_ref(), self.parking.as_ref()))?;
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

    pub(super) fn covers(&self, selection: &Selection) -> bool {
        self.all || selection.read.as_ref().is_some_and(|r| r.is_subset(&self.files))
    }

    /// The state a run plans from: the decoded tenants the selection reads, and their rows.
    /// Moves the documents out (they are the largest thing a run holds): a run plans once. A row
    /// [`in_step`] with its file is kept only as an [`Unchanged`], its document dropped with the
    /// file's, so a run that reads every row holds those that differ, not all of them.
    pub(super) async fn state(&mut self, client: &impl TenantStore, snapshot: &Snapshot, selection: Selection, key: &[u8]) -> Result<State, SyncError> {
        let mut tenants: Vec<Held> = std::mem::take(&mut self.tenants)
            .into_iter()
            .filter(|t| selection.read.as_ref().is_none_or(|r| r.contains(&t.file)))
            .collect();
        tenants.sort_unstable_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
        let Selection {
            rows,
            mut unchanged,
            owned,
            claims,
            ..
        } = selection;
        let (mut actual, mut kept) = (Vec::new(), vec![true; tenants.len()]);
        // The next chunk is on its way while this one is compared.
        let mut chunks = futures_util::stream::iter(rows.chunks(ROWS_CHUNK))
            .map(|ids| async move { (ids, client.rows(ids).await) })
            .buffered(2);
        while let Some((ids, read)) = chunks.next().await {
            let read = read?;
            // A parked document comes back for its row's chunk, and one in step with its row is
            // dropped with it: a run that reads every row holds those that differ, not all.
            let chunk = positions_of(&tenants, ids);
            self.unpark(&mut tenants, chunk)?;
            let (steps, differ) = crate::blocking(|| fold(&tenants, read, key));
            for (i, u) in steps {
                kept[i] = false;
                unchanged.push(u);
            }
            actual.extend(differ);
        }
        // In place, without a second list of the tenants; the in-step ones' documents go with them.
        let mut kept = kept.into_iter();
        tenants.retain(|_| kept.next().unwrap_or(true));
        // What is still parked had no row to compare with: new tenants, written from where they are.
        let (mut here, mut parked) = (Vec::with_capacity(tenants.len()), Vec::new());
        for t in tenants {
            match t {
                Held::Here(t) => here.push(t),
                Held::Parked(t) => parked.push(t),
            }
        }
        // A duplicate file for an unchanged tenant is an issue when decoding; nothing stands in twice.
        Ok(State {
            desired: Desired {
                commit: snapshot.commit.clone(),
                tenants: here,
                issues: vec![],
                files: snapshot.files.len(),
            },
            parked,
            actual,
            unchanged,
            owned,
            claims,
        })
    }
}

impl Decoded {
    /// The documents of `tenants` at `positions`, fetched back where they are parked (on every
    /// core): to be compared with their rows and planned, or reported on after the apply.
    fn unpark(&self, tenants: &mut [Held], positions: Vec<usize>) -> Result<(), SyncError> {
        let fetch = |&i: &usize| match &tenants[i] {
            Held::Parked(t) => Some(self.fetch(t).map(|doc| (i, doc))),
            Held::Here(_) => None,
        };
        let fetched = crate::blocking(|| positions.par_iter().filter_map(fetch).collect::<Result<Vec<_>, _>>())?;
        for (i, doc) in fetched {
            tenants[i].unpark(doc);
        }
        Ok(())
    }

    fn fetch(&self, t: &ParkedTenant) -> Result<crate::domain::json::JsonText, SyncError> {
        let fetched = match &self.parking {
            Some(parking) => parking.fetch(t.at()),
            None => Err(std::io::Error::other("the run parked no documents")),
        };
        Ok(fetched.map_err(|e| store::StoreError::parked(&t.tenant_id, e))?)
    }

    /// Every document still parked, fetched back: a drift report after the apply reads the
    /// created tenants' documents. `tenants` stays in tenant order.
    pub(super) fn unpark_all(&self, tenants: &mut Vec<DesiredTenant>, parked: Vec<ParkedTenant>) -> Result<(), SyncError> {
        let fetched = crate::blocking(|| parked.par_iter().map(|t| self.fetch(t)).collect::<Result<Vec<_>, _>>())?;
        tenants.extend(parked.into_iter().zip(fetched).map(|(t, doc)| t.unpark(doc)));
        tenants.sort_unstable_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
        Ok(())
    }
}

/// The positions in `tenants` (sorted by id) of the tenants `ids` name.
fn positions_of(tenants: &[Held], ids: &[String]) -> Vec<usize> {
    ids.iter()
        .filter_map(|id| tenants.binary_search_by(|t| t.tenant_id.as_str().cmp(id)).ok())
        .collect()
}

/// Rows read in full come this many at a time: all at once, a full read of 100,000 held every
/// row twice over (the database's reply, then the rows made of it).
const ROWS_CHUNK: usize = 1_000;

/// `rows` split into those in step with their files (with the position of the file in `tenants`,
/// sorted by tenant), as [`Unchanged`], and the rest.
fn fold(tenants: &[Held], rows: Vec<ActualTenant>, key: &[u8]) -> (Vec<(usize, Unchanged)>, Vec<ActualTenant>) {
    rows.into_par_iter().partition_map(|a| {
        let file = tenants
            .binary_search_by(|d| d.tenant_id.as_str().cmp(&a.tenant_id))
            .ok()
            .filter(|&i| matches!(&tenants[i], Held::Here(d) if in_step(d, &a, key)));
        match (file, a) {
            (
                Some(i),
                ActualTenant {
                    tenant_id,
                    config_version,
                    applied: Some(rec),
                    ..
                },
            ) => Either::Left((
                i,
                Unchanged {
                    tenant_id,
                    file: tenants[i].file.clone(),
                    config_version,
                    digest: rec.digest,
                    applied_commit: Some(rec.commit_id.into()),
                },
            )),
            (_, a) => Either::Right(a),
        }
    })
}

/// The rows a run over `src` works on, as the database has them now; a file claiming a tenant
/// another source owns is a problem of the run.
pub(super) async fn scope_of<'a>(
    ctx: &Ctx,
    src: &'a SourceConfig,
    source: &'a impl TenantSource,
    snapshot: &Snapshot,
    client: &impl TenantStore,
    prunes: bool,
) -> Result<Scope<'a>, SyncError> {
    let scope = Scope {
        id: source.id(),
        name: &src.name,
        adopts_unowned: ctx.adopts_unowned(src),
        prunes,
        foreign: client.foreign_owners(source.id(), &stems(snapshot)).await?,
    };
    // A source whose spelling changed to another repository or path: said once, not once for
    // every tenant it had claimed.
    let renamed: BTreeSet<&str> = scope
        .foreign
        .values()
        .filter(|o| o.name.as_deref() == Some(&src.name))
        .map(|o| o.source.as_str())
        .collect();
    if let Some(old) = renamed.first() {
        return Err(SyncError::Usage(format!(
            "source {name} now reads {id}, but {n} of its tenants were claimed when it read {old}, which is another repository or path: \
             nothing was applied. Set the source back to what it read, or give it another name and move the tenants to it with \
             `frostbyte-gitops tenant move ID --to NAME`",
            name = src.name,
            id = scope.id,
            n = scope.foreign.values().filter(|o| o.source == *old).count(),
        )));
    }
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
pub(super) async fn read_state(
    ctx: &Ctx,
    src: &SourceConfig,
    source: &impl TenantSource,
    snapshot: &Snapshot,
    client: &impl TenantStore,
    full: bool,
    key: &[u8],
) -> Result<State, SyncError> {
    let last = client.last_applied(source.id()).await?;
    let scope = scope_of(ctx, src, source, snapshot, client, false).await?;
    let index = scope.index(client, snapshot).await?;
    let selection = select(source, snapshot, &scope, last.as_ref(), index, full, &mut Changes::default())?;
    let mut decoded = Decoded::default();
    decoded.extend(ctx, source, snapshot, &selection)?;
    decoded.state(client, snapshot, selection, key).await
}
