//! What a run reads: the index of a source's rows, rows in full, owners, the digest key and the
//! last applied commit.

use super::{StoreError, q};
use crate::domain::json::{JsonText, SecretPaths};
use crate::domain::plan::{ActualTenant, AppliedRecord};
use rand::RngCore;
use rayon::prelude::*;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Json;

/// Which source owns a tenant, and the file it claimed it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub source: String,
    /// Its configured name when it claimed the tenant.
    pub name: Option<String>,
    pub file: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ({})", self.source),
            None => write!(f, "{}", self.source),
        }
    }
}

/// Which of `ids` other sources own (rows deleted by hand included).
pub async fn foreign_owners(client: &impl GenericClient, source: &str, ids: &[&str]) -> Result<BTreeMap<String, Owner>, StoreError> {
    // Most databases have one source: two probes of the source index say so, where sending every
    // id of a large source costs the server a parse of the whole array (70 ms at 100,000).
    let others = client
        .query_one("SELECT EXISTS (SELECT 1 FROM gitops_owners WHERE source < $1 OR source > $1)", &[&source])
        .await
        .map_err(q("reading gitops_owners"))?;
    if !others.get::<_, bool>(0) {
        return Ok(BTreeMap::new());
    }
    let rows = client
        .query(
            "SELECT tenant_id, source, source_name, file_path FROM gitops_owners WHERE tenant_id = ANY($2) AND source <> $1",
            &[&source, &ids],
        )
        .await
        .map_err(q("reading gitops_owners"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let owner = Owner {
                source: r.get(1),
                name: r.get(2),
                file: r.get(3),
            };
            (r.get(0), owner)
        })
        .collect())
}

/// The per-database key for sealing secrets; made on first use.
pub async fn digest_key(client: &impl GenericClient) -> Result<Vec<u8>, StoreError> {
    if let Some(row) = client
        .query_opt("SELECT digest_key FROM gitops_settings", &[])
        .await
        .map_err(q("reading gitops_settings"))?
    {
        return Ok(row.get(0));
    }
    let mut key = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    client
        .execute("INSERT INTO gitops_settings (digest_key) VALUES ($1) ON CONFLICT DO NOTHING", &[&key])
        .await
        .map_err(q("creating the digest key"))?;
    let row = client
        .query_one("SELECT digest_key FROM gitops_settings", &[])
        .await
        .map_err(q("reading gitops_settings"))?;
    Ok(row.get(0))
}

