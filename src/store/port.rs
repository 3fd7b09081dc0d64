//! PostgreSQL behind the ports orchestration is written against: [`Db`] is a pooled connection,
//! [`Tx`] a transaction on it.

use super::{ApplyContext, Create, CreatedSink, Owner, RowIndex, StoreError, q};
use crate::domain::commit::CommitId;
use crate::domain::plan::{ActualTenant, Plan};
use crate::domain::tenant::DesiredTenant;
use crate::ports::{Store, StoreTx, TenantStore};
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

/// A connection from the pool, for one run.
pub struct Db(deadpool_postgres::Object);

impl Db {
    pub fn new(client: deadpool_postgres::Object) -> Db {
        Db(client)
    }

    /// The driver's client, for the commands outside a run (`tenant move`, `audit verify`).
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.0
    }
}

/// A transaction of a [`Db`]; dropped without [`StoreTx::commit`], it rolls back.
pub struct Tx<'c>(deadpool_postgres::Transaction<'c>);

impl<C: GenericClient + Sync> TenantStore for C {
    async fn last_applied(&self, source: &str) -> Result<Option<CommitId>, StoreError> {
        Ok(super::last_applied_commit(self, source).await?.as_deref().and_then(CommitId::parse))
    }

    async fn index(&self, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError> {
        super::load_index(self, source, unowned_ids).await
    }

    async fn foreign_owners(&self, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError> {
        super::foreign_owners(self, source, ids).await
    }

    async fn rows(&self, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError> {
        super::load_actual_for(self, ids).await
    }
}

/// The reads of a [`Db`] and a [`Tx`] are those of the client each wraps.
macro_rules! reads_through {
    ($t:ty, $client:ident => $inner:expr) => {
        impl TenantStore for $t {
            async fn last_applied(&self, source: &str) -> Result<Option<CommitId>, StoreError> {
                let $client = self;
                $inner.last_applied(source).await
            }

            async fn index(&self, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError> {
                let $client = self;
                $inner.index(source, unowned_ids).await
            }

            async fn foreign_owners(&self, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError> {
                let $client = self;
                $inner.foreign_owners(source, ids).await
            }

            async fn rows(&self, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError> {
                let $client = self;
                $inner.rows(ids).await
            }
        }
    };
}

reads_through!(Db, c => &**c.0);
reads_through!(Tx<'_>, c => &*c.0);

impl Store for Db {
    type Tx<'t> = Tx<'t>;

    async fn begin(&mut self) -> Result<Tx<'_>, StoreError> {
        Ok(Tx(self.0.transaction().await.map_err(q("starting a transaction"))?))
    }

    async fn digest_key(&self) -> Result<Vec<u8>, StoreError> {
        super::digest_key(&**self.0).await
    }

    async fn other_spellings(&self, name: &str, id: &str) -> Result<Vec<String>, StoreError> {
        super::respell::other_spellings(&**self.0, name, id).await
    }

    async fn respell(&mut self, old: &str, new: &str) -> Result<u64, StoreError> {
        super::respell::respell(&mut self.0, old, new).await
    }
}

impl StoreTx for Tx<'_> {
    async fn lock_apply(&self, source: &str) -> Result<(), StoreError> {
        super::lock_apply(&self.0, source).await
    }

    async fn apply(
        &self,
        plan: &Plan,
        desired: &[DesiredTenant],
        creates: Vec<Create<'_>>,
        created: &mut dyn CreatedSink,
        ctx: &ApplyContext<'_>,
    ) -> Result<usize, StoreError> {
        super::apply(&self.0, plan, desired, creates, created, ctx).await
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await.map_err(q("committing"))
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.0.rollback().await.map_err(q("rolling back"))
    }
}
