//! Membership and per-source leases, as session-level advisory locks on one connection of the
//! replica's own. A replica is a member while it holds a slot lock; the members are read from
//! `pg_locks`, so a replica that dies (its session ends) stops counting at once, and the sources
//! it held are free. Who syncs what is [`crate::domain::shard::assign`] over the live members.
//!
//! The leases spread work; they are not what keeps a change from being applied twice: every run
//! plans and applies under its source's transaction-level apply lock, from what the database
//! holds once it has it (a fencing token would guard the same thing again).

use crate::domain::shard;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::time::Duration;

/// First key of the member slot locks ("frmb"); the second is the slot.
const MEMBER_NS: i32 = 0x6672_6d62;
/// More replicas than this share nothing: the extra ones wait for a slot.
const SLOTS: i32 = 1024;
/// A lease round (connect, join, read members, take and release) that takes longer fails.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// The lock key of a source's lease.
pub fn source_key(name: &str) -> i64 {
    let d = Sha256::digest(format!("frostbyte source lease\0{name}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

pub struct Leases {
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
    slot: Option<u32>,
    held: BTreeSet<String>,
}

impl Leases {
    pub fn new(config: tokio_postgres::Config) -> Self {
        Leases {
            config,
            client: None,
            slot: None,
            held: BTreeSet::new(),
        }
    }

    /// One round: join if not a member, read the live members, let go of the sources that are
    /// now another member's and take this one's. Returns the sources this replica holds.
    pub async fn balance(&mut self, sources: &[&str]) -> Result<BTreeSet<String>, String> {
        match tokio::time::timeout(ROUND_TIMEOUT, self.round(sources)).await {
            Ok(Ok(held)) => Ok(held),
            Ok(Err(e)) => {
                self.drop_session();
                Err(e)
            }
            Err(_) => {
                self.drop_session();
                Err(format!("the lease round took longer than {ROUND_TIMEOUT:?}"))
            }
        }
    }

    /// Losing the connection loses every lock it held: start over as a new member.
    fn drop_session(&mut self) {
        if self.client.take().is_some() && !self.held.is_empty() {
            tracing::warn!(sources = self.held.len(), "lost the connection that held the source leases");
        }
        self.slot = None;
        self.held.clear();
    }

    async fn round(&mut self, sources: &[&str]) -> Result<BTreeSet<String>, String> {
        if let Some(c) = &self.client
            && c.simple_query("SELECT 1").await.is_err()
        {
            self.drop_session();
        }
        if self.client.is_none() {
            let tls = crate::store::tls().map_err(|e| e.to_string())?;
            let (client, conn) = self.config.connect(tls).await.map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let members = live_members(client).await?;
        if self.slot.is_none() {
            self.slot = join(client, &members).await?;
        }
        let Some(me) = self.slot else {
            tracing::warn!("every member slot is taken: this replica stands by");
            return Ok(BTreeSet::new());
        };
        let mut members = live_members(client).await?;
        if !members.contains(&me) {
            members.push(me);
        }
        let assignment = shard::assign(sources, &members);
        let mine: BTreeSet<String> = assignment.into_iter().filter(|(_, m)| *m == me).map(|(s, _)| s).collect();
        for gone in self.held.difference(&mine).cloned().collect::<Vec<_>>() {
            client
                .query_one("SELECT pg_advisory_unlock($1)", &[&source_key(&gone)])
                .await
                .map_err(|e| format!("releasing the lease of source {gone}: {e}"))?;
            tracing::info!(source = %gone, "released the source lease: another replica's share now");
            self.held.remove(&gone);
        }
        for s in mine.difference(&self.held.clone()) {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&source_key(s)])
                .await
                .map_err(|e| format!("taking the lease of source {s}: {e}"))?
                .get(0);
            if got {
                tracing::info!(source = %s, "holding the source lease: this replica syncs it");
                self.held.insert(s.clone());
            } else {
                tracing::debug!(source = %s, "its previous holder has not let go yet");
            }
        }
        Ok(self.held.clone())
    }
}

/// The slots held now, in this database.
async fn live_members(client: &tokio_postgres::Client) -> Result<Vec<u32>, String> {
    let rows = client
        .query(
            "SELECT objid::bigint FROM pg_locks
              WHERE locktype = 'advisory' AND classid = $1::int::oid AND objsubid = 2 AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&MEMBER_NS],
        )
        .await
        .map_err(|e| format!("reading the members: {e}"))?;
    let mut slots: Vec<u32> = rows.iter().map(|r| r.get::<_, i64>(0) as u32).collect();
    slots.sort_unstable();
    Ok(slots)
}

/// Takes the lowest free slot (another replica may take it first: then the next).
async fn join(client: &tokio_postgres::Client, taken: &[u32]) -> Result<Option<u32>, String> {
    for slot in (0..SLOTS).filter(|s| !taken.contains(&(*s as u32))) {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&MEMBER_NS, &slot])
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