pub async fn last_applied_commit(client: &impl GenericClient, source: &str) -> Result<Option<String>, StoreError> {
    let row = client
        .query_opt("SELECT last_applied_commit FROM gitops_sources WHERE source = $1", &[&source])
        .await
        .map_err(q("reading gitops_sources"))?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn load_actual(client: &impl GenericClient) -> Result<Vec<ActualTenant>, StoreError> {
    let rows = client
        .query(
            "SELECT t.tenant_id, t.state, t.config_version, t.age_public_key, t.endpoints, t.config,
                    a.commit_id, a.config_version, a.document_digest, a.sealed_document, a.secret_paths, a.file_path, t.updated_at
               FROM tenants t LEFT JOIN gitops_applied a USING (tenant_id)
              ORDER BY t.tenant_id",
            &[],
        )
        .await
        .map_err(q("loading tenants"))?;
    actual_from_rows(&rows)
}

/// The rows of `ids` in full.
pub async fn load_actual_for(client: &impl GenericClient, ids: &[String]) -> Result<Vec<ActualTenant>, StoreError> {
    let rows = client
        .query(
            "SELECT t.tenant_id, t.state, t.config_version, t.age_public_key, t.endpoints, t.config,
                    a.commit_id, a.config_version, a.document_digest, a.sealed_document, a.secret_paths, a.file_path, t.updated_at
               FROM tenants t LEFT JOIN gitops_applied a USING (tenant_id)
              WHERE t.tenant_id = ANY($1)
              ORDER BY t.tenant_id",
            &[&ids],
        )
        .await
        .map_err(q("loading tenants"))?;
    actual_from_rows(&rows)
}

/// A row's bookkeeping, without its documents: enough to tell that it is as the agent left it.
#[derive(Debug, Clone)]
pub struct RowIndex {
    pub tenant_id: String,
    pub config_version: i64,
    /// From the applied record: file, config_version and document digest.
    pub applied: Option<(String, i64, String)>,
    /// The commit the applied record came from, when this source wrote it: one string for the
    /// rows of one commit (after a first sync every row names the same one).
    pub applied_commit: Option<Arc<str>>,
    /// Changed since the agent wrote it (its trigger-kept updated_at is newer).
    pub touched: bool,
    /// Whether this source owns it (if not, nobody does: made by hand, or before sources were
    /// recorded). The index holds no rows another source owns.
    pub owned: bool,
    /// The file this source owns it by, where that is not the applied record's (nearly never).
    pub owned_by_other_file: Option<String>,
}

impl RowIndex {
    /// The file this source owns it by; None when nobody owns it. Read before the applied record
    /// is taken from the row.
    pub fn owned_file(&self) -> Option<&str> {
        let applied = || self.applied.as_ref().map(|(file, ..)| file.as_str());
        self.owned.then(|| self.owned_by_other_file.as_deref().or_else(applied).unwrap_or_default())
    }
}

/// The index of the rows a run over `source` works on: those it owns, and those nobody owns
/// (all of them, or only those of `unowned_ids`). Driven from the owner index, so a run's cost
/// follows its own source's size, not the table's.
pub async fn load_index(client: &impl GenericClient, source: &str, unowned_ids: Option<&[&str]>) -> Result<Vec<RowIndex>, StoreError> {
    // Compared here rather than sent: at 100,000 rows every column is megabytes to read. An owner
    // is always this source, and its file is nearly always the applied record's.
    const COLUMNS: &str = "t.tenant_id, t.config_version, a.file_path, a.config_version, a.document_digest,
        (a.applied_at IS NULL OR t.updated_at > a.applied_at), CASE WHEN a.source = $1 THEN a.commit_id END,
        o.source IS NOT NULL, NULLIF(o.file_path, a.file_path)";
    use futures_util::TryStreamExt;
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let (sql, params): (String, Vec<Param<'_>>) = match &unowned_ids {
        // Every unowned row: one pass over the table (an anti-join costs twice as much).
        None => (
            format!(
                "SELECT {COLUMNS} FROM tenants t LEFT JOIN gitops_owners o USING (tenant_id) LEFT JOIN gitops_applied a USING (tenant_id)
                  WHERE o.source = $1 OR o.source IS NULL"
            ),
            vec![&source],
        ),
        // Its own rows through the owner index, and the unowned rows it has files for.
        Some(ids) => (
            format!(
                "SELECT {COLUMNS} FROM gitops_owners o JOIN tenants t USING (tenant_id) LEFT JOIN gitops_applied a USING (tenant_id)
                  WHERE o.source = $1
                 UNION ALL
                 SELECT {COLUMNS} FROM tenants t LEFT JOIN gitops_owners o USING (tenant_id) LEFT JOIN gitops_applied a USING (tenant_id)
                  WHERE t.tenant_id = ANY($2) AND o.source IS NULL"
            ),
            vec![&source, ids],
        ),
    };
    // Streamed: each row becomes its index entry as it arrives, instead of every row's message
    // being held until the last one has.
    let rows = client.query_raw(&sql, params).await.map_err(q("indexing tenants"))?;
    futures_util::pin_mut!(rows);
    let (mut index, mut commit) = (Vec::new(), None);
    while let Some(r) = rows.try_next().await.map_err(q("indexing tenants"))? {
        index.push(index_from_row(&r, &mut commit)?);
    }
    Ok(index)
}

/// `commit`: the last row's applied commit, which this row shares when it names the same one.
fn index_from_row(r: &tokio_postgres::Row, commit: &mut Option<Arc<str>>) -> Result<RowIndex, StoreError> {
    let tenant_id: String = r.get(0);
    let bad = |e: tokio_postgres::Error| StoreError::BadRow {
        tenant: tenant_id.clone(),
        message: e.to_string(),
    };
    let file: Option<String> = r.try_get(2).map_err(bad)?;
    let (owned, owned_by_other_file) = (r.try_get(7).map_err(bad)?, r.try_get(8).map_err(bad)?);
    let applied = match file {
        Some(f) => Some((f, r.try_get(3).map_err(bad)?, r.try_get(4).map_err(bad)?)),
        None => None,
    };
    let applied_commit = match r.try_get::<_, Option<&str>>(6).map_err(bad)? {
        Some(c) if commit.as_deref() != Some(c) => Some(commit.insert(Arc::from(c)).clone()),
        Some(_) => commit.clone(),
        None => None,
    };
    let (config_version, touched) = (r.try_get(1).map_err(bad)?, r.try_get(5).map_err(bad)?);
    Ok(RowIndex {
        owned,
        owned_by_other_file,
        applied_commit,
        config_version,
        touched,
        applied,
        tenant_id,
    })
}

/// Each row is two documents to parse (its config, and the sealed copy last applied), most of the
/// time a full read takes: they are parsed on every core.
fn actual_from_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<ActualTenant>, StoreError> {
    crate::blocking(|| rows.par_iter().map(actual_from_row).collect())
}

fn actual_from_row(row: &tokio_postgres::Row) -> Result<ActualTenant, StoreError> {
    let tenant: String = row.try_get(0).map_err(|e| StoreError::BadRow {
        tenant: "?".into(),
        message: e.to_string(),
    })?;
    let bad = |e: tokio_postgres::Error| StoreError::BadRow {
        tenant: tenant.clone(),
        message: e.to_string(),
    };
    // Kept as text (a full read holds every row): jsonb's own text, checked, not parsed into trees.
    let raw = |i| row.try_get::<_, Json<Box<RawValue>>>(i).map(|j| j.0).map_err(bad);
    let text = |s: Result<JsonText, String>| {
        s.map_err(|message| StoreError::BadRow {
            tenant: tenant.clone(),
            message,
        })
    };
    let key = Value::String(row.try_get::<_, String>(3).map_err(bad)?);
    let document = text(JsonText::from_text(format!(
        r#"{{"age_public_key":{key},"endpoints":{},"config":{}}}"#,
        raw(4)?.get(),
        raw(5)?.get()
    )))?;
    let applied = match row.try_get::<_, Option<String>>(6).map_err(bad)? {
        None => None,
        Some(commit_id) => {
            let secret_paths: SecretPaths = row.try_get::<_, Vec<String>>(10).map_err(bad)?.into_iter().collect();
            Some(AppliedRecord {
                commit_id,
                file: row.try_get(11).map_err(bad)?,
                config_version: row.try_get(7).map_err(bad)?,
                digest: row.try_get(8).map_err(bad)?,
                sealed: text(JsonText::from_raw(raw(9)?))?,
                secret_paths,
            })
        }
    };
    let updated_at: Option<chrono::DateTime<chrono::Utc>> = row.try_get(12).map_err(bad)?;
    Ok(ActualTenant {
        updated_at: updated_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        known_secrets: applied.as_ref().map(|a| a.secret_paths.clone()).unwrap_or_default(),
        state: row.try_get(1).map_err(bad)?,
        config_version: row.try_get(2).map_err(bad)?,
        tenant_id: tenant.clone(),
        document,
        applied,
    })
}
