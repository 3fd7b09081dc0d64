//! What the orchestration needs from its adapters, and no more: a source of tenant files at
//! commits, and a store of rows. `sync` is written against these; [`Source`] implements the first,
//! and any `tokio_postgres::GenericClient` (a client, or a transaction holding the apply lock) the
//! second. A new kind of source or backend implements these, not a new path through `run`.

use crate::domain::commit::CommitId;
use crate::domain::plan::ActualTenant;
use crate::source::{BodyReader, Source, SourceError, SourceFile};
use crate::store::{self, Owner, RowIndex, StoreError};
use crate::verify::{CommitSigner, Refused, TrustedSigners, VerifyMode};
use git2::Oid;
use std::collections::{BTreeMap, BTreeSet};

pub trait TenantSource {
    /// Stable identity: the repository without credentials, '#', the tenant path.
    fn id(&self) -> &str;
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

impl ReadBody for BodyReader {
    fn read(&self, file: &mut SourceFile) -> Result<(), SourceError> {
        BodyReader::read(self, file)
    }
}

fn oid(c: &CommitId) -> Oid {
    Oid::from_str(c.as_str()).expect("a CommitId is hex")
}

impl TenantSource for Source {
    fn id(&self) -> &str {
        &self.id
    }

    fn body_reader(&self) -> impl ReadBody {
        Source::body_reader(self)
    }

    fn descends_from(&self, new: &CommitId, old: &CommitId) -> Result<bool, SourceError> {
        Source::descends_from(self, oid(new), old.as_str())
    }

    fn is_shallow(&self) -> bool {
        Source::is_shallow(self)
    }

    fn changed_files(&self, old: &CommitId, new: &CommitId) -> Result<Option<BTreeSet<String>>, SourceError> {
        Source::changed_files(self, old.as_str(), oid(new))
    }

    fn verify(&self, mode: VerifyMode, last: Option<&CommitId>, new: &CommitId, signers: &TrustedSigners) -> Result<Option<CommitSigner>, Refused> {
        Source::verify(self, mode, last.map(CommitId::as_str), oid(new), signers)
    }
}

/// Used with concrete clients only (never boxed or sent across tasks by type), so the futures'
/// auto traits are those of the implementation.
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

impl<C: tokio_postgres::GenericClient + Sync> TenantStore for C {
    async fn last_applied(&self, source: &str) -> Result<Option<CommitId>, StoreError> {
        Ok(store::last_applied_commit(self, source).await?.as_deref().and_then(CommitId::parse))
    }

    async fn index(&self, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError> {
        store::load_index(self, source, unowned_ids).await
    }

    async fn foreign_owners(&self, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError> {
        store::foreign_owners(self, source, ids).await
    }

    async fn rows(&self, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError> {
        store::load_actual_for(self, ids).await
    }
}
