//! A run's writes, a chunk of tenants at a time. A chunk's statements go out together (one round
//! trip, not one per statement), and the next chunk's rows are built on this side while the
//! server writes the chunk before: the client's work and the server's overlap.

use super::audit::EMIT_AUDIT_EVENTS;
use super::{ApplyContext, Change, CreatedSink, StoreError, q};
use crate::domain::audit::events_for;
use crate::domain::plan::{self, Action, Packed, seal};
use crate::domain::tenant::TenantMeta;
use futures_util::{StreamExt, TryStreamExt};
use std::borrow::Cow;
use tokio_postgres::types::{IsNull, ToSql, Type, accepts, to_sql_checked};
use tokio_postgres::{Statement, Transaction};

/// Tenants per chunk: a chunk's parameters are copies of its documents, and a cold sync of every
/// tenant at once would hold all of them twice over.
const CHUNK: usize = 500;

/// Inserts and updates the rows of `changes` (not empty) with their audit events and applied
/// records; the plans of the creates it made go to `created`.
pub async fn changes(
    tx: &Transaction<'_>,
    statements: &Statements,
    changes: impl Iterator<Item = Change<'_>> + Send,
    ctx: &ApplyContext<'_>,
    created: &mut dyn CreatedSink,
    history: &History,
) -> Result<(), StoreError> {
    let mut changes = changes.peekable();
    let chunks = std::iter::from_fn(move || changes.peek().is_some().then(|| changes.by_ref().take(CHUNK).collect::<Vec<_>>()));
    // Two chunks in flight: while the server writes one, the next is planned and built (on rayon's
    // threads, not the runtime's worker, so that the connection's task keeps reading replies, and
    // where the documents were decoded, so that their memory returns to those threads' arenas)
    // and sent behind it. A chunk is built when its future is first polled, so the first chunk
    // is on its way before the second is built.
    futures_util::stream::iter(chunks)
        .map(|chunk| async move {
            let rows = crate::blocking(|| on_decoding_threads(|| Rows::of(chunk, ctx, history)))?;
            rows.write(tx, statements).await.map(|()| rows.created)
        })
        .buffered(2)
        .try_fold(created, |created, chunk| async move {
            created.take(chunk).map_err(StoreError::Spill)?;
            Ok(created)
        })
        .await
        .map(|_| ())
}

pub struct Statements {
    create: Statement,
    update: Statement,
    emit: Statement,
    applied: Statement,
    own: Statement,
    owned_elsewhere: Statement,
}

impl Statements {
    pub async fn prepare(tx: &Transaction<'_>) -> Result<Statements, StoreError> {
        let p = |sql| async move { tx.prepare(sql).await.map_err(q("preparing the writes")) };
        let (create, update, emit, applied, own, owned_elsewhere) =
            futures_util::try_join!(p(CREATE), p(UPDATE), p(EMIT_AUDIT_EVENTS), p(RECORD), p(OWN), p(OWNED_ELSEWHERE))?;
        Ok(Statements {
            create,
            update,
            emit,
            applied,
            own,
            owned_elsewhere,
        })
    }

    /// Records `source` as the owner of each of `ids` (with its file in `files`) that no other
    /// source owns; one that another source owns fails the run. Both statements go out when this
    /// is first polled, ahead of whatever its caller polls next, and the check runs after the
    /// insert: it sees what the insert left with another source, and neither meets a transaction
    /// a failed write aborted.
    pub async fn own(&self, tx: &Transaction<'_>, ids: &[&str], files: &[&str], source: &str, source_name: &str) -> Result<(), StoreError> {
        let record = async {
            tx.execute(&self.own, &[&ids, &files, &source, &source_name])
                .await
                .map_err(q("recording which source owns each tenant"))
        };
        let check = async { tx.query_opt(&self.owned_elsewhere, &[&ids, &source]).await.map_err(q("checking ownership")) };
        let (_, owned) = futures_util::try_join!(record, check)?;
        match owned {
            Some(row) => Err(StoreError::Conflict {
                tenant: row.get(0),
                message: format!("it belongs to source {}", row.get::<_, String>(1)),
            }),
            None => Ok(()),
        }
    }
}

