//! Git: the tenant files at a commit (or in the work tree), from a local repository or a remote
//! that is cloned into a cache and fetched on every run.

use crate::domain::audit::CommitInfo;
use crate::domain::commit::CommitId;
use crate::domain::commit::VerifyMode;
use crate::location::{GitAuth, RemoteUrl, RepoLocation};
use crate::ports::{ReadBody, TenantSource};
use crate::verify::{CommitSigner, Refused, TrustedSigners};
use git2::{Oid, Repository};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files larger than this are refused before they are read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Directories below the tenant path a tenant file may sit in (`tenants/eu/ac/acme.toml` is 2).
pub const MAX_DEPTH: usize = 16;
/// Tenant files one source may hold; a tree with more is refused before anything is read.
pub const MAX_FILES: usize = 1_000_000;

pub const TENANT_EXTENSIONS: [&str; 4] = ["toml", "json", "yaml", "yml"];

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    // libgit2's own text ends in "; class=...; code=...": people get its message alone.
    #[error("{path} is not inside a git repository ({})", cause.message())]
    NotARepo { path: String, cause: git2::Error },
    #[error("{what} ({repo}): {}", cause.message())]
    Git { what: String, repo: String, cause: git2::Error },
    #[error("reading {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not exist at {at}")]
    NoTenantDir { path: String, at: String },
    #[error("{path} holds more than {MAX_FILES} tenant files; split it into several sources")]
    TooManyFiles { path: String },
    #[error("revision {rev:?} names both a branch and a tag in {repo}; use refs/heads/{rev} or refs/tags/{rev}")]
    AmbiguousRef { rev: String, repo: String },
}

/// Longest a fetch may take, and longest the server may stay silent, before the fetch fails.
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
const SERVER_TIMEOUT_MS: i32 = 30_000;

#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub repo: RepoLocation,
    pub auth: GitAuth,
    /// The tenant directory, relative to the repository root (or to the subdirectory `repo` names).
    pub path: String,
    /// Where remotes are cloned.
    pub cache_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Bytes(Vec<u8>),
    Symlink,
    TooLarge(u64),
    /// Listed but not read yet: see [`Source::read_bodies`].
    Unread(Oid),
    /// Not a tenant file we will read, for the reason given (a submodule, a directory named like
    /// a tenant file, a name that is not UTF-8): reported, never skipped in silence.
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Relative to the source root, e.g. `tenants/acme.toml`.
    pub path: String,
    /// Where in `path` the tenant id its name claims is (empty when it claims none): a string of
    /// its own was 56 bytes a file, 5.6 MB of a listing of 100,000.
    stem: (u32, u32),
    pub body: Body,
}

impl SourceFile {
    /// A file at `path`, claiming the tenant its name names (`acme` for `tenants/acme.toml`).
    pub fn new(path: String, body: Body) -> SourceFile {
        let name_at = path.rfind('/').map_or(0, |i| i + 1);
        let stem = match (tenant_stem(&path[name_at..]), u32::try_from(name_at)) {
            (Some(stem), Ok(at)) => (at, at + stem.len() as u32),
            _ => (0, 0),
        };
        SourceFile { path, stem, body }
    }

    fn refused(path: String, why: &str) -> SourceFile {
        SourceFile {
            path,
            stem: (0, 0),
            body: Body::Refused(why.to_string()),
        }
    }

    /// The tenant id the file's name claims ("" for a file refused for its name or place).
    pub fn stem(&self) -> &str {
        &self.path[self.stem.0 as usize..self.stem.1 as usize]
    }
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// None when read from the work tree.
    pub commit: Option<CommitInfo>,
    pub files: Vec<SourceFile>,
}

pub struct Source {
    repo: Repository,
    /// Subdirectory of the repository that `--repo` named ("" for the root), with a trailing '/'.
    root: String,
    path: String,
    remote: bool,
    label: String,
    /// A remote's URL and credentials, for fetching again.
    auth: Option<(RemoteUrl, GitAuth)>,
    /// Stable name of this source in the database: repository identity (without credentials)
    /// and tenant path.
    pub id: String,
}

