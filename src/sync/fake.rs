//! An in-memory source and store, for unit tests of orchestration: the rules of a run (history,
//! ownership, prune, drift policy, the rounds under the lock) without git or PostgreSQL. The
//! store keeps what the real one keeps (rows, owners, applied records, the last applied commit,
//! event types) and plans creates and writes events with the same domain functions; its SQL is
//! tested against PostgreSQL elsewhere.

use crate::domain::audit::{CommitInfo, events_for};
use crate::domain::commit::CommitId;
use crate::domain::commit::VerifyMode;
use crate::domain::json::JsonText;
use crate::domain::plan::{self, Action, ActualTenant, AppliedRecord, Packed, Plan, seal};
use crate::domain::tenant::{DesiredTenant, TenantMeta};
use crate::ports::{ReadBody, Store, StoreTx, TenantSource, TenantStore};
use crate::source::{Body, Snapshot, SourceError, SourceFile};
use crate::store::{ApplyContext, Create, CreatedSink, Owner, RowIndex, StoreError};
use crate::verify::{CommitSigner, Refused, TrustedSigners};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

type Files = BTreeMap<String, Vec<u8>>;

struct Commit {
    id: CommitId,
    parent: Option<usize>,
    files: Files,
}

/// A repository of tenant files: a history of commits, the newest the branch's head.
pub struct FakeSource {
    id: String,
    commits: Vec<Commit>,
    head: Option<usize>,
    /// Every read fails with this, as an unreachable remote would.
    pub broken: Option<String>,
}

impl FakeSource {
    pub fn new(id: &str) -> FakeSource {
        FakeSource {
            id: id.into(),
            commits: vec![],
            head: None,
            broken: None,
        }
    }

    /// A new head, child of the old one, with the tenant files as `edit` leaves them.
    pub fn commit(&mut self, edit: impl FnOnce(&mut Files)) -> CommitId {
        let mut files = self.head.map(|h| self.commits[h].files.clone()).unwrap_or_default();
        edit(&mut files);
        self.push(self.head, files)
    }

    /// A new head that does not descend from the old one: history rewritten by a force-push.
    pub fn rewrite(&mut self, edit: impl FnOnce(&mut Files)) -> CommitId {
        let mut files = self.head.map(|h| self.commits[h].files.clone()).unwrap_or_default();
        edit(&mut files);
        self.push(None, files)
    }

    fn push(&mut self, parent: Option<usize>, files: Files) -> CommitId {
        let id = CommitId::parse(&format!("{:040x}", 0x00c0_ffee_0000_u64 + self.commits.len() as u64)).expect("hex");
        self.commits.push(Commit { id: id.clone(), parent, files });
        self.head = Some(self.commits.len() - 1);
        id
    }

    fn find(&self, id: &CommitId) -> Option<usize> {
        self.commits.iter().position(|c| &c.id == id)
    }

    fn failure(&self) -> Result<(), SourceError> {
        match &self.broken {
            Some(why) => Err(SourceError::Io {
                path: self.id.clone(),
                source: std::io::Error::other(why.clone()),
            }),
            None => Ok(()),
        }
    }

    fn info(&self, i: usize) -> CommitInfo {
        CommitInfo {
            id: self.commits[i].id.to_string(),
            time: "2026-12-08T00:00:00+00:00".into(),
            author: "Dev <dev@example.com>".into(),
        }
    }
}

/// A tenant file's text: `tenants/<id>.json`, in the clear (the tests' settings allow that).
pub fn tenant_file(files: &mut Files, id: &str, plan: &str) {
    let doc = json!({
        "tenant_id": id,
        "age_public_key": "age1mx37mncarh87w9uvcrtyy72nlmrx0r426tgmy09f32qkqtwtw58s7uxngf",
        "endpoints": {"api": format!("https://{id}.api.example.com")},
        "config": {"schema_version": 1, "display_name": format!("Tenant {id}"), "plan": plan, "region": "eu-west-1"}
    });
    files.insert(format!("tenants/{id}.json"), serde_json::to_vec_pretty(&doc).expect("json"));
}

struct Bodies;

impl ReadBody for Bodies {
    fn read(&self, _: &mut SourceFile) -> Result<(), SourceError> {
        Ok(())
    }
}

