//! Connecting to PostgreSQL: TLS, the session's settings and timeouts, the pool, and a connection
//! error as people see it (never the row a constraint quotes).

use super::{StoreError, q};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::str::FromStr;
use tokio_postgres::GenericClient;

/// A driver error as people see it. The server's DETAIL and WHERE are left out: for a violated
/// constraint or a bad value they quote the row (`Failing row contains (...)`), and a tenant's row
/// holds its decrypted config.
pub struct DbFailure(tokio_postgres::Error);

impl From<tokio_postgres::Error> for DbFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        DbFailure(e)
    }
}

impl std::fmt::Display for DbFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => {
                write!(f, "{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code())?;
                match db.hint() {
                    Some(hint) => write!(f, "; hint: {hint}"),
                    None => Ok(()),
                }
            }
            None => self.0.fmt(f),
        }
    }
}

/// The derived Debug would print every field of the server's error, DETAIL included.
impl std::fmt::Debug for DbFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbFailure({self})")
    }
}

impl std::error::Error for DbFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // A server error's own source is the full DbError; anything else (I/O, TLS) is safe to chain.
        match self.0.as_db_error() {
            Some(_) => None,
            None => std::error::Error::source(&self.0),
        }
    }
}

fn any_tcp_host(cfg: &tokio_postgres::Config) -> bool {
    cfg.get_hosts().iter().any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)))
}

/// TLS for TCP connections (`sslmode=prefer` by default, `require` to insist; unix sockets never
/// use it). Certificates are verified against the system's roots plus, if set, the CA file in
/// PGSSLROOTCERT (libpq's variable).
pub fn tls() -> Result<postgres_native_tls::MakeTlsConnector, StoreError> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = std::env::var_os("PGSSLROOTCERT") {
        let pem = std::fs::read(&path).map_err(|e| StoreError::Url(format!("reading PGSSLROOTCERT {}: {e}", path.to_string_lossy())))?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| StoreError::Url(format!("PGSSLROOTCERT {}: {e}", path.to_string_lossy())))?;
        builder.add_root_certificate(cert);
    }
    let connector = builder.build().map_err(|e| StoreError::Url(format!("setting up TLS: {e}")))?;
    Ok(postgres_native_tls::MakeTlsConnector::new(connector))
}

/// Bounds on every session the agent opens, so that a stuck lock or statement fails the run (and
/// the agent retries) instead of holding the apply lock or a replica forever. A URL that sets
/// `options` itself keeps its own. See docs/limits.md.
pub const SESSION_OPTIONS: &str = "-c statement_timeout=120s -c lock_timeout=60s -c idle_in_transaction_session_timeout=300s";

/// Whether a TCP connection may go without TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// As the URL says (`sslmode=prefer` when it says nothing).
    AsGiven,
    /// `sslmode=require` for TCP unless the URL asks for `disable` or a stricter mode (production).
    RequireForTcp,
}

/// A session's settings: the URL's, plus the timeouts and the TLS policy.
pub fn session_config(url: &str, tls_policy: TlsPolicy) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
    if cfg.get_options().is_none() {
        cfg.options(SESSION_OPTIONS);
    }
    let tcp = any_tcp_host(&cfg);
    // From the parsed settings, never the text: "sslmode" may sit in a password or an application
    // name. `prefer`, named or not, would send the password to a server that declines TLS.
    if tls_policy == TlsPolicy::RequireForTcp && tcp && cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    Ok(cfg)
}

/// A pool whose connections, handshakes and waits for a free connection each end at `deadline`:
/// a server that accepts and never answers fails the command instead of hanging it (the URL's
/// `connect_timeout` bounds only the TCP connect).
pub fn pool(url: &str, tls_policy: TlsPolicy, deadline: std::time::Duration) -> Result<Pool, StoreError> {
    let cfg = session_config(url, tls_policy)?;
    let manager = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    // Loading the system's roots takes tens of milliseconds, and a unix socket never uses them.
    let tcp = any_tcp_host(&cfg);
    let mgr = match tcp {
        true => Manager::from_config(cfg, tls()?, manager),
        false => Manager::from_config(cfg, tokio_postgres::NoTls, manager),
    };
    let timeouts = deadpool_postgres::Timeouts {
        wait: Some(deadline),
        create: Some(deadline),
        recycle: Some(deadline),
    };
    Pool::builder(mgr)
        .max_size(4)
        .timeouts(timeouts)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Url(e.to_string()))
}

/// A round trip within `deadline`: a server that finished the handshake but answers nothing is
/// caught before any real work waits on it.
pub async fn first_response(client: &tokio_postgres::Client, deadline: std::time::Duration) -> Result<(), StoreError> {
    match tokio::time::timeout(deadline, client.simple_query("SELECT 1")).await {
        Ok(answer) => answer.map(|_| ()).map_err(q("asking the server its first question")),
        Err(_) => Err(StoreError::Connect {
            target: String::new(),
            cause: format!("connected, but no answer to a first query within {} s (db_timeout)", deadline.as_secs()),
        }),
    }
}

/// Whether the server answers a trivial query (the agent's readiness check).
pub async fn ping(client: &tokio_postgres::Client) -> Result<(), String> {
    client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| e.to_string())
}

pub async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Timeout(kind) => StoreError::Connect {
            target: String::new(),
            cause: format!(
                "no answer within the deadline (db_timeout) while {}",
                match kind {
                    deadpool_postgres::TimeoutType::Wait => "waiting for a free connection",
                    deadpool_postgres::TimeoutType::Create => "connecting (TCP, TLS and login)",
                    deadpool_postgres::TimeoutType::Recycle => "checking a pooled connection",
                }
            ),
        },
        deadpool_postgres::PoolError::Backend(e) => {
            let mut cause: &dyn std::error::Error = &e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            StoreError::Connect {
                target: String::new(),
                cause: cause.to_string(),
            }
        }
        other => StoreError::Pool(other),
    })
}

/// Where a URL or conninfo points, without credentials: `host:port` or the socket directory, for
/// error messages.
pub fn target_of(url: &str) -> String {
    let Ok(cfg) = tokio_postgres::Config::from_str(url) else {
        return "(an invalid URL)".into();
    };
    let ports = cfg.get_ports();
    cfg.get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(host) => format!("{host}:{port}"),
                tokio_postgres::config::Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates `name` on the server `admin_url` points to, if it does not exist.
pub async fn create_database(admin: &impl GenericClient, name: &str) -> Result<(), StoreError> {
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(q("looking up the database"))?;
    if exists.is_none() {
        // Identifiers cannot be bound as parameters; quote it.
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(e) = admin.batch_execute(&sql).await
            && e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
        {
            return Err(StoreError::Query {
                context: format!("creating database {name}"),
                source: e.into(),
            });
        }
    }
    Ok(())
}