impl Source {
    pub fn open(spec: &SourceSpec) -> Result<Source, SourceError> {
        let path = spec.path.trim_matches('/').to_string();
        let given = match &spec.repo {
            RepoLocation::Local(p) => p,
            RepoLocation::Remote(url) => {
                let repo = clone_or_fetch(url, &spec.auth, &spec.cache_dir)?;
                return Ok(Source {
                    repo,
                    root: String::new(),
                    id: format!("{}#{}", url.public, path),
                    path,
                    remote: true,
                    label: url.public.clone(),
                    auth: Some((url.clone(), spec.auth.clone())),
                });
            }
        };
        let shown = given.display().to_string();
        let repo = Repository::discover(given).map_err(|cause| SourceError::NotARepo { path: shown.clone(), cause })?;
        let workdir = repo.workdir().unwrap_or_else(|| repo.path()).to_path_buf();
        let workdir = workdir.canonicalize().unwrap_or(workdir);
        let given = given.canonicalize().map_err(|source| SourceError::Io { path: shown.clone(), source })?;
        let mut root = given.strip_prefix(&workdir).unwrap_or(Path::new("")).to_string_lossy().replace('\\', "/");
        if !root.is_empty() {
            root.push('/');
        }
        let identity = repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().ok().map(|u| RemoteUrl::parse(u).public))
            .unwrap_or_else(|| workdir.display().to_string());
        Ok(Source {
            id: format!("{identity}#{root}{path}"),
            repo,
            root,
            path,
            remote: false,
            label: shown,
            auth: None,
        })
    }

    fn git_err(&self, what: impl Into<String>) -> impl FnOnce(git2::Error) -> SourceError + '_ {
        let what = what.into();
        move |cause| SourceError::Git {
            what,
            repo: self.label.clone(),
            cause,
        }
    }

    /// The commit a revision names; for a remote, branch and tag names are looked up among the
    /// fetched refs first, and no revision means the remote's default branch.
    pub fn resolve(&self, rev: Option<&str>) -> Result<Oid, SourceError> {
        if let Some(r) = rev {
            self.refuse_ambiguous(r)?;
        }
        let candidates: Vec<String> = match (rev, self.remote) {
            (None, false) => vec!["HEAD".into()],
            (None, true) => vec!["refs/remotes/origin/HEAD".into(), "HEAD".into()],
            (Some(r), false) => vec![r.into()],
            (Some(r), true) => vec![format!("refs/remotes/origin/{r}"), format!("refs/tags/{r}"), r.into()],
        };
        let mut last = None;
        for c in &candidates {
            match self.repo.revparse_single(c).and_then(|o| o.peel_to_commit()) {
                Ok(commit) => return Ok(commit.id()),
                Err(e) => last = Some(e),
            }
        }
        Err(SourceError::Git {
            what: format!("cannot resolve revision {:?}", rev.unwrap_or("HEAD")),
            repo: self.label.clone(),
            cause: last.expect("at least one candidate"),
        })
    }

    /// A short name that is both a branch and a tag means two commits; git picks one by a rule
    /// few people remember, so it is refused: name it fully (refs/heads/X or refs/tags/X).
    fn refuse_ambiguous(&self, rev: &str) -> Result<(), SourceError> {
        if rev.starts_with("refs/") {
            return Ok(());
        }
        let branch = if self.remote {
            format!("refs/remotes/origin/{rev}")
        } else {
            format!("refs/heads/{rev}")
        };
        let exists = |name: &str| self.repo.find_reference(name).is_ok();
        if exists(&branch) && exists(&format!("refs/tags/{rev}")) {
            return Err(SourceError::AmbiguousRef {
                rev: rev.to_string(),
                repo: self.label.clone(),
            });
        }
        Ok(())
    }

    pub fn commit_info(&self, oid: Oid) -> Result<CommitInfo, SourceError> {
        let c = self.repo.find_commit(oid).map_err(self.git_err(format!("reading commit {oid}")))?;
        let t = c.time();
        let offset = chrono::FixedOffset::east_opt(t.offset_minutes() * 60).unwrap_or(chrono::FixedOffset::east_opt(0).expect("zero offset"));
        let time = chrono::DateTime::from_timestamp(t.seconds(), 0)
            .map(|d| d.with_timezone(&offset).to_rfc3339())
            .unwrap_or_default();
        let a = c.author();
        Ok(CommitInfo {
            id: oid.to_string(),
            time,
            author: format!("{} <{}>", a.name().unwrap_or("?"), a.email().unwrap_or("?")),
        })
    }

    fn tenant_dir(&self) -> String {
        format!("{}{}", self.root, self.path)
    }

    /// The tenant files at `commit`.
    pub fn snapshot(&self, commit: Oid) -> Result<Snapshot, SourceError> {
        let info = self.commit_info(commit)?;
        let c = self.repo.find_commit(commit).map_err(self.git_err("reading commit"))?;
        let tree = c.tree().map_err(self.git_err("reading the commit's tree"))?;
        let dir = self.tenant_dir();
        let at = format!("commit {}", &info.id[..12]);
        let entry = tree.get_path(Path::new(&dir)).map_err(|_| SourceError::NoTenantDir {
            path: dir.clone(),
            at: at.clone(),
        })?;
        let sub = self
            .repo
            .find_tree(entry.id())
            .map_err(|_| SourceError::NoTenantDir { path: dir.clone(), at })?;
        let mut files = Vec::new();
        self.walk_tree(&sub, &self.path, 0, &mut files)?;
        // Paths in a tree are unique, and an unstable sort needs no buffer the size of the listing.
        files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(Snapshot { commit: Some(info), files })
    }

    /// Lists the tenant files under `tree` (whose path is `dir`), at any depth: sharded layouts
    /// such as `tenants/eu/ac/acme.toml` are tenant `acme`.
    fn walk_tree(&self, tree: &git2::Tree<'_>, dir: &str, depth: usize, files: &mut Vec<SourceFile>) -> Result<(), SourceError> {
        // Exact for a flat directory: growing by doubling would hold up to three listings' worth.
        files.reserve(tree.len());
        for e in tree.iter() {
            let Ok(name) = e.name() else {
                let shown = String::from_utf8_lossy(e.name_bytes()).to_string();
                files.push(SourceFile::refused(format!("{dir}/{shown}"), "the file name is not valid UTF-8"));
                continue;
            };
            // Not format!: at 100,000 entries its machinery was a fifth of listing a tree.
            let mut path = String::with_capacity(dir.len() + 1 + name.len());
            path.extend([dir, "/", name]);
            let kind = match e.kind() {
                Some(git2::ObjectType::Blob) if e.filemode() == 0o120000 => EntryKind::Symlink,
                Some(git2::ObjectType::Blob) => EntryKind::File,
                Some(git2::ObjectType::Tree) => EntryKind::Dir,
                Some(git2::ObjectType::Commit) => EntryKind::Submodule,
                _ => EntryKind::Other,
            };
            match classify(name, kind, depth) {
                Entry::Tenant if kind == EntryKind::Symlink => files.push(SourceFile::new(path, Body::Symlink)),
                Entry::Tenant => files.push(SourceFile::new(path, Body::Unread(e.id()))),
                Entry::Walk => {
                    let sub = self.repo.find_tree(e.id()).map_err(self.git_err(format!("reading {path}")))?;
                    self.walk_tree(&sub, &path, depth + 1, files)?;
                }
                Entry::Skip => {}
                Entry::Refuse(why) => files.push(SourceFile::refused(path, &why)),
            }
            if files.len() > MAX_FILES {
                return Err(SourceError::TooManyFiles { path: self.tenant_dir() });
            }
        }
        Ok(())
    }

    /// No tenant files at `commit`: what a source whose directory was deleted holds.
    pub fn empty_snapshot(&self, commit: Oid) -> Result<Snapshot, SourceError> {
        Ok(Snapshot {
            commit: Some(self.commit_info(commit)?),
            files: vec![],
        })
    }

    /// Reads the blobs of the listed files (those in `only`, or all), refusing any over the size
    /// limit before reading it. A sync reads only what it will decrypt.
    pub fn read_bodies(&self, snapshot: &mut Snapshot, only: Option<&BTreeSet<String>>) -> Result<(), SourceError> {
        for f in snapshot.files.iter_mut().filter(|f| only.is_none_or(|o| o.contains(&f.path))) {
            read_body(&self.repo, &self.label, f)?;
        }
        Ok(())
    }

    /// A reader of the listed files' blobs that the threads decoding them share.
    pub fn body_reader(&self) -> BodyReader {
        BodyReader {
            git_dir: self.repo.path().to_path_buf(),
            label: self.label.clone(),
            spare: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The tenant files as they are on disk (`--worktree`).
    pub fn worktree_snapshot(&self) -> Result<Snapshot, SourceError> {
        let workdir = self.repo.workdir().ok_or_else(|| SourceError::NoTenantDir {
            path: self.tenant_dir(),
            at: "a bare repository".into(),
        })?;
        let dir = workdir.join(self.tenant_dir());
        if !dir.is_dir() {
            return Err(SourceError::NoTenantDir {
                path: self.tenant_dir(),
                at: "the work tree".into(),
            });
        }
        let mut files = Vec::new();
        walk_dir(&dir, &self.path, 0, &mut files)?;
        if files.len() > MAX_FILES {
            return Err(SourceError::TooManyFiles { path: self.tenant_dir() });
        }
        files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(Snapshot { commit: None, files })
    }

    /// Whether `new` is `old` or descends from it. An `old` this repository does not have counts
    /// as not an ancestor: history was rewritten, or the source changed.
    pub fn descends_from(&self, new: Oid, old: &str) -> Result<bool, SourceError> {
        let Ok(old) = Oid::from_str(old) else { return Ok(false) };
        if new == old {
            return Ok(true);
        }
        if self.repo.find_commit(old).is_err() {
            return Ok(false);
        }
        self.repo.graph_descendant_of(new, old).map_err(self.git_err("comparing commits"))
    }

    /// Tenant files changed between two commits, or None when `old` is unknown here.
    pub fn changed_files(&self, old: &str, new: Oid) -> Result<Option<BTreeSet<String>>, SourceError> {
        let Ok(old) = Oid::from_str(old) else { return Ok(None) };
        let Ok(old_commit) = self.repo.find_commit(old) else { return Ok(None) };
        let new_commit = self.repo.find_commit(new).map_err(self.git_err("reading commit"))?;
        let (a, b) = (self.tenant_tree_id(&old_commit)?, self.tenant_tree_id(&new_commit)?);
        let mut out = BTreeSet::new();
        // The tenant directories themselves, not the whole trees under a pathspec: matching a
        // pathspec costs a pattern match for every file, and a directory git did not change is
        // one object id compared, without reading it.
        if a == b {
            return Ok(Some(out));
        }
        let tree = |id: Option<Oid>| id.map(|id| self.repo.find_tree(id)).transpose().map_err(self.git_err("reading tree"));
        let (a, b) = (tree(a)?, tree(b)?);
        let diff = self
            .repo
            .diff_tree_to_tree(a.as_ref(), b.as_ref(), None)
            .map_err(self.git_err("diffing trees"))?;
        for d in diff.deltas() {
            for f in [d.old_file().path(), d.new_file().path()].into_iter().flatten() {
                out.insert(format!("{}/{}", self.path, f.to_string_lossy()));
            }
        }
        Ok(Some(out))
    }

    /// The id of the tenant directory's tree at `commit`, if it has one.
    fn tenant_tree_id(&self, commit: &git2::Commit<'_>) -> Result<Option<Oid>, SourceError> {
        let root = commit.tree().map_err(self.git_err("reading tree"))?;
        let dir = self.tenant_dir();
        if dir.is_empty() {
            return Ok(Some(root.id()));
        }
        Ok(root
            .get_path(Path::new(&dir))
            .ok()
            .filter(|e| e.kind() == Some(git2::ObjectType::Tree))
            .map(|e| e.id()))
    }

    /// Whether `new` passes signature verification under `mode`, `last` being the last applied
    /// commit (strict mode checks every commit since it).
    pub fn verify(
        &self,
        mode: crate::domain::commit::VerifyMode,
        last: Option<&str>,
        new: Oid,
        signers: &crate::verify::TrustedSigners,
    ) -> Result<Option<crate::verify::CommitSigner>, crate::verify::Refused> {
        let last = last.and_then(|l| Oid::from_str(l).ok()).filter(|l| self.repo.find_commit(*l).is_ok());
        crate::verify::verify_range(&self.repo, mode, last, new, signers)
    }

    /// The bytes of `file` (relative to the source root, as runs record it) at `commit`, as git
    /// has them (a tenant file still encrypted); None when the repository does not have that
    /// commit. A file missing at the commit, or too large to be a tenant file, is an error.
    pub fn file_at(&self, commit: &str, file: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(c) = Oid::from_str(commit).ok().and_then(|oid| self.repo.find_commit(oid).ok()) else {
            return Ok(None);
        };
        let tree = c.tree().map_err(self.git_err("reading the commit's tree"))?;
        let path = format!("{}{file}", self.root);
        let missing = || SourceError::NoTenantDir {
            path: path.clone(),
            at: format!("commit {}", &commit[..12.min(commit.len())]),
        };
        let entry = tree.get_path(Path::new(&path)).map_err(|_| missing())?;
        let mut f = SourceFile::new(file.to_string(), Body::Unread(entry.id()));
        read_body(&self.repo, &self.label, &mut f)?;
        match f.body {
            Body::Bytes(bytes) => Ok(Some(bytes)),
            Body::TooLarge(size) => Err(SourceError::Io {
                path: path.clone(),
                source: std::io::Error::other(format!("{size} bytes, over the {MAX_FILE_BYTES}-byte limit of a tenant file")),
            }),
            _ => Err(missing()),
        }
    }

    /// The tenant files the work tree holds differently from the checked-out commit (edited,
    /// added, deleted), as paths in the repository; none for a remote or bare repository.
    pub fn uncommitted(&self) -> Result<Vec<String>, SourceError> {
        if self.remote || self.repo.is_bare() {
            return Ok(vec![]);
        }
        let mut opts = git2::StatusOptions::new();
        opts.include_untracked(true).recurse_untracked_dirs(true).pathspec(self.tenant_dir());
        let statuses = self.repo.statuses(Some(&mut opts)).map_err(self.git_err("reading the work tree's status"))?;
        Ok(statuses
            .iter()
            .filter_map(|e| e.path().ok().map(str::to_string))
            .filter(|p| crate::sops::Format::from_path(p).is_some())
            .collect())
    }

    /// Where `file` (relative to the source root) is in the work tree; None for a bare or remote
    /// repository.
    pub fn worktree_path(&self, file: &str) -> Option<PathBuf> {
        match self.remote {
            true => None,
            false => self.repo.workdir().map(|w| w.join(format!("{}{file}", self.root))),
        }
    }

    /// The directory notify should watch for new commits (the git dir) and tenant edits.
    pub fn watch_paths(&self) -> (PathBuf, Option<PathBuf>) {
        (self.repo.path().to_path_buf(), self.repo.workdir().map(|w| w.join(self.tenant_dir())))
    }

    pub fn is_remote(&self) -> bool {
        self.remote
    }

    pub fn is_shallow(&self) -> bool {
        self.repo.is_shallow()
    }

    /// Fetches again (remote sources only).
    pub fn refresh(&self) -> Result<(), SourceError> {
        match &self.auth {
            Some((url, auth)) => fetch(&self.repo, url, auth),
            None => Ok(()),
        }
    }
}

/// The work-tree twin of [`Source::walk_tree`]. Symbolic links are never followed.
fn walk_dir(dir: &Path, rel: &str, depth: usize, files: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SourceError::Io { path, source }
    };
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            let shown = name.to_string_lossy();
            files.push(SourceFile::refused(format!("{rel}/{shown}"), "the file name is not valid UTF-8"));
            continue;
        };
        // The repository's own directory, when the tenant path is the work tree's root.
        if name == ".git" {
            continue;
        }
        let path = format!("{rel}/{name}");
        let kind = match std::fs::symlink_metadata(e.path()) {
            Ok(m) if m.file_type().is_symlink() => EntryKind::Symlink,
            Ok(m) if m.is_dir() => EntryKind::Dir,
            Ok(m) if m.is_file() => EntryKind::File,
            Ok(_) => EntryKind::Other,
            Err(err) => {
                files.push(SourceFile::refused(path, &format!("cannot be read: {err}")));
                continue;
            }
        };
        match classify(name, kind, depth) {
            Entry::Tenant if kind == EntryKind::Symlink => files.push(SourceFile::new(path, Body::Symlink)),
            Entry::Tenant => {
                let body = match read_capped(&e.path()) {
                    Ok(body) => body,
                    Err(err) => {
                        files.push(SourceFile::refused(path, &format!("cannot be read: {err}")));
                        continue;
                    }
                };
                files.push(SourceFile::new(path, body));
            }
            Entry::Walk => walk_dir(&e.path(), &path, depth + 1, files)?,
            Entry::Skip => {}
            Entry::Refuse(why) => files.push(SourceFile::refused(path, &why)),
        }
        if files.len() > MAX_FILES {
            return Ok(());
        }
    }
    Ok(())
}