impl TenantSource for FakeSource {
    fn id(&self) -> &str {
        &self.id
    }

    fn commit_of(&self, rev: Option<&str>) -> Result<CommitId, SourceError> {
        self.failure()?;
        let found = match rev {
            None => self.head,
            Some(r) => CommitId::parse(r).and_then(|c| self.find(&c)),
        };
        found.map(|i| self.commits[i].id.clone()).ok_or_else(|| SourceError::Io {
            path: self.id.clone(),
            source: std::io::Error::other(format!("no revision {rev:?}")),
        })
    }

    fn snapshot_at(&self, commit: &CommitId) -> Result<Snapshot, SourceError> {
        self.failure()?;
        let i = self.find(commit).expect("a commit of this source");
        let files = self.commits[i]
            .files
            .iter()
            .map(|(path, body)| SourceFile::new(path.clone(), Body::Bytes(body.clone())))
            .collect();
        Ok(Snapshot {
            commit: Some(self.info(i)),
            files,
        })
    }

    fn empty_at(&self, commit: &CommitId) -> Result<Snapshot, SourceError> {
        let i = self.find(commit).expect("a commit of this source");
        Ok(Snapshot {
            commit: Some(self.info(i)),
            files: vec![],
        })
    }

    fn worktree(&self) -> Result<Snapshot, SourceError> {
        Err(SourceError::NoTenantDir {
            path: "tenants".into(),
            at: "the work tree".into(),
        })
    }

    fn body_reader(&self) -> impl ReadBody {
        Bodies
    }

    fn descends_from(&self, new: &CommitId, old: &CommitId) -> Result<bool, SourceError> {
        let mut at = self.find(new);
        while let Some(i) = at {
            if &self.commits[i].id == old {
                return Ok(true);
            }
            at = self.commits[i].parent;
        }
        Ok(false)
    }

    fn is_shallow(&self) -> bool {
        false
    }

    fn changed_files(&self, old: &CommitId, new: &CommitId) -> Result<Option<BTreeSet<String>>, SourceError> {
        let (Some(a), Some(b)) = (self.find(old), self.find(new)) else {
            return Ok(None);
        };
        let (a, b) = (&self.commits[a].files, &self.commits[b].files);
        Ok(Some(a.keys().chain(b.keys()).filter(|p| a.get(*p) != b.get(*p)).cloned().collect()))
    }

    fn verify(&self, _: VerifyMode, _: Option<&CommitId>, _: &CommitId, _: &TrustedSigners) -> Result<Option<CommitSigner>, Refused> {
        Ok(None)
    }
}

/// A row of `tenants`, with what the agent recorded of it.
#[derive(Clone, Debug)]
pub struct Row {
    pub state: String,
    pub config_version: i64,
    pub document: Value,
    /// The applied record, and the source that wrote it.
    pub applied: Option<(String, AppliedRecord)>,
    /// Edited since the agent wrote it.
    pub touched: bool,
}

/// What the database holds.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub tenants: BTreeMap<String, Row>,
    pub owners: BTreeMap<String, Owner>,
    pub last_applied: BTreeMap<String, CommitId>,
    /// (tenant, event type), in the order written.
    pub events: Vec<(String, String)>,
}

impl Tables {
    /// A hand edit of a row's config, outside git.
    pub fn edit_by_hand(&mut self, tenant: &str, pointer: &str, value: Value) {
        let row = self.tenants.get_mut(tenant).expect("a row");
        *row.document.pointer_mut(pointer).expect("an existing field") = value;
        row.touched = true;
    }

    fn row_index(&self, source: &str, id: &str, row: &Row) -> RowIndex {
        let owner = self.owners.get(id);
        let applied = row.applied.as_ref().map(|(_, a)| (a.file.clone(), a.config_version, a.digest.clone()));
        RowIndex {
            tenant_id: id.into(),
            config_version: row.config_version,
            applied_commit: row.applied.as_ref().filter(|(s, _)| s == source).map(|(_, a)| Arc::from(a.commit_id.as_str())),
            touched: row.touched,
            owned: owner.is_some(),
            owned_by_other_file: owner.map(|o| o.file.clone()).filter(|f| applied.as_ref().is_none_or(|(a, ..)| a != f)),
            applied,
        }
    }

