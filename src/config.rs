//! Configuration, resolved once at start-up: flag > environment > config file > default.

use crate::domain::commit::VerifyMode;
use crate::location::RepoLocation;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Dev,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Report and count drift; apply only changes that come from git.
    Warn,
    /// Write git's version over tenants changed outside git.
    Correct,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Flag,
    Env(String),
    File,
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => write!(f, "flag"),
            Origin::Env(name) => write!(f, "env {name}"),
            Origin::File => write!(f, "config file"),
            Origin::Default => write!(f, "default"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub name: &'static str,
    pub value: String,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub database_url: Option<String>,
    pub repo: RepoLocation,
    pub git_ref: Option<String>,
    pub path: String,
    pub age_key_file: Option<PathBuf>,
    /// Identities given inline (SOPS_AGE_KEY). Secret.
    pub age_key: Option<String>,
    pub log_format: LogFormat,
    pub data_dir: PathBuf,
    pub allow_plaintext: bool,
    pub require_tenant_recipient: bool,
    pub drift_policy: DriftPolicy,
    pub worktree: bool,
    pub interval_secs: u64,
    /// Seconds between the agent's full runs.
    pub full_resync_secs: u64,
    pub debounce_ms: u64,
    /// Seconds a command waits for the database to connect, shake hands, hand out a connection
    /// and answer its first query.
    pub db_timeout_secs: u64,
    /// Runs kept per source in the database's run history; older ones are deleted as new ones come.
    pub run_history: u64,
    pub listen: String,
    /// Bearer token for `POST /sync`. Secret.
    pub webhook_token: Option<String>,
    /// Serve the status page on the agent's listener.
    pub status_page: bool,
    /// What the status page asks of a reader on a listener that is not loopback. Secret.
    pub status_token: Option<String>,
    /// Credentials for a remote repository.
    pub git_auth: crate::location::GitAuth,
    pub verify_commits: VerifyMode,
    /// OpenSSH allowed_signers file of trusted commit signers.
    pub allowed_signers: Option<PathBuf>,
    /// Armored OpenPGP public keys of trusted commit signers.
    pub trusted_pgp_keys: Option<PathBuf>,
    /// The platform's default embedding endpoint, for tenants whose config names none. Readers
    /// resolve it (it is not written into rows): see docs/tenant-config.md.
    pub embedding_endpoint: Option<String>,
    /// Where tenant files come from: never empty.
    pub sources: Vec<SourceConfig>,
    pub notifications: Vec<NotificationConfig>,
    /// Every setting with its (masked) value and origin, for `frostbyte-gitops config`.
    pub shown: Vec<Shown>,
}

/// One place tenant files come from. Without `[[sources]]` in the config file there is one, named
/// `default`, from `repo`, `ref` and `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// How commands (`--source`), metrics and outputs call it.
    pub name: String,
    pub repo: RepoLocation,
    pub git_ref: Option<String>,
    pub path: String,
    /// Decommission tenants whose file was deleted from this source (never delete them).
    pub prune: bool,
    /// A run that would decommission more than this fraction of the source's tenants is refused
    /// unless `--allow-mass-prune` is given.
    pub prune_max_fraction: f64,
}

/// A receiver of notifications (`[[notifications]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationConfig {
    pub url: String,
    /// The HMAC key for `X-Frostbyte-Signature-256`, read at start-up.
    pub secret_file: Option<PathBuf>,
    pub events: Vec<NotifyEvent>,
    pub format: NotifyFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyEvent {
    /// A sync or apply wrote something.
    Applied,
    /// A run failed (invalid files, a database or git error).
    Failed,
    /// A run was refused on policy: an untrusted commit, a rewritten history, a mass prune.
    Refused,
    /// A drift report found tenants out of sync.
    Drift,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 4] = [Self::Applied, Self::Failed, Self::Refused, Self::Drift];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Drift => "drift",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyFormat {
    Generic,
    /// A Slack incoming-webhook body (`{"text": ...}`).
    Slack,
}

pub const DEFAULT_SOURCE: &str = "default";
pub const DEFAULT_PRUNE_MAX_FRACTION: f64 = 0.1;

/// Every setting. Each has one definition in [`DEFS`]: its name in the config file, its flag and
/// environment variables, its default, whether it is secret, and its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setting {
    Mode,
    DatabaseUrl,
    Repo,
    Ref,
    Path,
    Prune,
    PruneMaxFraction,
    AgeKeyFile,
    AgeKey,
    LogFormat,
    DataDir,
    AllowPlaintext,
    RequireTenantRecipient,
    DriftPolicy,
    Worktree,
    Interval,
    FullResyncInterval,
    DbTimeout,
    RunHistory,
    DebounceMs,
    Listen,
    WebhookToken,
    StatusPage,
    StatusToken,
    EmbeddingEndpoint,
    VerifyCommits,
    AllowedSigners,
    TrustedPgpKeys,
    GitTokenFile,
    GitSshKeyFile,
    GitKnownHosts,
}

impl Setting {
    fn def(self) -> &'static Def {
        DEFS.iter().find(|d| d.key == self).expect("every setting is defined")
    }

    /// Its key in the config file.
    pub fn name(self) -> &'static str {
        self.def().name
    }

    /// Its command-line flag, where it has one.
    pub fn flag(self) -> Option<&'static str> {
        self.def().flag
    }

    /// Whether its value is true or false (a flag without a value).
    pub fn is_bool(self) -> bool {
        self.def().kind == Kind::Bool
    }

    /// Every setting, in the order of docs/configuration.md's table.
    pub fn all() -> impl Iterator<Item = Setting> {
        DEFS.iter().map(|d| d.key)
    }
}

/// Flags as given on the command line; None when absent.
#[derive(Debug, Clone, Default)]
pub struct Flags(pub BTreeMap<Setting, String>);

struct Def {
    key: Setting,
    name: &'static str,
    /// Its command-line flag, where it has one.
    flag: Option<&'static str>,
    env: &'static [&'static str],
    default: Option<&'static str>,
    secret: bool,
    kind: Kind,
}

/// What a setting's value is, as the config file must write it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    /// A whole number (also accepted as a string, as the environment gives it).
    Number,
    /// A number between 0 and 1 (also as a string).
    Fraction,
    /// true or false (also as a string).
    Bool,
}