/// A work-tree file's bytes, or its size when over the limit (never read past it).
fn read_capped(path: &Path) -> std::io::Result<Body> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        let len = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Ok(Body::TooLarge(len));
    }
    Ok(Body::Bytes(bytes))
}

/// What an entry under the tenant path is, as git or the file system says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    File,
    Symlink,
    Dir,
    Submodule,
    /// A socket, a pipe, a device.
    Other,
}

/// What the walk does with an entry. Every entry is read, walked, one of the few files a tenant
/// directory may hold beside tenant files, or reported: none is passed over in silence, since a
/// tenant file the walk does not see is a tenant a pruning run decommissions.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Tenant,
    Walk,
    Skip,
    Refuse(String),
}

/// Files a tenant directory may hold that are not tenants: notes for people and git's or sops's
/// own settings.
fn is_companion(name: &str) -> bool {
    matches!(name, ".gitkeep" | ".gitignore" | ".gitattributes" | ".sops.yaml") || (name.ends_with(".md") && !name.starts_with('.'))
}

fn classify(name: &str, kind: EntryKind, depth: usize) -> Entry {
    let refuse = |why: &str| Entry::Refuse(why.to_string());
    let odd_edges = name.trim() != name || name.chars().any(char::is_control);
    match kind {
        EntryKind::Submodule => return refuse("is a git submodule; nothing in it is read"),
        EntryKind::Other => return refuse("is not a regular file or directory"),
        EntryKind::Symlink if tenant_stem(name).is_none() => {
            return refuse("is a symbolic link, which is never followed; tenant directories and files must be real ones");
        }
        EntryKind::Dir if tenant_stem(name).is_some() => return refuse("is a directory named like a tenant file"),
        EntryKind::Dir if name.starts_with('.') => {
            return refuse("is a hidden directory, which is not read; tenant files belong in visible directories");
        }
        EntryKind::Dir if odd_edges => return refuse("has white space or a control character in its name"),
        EntryKind::Dir if depth + 1 > MAX_DEPTH => {
            return Entry::Refuse(format!("is nested deeper than {MAX_DEPTH} directories under the tenant path"));
        }
        EntryKind::Dir => return Entry::Walk,
        EntryKind::File | EntryKind::Symlink => {}
    }
    if odd_edges {
        return refuse("has white space or a control character in its name");
    }
    if tenant_stem(name).is_some() {
        return Entry::Tenant;
    }
    if is_companion(name) {
        return Entry::Skip;
    }
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext {
        Some(e) if name.starts_with('.') && TENANT_EXTENSIONS.contains(&e.as_str()) => refuse("is a hidden file; tenant files are not hidden"),
        Some(e) if TENANT_EXTENSIONS.contains(&e.as_str()) => Entry::Refuse(format!(
            "has the extension .{}; tenant files end in .toml, .json, .yaml or .yml, in lower case",
            name.rsplit_once('.').map_or("", |(_, e)| e)
        )),
        _ => refuse("is not a tenant file (those end in .toml, .json, .yaml or .yml; notes may end in .md): move it out of the tenant path"),
    }
}

