//! Membership and per-source leases, as session-level advisory locks on one connection of the
//! replica's own. A replica is a member while it holds a slot lock; the members are read from
//! `pg_locks`, so a replica that dies (its session ends) stops counting at once, and the sources
//! it held are free. Who syncs what is [`crate::domain::shard::assign`] over the live members.
//!
//! The leases spread work; they are not what keeps a change from being applied twice: every run
//! plans and applies under its source's transaction-level apply lock, from what the database
//! holds once it has it (a fencing token would guard the same thing again).

use crate::domain::shard;
use crate::store::lease::{alive, join, live_members, release, try_take};
use std::collections::BTreeSet;
use std::time::Duration;

/// A lease round (connect, join, read members, take and release) that takes longer fails.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

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
            && !alive(c).await
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
            release(client, &gone).await?;
            tracing::info!(source = %gone, "released the source lease: another replica's share now");
            self.held.remove(&gone);
        }
        for s in mine.difference(&self.held.clone()) {
            if try_take(client, s).await? {
                tracing::info!(source = %s, "holding the source lease: this replica syncs it");
                self.held.insert(s.clone());
            } else {
                tracing::debug!(source = %s, "its previous holder has not let go yet");
            }
        }
        Ok(self.held.clone())
    }
}
