//! The binary's edge, where adapters meet orchestration: the configured database (or in dev mode
//! the agent's own local cluster) connected and migrated, and a run of a source wired to its
//! repository and a connection. Commands and the agent start here; `sync` never sees a pool.

use crate::config::{Config, Mode, SourceConfig};
use crate::domain::drift::TenantDrift;
use crate::domain::render::Header;
use crate::localpg;
use crate::source::Source;
use crate::store::{self, Db, StoreError};
use crate::sync::{self, Ctx, Outcome, Run, RunOptions, SyncError};
use deadpool_postgres::Pool;

/// The configured database: a pool, and the connection string for the agent's leader lease.
#[derive(Clone)]
pub struct Database {
    pub pool: Pool,
    pub url: String,
    pub tls_policy: store::TlsPolicy,
}

impl Database {
    /// A connection that has answered a first query within the deadline, or an error naming
    /// where the database is.
    pub async fn client(&self, cfg: &Config) -> Result<deadpool_postgres::Object, StoreError> {
        let client = store::client(&self.pool).await.map_err(|e| self.named(e))?;
        store::first_response(&client, std::time::Duration::from_secs(cfg.db_timeout_secs))
            .await
            .map_err(|e| self.named(e))?;
        Ok(client)
    }

    /// A connection error, with where it tried to connect.
    pub fn named(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Connect { target, cause } if target.is_empty() => StoreError::Connect {
                target: store::target_of(&self.url),
                cause,
            },
            other => other,
        }
    }
}

/// The configured database; in dev mode with none configured, the agent's own cluster.
pub async fn connect(cfg: &Config) -> Result<Database, SyncError> {
    let deadline = std::time::Duration::from_secs(cfg.db_timeout_secs);
    let url = match &cfg.database_url {
        Some(url) => url.clone(),
        None if cfg.mode == Mode::Production => {
            return Err(SyncError::Usage(
                "production mode needs a database: set FROSTBYTE_CONTROL_DB_URL (the local PostgreSQL is for dev mode only)".into(),
            ));
        }
        None => {
            let dir = cfg.data_dir.join("pgdata");
            let cluster = tokio::task::spawn_blocking(move || localpg::ensure(&dir, &[]))
                .await
                .expect("local PostgreSQL start panicked")?;
            let admin = store::pool(&cluster.conninfo("postgres"), store::TlsPolicy::AsGiven, deadline)?;
            store::create_database(&**store::client(&admin).await?, "frostbyte").await?;
            cluster.conninfo("frostbyte")
        }
    };
    let policy = if cfg.mode == Mode::Production {
        store::TlsPolicy::RequireForTcp
    } else {
        store::TlsPolicy::AsGiven
    };
    Ok(Database {
        pool: store::pool(&url, policy, deadline)?,
        url,
        tls_policy: policy,
    })
}

/// Dev mode migrates on the way in; production expects `migrate` to have run.
pub async fn prepare(cfg: &Config, db: &Database) -> Result<(), SyncError> {
    let mut client = db.client(cfg).await?;
    // Dev mode migrates unless it need not: the agent may run as an app role that cannot.
    if cfg.mode == Mode::Dev && store::check_migrated(&**client).await.is_err() {
        store::migrate(&mut client).await?;
    } else {
        store::check_migrated(&**client).await?;
    }
    Ok(())
}

/// Opens `src`'s repository; a remote one is cloned or fetched first, so this blocks.
pub fn open_source(ctx: &Ctx, src: &SourceConfig) -> Result<Source, SyncError> {
    crate::blocking(|| Ok(Source::open(&ctx.source_spec(src))?))
}

/// One run of `src` against the database.
pub async fn run(ctx: &Ctx, db: &Database, src: &SourceConfig, run: Run, opts: RunOptions) -> Result<Outcome, SyncError> {
    let source = open_source(ctx, src)?;
    let mut store = Db::new(store::client(&db.pool).await?);
    sync::run(ctx, &source, &mut store, src, run, opts).await
}

/// The drift report of `src` at its configured revision.
pub async fn drift(ctx: &Ctx, db: &Database, src: &SourceConfig, full: bool) -> Result<(Header, Vec<TenantDrift>), SyncError> {
    let source = open_source(ctx, src)?;
    let mut store = Db::new(store::client(&db.pool).await?);
    sync::drift_report(ctx, &source, &mut store, src, full).await
}