fn tenant_stem(name: &str) -> Option<&str> {
    if name.starts_with('.') {
        return None;
    }
    let (stem, ext) = name.rsplit_once('.')?;
    TENANT_EXTENSIONS.contains(&ext).then_some(stem)
}

fn clone_or_fetch(url: &RemoteUrl, auth: &GitAuth, cache: &Path) -> Result<Repository, SourceError> {
    let dir = cache.join(hex::encode(&Sha256::digest(url.public.as_bytes())[..8]));
    let err = |what: &str| {
        let what = what.to_string();
        move |cause| SourceError::Git {
            what,
            repo: url.public.clone(),
            cause,
        }
    };
    let repo = match Repository::open_bare(&dir) {
        Ok(r) => r,
        Err(_) => {
            std::fs::create_dir_all(&dir).map_err(|source| SourceError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            let r = Repository::init_bare(&dir).map_err(err("creating the clone cache"))?;
            r.remote("origin", &url.public).map_err(err("adding the remote"))?;
            r
        }
    };
    fetch(&repo, url, auth)?;
    Ok(repo)
}

/// libgit2's socket timeouts are process-wide; set them once.
fn set_git_timeouts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: called once, before any fetch of this process starts.
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(SERVER_TIMEOUT_MS);
            let _ = git2::opts::set_server_timeout_in_milliseconds(SERVER_TIMEOUT_MS);
        }
    });
}