/// One row per tenant in `ids`: ON CONFLICT DO UPDATE cannot touch a row twice in one statement.
const OWN: &str = "INSERT INTO gitops_owners (tenant_id, source, source_name, file_path)
     SELECT u.id, $3, $4, u.file FROM unnest($1::text[], $2::text[]) AS u(id, file)
     ON CONFLICT (tenant_id) DO UPDATE SET file_path = EXCLUDED.file_path, source_name = EXCLUDED.source_name
      WHERE gitops_owners.source = EXCLUDED.source
        AND (gitops_owners.file_path, gitops_owners.source_name) IS DISTINCT FROM (EXCLUDED.file_path, EXCLUDED.source_name)";

const OWNED_ELSEWHERE: &str = "SELECT tenant_id, source FROM gitops_owners WHERE tenant_id = ANY($1) AND source <> $2 LIMIT 1";

/// Config events already in the trail, by tenant: none for a tenant that never existed.
pub type History = std::collections::HashMap<String, i64>;

/// The versions the audit trail already holds for the tenants a run creates: a row deleted
/// outside git leaves its events behind, and the tenant created again goes on from them, so that
/// its version still counts its config events. Asked once, before the writes (a question inside
/// the chunks' pipeline would wait for the chunk before it and undo their overlap).
pub async fn history(tx: &Transaction<'_>, creates: &[&str]) -> Result<History, StoreError> {
    if creates.is_empty() {
        return Ok(History::new());
    }
    // Only a tenant the agent applied before can have a history, and a first sync has applied
    // none: it sends no ids, reads nothing of the trail, and waits on none of its locks.
    let any = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM gitops_applied)", &[])
        .await
        .map_err(q("reading gitops_applied"))?;
    if !any.get::<_, bool>(0) {
        return Ok(History::new());
    }
    let known = tx
        .query(APPLIED_BEFORE, &[&creates])
        .await
        .map_err(q("reading the applied records of the tenants to create"))?;
    let known: Vec<String> = known.iter().map(|r| r.get(0)).collect();
    if known.is_empty() {
        return Ok(History::new());
    }
    let rows = tx
        .query(HISTORY, &[&known])
        .await
        .map_err(q("reading the audit history of the tenants to create"))?;
    Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect())
}

const APPLIED_BEFORE: &str = "SELECT tenant_id FROM gitops_applied WHERE tenant_id = ANY($1)";

const HISTORY: &str = "SELECT tenant_id, count(*) FROM audit_events
      WHERE tenant_id = ANY($1) AND event_type = 'TENANT_CONFIG_UPDATED'
      GROUP BY tenant_id";

const CREATE: &str = "INSERT INTO tenants (tenant_id, state, config, config_version, age_public_key, endpoints)
     SELECT u.id, 'pending', u.config, u.version, u.key, u.endpoints
       FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::jsonb[], $5::bigint[]) AS u(id, config, key, endpoints, version)
     ON CONFLICT (tenant_id) DO NOTHING
     RETURNING tenant_id";

const UPDATE: &str = "UPDATE tenants t SET config = u.config, age_public_key = u.key, endpoints = u.endpoints,
            config_version = t.config_version + 1
       FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::jsonb[], $5::bigint[]) AS u(id, config, key, endpoints, version)
      WHERE t.tenant_id = u.id AND t.config_version = u.version
     RETURNING t.tenant_id";