    fn actual(&self, id: &str) -> Option<ActualTenant> {
        let row = self.tenants.get(id)?;
        let d = &row.document;
        let document = JsonText::of(&json!({"age_public_key": d["age_public_key"], "endpoints": d["endpoints"], "config": d["config"]}));
        let applied = row.applied.as_ref().map(|(_, a)| a.clone());
        Some(ActualTenant {
            tenant_id: id.into(),
            state: row.state.clone(),
            config_version: row.config_version,
            known_secrets: applied.as_ref().map(|a| a.secret_paths.clone()).unwrap_or_default(),
            document,
            applied,
            updated_at: None,
        })
    }

    fn last_applied(&self, source: &str) -> Option<CommitId> {
        self.last_applied.get(source).cloned()
    }

    fn index(&self, source: &str, unowned_ids: Option<&[&str]>) -> Vec<RowIndex> {
        let mine = |id: &str| match self.owners.get(id) {
            Some(o) => o.source == source,
            None => unowned_ids.is_none_or(|ids| ids.contains(&id)),
        };
        self.tenants
            .iter()
            .filter(|(id, _)| mine(id))
            .map(|(id, row)| self.row_index(source, id, row))
            .collect()
    }

    fn foreign_owners(&self, source: &str, ids: &[&str]) -> BTreeMap<String, Owner> {
        ids.iter()
            .filter_map(|id| self.owners.get(*id).filter(|o| o.source != source).map(|o| (id.to_string(), o.clone())))
            .collect()
    }

    fn rows(&self, ids: &[String]) -> Vec<ActualTenant> {
        ids.iter().filter_map(|id| self.actual(id)).collect()
    }
}

/// What others do to the database while a run is not looking.
pub type Meanwhile = Box<dyn FnOnce(&mut Tables)>;

/// The database: what is committed, and what happens when a run takes the apply lock.
#[derive(Default)]
pub struct FakeStore {
    pub committed: Tables,
    /// Run, one each time a run takes the apply lock, against the committed tables: another run
    /// or a person that got there first.
    pub before_lock: Vec<Meanwhile>,
    /// Transactions begun.
    pub transactions: usize,
}

/// A transaction: it reads what was committed when it began or took the lock, and its writes
/// are seen by others once it commits.
pub struct FakeTx<'s> {
    store: std::cell::RefCell<&'s mut FakeStore>,
    work: std::cell::RefCell<Tables>,
}