/// Answers libgit2's credential requests from the settings, each kind of credential at most once:
/// libgit2 asks again after a refusal, forever if the answer never changes.
fn credentials<'a>(url: &'a RemoteUrl, auth: &'a GitAuth) -> impl FnMut(&str, Option<&str>, git2::CredentialType) -> Result<git2::Cred, git2::Error> + 'a {
    let mut tried = git2::CredentialType::empty();
    move |_url, user, allowed| {
        let user = user.or(url.user()).unwrap_or("git");
        let kinds = [
            git2::CredentialType::USERNAME,
            git2::CredentialType::SSH_KEY,
            git2::CredentialType::USER_PASS_PLAINTEXT,
        ];
        let Some(kind) = kinds.into_iter().find(|k| allowed.contains(*k) && !tried.contains(*k)) else {
            return Err(git2::Error::from_str("authentication was refused with every configured credential"));
        };
        tried |= kind;
        if kind == git2::CredentialType::USERNAME {
            git2::Cred::username(user)
        } else if kind == git2::CredentialType::SSH_KEY {
            match &auth.ssh_key_file {
                Some(key) => git2::Cred::ssh_key(user, None, key, None),
                None => git2::Cred::ssh_key_from_agent(user),
            }
        } else {
            let password = match (&auth.token_file, url.password()) {
                (Some(file), _) => std::fs::read_to_string(file)
                    .map_err(|e| git2::Error::from_str(&format!("reading the git token file {}: {e}", file.display())))?
                    .trim()
                    .to_string(),
                (None, Some(p)) => p.clone(),
                (None, None) => return Err(git2::Error::from_str("the remote asks for a password; set git_token_file")),
            };
            git2::Cred::userpass_plaintext(user, &password)
        }
    }
}

