//! The dev cluster's directories: made private, and refused (naming the path) when someone else
//! could have prepared them.

use frostbyte_gitops::localpg::{self, LocalPgError};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A data directory the postgres user cannot reach, so the cluster moves under /var/tmp.
fn unreachable_data_dir() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let wanted = base.path().join("data").join("pgdata");
    (base, wanted)
}

fn refused(result: Result<localpg::LocalCluster, LocalPgError>, path: &Path, why: &str) {
    match result {
        Err(e @ LocalPgError::Unsafe { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()) && text.contains(why), "{text}");
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_relocated_directory_prepared_by_someone_else_is_refused() {
    if !as_root() {
        eprintln!("skipped: the cluster moves under /var/tmp only when run as root");
        return;
    }
    let (_base, wanted) = unreachable_data_dir();
    std::fs::create_dir_all(wanted.parent().unwrap()).unwrap();
    let moved = localpg::effective_dir(&wanted);
    let dir = moved.parent().unwrap().to_path_buf();
    assert!(dir.starts_with("/var/tmp"), "{}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&dir);

    // A link planted where the directory goes.
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), &dir).unwrap();
    refused(localpg::ensure(&wanted, &[]), &dir, "not a directory");
    std::fs::remove_file(&dir).unwrap();

    // A directory anyone can write to.
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(localpg::ensure(&wanted, &[]), &dir, "must be 0700");
    std::fs::remove_dir(&dir).unwrap();

    // Made by us: 0700, the postgres user's, and the cluster starts in it.
    let cluster = localpg::ensure(&wanted, &[]).unwrap();
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700);
    assert_ne!(meta.uid(), 0, "owned by the user that runs the cluster");
    assert!(cluster.data_dir.starts_with(&dir));
    localpg::stop(&wanted).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lock_file_that_is_a_link_is_refused() {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let wanted = base.path().join("pgdata");
    let lock = base.path().join("pgdata.lock");
    std::os::unix::fs::symlink("/etc/passwd", &lock).unwrap();
    refused(localpg::ensure(&wanted, &[]), &lock, "symbolic link");
}