macro_rules! reads {
    ($t:ty, $s:ident => $tables:expr) => {
        impl TenantStore for $t {
            async fn last_applied(&self, source: &str) -> Result<Option<CommitId>, StoreError> {
                let $s = self;
                Ok($tables.last_applied(source))
            }

            async fn index(&self, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError> {
                let $s = self;
                Ok($tables.index(source, unowned_ids))
            }

            async fn foreign_owners(&self, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError> {
                let $s = self;
                Ok($tables.foreign_owners(source, ids))
            }

            async fn rows(&self, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError> {
                let $s = self;
                Ok($tables.rows(ids))
            }
        }
    };
}

reads!(FakeStore, s => s.committed);
reads!(FakeTx<'_>, s => s.work.borrow());

impl Store for FakeStore {
    type Tx<'t> = FakeTx<'t>;

    async fn begin(&mut self) -> Result<FakeTx<'_>, StoreError> {
        self.transactions += 1;
        let work = std::cell::RefCell::new(self.committed.clone());
        Ok(FakeTx {
            store: std::cell::RefCell::new(self),
            work,
        })
    }

    async fn digest_key(&self) -> Result<Vec<u8>, StoreError> {
        Ok(vec![7; 32])
    }

    async fn other_spellings(&self, _: &str, _: &str) -> Result<Vec<String>, StoreError> {
        Ok(vec![])
    }

    async fn respell(&mut self, _: &str, _: &str) -> Result<u64, StoreError> {
        Ok(0)
    }
}

impl StoreTx for FakeTx<'_> {
    /// The lock is the moment a run sees what others committed before it.
    async fn lock_apply(&self, _: &str) -> Result<(), StoreError> {
        let mut store = self.store.borrow_mut();
        if !store.before_lock.is_empty() {
            let hook = store.before_lock.remove(0);
            hook(&mut store.committed);
        }
        *self.work.borrow_mut() = store.committed.clone();
        Ok(())
    }

    async fn apply(
        &self,
        plan: &Plan,
        desired: &[DesiredTenant],
        creates: Vec<Create<'_>>,
        created: &mut dyn CreatedSink,
        ctx: &ApplyContext<'_>,
    ) -> Result<usize, StoreError> {
        let mut work = self.work.borrow_mut();
        let mut writes: Vec<(plan::TenantPlan, &TenantMeta, Value)> = vec![];
        for change in plan.changes() {
            let d = desired.iter().find(|d| d.tenant_id == change.tenant_id).expect("a planned change has its file");
            writes.push((change.clone(), &**d, d.document().value()));
        }
        let mut packed = Packed::default();
        for c in creates {
            let d = c.tenant();
            let doc = c.into_document(ctx.parked)?;
            let planned = plan::create(d, &doc, ctx.key);
            packed.push(&planned);
            writes.push((planned, d, doc));
        }
        writes.sort_by(|a, b| a.0.tenant_id.cmp(&b.0.tenant_id));
        for (id, file) in &ctx.claims {
            work.owners.entry(id.clone()).or_insert_with(|| owner(ctx, file));
        }
        for (change, d, doc) in &writes {
            write(&mut work, change, d, doc, ctx)?;
        }
        for t in plan.decommissions() {
            work.tenants.get_mut(&t.tenant_id).expect("a row to decommission").state = "decommissioning".into();
            work.events.push((t.tenant_id.clone(), "TENANT_STATE_CHANGED".into()));
        }
        if ctx.record_commit {
            work.last_applied.insert(ctx.source.into(), CommitId::parse(&ctx.commit.id).expect("a commit"));
        }
        created.take(packed).map_err(StoreError::Spill)?;
        Ok(writes.len() + plan.decommissions().count())
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.store.into_inner().committed = self.work.into_inner();
        Ok(())
    }

    async fn rollback(self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn owner(ctx: &ApplyContext<'_>, file: &str) -> Owner {
    Owner {
        source: ctx.source.into(),
        name: Some(ctx.source_name.into()),
        file: file.into(),
    }
}

/// One tenant's write, refused as the database refuses it: another source's tenant, or a row
/// that is not at the version the plan saw.
fn write(work: &mut Tables, change: &plan::TenantPlan, d: &TenantMeta, doc: &Value, ctx: &ApplyContext<'_>) -> Result<(), StoreError> {
    let conflict = |message: &str| StoreError::Conflict {
        tenant: d.tenant_id.clone(),
        message: message.into(),
    };
    match work.owners.get(&d.tenant_id) {
        Some(o) if o.source != ctx.source => return Err(conflict("another source owns it")),
        _ => {}
    }
    let now = work.tenants.get(&d.tenant_id).map(|r| r.config_version);
    if now != change.current_version {
        return Err(conflict("changed since the plan"));
    }
    let version = change.next_version.unwrap_or(1);
    let applied = AppliedRecord {
        commit_id: ctx.commit.id.clone(),
        file: d.file.clone(),
        config_version: version,
        digest: change.desired_digest.clone().unwrap_or_default(),
        sealed: JsonText::of(&seal(ctx.key, doc, &d.secrets)),
        secret_paths: (*d.secrets).clone(),
    };
    work.tenants.insert(
        d.tenant_id.clone(),
        Row {
            state: work.tenants.get(&d.tenant_id).map_or_else(|| "provisioning".into(), |r| r.state.clone()),
            config_version: version,
            document: doc.clone(),
            applied: Some((ctx.source.into(), applied)),
            touched: false,
        },
    );
    work.owners.insert(d.tenant_id.clone(), owner(ctx, &d.file));
    for e in events_for(change, ctx.commit, ctx.source, ctx.actor, &ctx.signer) {
        work.events.push((e.tenant_id, e.event_type.to_string()));
    }
    debug_assert!(matches!(change.action, Action::Create | Action::Update));
    Ok(())
}