/// With a known_hosts file, an SSH host key must be listed there for the host (plain host names;
/// hashed entries are not read).
fn check_host_key(known_hosts: &Path, cert: &git2::cert::Cert<'_>, host: &str) -> Result<git2::CertificateCheckStatus, git2::Error> {
    let Some(key) = cert.as_hostkey().and_then(|h| h.hostkey()) else {
        return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
    };
    let text = std::fs::read_to_string(known_hosts).map_err(|e| git2::Error::from_str(&format!("reading {}: {e}", known_hosts.display())))?;
    use base64::Engine;
    let listed = text.lines().filter(|l| !l.trim_start().starts_with('#')).any(|line| {
        let mut parts = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        hosts
            .split(',')
            .any(|h| h == host || h.strip_prefix('[').and_then(|h| h.split_once("]:")).is_some_and(|(h, _)| h == host))
            && base64::engine::general_purpose::STANDARD.decode(b64).is_ok_and(|k| k == key)
    });
    if listed {
        Ok(git2::CertificateCheckStatus::CertificateOk)
    } else {
        Err(git2::Error::from_str(&format!(
            "the SSH host key of {host} is not in {}",
            known_hosts.display()
        )))
    }
}

fn fetch(repo: &Repository, url: &RemoteUrl, auth: &GitAuth) -> Result<(), SourceError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |cause| SourceError::Git {
            what,
            repo: url.public.clone(),
            cause,
        }
    };
    set_git_timeouts();
    if url.sends_credentials_in_clear(auth.token_file.is_some()) {
        // Production refuses this at start-up; in dev it is said on every fetch.
        tracing::warn!(repo = %url.public, "plain http: the git token or password goes over the network unencrypted; use https://");
    }
    let mut remote = repo.find_remote("origin").map_err(err("finding the remote"))?;
    let mut cb = git2::RemoteCallbacks::new();
    cb.credentials(credentials(url, auth));
    if let Some(known_hosts) = &auth.known_hosts {
        cb.certificate_check(move |cert, host| check_host_key(known_hosts, cert, host));
    }
    // A server that trickles bytes never trips the socket timeout; the whole fetch has a deadline.
    let deadline = std::time::Instant::now() + FETCH_TIMEOUT;
    cb.transfer_progress(move |_| std::time::Instant::now() < deadline);
    cb.sideband_progress(move |_| std::time::Instant::now() < deadline);
    let mut fo = git2::FetchOptions::new();
    fo.remote_callbacks(cb);
    fo.prune(git2::FetchPrune::On);
    remote
        .fetch(&["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"], Some(&mut fo), None)
        .map_err(err("fetching"))?;
    // Learn the remote's default branch, so that no --ref means what `git clone` would check out.
    if let Ok(head) = remote.default_branch()
        && let Some(branch) = head.as_str().ok().and_then(|h| h.strip_prefix("refs/heads/"))
    {
        let target = format!("refs/remotes/origin/{branch}");
        if repo.find_reference(&target).is_ok() {
            let _ = repo.reference_symbolic("refs/remotes/origin/HEAD", &target, true, "default branch");
        }
    }
    Ok(())
}

