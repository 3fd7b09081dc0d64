//! What the status page reads beyond `status`: runs per hour, drift over time, tenants a page at
//! a time, one tenant's owner and recorded drift, and recent audit events. Every list is bounded.

use super::{StoreError, q};
use crate::domain::drift::TenantDrift;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::GenericClient;

const TIME: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";

/// Most rows one page shows.
pub const PAGE_ROWS: i64 = 100;

/// Replaces the recorded drift of the source named `name` with `report`'s drifted tenants, in
/// one transaction.
pub async fn record_drift(client: &mut tokio_postgres::Client, name: &str, report: &[TenantDrift]) -> Result<(), StoreError> {
    let drifted: Vec<&TenantDrift> = report.iter().filter(|t| !t.in_sync()).collect();
    let ids: Vec<&str> = drifted.iter().map(|t| t.tenant_id.as_str()).collect();
    let classes: Vec<String> = drifted
        .iter()
        .map(|t| t.classes.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(","))
        .collect();
    let details: Vec<Value> = drifted.iter().map(|t| serde_json::to_value(t).expect("a report serialises")).collect();
    let tx = client.transaction().await.map_err(q("starting a transaction"))?;
    tx.execute("DELETE FROM gitops_tenant_drift WHERE source_name = $1", &[&name])
        .await
        .map_err(q("clearing the source's recorded drift"))?;
    // A tenant another source reported drifted stays as that source recorded it.
    tx.execute(
        "INSERT INTO gitops_tenant_drift (tenant_id, source_name, classes, detail)
         SELECT u.id, $1, string_to_array(u.classes, ','), u.detail FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS u(id, classes, detail)
         ON CONFLICT (tenant_id) DO UPDATE SET source_name = EXCLUDED.source_name, classes = EXCLUDED.classes,
             detail = EXCLUDED.detail, recorded_at = now()",
        &[&name, &ids, &classes, &details],
    )
    .await
    .map_err(q("recording the source's drift"))?;
    tx.commit().await.map_err(q("committing the recorded drift"))
}

/// Runs that applied and runs that failed or were refused, per hour of the last `hours`.
#[derive(Debug, Clone, Serialize)]
pub struct Hour {
    /// The hour's start, RFC 3339.
    pub hour: String,
    pub applied: i64,
    pub failed: i64,
    /// Tenants drifted at the hour's last drift report of each source, summed over the sources.
    pub drifted: Option<i64>,
}

pub async fn hours(client: &impl GenericClient, hours: i32) -> Result<Vec<Hour>, StoreError> {
    let rows = client
        .query(
            &format!(
                "WITH h AS (SELECT generate_series(date_trunc('hour', now()) - make_interval(hours => $1 - 1), date_trunc('hour', now()), interval '1 hour') AS hour),
                 r AS (SELECT date_trunc('hour', started_at) AS hour,
                              count(*) FILTER (WHERE outcome = 'applied') AS applied,
                              count(*) FILTER (WHERE outcome IN ('failed', 'refused')) AS failed
                         FROM gitops_runs WHERE started_at >= date_trunc('hour', now()) - make_interval(hours => $1 - 1)
                        GROUP BY 1),
                 d AS (SELECT hour, sum(n) AS drifted FROM (
                         SELECT DISTINCT ON (date_trunc('hour', started_at), source_name) date_trunc('hour', started_at) AS hour,
                                (SELECT coalesce(sum(value::bigint), 0) FROM jsonb_each_text(drift) WHERE key <> 'in-sync') AS n
                           FROM gitops_runs
                          WHERE drift IS NOT NULL AND started_at >= date_trunc('hour', now()) - make_interval(hours => $1 - 1)
                          ORDER BY date_trunc('hour', started_at), source_name, run_id DESC) last GROUP BY hour)
                 SELECT to_char(h.hour AT TIME ZONE 'UTC', {TIME}), coalesce(r.applied, 0), coalesce(r.failed, 0), d.drifted::bigint
                   FROM h LEFT JOIN r USING (hour) LEFT JOIN d USING (hour) ORDER BY h.hour"
            ),
            &[&hours],
        )
        .await
        .map_err(q("counting runs per hour"))?;
    Ok(rows
        .iter()
        .map(|r| Hour {
            hour: r.get(0),
            applied: r.get(1),
            failed: r.get(2),
            drifted: r.get(3),
        })
        .collect())
}

