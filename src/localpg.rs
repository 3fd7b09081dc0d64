//! A PostgreSQL cluster of the agent's own, for development and tests: started (or reused) under a
//! data directory, reachable only through a unix socket inside it, so no TCP port can collide.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or under /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql) or set FROSTBYTE_CONTROL_DB_URL to an existing database"
    )]
    NoBinaries,
    #[error(
        "running as root, but there is no `postgres` user to run the server as (PostgreSQL refuses to run as root); create one or set FROSTBYTE_CONTROL_DB_URL"
    )]
    NoPostgresUser,
    #[error("{what} ({path})")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {output}")]
    Command { command: String, output: String },
    #[error("the socket path {0} is longer than unix sockets allow (107 bytes); use a shorter --data-dir")]
    SocketPathTooLong(PathBuf),
    #[error("refusing {path}: {why} (another user may have made it; remove it or use another --data-dir)")]
    Unsafe { path: PathBuf, why: String },
}

/// A running cluster.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub user: String,
}

impl LocalCluster {
    /// A libpq-style connection string for `dbname` on this cluster.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!("host={} user={} dbname={}", self.socket_dir.display(), self.user, dbname)
    }
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |source| LocalPgError::Io { what, path, source }
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

struct RunAs {
    /// uid/gid to run the server as when we are root.
    user: Option<(u32, u32)>,
}

impl RunAs {
    fn detect() -> Result<Self, LocalPgError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(RunAs { user: None });
        }
        let name = std::ffi::CString::new("postgres").expect("no NUL");
        // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return Err(LocalPgError::NoPostgresUser);
        }
        // SAFETY: checked non-null above.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(RunAs { user: Some((uid, gid)) })
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir("/");
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
            // The server must not inherit root's HOME or supplementary groups' view.
            c.env("HOME", "/tmp");
        }
        c
    }

    fn chown(&self, path: &Path) -> Result<(), LocalPgError> {
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("giving the data directory to the postgres user", path))?;
        }
        Ok(())
    }
}

fn run(mut cmd: Command) -> Result<(), LocalPgError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| LocalPgError::Command {
        command: shown.clone(),
        output: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if text.is_empty() {
            text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(LocalPgError::Command { command: shown, output: text })
    }
}

/// Starts the cluster under `data_dir` (creating it on first use) unless it already runs.
/// `extra` goes to the server as `-c` settings. Safe to call from several processes at once.
pub fn ensure(data_dir: &Path, extra: &[&str]) -> Result<LocalCluster, LocalPgError> {
    let bin = find_bin_dir().ok_or(LocalPgError::NoBinaries)?;
    let run_as = RunAs::detect()?;
    let parent = data_dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io("creating the data directory's parent", parent))?;
    let mut data_dir = fs::canonicalize(parent)
        .map_err(io("resolving", parent))?
        .join(data_dir.file_name().unwrap_or("pgdata".as_ref()));
    if run_as.user.is_some() && !others_can_enter(&data_dir) {
        // The server runs as `postgres`, which cannot reach a directory under, say, /root.
        let moved = relocated(&data_dir);
        tracing::warn!(wanted = %data_dir.display(), using = %moved.display(), "the postgres user cannot reach the data directory; using another one");
        private_dir(moved.parent().expect("has a parent"), &run_as)?;
        data_dir = moved;
    }
    if fs::symlink_metadata(&data_dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(LocalPgError::Unsafe {
            path: data_dir,
            why: "the data directory is a symbolic link".into(),
        });
    }
    let socket = data_dir.join(".s.PGSQL.5432");
    if socket.as_os_str().len() > 107 {
        return Err(LocalPgError::SocketPathTooLong(socket));
    }
    let lock_path = data_dir.with_extension("lock");
    let lock = open_lock(&lock_path)?;
    lock.lock().map_err(io("locking", &lock_path))?;

    if !data_dir.join("PG_VERSION").exists() {
        fs::create_dir_all(&data_dir).map_err(io("creating the data directory", &data_dir))?;
        run_as.chown(&data_dir)?;
        let mut c = run_as.command(&bin.join("initdb"));
        c.arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-instructions"]);
        run(c)?;
    }
    let mut status = run_as.command(&bin.join("pg_ctl"));
    status.arg("status").arg("-D").arg(&data_dir);
    let running = status.output().map(|o| o.status.success()).unwrap_or(false);
    if !running {
        let mut opts = format!("-c listen_addresses='' -c unix_socket_directories='{}'", data_dir.display());
        for e in extra {
            opts.push_str(" -c ");
            opts.push_str(e);
        }
        let mut c = run_as.command(&bin.join("pg_ctl"));
        c.arg("start")
            .arg("-D")
            .arg(&data_dir)
            .args(["-w", "-t", "60", "-s"])
            .arg("-l")
            .arg(data_dir.join("server.log"))
            .arg("-o")
            .arg(opts);
        run(c)?;
    }
    drop(lock);
    Ok(LocalCluster {
        socket_dir: data_dir.clone(),
        data_dir,
        user: "postgres".into(),
    })
}