// clock_timestamp(), not now(): taken after the rows were written, so a later hand edit (whose
// trigger stamps updated_at) is always newer than applied_at. text[][] must be rectangular; the
// secret paths travel as one JSON array per tenant instead.
const RECORD: &str =
    "INSERT INTO gitops_applied (tenant_id, source, commit_id, file_path, config_version, document_digest, sealed_document, secret_paths, applied_at)
     SELECT u.id, $6, $7, u.file, u.version, u.digest, u.sealed, ARRAY(SELECT jsonb_array_elements_text(u.paths)), clock_timestamp()
       FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $8::jsonb[]) AS u(id, file, version, digest, sealed, paths)
     ON CONFLICT (tenant_id) DO UPDATE SET source = EXCLUDED.source, commit_id = EXCLUDED.commit_id,
         file_path = EXCLUDED.file_path, config_version = EXCLUDED.config_version,
         document_digest = EXCLUDED.document_digest, sealed_document = EXCLUDED.sealed_document,
         secret_paths = EXCLUDED.secret_paths, applied_at = EXCLUDED.applied_at";

/// The columns of `tenants` a create or an update writes, borrowed from the documents.
#[derive(Default)]
struct Tenants<'a> {
    ids: Vec<&'a str>,
    configs: Vec<Jsonb>,
    keys: Vec<String>,
    endpoints: Vec<Jsonb>,
    /// For an update: the version it expects to find; for a create: the version it writes.
    versions: Vec<i64>,
}

impl<'a> Tenants<'a> {
    fn push(&mut self, version: i64, d: &'a TenantMeta, doc: &serde_json::Value) {
        self.ids.push(&d.tenant_id);
        self.configs.push(Jsonb::of(&doc["config"]));
        self.keys.push(doc["age_public_key"].as_str().unwrap_or_default().to_string());
        self.endpoints.push(Jsonb::of(&doc["endpoints"]));
        self.versions.push(version);
    }
}

/// The parameters of one chunk's statements.
struct Rows<'a> {
    creates: Tenants<'a>,
    updates: Tenants<'a>,
    event_tenants: Vec<String>,
    event_types: Vec<&'static str>,
    event_actors: Vec<String>,
    event_details: Vec<Jsonb>,
    ids: Vec<&'a str>,
    files: Vec<&'a str>,
    versions: Vec<i64>,
    digests: Vec<String>,
    sealed: Vec<Jsonb>,
    secret_paths: Vec<Jsonb>,
    source: &'a str,
    source_name: &'a str,
    commit: &'a str,
    /// The plans of this chunk's creates, made here.
    created: Packed,
}