impl Kind {
    /// The text of a config file's value, or why it has the wrong type.
    fn text_of(self, v: &toml::Value) -> Result<String, String> {
        match (self, v) {
            (_, toml::Value::String(s)) => Ok(s.clone()),
            (Kind::Number, toml::Value::Integer(i)) => Ok(i.to_string()),
            (Kind::Fraction, toml::Value::Integer(_) | toml::Value::Float(_)) => Ok(v.to_string()),
            (Kind::Bool, toml::Value::Boolean(b)) => Ok(b.to_string()),
            (kind, other) => Err(format!(
                "is {} {}, but must be {}",
                if other.type_str().starts_with(['a', 'i']) { "an" } else { "a" },
                other.type_str(),
                match kind {
                    Kind::Text => "a string",
                    Kind::Number => "a whole number",
                    Kind::Fraction => "a number",
                    Kind::Bool => "true or false",
                }
            )),
        }
    }
}

const DEFS: &[Def] = &[
    Def {
        key: Setting::Mode,
        name: "mode",
        flag: Some("--mode"),
        env: &["FROSTBYTE_MODE"],
        default: Some("dev"),
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::DatabaseUrl,
        name: "database_url",
        flag: Some("--database-url"),
        env: &["FROSTBYTE_CONTROL_DB_URL"],
        default: None,
        secret: true,
        kind: Kind::Text,
    },
    Def {
        key: Setting::Repo,
        name: "repo",
        flag: Some("--repo"),
        env: &["FROSTBYTE_GITOPS_REPO"],
        default: Some("."),
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::Ref,
        name: "ref",
        flag: Some("--ref"),
        env: &["FROSTBYTE_GITOPS_REF"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::Path,
        name: "path",
        flag: Some("--path"),
        env: &["FROSTBYTE_GITOPS_PATH"],
        default: Some("tenants"),
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::Prune,
        name: "prune",
        // `--prune` is an option of one run (sync, plan, apply), not this setting.
        flag: None,
        env: &["FROSTBYTE_PRUNE"],
        default: Some("false"),
        secret: false,
        kind: Kind::Bool,
    },
    Def {
        key: Setting::PruneMaxFraction,
        name: "prune_max_fraction",
        flag: None,
        env: &["FROSTBYTE_PRUNE_MAX_FRACTION"],
        default: Some("0.1"),
        secret: false,
        kind: Kind::Fraction,
    },
    Def {
        key: Setting::AgeKeyFile,
        name: "age_key_file",
        flag: Some("--age-key-file"),
        env: &["SOPS_AGE_KEY_FILE"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::AgeKey,
        name: "age_key",
        flag: None,
        env: &["SOPS_AGE_KEY"],
        default: None,
        secret: true,
        kind: Kind::Text,
    },
    Def {
        key: Setting::LogFormat,
        name: "log_format",
        flag: Some("--log-format"),
        env: &["FROSTBYTE_LOG_FORMAT"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::DataDir,
        name: "data_dir",
        flag: Some("--data-dir"),
        env: &["FROSTBYTE_DATA_DIR"],
        default: Some(".frostbyte"),
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::AllowPlaintext,
        name: "allow_plaintext",
        flag: Some("--allow-plaintext"),
        env: &["FROSTBYTE_ALLOW_PLAINTEXT"],
        default: Some("false"),
        secret: false,
        kind: Kind::Bool,
    },
    Def {
        key: Setting::RequireTenantRecipient,
        name: "require_tenant_recipient",
        flag: None,
        env: &["FROSTBYTE_REQUIRE_TENANT_RECIPIENT"],
        default: Some("true"),
        secret: false,
        kind: Kind::Bool,
    },
    Def {
        key: Setting::DriftPolicy,
        name: "drift_policy",
        flag: Some("--drift-policy"),
        env: &["FROSTBYTE_DRIFT_POLICY"],
        default: Some("correct"),
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::Worktree,
        name: "worktree",
        flag: Some("--worktree"),
        env: &["FROSTBYTE_WORKTREE"],
        default: Some("false"),
        secret: false,
        kind: Kind::Bool,
    },
    Def {
        key: Setting::Interval,
        name: "interval",
        flag: Some("--interval"),
        env: &["FROSTBYTE_SYNC_INTERVAL"],
        default: Some("60"),
        secret: false,
        kind: Kind::Number,
    },
    Def {
        key: Setting::FullResyncInterval,
        name: "full_resync_interval",
        flag: None,
        env: &["FROSTBYTE_FULL_RESYNC_INTERVAL"],
        default: Some("3600"),
        secret: false,
        kind: Kind::Number,
    },
    Def {
        key: Setting::DebounceMs,
        name: "debounce_ms",
        flag: Some("--debounce-ms"),
        env: &["FROSTBYTE_DEBOUNCE_MS"],
        default: Some("500"),
        secret: false,
        kind: Kind::Number,
    },
    Def {
        key: Setting::DbTimeout,
        name: "db_timeout",
        flag: None,
        env: &["FROSTBYTE_DB_TIMEOUT"],
        default: Some("30"),
        secret: false,
        kind: Kind::Number,
    },
    Def {
        key: Setting::RunHistory,
        name: "run_history",
        flag: None,
        env: &["FROSTBYTE_RUN_HISTORY"],
        default: Some("1000"),
        secret: false,
        kind: Kind::Number,
    },
    Def {
        key: Setting::Listen,
        name: "listen",
        flag: Some("--listen"),
        env: &["FROSTBYTE_LISTEN"],
        default: Some("127.0.0.1:8686"),
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::WebhookToken,
        name: "webhook_token",
        flag: None,
        env: &["FROSTBYTE_WEBHOOK_TOKEN"],
        default: None,
        secret: true,
        kind: Kind::Text,
    },
    Def {
        key: Setting::StatusPage,
        name: "status_page",
        flag: None,
        env: &["FROSTBYTE_STATUS_PAGE"],
        default: Some("true"),
        secret: false,
        kind: Kind::Bool,
    },
    Def {
        key: Setting::StatusToken,
        name: "status_token",
        flag: None,
        env: &["FROSTBYTE_STATUS_TOKEN"],
        default: None,
        secret: true,
        kind: Kind::Text,
    },
    Def {
        key: Setting::VerifyCommits,
        name: "verify_commits",
        flag: Some("--verify-commits"),
        env: &["FROSTBYTE_VERIFY_COMMITS"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::AllowedSigners,
        name: "allowed_signers",
        flag: Some("--allowed-signers"),
        env: &["FROSTBYTE_ALLOWED_SIGNERS"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::TrustedPgpKeys,
        name: "trusted_pgp_keys",
        flag: Some("--trusted-pgp-keys"),
        env: &["FROSTBYTE_TRUSTED_PGP_KEYS"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::EmbeddingEndpoint,
        name: "embedding_endpoint",
        flag: None,
        env: &["FROSTBYTE_EMBEDDING_ENDPOINT"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::GitTokenFile,
        name: "git_token_file",
        flag: None,
        env: &["FROSTBYTE_GIT_TOKEN_FILE"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::GitSshKeyFile,
        name: "git_ssh_key_file",
        flag: None,
        env: &["FROSTBYTE_GIT_SSH_KEY_FILE"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
    Def {
        key: Setting::GitKnownHosts,
        name: "git_known_hosts",
        flag: None,
        env: &["FROSTBYTE_GIT_KNOWN_HOSTS"],
        default: None,
        secret: false,
        kind: Kind::Text,
    },
];

/// A webhook token shorter than this is refused: it guards `POST /sync`.
pub const MIN_WEBHOOK_TOKEN_BYTES: usize = 16;

pub fn known_keys() -> Vec<&'static str> {
    DEFS.iter().map(|d| d.name).collect()
}

/// The database URL or conninfo with its password masked, in every spelling the client reads.
pub fn mask_url(url: &str) -> String {
    crate::store::conninfo::masked(url)
}

/// An https URL without credentials; http is allowed in dev mode.
fn check_endpoint(url: &str, mode: Mode) -> Result<(), String> {
    let rest = match url.split_once("://") {
        Some(("https", rest)) => rest,
        Some(("http", rest)) if mode == Mode::Dev => rest,
        Some(("http", _)) => return Err("http is allowed in dev mode only; use an https:// URL".into()),
        _ => return Err("not an https:// URL".into()),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("needs a host, and no credentials or spaces".into());
    }
    Ok(())
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match f64::from_str(s.trim()) {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a fraction in (0, 1]")),
    }
}

/// `[[sources]]`: every entry checked, every problem reported. Fields left out take the top-level
/// `repo`, `ref`, `path`, `prune` and `prune_max_fraction`.
fn parse_sources(file: &str, v: &toml::Value, top: &SourceConfig) -> Result<Vec<SourceConfig>, Vec<String>> {
    let Some(list) = v.as_array() else {
        return Err(vec![format!("config file {file}: sources must be an array of tables ([[sources]])")]);
    };
    let mut errors = Vec::new();
    let mut out: Vec<SourceConfig> = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let at = format!("config file {file}: sources[{i}]");
        let Some(t) = entry.as_table() else {
            errors.push(format!("{at}: not a table"));
            continue;
        };
        for key in t
            .keys()
            .filter(|k| !["name", "repo", "ref", "path", "prune", "prune_max_fraction"].contains(&k.as_str()))
        {
            errors.push(format!("{at}: unknown key {key:?} (known: name, repo, ref, path, prune, prune_max_fraction)"));
        }
        let text = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let wrong_type: Vec<String> = ["name", "repo", "ref", "path"]
            .iter()
            .filter(|k| t.get(**k).is_some_and(|v| !v.is_str()))
            .map(|k| format!("{at}: {k} must be a string"))
            .collect();
        errors.extend(wrong_type);
        let name = text("name").unwrap_or_default();
        if !is_source_name(&name) {
            errors.push(format!("{at}: name {name:?} must be 1-63 characters of a-z, 0-9, '-' and '_'"));
        } else if out.iter().any(|o| o.name == name) {
            errors.push(format!("{at}: name {name:?} is used twice"));
        }
        let prune = match t.get("prune") {
            None => top.prune,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                errors.push(format!("{at}: prune must be true or false"));
                false
            }
        };
        let prune_max_fraction = match t.get("prune_max_fraction") {
            None => top.prune_max_fraction,
            Some(v) => match v
                .as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .map(|f| parse_fraction(&f.to_string()))
            {
                Some(Ok(f)) => f,
                _ => {
                    errors.push(format!("{at}: prune_max_fraction must be a number in (0, 1]"));
                    DEFAULT_PRUNE_MAX_FRACTION
                }
            },
        };
        out.push(SourceConfig {
            name,
            repo: text("repo").map_or_else(|| top.repo.clone(), |r| RepoLocation::parse(&r)),
            git_ref: text("ref").or_else(|| top.git_ref.clone()),
            path: text("path").unwrap_or_else(|| top.path.clone()),
            prune,
            prune_max_fraction,
        });
    }
    if list.is_empty() {
        errors.push(format!("config file {file}: sources is empty; remove it to use repo/ref/path"));
    }
    errors.extend(overlapping_sources(file, &out));
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// Two sources of one repository whose tenant paths nest would each claim the other's files.
fn overlapping_sources(file: &str, sources: &[SourceConfig]) -> Vec<String> {
    let norm = |p: &str| p.trim_start_matches("./").trim_matches('/').to_string();
    let nests = |a: &str, b: &str| a.is_empty() || b.is_empty() || a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/"));
    let mut errors = Vec::new();
    for (i, a) in sources.iter().enumerate() {
        for b in &sources[i + 1..] {
            let (pa, pb) = (norm(&a.path), norm(&b.path));
            if crate::location::same_repository(&a.repo.to_string(), &b.repo.to_string()) && nests(&pa, &pb) {
                errors.push(format!(
                    "config file {file}: sources {} (path {:?}) and {} (path {:?}) read overlapping directories of one repository; give each its own directory",
                    a.name, a.path, b.name, b.path
                ));
            }
        }
    }
    errors
}

/// `[[notifications]]`: every entry checked, every problem reported.
fn parse_notifications(file: &str, v: &toml::Value, mode: Mode) -> Result<Vec<NotificationConfig>, Vec<String>> {
    let Some(list) = v.as_array() else {
        return Err(vec![format!(
            "config file {file}: notifications must be an array of tables ([[notifications]])"
        )]);
    };
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let at = format!("config file {file}: notifications[{i}]");
        let Some(t) = entry.as_table() else {
            errors.push(format!("{at}: not a table"));
            continue;
        };
        for key in t.keys().filter(|k| !["url", "secret_file", "events", "format"].contains(&k.as_str())) {
            errors.push(format!("{at}: unknown key {key:?} (known: url, secret_file, events, format)"));
        }
        let url = t.get("url").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        if let Err(e) = check_endpoint(&url, mode) {
            errors.push(format!("{at}: url {}: {e}", crate::domain::escape::shown_url(&url)));
        }
        let events = match t.get("events") {
            None => NotifyEvent::ALL.to_vec(),
            Some(v) => {
                let names: Vec<&str> = v.as_array().map(|a| a.iter().filter_map(|e| e.as_str()).collect()).unwrap_or_default();
                let events: Vec<NotifyEvent> = names.iter().filter_map(|n| NotifyEvent::ALL.into_iter().find(|e| e.as_str() == *n)).collect();
                if events.len() != v.as_array().map_or(usize::MAX, Vec::len) || events.is_empty() {
                    errors.push(format!("{at}: events must be a non-empty list of applied, failed, refused, drift"));
                }
                events
            }
        };
        let format = match t.get("format").map(|v| v.as_str()) {
            None | Some(Some("generic")) => NotifyFormat::Generic,
            Some(Some("slack")) => NotifyFormat::Slack,
            _ => {
                errors.push(format!("{at}: format must be generic or slack"));
                NotifyFormat::Generic
            }
        };
        let secret_file = match t.get("secret_file") {
            None => None,
            Some(v) => match v.as_str() {
                Some(p) => Some(PathBuf::from(p)),
                None => {
                    errors.push(format!("{at}: secret_file must be a path"));
                    None
                }
            },
        };
        out.push(NotificationConfig {
            url,
            secret_file,
            events,
            format,
        });
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

pub fn is_source_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// What production mode refuses: plaintext files, and commit verification with no one to trust.
/// (A missing database_url is refused where a database is needed, see sync::connect: in
/// production, validate and plan --against-ref run without one.)
fn production_errors(mode: Mode, allow_plaintext: bool, verify_commits: VerifyMode, has_signers: bool) -> Vec<String> {
    let mut errors = Vec::new();
    if mode != Mode::Production {
        return errors;
    }
    if allow_plaintext {
        errors.push("allow_plaintext cannot be used in production mode".into());
    }
    if verify_commits != VerifyMode::Off && !has_signers {
        errors.push(format!(
            "verify_commits is {verify_commits} in production but no trusted signer is configured: set allowed_signers (FROSTBYTE_ALLOWED_SIGNERS) or trusted_pgp_keys (FROSTBYTE_TRUSTED_PGP_KEYS), or verify_commits = \"off\""
        ));
    }
    errors
}

/// A plain `http://` remote with a token or password to send is refused in production (dev warns
/// on every fetch).
fn plain_http_errors(mode: Mode, sources: &[SourceConfig], token_file: bool) -> Vec<String> {
    if mode != Mode::Production {
        return vec![];
    }
    sources
        .iter()
        .filter_map(|s| match &s.repo {
            RepoLocation::Remote(u) if u.sends_credentials_in_clear(token_file) => Some(format!(
                "source {}: repo {} is plain http, which would send the git token or password unencrypted; use https:// (http is allowed in dev mode only)",
                s.name, s.repo
            )),
            _ => None,
        })
        .collect()
}

/// What `config` says of a setting nothing gave a value.
fn unset_text(key: Setting, log_format: LogFormat, verify_commits: VerifyMode) -> String {
    match key {
        Setting::DatabaseUrl => "(unset: local PostgreSQL under data_dir)".to_string(),
        Setting::LogFormat => format!("{log_format:?}").to_lowercase(),
        Setting::VerifyCommits => verify_commits.to_string(),
        _ => "(unset)".to_string(),
    }
}

/// Which of `choices` a setting names (`unset` when it has no value), or an error listing them.
fn one_of<T: Copy>(value: Option<&str>, choices: &[(&str, T)], unset: T) -> Result<T, String> {
    let Some(v) = value else { return Ok(unset) };
    choices.iter().find(|(name, _)| *name == v).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        format!("{v:?} is not {}", names.join(" or "))
    })
}

/// The config file's table (empty without a file), and an error for each key it does not know.
fn file_table(file: Option<(&str, &str)>) -> Result<(toml::Table, Vec<String>), String> {
    let Some((path, text)) = file else {
        return Ok((toml::Table::new(), Vec::new()));
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("config file {path}: {}", e.message()))?;
    let mut errors: Vec<String> = table
        .keys()
        .filter(|key| !DEFS.iter().any(|d| d.name == *key) && *key != "sources" && *key != "notifications")
        .map(|key| format!("config file {path}: unknown setting {key:?} (known: {})", known_keys().join(", ")))
        .collect();
    errors.extend(DEFS.iter().filter_map(|d| {
        let why = d.kind.text_of(table.get(d.name)?).err()?;
        Some(format!("config file {path}: {} {why}", d.name))
    }));
    Ok((table, errors))
}

/// Each setting's text and where it came from: a flag beats the environment, which beats the
/// file, which beats the default.
type Raw = BTreeMap<Setting, (Option<String>, Origin)>;

/// Reads settings out of [`Raw`], keeping every problem (named with where its value came from)
/// so that all of them are said at once; a bad value reads as the fallback given.
struct Reader<'a> {
    raw: &'a Raw,
    errors: Vec<String>,
}

impl Reader<'_> {
    fn checked<T>(&mut self, key: Setting, fallback: T, parse: impl FnOnce(Option<String>) -> Result<T, String>) -> T {
        let (value, origin) = &self.raw[&key];
        parse(value.clone()).unwrap_or_else(|e| {
            self.errors.push(format!("{} (from {origin}): {e}", key.name()));
            fallback
        })
    }

    fn choice<T: Copy>(&mut self, key: Setting, choices: &[(&str, T)], unset: T, fallback: T) -> T {
        self.checked(key, fallback, |v| one_of(v.as_deref(), choices, unset))
    }

    fn flag(&mut self, key: Setting) -> bool {
        self.checked(key, false, |v| parse_bool(&v.unwrap_or_default()))
    }

    /// The list of tables a config file keeps under `key` (`[[sources]]`), or `absent` without
    /// one; none, with its problems kept, when it has any.
    fn table_list<T>(
        &mut self,
        table: &toml::Table,
        key: &str,
        absent: impl FnOnce() -> Vec<T>,
        parse: impl FnOnce(&toml::Value) -> Result<Vec<T>, Vec<String>>,
    ) -> Vec<T> {
        let Some(v) = table.get(key) else { return absent() };
        parse(v).unwrap_or_else(|mut e| {
            self.errors.append(&mut e);
            vec![]
        })
    }

    /// The mode and the choices whose default follows from it.
    fn policies(&mut self) -> (Mode, LogFormat, DriftPolicy) {
        let mode = self.choice(Setting::Mode, &[("dev", Mode::Dev), ("production", Mode::Production)], Mode::Dev, Mode::Dev);
        let log_unset = if mode == Mode::Production { LogFormat::Json } else { LogFormat::Text };
        let log_formats = [("text", LogFormat::Text), ("json", LogFormat::Json)];
        let log_format = self.choice(Setting::LogFormat, &log_formats, log_unset, LogFormat::Text);
        let policies = [("correct", DriftPolicy::Correct), ("warn", DriftPolicy::Warn)];
        (
            mode,
            log_format,
            self.choice(Setting::DriftPolicy, &policies, DriftPolicy::Correct, DriftPolicy::Correct),
        )
    }

    /// allow_plaintext, prune, require_tenant_recipient, worktree, status_page.
    fn switches(&mut self) -> [bool; 5] {
        let keys = [
            Setting::AllowPlaintext,
            Setting::Prune,
            Setting::RequireTenantRecipient,
            Setting::Worktree,
            Setting::StatusPage,
        ];
        keys.map(|n| self.flag(n))
    }

    /// interval, full_resync_interval, debounce_ms, db_timeout, run_history, each at its least.
    fn numbers(&mut self) -> [u64; 5] {
        let keys = [
            (Setting::Interval, 1),
            (Setting::FullResyncInterval, 1),
            (Setting::DebounceMs, 0),
            (Setting::DbTimeout, 1),
            (Setting::RunHistory, 1),
        ];
        keys.map(|(n, min)| self.number(n, min))
    }

    fn number(&mut self, key: Setting, min: u64) -> u64 {
        self.checked(key, min, |v| {
            let v = v.unwrap_or_default();
            u64::from_str(v.trim())
                .ok()
                .filter(|n| *n >= min)
                .ok_or_else(|| format!("{v:?} is not a whole number >= {min}"))
        })
    }
}

/// The age key file and where it was named; unset, the SOPS CLI's default location when a file
/// is there.
fn age_key_file(raw: &Raw, home: Option<PathBuf>) -> (Option<PathBuf>, Origin) {
    let (given, origin) = &raw[&Setting::AgeKeyFile];
    match (given, home.map(|h| h.join(".config/sops/age/keys.txt"))) {
        (Some(f), _) => (Some(PathBuf::from(f)), origin.clone()),
        (None, Some(default)) if default.is_file() => (Some(default), Origin::Default),
        (None, _) => (None, origin.clone()),
    }
}

fn raw_settings(flags: &Flags, env: &dyn Fn(&str) -> Option<String>, table: &toml::Table) -> Raw {
    let mut raw = Raw::new();
    for d in DEFS {
        let v = if let Some(v) = flags.0.get(&d.key) {
            (Some(v.clone()), Origin::Flag)
        } else if let Some((name, v)) = d.env.iter().find_map(|n| env(n).filter(|v| !v.is_empty()).map(|v| (*n, v))) {
            (Some(v), Origin::Env(name.to_string()))
        } else if let Some(v) = table.get(d.name) {
            // A value of the wrong type was refused by file_table; it reads as unset here.
            (d.kind.text_of(v).ok(), Origin::File)
        } else {
            (d.default.map(str::to_string), Origin::Default)
        };
        raw.insert(d.key, v);
    }
    raw
}

/// A bearer token (`webhook_token`, `status_token`), refused when too short to guard `what`.
fn token(raw: &Raw, env: &dyn Fn(&str) -> Option<String>, key: Setting, what: &str) -> Result<Option<String>, String> {
    let (given, origin) = raw[&key].clone();
    let var = key.def().env[0];
    // An empty value in the environment counts as given here: it opens the door, not closes it.
    let (token, from) = match given {
        Some(t) => (t, origin),
        None => match env(var).filter(|v| v.is_empty()) {
            Some(t) => (t, Origin::Env(var.into())),
            None => return Ok(None),
        },
    };
    if token.len() < MIN_WEBHOOK_TOKEN_BYTES {
        return Err(format!(
            "{} (from {from}): {} bytes is too short to guard {what}; use at least {MIN_WEBHOOK_TOKEN_BYTES} random bytes, or unset it",
            key.name(),
            token.len()
        ));
    }
    Ok(Some(token))
}

/// Every setting as `frostbyte-gitops config` shows it: secrets hidden, a URL without its
/// credentials; `unset` says what an unset setting means.
fn shown_settings(raw: &Raw, key_file: (Option<String>, Origin), unset: &dyn Fn(Setting) -> String) -> Vec<Shown> {
    DEFS.iter()
        .map(|d| {
            let (value, origin) = match d.key {
                Setting::AgeKeyFile => key_file.clone(),
                _ => raw[&d.key].clone(),
            };
            let value = match (value, d.secret) {
                (None, _) => unset(d.key),
                (Some(v), true) if d.key == Setting::DatabaseUrl => mask_url(&v),
                (Some(v), false) if d.key == Setting::Repo => RepoLocation::parse(&v).to_string(),
                (Some(_), true) => "(set, hidden)".to_string(),
                (Some(v), false) => v,
            };
            Shown { name: d.name, value, origin }
        })
        .collect()
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

impl Config {
    /// `env` looks up environment variables; `file` is the config file's path and text, if any;
    /// `home` locates the SOPS CLI's default key file. Every invalid setting is reported at once.
    pub fn resolve(flags: &Flags, env: &dyn Fn(&str) -> Option<String>, file: Option<(&str, &str)>, home: Option<PathBuf>) -> Result<Config, String> {
        let (table, errors) = file_table(file)?;
        let raw = raw_settings(flags, env, &table);
        let mut r = Reader { raw: &raw, errors };
        let get = |key: Setting| raw[&key].0.clone();
        // A setting with a default always has a value: its definition's, when nothing else gave one.
        let defaulted = |key: Setting| get(key).or_else(|| key.def().default.map(str::to_string)).unwrap_or_default();
        let path = |key: Setting| get(key).map(PathBuf::from);
        let (mode, log_format, drift_policy) = r.policies();
        let [allow_plaintext, prune, require_tenant_recipient, worktree, status_page] = r.switches();
        let [interval_secs, full_resync_secs, debounce_ms, db_timeout_secs, run_history] = r.numbers();
        let fraction = |v: Option<String>| parse_fraction(&v.unwrap_or_default());
        let prune_max_fraction = r.checked(Setting::PruneMaxFraction, DEFAULT_PRUNE_MAX_FRACTION, fraction);
        let repo = RepoLocation::parse(&defaulted(Setting::Repo));
        let implicit = SourceConfig {
            name: DEFAULT_SOURCE.into(),
            repo: repo.clone(),
            git_ref: get(Setting::Ref),
            path: defaulted(Setting::Path),
            prune,
            prune_max_fraction,
        };
        let file_name = file.map_or("", |f| f.0);
        let sources = r.table_list(&table, "sources", || vec![implicit.clone()], |v| parse_sources(file_name, v, &implicit));
        let verify_unset = if mode == Mode::Production { VerifyMode::Head } else { VerifyMode::Off };
        let verify_commits = r.checked(Setting::VerifyCommits, VerifyMode::Off, |v| v.map_or(Ok(verify_unset), |v| v.parse()));
        let has_signers = get(Setting::AllowedSigners).is_some() || get(Setting::TrustedPgpKeys).is_some();
        r.errors.extend(production_errors(mode, allow_plaintext, verify_commits, has_signers));
        r.errors.extend(plain_http_errors(mode, &sources, get(Setting::GitTokenFile).is_some()));
        let embedding_endpoint = get(Setting::EmbeddingEndpoint);
        if let Some(url) = &embedding_endpoint {
            r.checked(Setting::EmbeddingEndpoint, (), |_| check_endpoint(url, mode));
        }
        let tokens = [(Setting::WebhookToken, "POST /sync"), (Setting::StatusToken, "the status page")];
        let [webhook_token, status_token] = tokens.map(|(key, what)| token(&raw, env, key, what).map_err(|e| r.errors.push(e)).unwrap_or_default());
        let (age_key_file, key_file_origin) = age_key_file(&raw, home);
        let notifications = r.table_list(&table, "notifications", Vec::new, |v| parse_notifications(file_name, v, mode));
        if !r.errors.is_empty() {
            return Err(r.errors.join("\n"));
        }

        let key_file = age_key_file.as_ref().map(|p| p.display().to_string());
        let unset = |key: Setting| unset_text(key, log_format, verify_commits);
        let shown = shown_settings(&raw, (key_file, key_file_origin), &unset);
        Ok(Config {
            mode,
            database_url: get(Setting::DatabaseUrl),
            repo,
            git_ref: get(Setting::Ref),
            path: defaulted(Setting::Path),
            age_key_file,
            age_key: get(Setting::AgeKey),
            log_format,
            data_dir: PathBuf::from(defaulted(Setting::DataDir)),
            allow_plaintext,
            require_tenant_recipient,
            drift_policy,
            worktree,
            interval_secs,
            full_resync_secs,
            debounce_ms,
            db_timeout_secs,
            run_history,
            listen: get(Setting::Listen).unwrap_or_default(),
            webhook_token,
            status_page,
            status_token,
            embedding_endpoint,
            verify_commits,
            allowed_signers: path(Setting::AllowedSigners),
            trusted_pgp_keys: path(Setting::TrustedPgpKeys),
            git_auth: crate::location::GitAuth::from_files(path(Setting::GitTokenFile), path(Setting::GitSshKeyFile), path(Setting::GitKnownHosts)),
            sources,
            notifications,
            shown,
        })
    }

    pub fn render(&self) -> String {
        let w = self.shown.iter().map(|s| s.name.len()).max().unwrap_or(0);
        let vw = self.shown.iter().map(|s| s.value.len()).max().unwrap_or(0).min(60);
        let mut out: String = self.shown.iter().map(|s| format!("{:w$}  {:vw$}  ({})\n", s.name, s.value, s.origin)).collect();
        for n in &self.notifications {
            let events: Vec<&str> = n.events.iter().map(|e| e.as_str()).collect();
            out.push_str(&format!(
                "notification: {} events {} format {:?}, {}\n",
                crate::domain::escape::shown_url(&n.url),
                events.join(","),
                n.format,
                if n.secret_file.is_some() { "signed" } else { "unsigned" }
            ));
        }
        for src in &self.sources {
            out.push_str(&format!(
                "source {}: repo {}, ref {}, path {}, prune {} (max fraction {})\n",
                src.name,
                src.repo,
                src.git_ref.as_deref().unwrap_or("(default branch)"),
                src.path,
                src.prune,
                src.prune_max_fraction
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let mut flags = Flags::default();
        flags.0.insert(Setting::Path, "from-flag".into());
        let env = env_of(&[("FROSTBYTE_GITOPS_PATH", "from-env"), ("FROSTBYTE_GITOPS_REF", "env-ref")]);
        let file = "path = \"from-file\"\nref = \"file-ref\"\nrepo = \"file-repo\"\n";
        let c = Config::resolve(&flags, &env, Some(("f.toml", file)), None).unwrap();
        assert_eq!(
            (c.path.as_str(), c.git_ref.as_deref(), &c.repo),
            ("from-flag", Some("env-ref"), &RepoLocation::Local("file-repo".into()))
        );
        let origin = |n: &str| c.shown.iter().find(|s| s.name == n).unwrap().origin.clone();
        assert_eq!(origin("path"), Origin::Flag);
        assert_eq!(origin("ref"), Origin::Env("FROSTBYTE_GITOPS_REF".into()));
        assert_eq!(origin("repo"), Origin::File);
        assert_eq!(origin("mode"), Origin::Default);
    }

    #[test]
    fn every_invalid_setting_is_reported_together() {
        let env = env_of(&[
            ("FROSTBYTE_MODE", "prod"),
            ("FROSTBYTE_DRIFT_POLICY", "ignore"),
            ("FROSTBYTE_SYNC_INTERVAL", "soon"),
            ("FROSTBYTE_LOG_FORMAT", "yaml"),
            ("FROSTBYTE_PRUNE", "maybe"),
            ("FROSTBYTE_DEBOUNCE_MS", "-1"),
            ("FROSTBYTE_PRUNE_MAX_FRACTION", "2"),
            ("FROSTBYTE_VERIFY_COMMITS", "sometimes"),
            ("FROSTBYTE_EMBEDDING_ENDPOINT", "ftp://embed.example.com"),
        ]);
        let err = Config::resolve(&Flags::default(), &env, Some(("f.toml", "colour = 1\n")), None).unwrap_err();
        for needle in [
            "mode (from env FROSTBYTE_MODE): \"prod\" is not dev or production",
            "drift_policy (from env FROSTBYTE_DRIFT_POLICY): \"ignore\" is not correct or warn",
            "log_format (from env FROSTBYTE_LOG_FORMAT): \"yaml\" is not text or json",
            "interval (from env FROSTBYTE_SYNC_INTERVAL): \"soon\" is not a whole number >= 1",
            "debounce_ms (from env FROSTBYTE_DEBOUNCE_MS): \"-1\" is not a whole number >= 0",
            "prune (from env FROSTBYTE_PRUNE): \"maybe\" is not a boolean",
            "prune_max_fraction (from env FROSTBYTE_PRUNE_MAX_FRACTION): \"2\" is not a fraction in (0, 1]",
            "verify_commits (from env FROSTBYTE_VERIFY_COMMITS): \"sometimes\" is not off, head or strict",
            "embedding_endpoint (from env FROSTBYTE_EMBEDDING_ENDPOINT): not an https:// URL",
            "unknown setting \"colour\"",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
    }

    #[test]
    fn a_weak_webhook_token_is_refused_from_every_origin() {
        for (env, file) in [
            (vec![("FROSTBYTE_WEBHOOK_TOKEN", "")], None),
            (vec![("FROSTBYTE_WEBHOOK_TOKEN", "short")], None),
            (vec![], Some("webhook_token = \"\"\n")),
        ] {
            let err = Config::resolve(&Flags::default(), &env_of(&env), file.map(|f| ("f.toml", f)), None).unwrap_err();
            assert!(err.contains("webhook_token") && err.contains("too short"), "{env:?} {file:?}: {err}");
        }
        let ok = env_of(&[("FROSTBYTE_WEBHOOK_TOKEN", "0123456789abcdef")]);
        assert!(Config::resolve(&Flags::default(), &ok, None, None).is_ok());
    }

    #[test]
    fn repository_credentials_are_not_shown() {
        let env = env_of(&[("FROSTBYTE_GITOPS_REPO", "https://bot:ghp_token123@git.example.com/o/r.git")]);
        let text = Config::resolve(&Flags::default(), &env, None, None).unwrap().render();
        assert!(!text.contains("ghp_token123") && !text.contains("bot:"), "{text}");
        assert!(text.contains("https://git.example.com/o/r.git"), "{text}");
        assert_eq!(mask_url("postgres://u:p@ss@h/db"), "postgres://u:****@h/db");
    }

    #[test]
    fn the_embedding_endpoint_is_https_except_in_dev() {
        let ok = |pairs: &[(&str, &str)]| Config::resolve(&Flags::default(), &env_of(pairs), None, None);
        let c = ok(&[("FROSTBYTE_EMBEDDING_ENDPOINT", "http://embeddings:80/v1")]).unwrap();
        assert_eq!(c.embedding_endpoint.as_deref(), Some("http://embeddings:80/v1"));
        assert!(c.render().contains("http://embeddings:80/v1"));
        let err = ok(&[
            ("FROSTBYTE_MODE", "production"),
            ("FROSTBYTE_VERIFY_COMMITS", "off"),
            ("FROSTBYTE_EMBEDDING_ENDPOINT", "http://embeddings:80/v1"),
        ])
        .unwrap_err();
        assert!(
            err.contains("embedding_endpoint (from env FROSTBYTE_EMBEDDING_ENDPOINT): http is allowed in dev mode only"),
            "{err}"
        );
        assert!(ok(&[("FROSTBYTE_EMBEDDING_ENDPOINT", "https://u:p@e.example/v1")]).is_err());
        assert!(ok(&[("FROSTBYTE_EMBEDDING_ENDPOINT", "ftp://e.example")]).is_err());
    }

    #[test]
    fn sources_take_the_top_level_settings_they_leave_out() {
        let file = "repo = \"/r\"\nref = \"main\"\nprune = true\n[[sources]]\nname = \"eu\"\npath = \"tenants/eu\"\n[[sources]]\nname = \"us\"\nrepo = \"/other\"\nref = \"prod\"\nprune = false\nprune_max_fraction = 0.5\n";
        let c = Config::resolve(&Flags::default(), &env_of(&[]), Some(("f.toml", file)), None).unwrap();
        let eu = SourceConfig {
            name: "eu".into(),
            repo: RepoLocation::Local("/r".into()),
            git_ref: Some("main".into()),
            path: "tenants/eu".into(),
            prune: true,
            prune_max_fraction: 0.1,
        };
        let us = SourceConfig {
            name: "us".into(),
            repo: RepoLocation::Local("/other".into()),
            git_ref: Some("prod".into()),
            path: "tenants".into(),
            prune: false,
            prune_max_fraction: 0.5,
        };
        assert_eq!(c.sources, [eu, us]);
        let implicit = Config::resolve(&Flags::default(), &env_of(&[]), None, None).unwrap();
        assert_eq!(implicit.sources.len(), 1);
        assert_eq!(implicit.sources[0].name, DEFAULT_SOURCE);
    }

    #[test]
    fn every_bad_source_entry_is_reported() {
        let file = "[[sources]]\nname = \"EU!\"\ncolour = 1\n[[sources]]\nname = \"us\"\nprune_max_fraction = 2\npath = 3\n[[sources]]\nname = \"us\"\n";
        let err = Config::resolve(&Flags::default(), &env_of(&[]), Some(("f.toml", file)), None).unwrap_err();
        for needle in [
            "sources[0]: unknown key \"colour\"",
            "sources[0]: name \"EU!\"",
            "sources[1]: prune_max_fraction",
            "sources[1]: path must be a string",
            "sources[2]: name \"us\" is used twice",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
    }

    #[test]
    fn notifications_are_checked_and_shown_without_their_path() {
        let file = "[[notifications]]\nurl = \"https://hooks.slack.com/services/T0/B0/XYZSECRET\"\nformat = \"slack\"\nevents = [\"failed\", \"refused\"]\nsecret_file = \"/run/key\"\n\n[[notifications]]\nurl = \"ftp://x\"\nevents = [\"applied\", \"exploded\"]\nformat = \"teams\"\n";
        let err = Config::resolve(&Flags::default(), &env_of(&[]), Some(("f.toml", file)), None).unwrap_err();
        for needle in ["notifications[1]: url", "notifications[1]: events", "notifications[1]: format"] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
        let ok = "[[notifications]]\nurl = \"https://hooks.slack.com/services/T0/B0/XYZSECRET\"\nformat = \"slack\"\nevents = [\"failed\", \"refused\"]\n";
        let c = Config::resolve(&Flags::default(), &env_of(&[]), Some(("f.toml", ok)), None).unwrap();
        assert_eq!(c.notifications[0].events, [NotifyEvent::Failed, NotifyEvent::Refused]);
        let text = c.render();
        assert!(
            text.contains("notification: https://hooks.slack.com events failed,refused format Slack"),
            "{text}"
        );
        assert!(!text.contains("XYZSECRET"), "{text}");
    }

    #[test]
    fn production_refuses_plaintext() {
        let env = env_of(&[("FROSTBYTE_MODE", "production"), ("FROSTBYTE_ALLOW_PLAINTEXT", "true")]);
        let err = Config::resolve(&Flags::default(), &env, None, None).unwrap_err();
        assert!(err.contains("allow_plaintext cannot be used"), "{err}");
    }

    /// docs/configuration.md's table of settings is the definitions', row for row: key, flag,
    /// environment variables and default.
    #[test]
    fn the_documented_table_lists_every_setting_as_defined() {
        let readme = include_str!("../docs/configuration.md");
        let rows: Vec<Vec<&str>> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| key | flag | environment | default |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim().trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        let named: Vec<&str> = rows.iter().map(|r| r[0].trim_matches('`')).filter(|n| *n != "sources").collect();
        let defined: Vec<&str> = DEFS.iter().map(|d| d.name).collect();
        assert_eq!(named, defined, "docs/configuration.md lists the settings in their definitions' order");
        for d in DEFS {
            let row = rows.iter().find(|r| r[0] == format!("`{}`", d.name)).unwrap();
            match d.flag {
                Some(flag) => assert!(row[1].starts_with(&format!("`{flag}`")), "{}: flag {flag} not in {:?}", d.name, row[1]),
                None => assert!(row[1].is_empty(), "{}: no flag is defined, the docs name {:?}", d.name, row[1]),
            }
            let envs: Vec<&str> = row[2].split(", ").map(|e| e.trim_matches('`')).filter(|e| !e.is_empty()).collect();
            assert_eq!(envs, d.env, "{}", d.name);
            if let Some(default) = d.default {
                assert!(
                    row[3].starts_with(&format!("`{default}`")),
                    "{}: default {default} not at the start of {:?}",
                    d.name,
                    row[3]
                );
            }
        }
    }

    #[test]
    fn sources_that_overlap_in_one_repository_are_refused() {
        let resolve = |text: &str| Config::resolve(&Flags::default(), &env_of(&[]), Some(("frostbyte.toml", text)), None);
        let two = |p1: &str, r2: &str, p2: &str| {
            format!(
                "[[sources]]\nname = \"a\"\nrepo = \"https://g.example.com/o/r.git\"\npath = \"{p1}\"\n\n[[sources]]\nname = \"b\"\nrepo = \"{r2}\"\npath = \"{p2}\"\n"
            )
        };
        for (p1, r2, p2) in [
            ("tenants", "https://g.example.com/o/r.git", "tenants/eu"),
            ("tenants/", "git@g.example.com:o/r", "./tenants"),
            ("", "https://g.example.com/o/r", "tenants"),
        ] {
            let err = resolve(&two(p1, r2, p2)).unwrap_err();
            assert!(err.contains("overlapping directories"), "{p1} {r2} {p2}: {err}");
        }
        for (p1, r2, p2) in [
            ("tenants/eu", "https://g.example.com/o/r.git", "tenants/us"),
            ("tenants", "https://g.example.com/o/other.git", "tenants"),
            ("tenants/e", "https://g.example.com/o/r.git", "tenants/eu"),
        ] {
            assert!(resolve(&two(p1, r2, p2)).is_ok(), "{p1} {r2} {p2}");
        }
    }

    #[test]
    fn wrong_types_in_the_config_file_are_refused() {
        let resolve = |text: &str| Config::resolve(&Flags::default(), &env_of(&[]), Some(("frostbyte.toml", text)), None);
        let err = resolve("repo = 42\ninterval = true\nprune = \"yes\"\nworktree = 1\n").unwrap_err();
        assert!(err.contains("repo is an integer, but must be a string"), "{err}");
        assert!(err.contains("interval is a boolean, but must be a whole number"), "{err}");
        assert!(err.contains("worktree is an integer, but must be true or false"), "{err}");
        let ok = resolve("interval = 30\nprune = true\nprune_max_fraction = 0.5\ndebounce_ms = \"250\"\n").unwrap();
        assert_eq!((ok.interval_secs, ok.debounce_ms), (30, 250));
    }

    #[test]
    fn production_refuses_a_token_over_plain_http() {
        let resolve = |pairs: &[(&str, &str)]| Config::resolve(&Flags::default(), &env_of(pairs), None, None);
        let base = [("FROSTBYTE_MODE", "production"), ("FROSTBYTE_VERIFY_COMMITS", "off")];
        for extra in [
            vec![("FROSTBYTE_GITOPS_REPO", "http://bot:ghp_tok@git.example.com/o/r.git")],
            vec![
                ("FROSTBYTE_GITOPS_REPO", "HTTP://git.example.com/o/r.git"),
                ("FROSTBYTE_GIT_TOKEN_FILE", "/run/token"),
            ],
        ] {
            let err = resolve(&[&base[..], &extra[..]].concat()).unwrap_err();
            assert!(err.contains("plain http") && err.contains("source default"), "{err}");
            assert!(!err.contains("ghp_tok"), "{err}");
            let mut dev = extra.clone();
            dev.push(("FROSTBYTE_VERIFY_COMMITS", "off"));
            assert!(resolve(&dev).is_ok(), "dev mode warns instead");
        }
        let anonymous = [("FROSTBYTE_GITOPS_REPO", "http://git.example.com/o/r.git")];
        assert!(resolve(&[&base[..], &anonymous[..]].concat()).is_ok(), "nothing secret to send");
        let https = [("FROSTBYTE_GITOPS_REPO", "https://bot:tok@git.example.com/o/r.git")];
        assert!(resolve(&[&base[..], &https[..]].concat()).is_ok());
    }

    #[test]
    fn secrets_are_masked() {
        let env = env_of(&[
            ("FROSTBYTE_CONTROL_DB_URL", "postgres://app:hunter2@db/x"),
            ("SOPS_AGE_KEY", "AGE-SECRET-KEY-1XYZ"),
        ]);
        let c = Config::resolve(&Flags::default(), &env, None, None).unwrap();
        let text = c.render();
        assert!(text.contains("postgres://app:****@db/x"), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("AGE-SECRET"), "{text}");
        assert_eq!(mask_url("host=/tmp user=x password=pw dbname=y"), "host=/tmp user=x password=**** dbname=y");
    }
}
