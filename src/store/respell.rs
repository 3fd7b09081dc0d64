//! A source whose repository is spelled another way (a path for a `file://` URL, ssh for https)
//! keeps its tenants: what was recorded under the old spelling moves to the new one.

use super::{StoreError, q};
use tokio_postgres::GenericClient;

/// The source ids that tenants claimed by the source named `name` are recorded under, other
/// than `id`.
pub async fn other_spellings(client: &impl GenericClient, name: &str, id: &str) -> Result<Vec<String>, StoreError> {
    // Every run asks, so it must not read every owner: the distinct sources are walked on the
    // source index (a skip scan, one probe per source), and one row of each gives its name.
    let rows = client
        .query(
            "WITH RECURSIVE s(source) AS (
                 (SELECT source FROM gitops_owners ORDER BY source LIMIT 1)
                 UNION ALL
                 SELECT (SELECT o.source FROM gitops_owners o WHERE o.source > s.source ORDER BY o.source LIMIT 1)
                   FROM s WHERE s.source IS NOT NULL)
             SELECT s.source FROM s
              WHERE s.source IS NOT NULL AND s.source <> $2
                AND (SELECT o.source_name FROM gitops_owners o WHERE o.source = s.source LIMIT 1) = $1",
            &[&name, &id],
        )
        .await
        .map_err(q("reading which sources own tenants"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Moves everything recorded under source id `old` (owners, applied records, the last applied
/// commit) to `new`, in one transaction; returns how many tenants moved. Running it twice, or
/// from two replicas at once, moves each record once.
pub async fn respell(client: &mut tokio_postgres::Client, old: &str, new: &str) -> Result<u64, StoreError> {
    let tx = client.transaction().await.map_err(q("starting a transaction"))?;
    let moved = tx
        .execute("UPDATE gitops_owners SET source = $2 WHERE source = $1", &[&old, &new])
        .await
        .map_err(q("moving tenant owners to the source's new spelling"))?;
    tx.execute("UPDATE gitops_applied SET source = $2 WHERE source = $1", &[&old, &new])
        .await
        .map_err(q("moving applied records to the source's new spelling"))?;
    tx.execute(
        "UPDATE gitops_sources SET source = $2 WHERE source = $1 AND NOT EXISTS (SELECT 1 FROM gitops_sources WHERE source = $2)",
        &[&old, &new],
    )
    .await
    .map_err(q("moving the last applied commit to the source's new spelling"))?;
    tx.execute("DELETE FROM gitops_sources WHERE source = $1", &[&old])
        .await
        .map_err(q("moving the last applied commit to the source's new spelling"))?;
    tx.commit().await.map_err(q("committing the source's new spelling"))?;
    Ok(moved)
}