impl<'a> Rows<'a> {
    /// Consumes the chunk: a create's document moved into it is dropped here.
    fn of(chunk: Vec<Change<'a>>, ctx: &ApplyContext<'a>, history: &History) -> Result<Rows<'a>, StoreError> {
        let mut rows = Rows {
            creates: Tenants::default(),
            updates: Tenants::default(),
            event_tenants: vec![],
            event_types: vec![],
            event_actors: vec![],
            event_details: vec![],
            ids: vec![],
            files: vec![],
            versions: vec![],
            digests: vec![],
            sealed: vec![],
            secret_paths: vec![],
            source: ctx.source,
            source_name: ctx.source_name,
            commit: &ctx.commit.id,
            created: Packed::default(),
        };
        for change in chunk {
            let (d, planned) = (change.desired(), change.planned());
            let doc = change.into_document(ctx.parked)?;
            let mut c = match planned {
                Some(c) => Cow::Borrowed(c),
                None => {
                    let mut c = plan::create(d, &doc, ctx.key);
                    c.annotate_embedding(d.embedding_endpoint.as_deref(), ctx.embedding_default);
                    Cow::Owned(c)
                }
            };
            if let Some(&before) = history.get(&d.tenant_id).filter(|_| c.action == Action::Create) {
                c.to_mut().continue_from(before);
            }
            match c.action {
                Action::Create => rows.creates.push(c.next_version.unwrap_or(1), d, &doc),
                _ => rows.updates.push(c.current_version.unwrap_or(0), d, &doc),
            }
            for e in events_for(&c, ctx.commit, ctx.source, ctx.actor, &ctx.signer) {
                rows.event_tenants.push(e.tenant_id);
                rows.event_types.push(e.event_type);
                rows.event_actors.push(e.actor);
                rows.event_details.push(Jsonb::of(&e.details));
            }
            rows.ids.push(&d.tenant_id);
            rows.files.push(&d.file);
            rows.versions.push(c.next_version.unwrap_or(1));
            rows.digests.push(c.desired_digest.clone().unwrap_or_default());
            rows.sealed.push(Jsonb::of(&seal(ctx.key, &doc, &d.secrets)));
            rows.secret_paths.push(Jsonb::of(&*d.secrets));
            if let Cow::Owned(c) = c {
                rows.created.push(&c);
            }
        }
        Ok(rows)
    }

    /// The chunk's statements, sent together; a tenant another source owns, or created or changed
    /// by someone else since the plan, fails the run.
    async fn write(&self, tx: &Transaction<'_>, st: &Statements) -> Result<(), StoreError> {
        let (c, u) = (&self.creates, &self.updates);
        // Sent first, so the server checks the chunk's tenants are this source's before it writes
        // them. Claimed a chunk at a time, a first sync of 100,000 does not hold every tenant's id
        // and file in one statement (12 MB of its peak).
        let owned = st.own(tx, &self.ids, &self.files, self.source, self.source_name);
        let created = async {
            match c.ids.is_empty() {
                true => Ok(vec![]),
                false => tx
                    .query(&st.create, &[&c.ids, &c.configs, &c.keys, &c.endpoints, &c.versions])
                    .await
                    .map_err(q(format!("creating {} tenant(s)", c.ids.len()))),
            }
        };
        let updated = async {
            match u.ids.is_empty() {
                true => Ok(vec![]),
                false => tx
                    .query(&st.update, &[&u.ids, &u.configs, &u.keys, &u.endpoints, &u.versions])
                    .await
                    .map_err(q(format!("updating {} tenant(s)", u.ids.len()))),
            }
        };
        let events = async {
            tx.query(&st.emit, &[&self.event_tenants, &self.event_types, &self.event_actors, &self.event_details])
                .await
                .map_err(q(format!("writing {} audit event(s)", self.event_tenants.len())))
        };
        let recorded = async {
            tx.execute(
                &st.applied,
                &[
                    &self.ids,
                    &self.files,
                    &self.versions,
                    &self.digests,
                    &self.sealed,
                    &self.source,
                    &self.commit,
                    &self.secret_paths,
                ],
            )
            .await
            .map_err(q("recording what was applied"))
        };
        let (_, created, updated, _, _) = futures_util::try_join!(owned, created, updated, events, recorded)?;
        let returned = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, String>(0)).collect::<std::collections::BTreeSet<_>>();
        let created = returned(created);
        if let Some(taken) = c.ids.iter().find(|id| !created.contains(**id)) {
            return Err(StoreError::Conflict {
                tenant: taken.to_string(),
                message: "it was created by someone else".into(),
            });
        }
        let updated = returned(updated);
        if let Some((id, version)) = u.ids.iter().zip(&u.versions).find(|(id, _)| !updated.contains(**id)) {
            return Err(StoreError::Conflict {
                tenant: id.to_string(),
                message: format!("its config_version is no longer {version}"),
            });
        }
        Ok(())
    }
}

/// A jsonb parameter serialised when its chunk is built, not when the statement is sent: the
/// encoding is client work, and this way it overlaps with the server's.
#[derive(Debug)]
struct Jsonb(Vec<u8>);

impl Jsonb {
    fn of(v: &impl serde::Serialize) -> Jsonb {
        Jsonb(serde_json::to_vec(v).expect("a JSON value always serialises"))
    }
}

impl ToSql for Jsonb {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary format: a version byte, then the JSON text.
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    accepts!(JSON, JSONB);
    to_sql_checked!();
}

/// Runs `f` on a thread of rayon's pool, where the documents were decoded: what the chunk frees
/// (the created tenants' documents) goes back to the malloc arenas it came from, and the plans
/// built next reuse it. Built on the runtime's thread, they took fresh memory from its arena,
/// and a first sync of 100,000 held as much as without freeing anything.
fn on_decoding_threads<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran it")
}