/// A directory only the cluster's user can enter, made 0700 if missing and checked if present: a
/// real directory (not a link), owned by that user (or by us), writable by nobody else. Under
/// /var/tmp another local user could otherwise have made it first and planted a socket or link.
fn private_dir(path: &Path, run_as: &RunAs) -> Result<(), LocalPgError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => run_as.chown(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", path)(e)),
    }
    let unsafe_dir = |why: String| LocalPgError::Unsafe { path: path.to_path_buf(), why };
    let meta = fs::symlink_metadata(path).map_err(io("checking", path))?;
    if !meta.file_type().is_dir() {
        return Err(unsafe_dir("it is not a directory (a symbolic link or a file)".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    let owner_ok = meta.uid() == ours || run_as.user.is_some_and(|(uid, _)| meta.uid() == uid);
    if !owner_ok {
        return Err(unsafe_dir(format!("it is owned by uid {}, not by the user that runs the cluster", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!("its mode is {:o}; it must be 0700", meta.mode() & 0o777)));
    }
    Ok(())
}

/// The cluster lock file, never through a link: opened with O_NOFOLLOW, and refused unless it is
/// a regular file of ours with a single name (a hard link to another file is not).
fn open_lock(path: &Path) -> Result<File, LocalPgError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => LocalPgError::Unsafe {
                path: path.to_path_buf(),
                why: "the lock file is a symbolic link".into(),
            },
            _ => io("opening the cluster lock file", path)(e),
        })?;
    let meta = file.metadata().map_err(io("checking", path))?;
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != ours || meta.nlink() != 1 {
        return Err(LocalPgError::Unsafe {
            path: path.to_path_buf(),
            why: "the lock file is not a regular file of ours with a single name".into(),
        });
    }
    Ok(file)
}

/// Whether every existing ancestor of `path` lets other users through (o+x).
fn others_can_enter(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors()
        .skip(1)
        .filter_map(|p| fs::metadata(p).ok())
        .all(|m| m.permissions().mode() & 0o001 != 0)
}

/// A place under /var/tmp, named after the wanted path so that the same path finds it again.
fn relocated(wanted: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let tag = hex::encode(&Sha256::digest(wanted.as_os_str().as_encoded_bytes())[..6]);
    PathBuf::from(format!("/var/tmp/frostbyte-{tag}")).join(wanted.file_name().unwrap_or("pgdata".as_ref()))
}

/// Where `ensure` keeps (or would keep) the cluster wanted at `data_dir`.
pub fn effective_dir(data_dir: &Path) -> PathBuf {
    let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let abs = abs
        .parent()
        .and_then(|p| fs::canonicalize(p).ok())
        .map(|p| p.join(abs.file_name().unwrap_or_default()))
        .unwrap_or(abs);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !others_can_enter(&abs) {
        relocated(&abs)
    } else {
        abs
    }
}

/// Stops the cluster under `data_dir` if it runs.
pub fn stop(data_dir: &Path) -> Result<(), LocalPgError> {
    let bin = find_bin_dir().ok_or(LocalPgError::NoBinaries)?;
    let data_dir = &effective_dir(data_dir);
    if !data_dir.join("PG_VERSION").exists() {
        return Ok(());
    }
    let run_as = RunAs::detect()?;
    let mut c = run_as.command(&bin.join("pg_ctl"));
    c.arg("stop").arg("-D").arg(data_dir).args(["-m", "fast", "-s"]);
    let _ = run(c);
    Ok(())
}
