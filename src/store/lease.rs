//! The replicas' membership and source leases, as session-level advisory locks (see
//! `agent::lease`, which decides who holds what).

use super::locks;

/// More replicas than this share nothing: the extra ones wait for a slot.
pub const SLOTS: i32 = 1024;

/// The member slots held now, in this database.
pub async fn live_members(client: &tokio_postgres::Client) -> Result<Vec<u32>, String> {
    let rows = client
        .query(
            "SELECT objid::bigint FROM pg_locks
              WHERE locktype = 'advisory' AND classid = $1::int::oid AND objsubid = 2 AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&locks::MEMBER_NS],
        )
        .await
        .map_err(|e| format!("reading the members: {e}"))?;
    let mut slots: Vec<u32> = rows.iter().map(|r| r.get::<_, i64>(0) as u32).collect();
    slots.sort_unstable();
    Ok(slots)
}

/// Takes the lowest free slot (another replica may take it first: then the next).
pub async fn join(client: &tokio_postgres::Client, taken: &[u32]) -> Result<Option<u32>, String> {
    for slot in (0..SLOTS).filter(|s| !taken.contains(&(*s as u32))) {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&locks::MEMBER_NS, &slot])
            .await
            .map_err(|e| format!("joining the replicas: {e}"))?
            .get(0);
        if got {
            tracing::info!(slot, "joined the replicas");
            return Ok(Some(slot as u32));
        }
    }
    Ok(None)
}

/// Lets go of a source's lease.
pub async fn release(client: &tokio_postgres::Client, source: &str) -> Result<(), String> {
    client
        .query_one("SELECT pg_advisory_unlock($1)", &[&locks::lease(source)])
        .await
        .map_err(|e| format!("releasing the lease of source {source}: {e}"))
        .map(|_| ())
}

/// Takes a source's lease if no other session holds it.
pub async fn try_take(client: &tokio_postgres::Client, source: &str) -> Result<bool, String> {
    Ok(client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&locks::lease(source)])
        .await
        .map_err(|e| format!("taking the lease of source {source}: {e}"))?
        .get(0))
}

/// Whether the session still answers.
pub async fn alive(client: &tokio_postgres::Client) -> bool {
    client.simple_query("SELECT 1").await.is_ok()
}