/// Reads blobs for many threads at once. A git2 repository handle must not be shared between
/// threads, so each read borrows a handle of its own from a pool that grows to the number of
/// threads reading: the thread that decodes a file reads it, and no chunk of bodies waits for
/// one thread to read it while the others idle.
pub struct BodyReader {
    git_dir: PathBuf,
    label: String,
    spare: std::sync::Mutex<Vec<Repository>>,
}

impl BodyReader {
    /// Reads `f`'s blob if it is listed but unread, under the size limit.
    pub fn read(&self, f: &mut SourceFile) -> Result<(), SourceError> {
        if !matches!(f.body, Body::Unread(_)) {
            return Ok(());
        }
        let spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let repo = match spare {
            Some(r) => r,
            None => Repository::open(&self.git_dir).map_err(|cause| SourceError::Git {
                what: "opening the repository for a reader thread".into(),
                repo: self.label.clone(),
                cause,
            })?,
        };
        let read = read_body(&repo, &self.label, f);
        self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(repo);
        read
    }
}

/// Reads an unread file's blob, refusing it unread when its header says it is over the limit.
fn read_body(repo: &Repository, label: &str, f: &mut SourceFile) -> Result<(), SourceError> {
    let Body::Unread(oid) = f.body else { return Ok(()) };
    let git_err = |cause| SourceError::Git {
        what: format!("reading {}", f.path),
        repo: label.to_string(),
        cause,
    };
    let (size, _) = repo.odb().and_then(|odb| odb.read_header(oid)).map_err(git_err)?;
    f.body = if size as u64 > MAX_FILE_BYTES {
        Body::TooLarge(size as u64)
    } else {
        Body::Bytes(repo.find_blob(oid).map_err(git_err)?.content().to_vec())
    };
    Ok(())
}

