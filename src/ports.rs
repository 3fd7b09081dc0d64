//! What orchestration needs from its adapters, and no more: a source of tenant files at commits,
//! and a store of rows that applies a plan in one transaction. `sync` is written against these
//! traits and never names git, PostgreSQL or a pool; `source::Source` implements the first, and
//! `store::Db` (a connection) with `store::Tx` (its transaction) the others. Tests drive `sync`
//! with in-memory implementations. The types the ports carry (files, rows, errors) are plain data
//! of the adapters' modules.

use crate::domain::commit::CommitId;
use crate::domain::commit::VerifyMode;
use crate::domain::plan::{ActualTenant, Plan};
use crate::domain::tenant::DesiredTenant;
use crate::source::{Snapshot, SourceError, SourceFile};
use crate::store::{ApplyContext, Create, CreatedSink, Owner, RowIndex, StoreError};
use crate::verify::{CommitSigner, Refused, TrustedSigners};
use std::collections::{BTreeMap, BTreeSet};

pub trait TenantSource {
    /// Stable identity: the repository without credentials, '#', the tenant path.
    fn id(&self) -> &str;
    /// The commit a revision names (None: the default branch).
    fn commit_of(&self, rev: Option<&str>) -> Result<CommitId, SourceError>;
    /// The tenant files at `commit`, listed (bodies may be read later, by [`ReadBody`]).
    fn snapshot_at(&self, commit: &CommitId) -> Result<Snapshot, SourceError>;
    /// `commit` without any tenant file: the tenant directory was deleted.
    fn empty_at(&self, commit: &CommitId) -> Result<Snapshot, SourceError>;
    /// The tenant files as they are on disk, uncommitted.
    fn worktree(&self) -> Result<Snapshot, SourceError>;
    /// Reads the bodies of listed files, under the size limit, for every thread that decodes them.
    fn body_reader(&self) -> impl ReadBody;
    /// Whether `new` is `old` or descends from it; a commit the source does not have is not.
    fn descends_from(&self, new: &CommitId, old: &CommitId) -> Result<bool, SourceError>;
    /// Whether the repository is a shallow clone, whose history stops before its first commits.
    fn is_shallow(&self) -> bool;
    /// The tenant files that differ between two commits; None when `old` is unknown.
    fn changed_files(&self, old: &CommitId, new: &CommitId) -> Result<Option<BTreeSet<String>>, SourceError>;
    /// Whether `new` passes signature verification, `last` being the last applied commit.
    fn verify(&self, mode: VerifyMode, last: Option<&CommitId>, new: &CommitId, signers: &TrustedSigners) -> Result<Option<CommitSigner>, Refused>;
}

/// Fills in a listed file's body (a file read already is left as it is); shared by the threads
/// decoding files.
pub trait ReadBody: Sync {
    fn read(&self, file: &mut SourceFile) -> Result<(), SourceError>;
}

/// The reads a run makes, on a connection or inside its transaction.
///
/// Used with concrete types only (never boxed or sent across tasks by type), so the futures' auto
/// traits are those of the implementation.
#[allow(async_fn_in_trait)]
pub trait TenantStore {
    /// The last commit applied from `source`; a stored value that is not a commit id counts as none.
    async fn last_applied(&self, source: &str) -> Result<Option<CommitId>, StoreError>;
    /// The rows `source` owns, and the unowned ones (all, or those of `unowned_ids`), without
    /// their documents.
    async fn index(&self, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError>;
    /// Which of `ids` other sources own.
    async fn foreign_owners(&self, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError>;
    /// The rows of `ids` in full.
    async fn rows(&self, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError>;
}

/// A connection a run holds: reads, the source bookkeeping outside any apply, and transactions.
#[allow(async_fn_in_trait)]
pub trait Store: TenantStore {
    type Tx<'t>: StoreTx
    where
        Self: 't;
    async fn begin(&mut self) -> Result<Self::Tx<'_>, StoreError>;
    /// The key of the digests that stand for secret values; it never leaves the database.
    async fn digest_key(&self) -> Result<Vec<u8>, StoreError>;
    /// Source ids other than `id` under which the source named `name` recorded tenants.
    async fn other_spellings(&self, name: &str, id: &str) -> Result<Vec<String>, StoreError>;
    /// Moves what was recorded under source id `old` to `new`, in a transaction of its own;
    /// returns how many tenants moved.
    async fn respell(&mut self, old: &str, new: &str) -> Result<u64, StoreError>;
}

/// One transaction: everything a run applies commits together or not at all.
#[allow(async_fn_in_trait)]
pub trait StoreTx: TenantStore {
    /// Waits for the source's apply lock, held until the transaction ends: two runs of one
    /// source never plan against the same rows.
    async fn lock_apply(&self, source: &str) -> Result<(), StoreError>;
    /// Writes `plan`'s changes and creates `creates` (their plans go to `created`), with their
    /// audit events, the owners and the applied commit; returns how many tenants it wrote.
    async fn apply(
        &self,
        plan: &Plan,
        desired: &[DesiredTenant],
        creates: Vec<Create<'_>>,
        created: &mut dyn CreatedSink,
        ctx: &ApplyContext<'_>,
    ) -> Result<usize, StoreError>;
    async fn commit(self) -> Result<(), StoreError>;
    async fn rollback(self) -> Result<(), StoreError>;
}
