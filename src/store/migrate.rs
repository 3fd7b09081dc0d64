//! Migrations: plain SQL files in `migrations/`, applied in order under an advisory lock, each
//! recorded with its checksum. Which are pending, and whether what was applied is still what this
//! build carries, is [`verify`]: a pure function, tested without a database.

use super::{StoreError, locks, q};
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;

/// Migrations in the order they apply. Their text is part of the binary so that a deployed agent
/// cannot drift from the files it was built with.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "001_tenant_registry.sql", include_str!("../../migrations/001_tenant_registry.sql")),
    (2, "002_audit_events.sql", include_str!("../../migrations/002_audit_events.sql")),
    (3, "003_gitops_state.sql", include_str!("../../migrations/003_gitops_state.sql")),
    (4, "004_audit_chain.sql", include_str!("../../migrations/004_audit_chain.sql")),
    (5, "005_tenant_lifecycle.sql", include_str!("../../migrations/005_tenant_lifecycle.sql")),
    (6, "006_sources.sql", include_str!("../../migrations/006_sources.sql")),
    (7, "007_audit_batch.sql", include_str!("../../migrations/007_audit_batch.sql")),
    (8, "008_audit_head.sql", include_str!("../../migrations/008_audit_head.sql")),
    (9, "009_cheaper_checks.sql", include_str!("../../migrations/009_cheaper_checks.sql")),
    (10, "010_covering_keys.sql", include_str!("../../migrations/010_covering_keys.sql")),
    (11, "011_runs.sql", include_str!("../../migrations/011_runs.sql")),
];

pub fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// A migration as `schema_migrations` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i32,
    pub name: String,
    pub checksum: String,
}

/// The migrations of `known` still to apply, in order; or why the database cannot be migrated: it
/// holds a migration this build does not know (a newer build ran), or one whose text changed
/// since it was applied.
pub fn verify<'k>(applied: &[Applied], known: &'k [(i32, &'k str, &'k str)]) -> Result<Vec<&'k (i32, &'k str, &'k str)>, StoreError> {
    for a in applied {
        match known.iter().find(|m| m.0 == a.version) {
            None => {
                return Err(StoreError::UnknownMigration {
                    version: a.version,
                    name: a.name.clone(),
                });
            }
            Some((_, file, sql)) if checksum(sql) != a.checksum => {
                return Err(StoreError::ChecksumMismatch {
                    name: file.to_string(),
                    applied: a.checksum.clone(),
                    now: checksum(sql),
                });
            }
            Some(_) => {}
        }
    }
    Ok(known.iter().filter(|m| !applied.iter().any(|a| a.version == m.0)).collect())
}

/// Applies pending migrations, each in its own transaction, under an advisory lock so that two
/// processes migrating at once apply each migration once. Returns the names applied.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<String>, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&locks::MIGRATE])
        .await
        .map_err(q("taking the migration lock"))?;
    let result = migrate_locked(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&locks::MIGRATE])
        .await
        .map_err(q("releasing the migration lock"));
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<Vec<String>, StoreError> {
    client
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now());
             RESET client_min_messages",
        )
        .await
        .map_err(q("creating schema_migrations"))?;
    let applied: Vec<Applied> = client
        .query("SELECT version, name, checksum FROM schema_migrations ORDER BY version", &[])
        .await
        .map_err(q("reading schema_migrations"))?
        .iter()
        .map(|row| Applied {
            version: row.get(0),
            name: row.get(1),
            checksum: row.get(2),
        })
        .collect();
    let mut done = Vec::new();
    for (version, name, sql) in verify(&applied, MIGRATIONS)? {
        let tx = client.transaction().await.map_err(q("starting a migration"))?;
        tx.batch_execute(sql).await.map_err(q(format!("applying migration {name}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &checksum(sql)],
        )
        .await
        .map_err(q(format!("recording migration {name}")))?;
        tx.commit().await.map_err(q(format!("committing migration {name}")))?;
        done.push(name.to_string());
    }
    Ok(done)
}

/// Fails unless every migration this build knows is applied.
pub async fn check_migrated(client: &impl GenericClient) -> Result<(), StoreError> {
    let rows = client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(|e| StoreError::NotMigrated(e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())))?;
    let have: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&str> = MIGRATIONS.iter().filter(|m| !have.contains(&m.0)).map(|m| m.1).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StoreError::NotMigrated(format!("pending: {}", missing.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[(i32, &str, &str)] = &[(1, "001_a.sql", "CREATE TABLE a ();"), (2, "002_b.sql", "CREATE TABLE b ();")];

    fn applied(version: i32, sql: &str) -> Applied {
        Applied {
            version,
            name: format!("{version:03}.sql"),
            checksum: checksum(sql),
        }
    }

    #[test]
    fn pending_unknown_and_changed_migrations() {
        let pending = |a: &[Applied]| verify(a, KNOWN).map(|p| p.iter().map(|m| m.0).collect::<Vec<_>>());
        assert_eq!(pending(&[]).unwrap(), [1, 2], "a new database");
        assert_eq!(pending(&[applied(1, KNOWN[0].2)]).unwrap(), [2]);
        assert_eq!(pending(&[applied(1, KNOWN[0].2), applied(2, KNOWN[1].2)]).unwrap(), Vec::<i32>::new());
        assert_eq!(pending(&[applied(2, KNOWN[1].2)]).unwrap(), [1], "a gap is filled");
        match pending(&[applied(1, KNOWN[0].2), applied(3, "later")]) {
            Err(StoreError::UnknownMigration { version: 3, .. }) => {}
            other => panic!("a migration from a newer build: {other:?}"),
        }
        match pending(&[applied(1, "CREATE TABLE a (x int);")]) {
            Err(StoreError::ChecksumMismatch { name, .. }) => assert_eq!(name, "001_a.sql"),
            other => panic!("an edited migration: {other:?}"),
        }
    }

    #[test]
    fn shipped_migrations_are_numbered_in_order_and_named_after_their_files() {
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i32 + 1);
            assert!(name.starts_with(&format!("{version:03}_")), "{name}");
        }
    }
}