/// The port orchestration reads tenant files through.
impl TenantSource for Source {
    fn id(&self) -> &str {
        &self.id
    }

    fn commit_of(&self, rev: Option<&str>) -> Result<CommitId, SourceError> {
        Ok(CommitId::parse(&self.resolve(rev)?.to_string()).expect("git names commits in hex"))
    }

    fn snapshot_at(&self, commit: &CommitId) -> Result<Snapshot, SourceError> {
        self.snapshot(oid(commit))
    }

    fn empty_at(&self, commit: &CommitId) -> Result<Snapshot, SourceError> {
        self.empty_snapshot(oid(commit))
    }

    fn worktree(&self) -> Result<Snapshot, SourceError> {
        self.worktree_snapshot()
    }

    fn body_reader(&self) -> impl ReadBody {
        Source::body_reader(self)
    }

    fn descends_from(&self, new: &CommitId, old: &CommitId) -> Result<bool, SourceError> {
        Source::descends_from(self, oid(new), old.as_str())
    }

    fn is_shallow(&self) -> bool {
        Source::is_shallow(self)
    }

    fn changed_files(&self, old: &CommitId, new: &CommitId) -> Result<Option<BTreeSet<String>>, SourceError> {
        Source::changed_files(self, old.as_str(), oid(new))
    }

    fn verify(&self, mode: VerifyMode, last: Option<&CommitId>, new: &CommitId, signers: &TrustedSigners) -> Result<Option<CommitSigner>, Refused> {
        Source::verify(self, mode, last.map(CommitId::as_str), oid(new), signers)
    }
}

impl ReadBody for BodyReader {
    fn read(&self, file: &mut SourceFile) -> Result<(), SourceError> {
        BodyReader::read(self, file)
    }
}

fn oid(c: &CommitId) -> Oid {
    Oid::from_str(c.as_str()).expect("a CommitId is hex")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_read_walked_a_companion_or_refused() {
        use EntryKind::*;
        let refused = |name: &str, kind: EntryKind, needle: &str| match classify(name, kind, 0) {
            Entry::Refuse(why) => assert!(why.contains(needle), "{name:?}: {why}"),
            other => panic!("{name:?} ({kind:?}) gave {other:?}, not a refusal"),
        };
        for (name, kind, want) in [
            ("acme.toml", File, Entry::Tenant),
            ("acme.yml", File, Entry::Tenant),
            ("acme.json", Symlink, Entry::Tenant),
            ("eu", Dir, Entry::Walk),
            ("README.md", File, Entry::Skip),
            (".gitkeep", File, Entry::Skip),
            (".sops.yaml", File, Entry::Skip),
        ] {
            assert_eq!(classify(name, kind, 0), want, "{name:?}");
        }
        refused("eu", Symlink, "symbolic link");
        refused("README.md", Symlink, "symbolic link");
        refused("vendor", Submodule, "submodule");
        refused("acme.toml", Submodule, "submodule");
        refused("acme.toml", Dir, "named like a tenant file");
        refused(".old", Dir, "hidden directory");
        refused("acme.TOML", File, "extension .TOML");
        refused("acme.Yaml", File, "extension .Yaml");
        refused("acme.toml ", File, "white space");
        refused(" acme.toml", File, "white space");
        refused("acme\u{7}.toml", File, "control character");
        refused("eu ", Dir, "white space");
        refused(".acme.toml", File, "hidden file");
        refused("acme.toml.bak", File, "not a tenant file");
        refused("acme", File, "not a tenant file");
        refused("fifo", Other, "not a regular file");
        match classify("eu", Dir, MAX_DEPTH) {
            Entry::Refuse(why) => assert!(why.contains("nested deeper"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