/// One row of the tenant list.
#[derive(Debug, Clone, Serialize)]
pub struct TenantRow {
    pub tenant_id: String,
    pub state: String,
    pub config_version: i64,
    pub source: Option<String>,
    pub file: Option<String>,
    /// Its drift classes at the last report; empty: in sync.
    pub drift: Vec<String>,
}

/// Tenants after `after` in id order, at most [`PAGE_ROWS`]; with `class`, only those the last
/// drift report put in it (`in-sync`: those it found in sync).
pub async fn tenants(client: &impl GenericClient, class: Option<&str>, after: &str) -> Result<Vec<TenantRow>, StoreError> {
    let rows = client
        .query(
            "SELECT t.tenant_id, t.state, t.config_version, o.source_name, o.file_path, coalesce(d.classes, '{}')
               FROM tenants t LEFT JOIN gitops_owners o USING (tenant_id) LEFT JOIN gitops_tenant_drift d USING (tenant_id)
              WHERE t.tenant_id > $1
                AND ($2::text IS NULL OR ($2 = 'in-sync' AND d.tenant_id IS NULL) OR $2 = ANY(d.classes))
              ORDER BY t.tenant_id LIMIT $3",
            &[&after, &class, &PAGE_ROWS],
        )
        .await
        .map_err(q("listing tenants"))?;
    Ok(rows
        .iter()
        .map(|r| TenantRow {
            tenant_id: r.get(0),
            state: r.get(1),
            config_version: r.get(2),
            source: r.get(3),
            file: r.get(4),
            drift: r.get(5),
        })
        .collect())
}

/// Who owns a tenant (source name and id, its file), and its recorded drift.
#[derive(Debug, Clone, Serialize)]
pub struct TenantBook {
    pub source_name: Option<String>,
    pub source: Option<String>,
    pub file: Option<String>,
    pub drift: Option<Value>,
    pub drift_recorded_at: Option<String>,
}

pub async fn tenant_book(client: &impl GenericClient, tenant: &str) -> Result<TenantBook, StoreError> {
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT source_name FROM gitops_owners WHERE tenant_id = $1), (SELECT source FROM gitops_owners WHERE tenant_id = $1),
                        (SELECT file_path FROM gitops_owners WHERE tenant_id = $1), (SELECT detail FROM gitops_tenant_drift WHERE tenant_id = $1),
                        (SELECT to_char(recorded_at AT TIME ZONE 'UTC', {TIME}) FROM gitops_tenant_drift WHERE tenant_id = $1)"
            ),
            &[&tenant],
        )
        .await
        .map_err(q(format!("reading the owner of tenant {tenant}")))?;
    Ok(TenantBook {
        source_name: row.get(0),
        source: row.get(1),
        file: row.get(2),
        drift: row.get(3),
        drift_recorded_at: row.get(4),
    })
}

/// One audit event as the audit page lists it (details stay in the trail).
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub seq: i64,
    pub tenant_id: String,
    pub event_type: String,
    pub occurred_at: String,
    pub actor: String,
    pub to_version: Option<i64>,
}

/// Events before `before` (newest first), at most [`PAGE_ROWS`].
pub async fn events(client: &impl GenericClient, before: i64) -> Result<Vec<EventRow>, StoreError> {
    let rows = client
        .query(
            &format!(
                "SELECT event_seq, tenant_id, event_type, to_char(occurred_at AT TIME ZONE 'UTC', {TIME}), actor, (details->>'to_version')::bigint
                   FROM audit_events WHERE event_seq < $1 ORDER BY event_seq DESC LIMIT $2"
            ),
            &[&before, &PAGE_ROWS],
        )
        .await
        .map_err(q("reading recent audit events"))?;
    Ok(rows
        .iter()
        .map(|r| EventRow {
            seq: r.get(0),
            tenant_id: r.get(1),
            event_type: r.get(2),
            occurred_at: r.get(3),
            actor: r.get(4),
            to_version: r.get(5),
        })
        .collect())
}
