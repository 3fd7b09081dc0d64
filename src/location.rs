//! Where a source's repository is and how to authenticate to it: values the settings decide and
//! the git adapter uses, owned by neither. A URL's credentials are split off here, before the URL is
//! stored, shown or logged.

use std::path::{Path, PathBuf};

/// How to authenticate to a remote, from settings of their own (never from the URL, whose
/// userinfo is stripped before the URL is stored, shown or logged).
#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    /// A file holding an HTTPS token (used as the password).
    pub token_file: Option<PathBuf>,
    /// A private SSH key file (unencrypted), for ssh:// and scp-like URLs.
    pub ssh_key_file: Option<PathBuf>,
    /// OpenSSH known_hosts file; with it, an SSH host key not listed there is refused.
    pub known_hosts: Option<PathBuf>,
}

impl GitAuth {
    pub fn from_files(token_file: Option<PathBuf>, ssh_key_file: Option<PathBuf>, known_hosts: Option<PathBuf>) -> GitAuth {
        GitAuth {
            token_file,
            ssh_key_file,
            known_hosts,
        }
    }
}

/// Where a source's repository is, decided once when the settings are read.
#[derive(Debug, Clone, PartialEq)]
pub enum RepoLocation {
    /// A path inside a work tree.
    Local(PathBuf),
    /// A URL to clone and fetch.
    Remote(RemoteUrl),
}

impl RepoLocation {
    /// A URL (`scheme://...`, or scp-like `user@host:path` when no such path exists), else a path.
    pub fn parse(text: &str) -> RepoLocation {
        let scp_like = text.contains('@') && text.contains(':') && !Path::new(text).exists();
        match text.contains("://") || scp_like {
            true => RepoLocation::Remote(RemoteUrl::parse(text)),
            false => RepoLocation::Local(PathBuf::from(text)),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, RepoLocation::Remote(_))
    }
}

/// As it may be shown: a URL without its userinfo.
impl std::fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoLocation::Local(p) => write!(f, "{}", p.display()),
            RepoLocation::Remote(u) => f.write_str(&u.public),
        }
    }
}

/// A remote URL split into what may be shown and what may not.
#[derive(Clone, PartialEq)]
pub struct RemoteUrl {
    /// The URL without userinfo: the only form that is stored, shown or logged.
    pub public: String,
    user: Option<String>,
    password: Option<String>,
}

impl RemoteUrl {
    /// The user the URL named, for the git adapter's credentials only.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password the URL carried, for the git adapter when no token file is set.
    pub fn password(&self) -> Option<&String> {
        self.password.as_ref()
    }
}

impl std::fmt::Debug for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteUrl({})", self.public)
    }
}

impl RemoteUrl {
    /// Whether fetching would send a password or token unencrypted: plain `http://` with a
    /// password in the URL or a token file to offer.
    pub fn sends_credentials_in_clear(&self, token_file: bool) -> bool {
        self.public.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) && (self.password.is_some() || token_file)
    }

    pub fn parse(url: &str) -> RemoteUrl {
        let Some((scheme, rest)) = url.split_once("://") else {
            // scp-like `user@host:path`: the user is not a secret.
            return RemoteUrl {
                public: url.to_string(),
                user: url.split_once('@').map(|(u, _)| u.to_string()),
                password: None,
            };
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return RemoteUrl {
                public: url.to_string(),
                user: None,
                password: None,
            };
        };
        let userinfo = &rest[..at];
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u.to_string(), Some(p.to_string())),
            None => (userinfo.to_string(), None),
        };
        RemoteUrl {
            public: format!("{scheme}://{}", &rest[at + 1..]),
            user: Some(user).filter(|u| !u.is_empty()),
            password,
        }
    }
}

/// Whether two source ids (`<repository>#<path>`) name the same tenant directory of the same
/// repository, however the repository is spelled: a path or a `file://` URL to it, https or ssh
/// (`git@host:org/repo.git`) to one host and path, with or without `.git` or a user.
pub fn same_source(a: &str, b: &str) -> bool {
    let split = |id: &str| {
        id.split_once('#').map_or((id.to_string(), String::new()), |(r, p)| {
            (repository_identity(r), p.trim_matches('/').to_string())
        })
    };
    split(a) == split(b)
}

/// Whether two spellings (URLs or paths) name one repository.
pub fn same_repository(a: &str, b: &str) -> bool {
    repository_identity(a) == repository_identity(b)
}

/// A repository's spelling reduced to what names it: `host/path` for a network URL, the
/// canonical directory of a local one.
fn repository_identity(spelled: &str) -> String {
    let s = spelled.trim_end_matches('/');
    let s = s.strip_suffix(".git").unwrap_or(s).trim_end_matches('/');
    let local = |p: &str| {
        let p = Path::new(p).canonicalize().unwrap_or_else(|_| PathBuf::from(p));
        let p = if p.ends_with(".git") {
            p.parent().map(Path::to_path_buf).unwrap_or(p)
        } else {
            p
        };
        p.display().to_string()
    };
    if let Some(path) = s.strip_prefix("file://") {
        return local(path);
    }
    let host_path = |authority: &str, path: &str| {
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
        format!("{host}/{}", path.trim_start_matches('/'))
    };
    if let Some((_, rest)) = s.split_once("://") {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        return host_path(authority, path);
    }
    match s.split_once(':') {
        Some((authority, path)) if !s.starts_with('/') && authority.contains('@') => host_path(authority, path),
        _ => local(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_never_reaches_the_public_url() {
        let u = RemoteUrl::parse("https://bot:s3cr3t-token@git.example.com/org/repo.git");
        assert_eq!(u.public, "https://git.example.com/org/repo.git");
        assert_eq!((u.user.as_deref(), u.password.as_deref()), (Some("bot"), Some("s3cr3t-token")));
        assert!(!format!("{u:?}").contains("s3cr3t"));
        assert_eq!(RemoteUrl::parse("https://git.example.com/a@b").public, "https://git.example.com/a@b");
        assert_eq!(RemoteUrl::parse("git@github.com:org/repo.git").public, "git@github.com:org/repo.git");
        assert_eq!(RepoLocation::parse("ssh://tok:en@h/r").to_string(), "ssh://h/r");
        assert_eq!(RepoLocation::parse("git@github.com:org/repo.git").to_string(), "git@github.com:org/repo.git");
        assert_eq!(RepoLocation::parse("../tenants-repo"), RepoLocation::Local("../tenants-repo".into()));
    }

    #[test]
    fn a_repository_respelled_is_the_same_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display().to_string();
        for (a, b) in [
            ("https://git.example.com/org/repo.git#tenants", "git@git.example.com:org/repo.git#tenants"),
            ("https://git.example.com/org/repo#tenants", "ssh://git@GIT.example.com:22/org/repo.git#tenants/"),
            (&format!("{p}#tenants"), &format!("file://{p}#tenants")),
            (&format!("{p}#tenants"), &format!("file://{p}/.git#tenants")),
        ] {
            assert!(same_source(a, b), "{a} ~ {b}");
        }
        for (a, b) in [
            ("https://git.example.com/org/repo.git#tenants", "https://git.example.com/org/other.git#tenants"),
            (
                "https://git.example.com/org/repo.git#tenants",
                "https://git.example.com/org/repo.git#tenants/eu",
            ),
            ("https://a.example.com/org/repo#tenants", "https://b.example.com/org/repo#tenants"),
        ] {
            assert!(!same_source(a, b), "{a} !~ {b}");
        }
    }
}
