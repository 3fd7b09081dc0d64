//! The command line as clap reads it: the global options and every command's own.

use clap::{Args, Parser, Subcommand, ValueEnum};
use frostbyte_gitops::domain::render;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "frostbyte-gitops",
    version,
    about = "Sync SOPS-encrypted tenant definitions from git into the Frostbyte tenant registry"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Args)]
#[command(next_help_heading = "Global options")]
pub(crate) struct Global {
    /// TOML configuration file (env FROSTBYTE_CONFIG).
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// dev or production (env FROSTBYTE_MODE).
    #[arg(long, global = true)]
    pub(crate) mode: Option<String>,
    /// PostgreSQL URL or conninfo (env FROSTBYTE_CONTROL_DB_URL). Unset in dev mode: a local cluster.
    #[arg(long, global = true)]
    pub(crate) database_url: Option<String>,
    /// Path inside a git work tree, or a git URL (env FROSTBYTE_GITOPS_REPO).
    #[arg(long, global = true)]
    pub(crate) repo: Option<String>,
    /// Revision to read (env FROSTBYTE_GITOPS_REF; default HEAD / the remote's default branch).
    #[arg(long = "ref", global = true)]
    pub(crate) git_ref: Option<String>,
    /// Tenant directory inside the repository (env FROSTBYTE_GITOPS_PATH; default tenants).
    #[arg(long, global = true)]
    pub(crate) path: Option<String>,
    /// age identities file (env SOPS_AGE_KEY_FILE).
    #[arg(long, global = true)]
    pub(crate) age_key_file: Option<String>,
    /// text or json (env FROSTBYTE_LOG_FORMAT).
    #[arg(long, global = true)]
    pub(crate) log_format: Option<String>,
    /// Where the local cluster and clone cache live (env FROSTBYTE_DATA_DIR; default .frostbyte).
    #[arg(long, global = true)]
    pub(crate) data_dir: Option<String>,
    /// warn or correct (env FROSTBYTE_DRIFT_POLICY).
    #[arg(long, global = true)]
    pub(crate) drift_policy: Option<String>,
    /// Accept tenant files without sops metadata (dev mode only).
    #[arg(long, global = true)]
    pub(crate) allow_plaintext: bool,
    /// Read the files on disk instead of a commit.
    #[arg(long, global = true)]
    pub(crate) worktree: bool,
    /// `run`: seconds between syncs (env FROSTBYTE_SYNC_INTERVAL; default 60).
    #[arg(long, global = true)]
    pub(crate) interval: Option<String>,
    /// `run`: quiet time after a file event before syncing (env FROSTBYTE_DEBOUNCE_MS; default 500).
    #[arg(long, global = true)]
    pub(crate) debounce_ms: Option<String>,
    /// `run`: HTTP listener address (env FROSTBYTE_LISTEN; default 127.0.0.1:8686).
    #[arg(long, global = true)]
    pub(crate) listen: Option<String>,
    /// off, head or strict (env FROSTBYTE_VERIFY_COMMITS; default off in dev, head in production).
    #[arg(long, global = true)]
    pub(crate) verify_commits: Option<String>,
    /// OpenSSH allowed_signers file of trusted commit signers (env FROSTBYTE_ALLOWED_SIGNERS).
    #[arg(long, global = true)]
    pub(crate) allowed_signers: Option<String>,
    /// Armored OpenPGP public keys of trusted commit signers (env FROSTBYTE_TRUSTED_PGP_KEYS).
    #[arg(long, global = true)]
    pub(crate) trusted_pgp_keys: Option<String>,
    /// Only this configured source (default: every one, each planned and applied on its own).
    #[arg(long, global = true)]
    pub(crate) source: Option<String>,
    /// JSON output as format_version 1 (no old values in patches), for one release.
    #[arg(long, global = true, default_value_t = render::JSON_FORMAT_VERSION, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub(crate) json_format_version: u32,
}

#[derive(Args, Clone, Copy)]
pub(crate) struct PruneArgs {
    /// Decommission tenants whose file was deleted from the source that owns them, whatever the
    /// source's `prune` setting says.
    #[arg(long)]
    pub(crate) prune: bool,
    /// Prune even past the source's prune_max_fraction, or every tenant of a source.
    #[arg(long)]
    pub(crate) allow_mass_prune: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum OutFormat {
    Text,
    Json,
    Markdown,
}

/// For the reports that have no Markdown form.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum TextOrJson {
    Text,
    Json,
}

impl From<TextOrJson> for OutFormat {
    fn from(f: TextOrJson) -> OutFormat {
        match f {
            TextOrJson::Text => OutFormat::Text,
            TextOrJson::Json => OutFormat::Json,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Apply pending database migrations, as the tables' owner; with --app-role, grant that role
    /// exactly what the agent needs.
    Migrate {
        /// The role the agent connects as (env FROSTBYTE_APP_ROLE): it must exist, and own nothing.
        #[arg(long, env = "FROSTBYTE_APP_ROLE")]
        app_role: Option<String>,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Print the resolved configuration and where each value came from.
    Config,
    /// Decrypt and validate every tenant file. Exit 0 when all are valid, 1 otherwise.
    Validate {
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        /// Check everything that needs no key (names, structure, sops metadata, the schema of the
        /// plaintext parts, recipients): for pull-request jobs, which must not hold one.
        #[arg(long)]
        no_decrypt: bool,
    },
    /// Show what a sync would change. Exit 0 no changes, 2 changes, 1 error.
    Plan {
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        /// Save the plan for `apply FILE`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Compare with the tenant files at this revision instead of the database.
        #[arg(long)]
        against_ref: Option<String>,
        /// Colour the text plan: auto (on a terminal), always or never.
        #[arg(long, value_enum, default_value = "auto")]
        color: Color,
        #[command(flatten)]
        prune: PruneArgs,
    },
    /// Apply a saved plan, or plan and apply now.
    Apply {
        /// A plan saved with `plan --out`.
        plan_file: Option<PathBuf>,
        /// Apply a commit that does not descend from the last applied one (a force-push, a reset).
        #[arg(long)]
        allow_non_fast_forward: bool,
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: TextOrJson,
        #[command(flatten)]
        prune: PruneArgs,
    },
    /// Fetch, plan and apply in one go (for cron).
    Sync {
        /// Apply a commit that does not descend from the last applied one (a force-push, a reset).
        #[arg(long)]
        allow_non_fast_forward: bool,
        /// Read every file and row, whatever the incremental state says.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        prune: PruneArgs,
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: TextOrJson,
    },
    /// Each source's last applied commit, lease holder, last run and drift, and the audit
    /// trail's head, from the database alone. Exit 0 healthy, 2 drift or a failing source, 1 error.
    Status {
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
    },
    /// Report how the database differs from git. Exit 0 in sync, 2 drift, 1 error.
    Drift {
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        /// Classes that make the exit code 2 (default: all): pending,modified,missing,orphaned.
        #[arg(long, value_delimiter = ',')]
        fail_on: Vec<String>,
        /// Read every file and row, whatever the incremental state says: finds edits made with
        /// triggers off, restores, and clocks that stepped back.
        #[arg(long)]
        full: bool,
    },
    /// Run the agent: sync on an interval, on new commits and on webhooks; serve health and
    /// metrics. Exits 0 on SIGTERM or SIGINT after the sync in progress.
    Run,
    /// Keep tenant files encrypted (the sops CLI cannot edit TOML).
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Tenant file helpers.
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// The local PostgreSQL cluster used in dev mode.
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
}

#[derive(Subcommand)]
pub(crate) enum SecretsCmd {
    /// Encrypt a plaintext file in place, to the recipients of its .sops.yaml creation rule and
    /// the tenant's own age_public_key.
    Encrypt { file: PathBuf },
    /// Print the decrypted file.
    Decrypt { file: PathBuf },
    /// Edit the plaintext in $EDITOR; re-encrypt if it changed and is still a valid tenant file.
    /// An edit that is not is never lost: the editor opens again with its problems on top, or the
    /// edit is kept in a private file whose name the error gives.
    Edit {
        file: PathBuf,
        /// Start from an edit kept by an earlier `secrets edit` instead of the file's plaintext.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Re-encrypt the data key of tenant files to the recipients the creation rules name now.
    Updatekeys {
        /// Files to update (default: every tenant file under the configured path).
        files: Vec<PathBuf>,
        /// Say which files would change and write none.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace the data key of tenant files: every value re-encrypted, the MAC recomputed, the
    /// same recipients (as `sops rotate`).
    Rotate {
        /// Files to rotate (default: every tenant file under the configured path).
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Recompute the audit chain and check every tenant's config_version against its config
    /// events. Exit 0 intact, 1 naming the first event edited, deleted, inserted or reordered.
    Verify {
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: TextOrJson,
        /// A file recording the head of the last good verification: the event it names must still
        /// be there unchanged (this catches a rewrite of the whole chain); updated when intact.
        #[arg(long)]
        anchor: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum TenantCmd {
    /// Move a tenant to another lifecycle state (pending -> provisioning -> active <-> suspended;
    /// any -> decommissioning -> decommissioned), with its audit event. Git never changes state.
    State {
        tenant_id: String,
        /// provisioning, active, suspended, decommissioning or decommissioned.
        state: String,
        /// Recorded in the audit event.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Give a tenant to another configured source (audited as TENANT_SOURCE_CHANGED); its file
    /// should move to that source's repository in the same change.
    Move {
        tenant_id: String,
        /// The configured name of the source that owns it from now on.
        #[arg(long)]
        to: String,
    },
    /// A tenant's versions from the audit trail: when, by whom, from which commit, and each
    /// change old -> new, secrets redacted.
    History {
        tenant_id: String,
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
    },
    /// The tenant's document at a version (default: the current one), secrets redacted, replayed
    /// from the audit trail; the current version is checked against the row. Exit 2 when the row
    /// was changed outside git since.
    Show {
        tenant_id: String,
        /// The version to show (default: the current one).
        #[arg(long)]
        version: Option<i64>,
        /// How to print the result.
        #[arg(long, value_enum, default_value = "text")]
        format: TextOrJson,
    },
    /// Write the tenant's file as it was in the commit that produced a version (still encrypted,
    /// from git) to its path in the work tree, or to --out: commit it to revert the tenant.
    Restore {
        tenant_id: String,
        /// The version whose file to write.
        #[arg(long)]
        version: i64,
        /// Where to write it (default: its path in the work tree).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a valid, encrypted skeleton for a new tenant.
    New {
        tenant_id: String,
        /// The tenant's own age recipient.
        #[arg(long)]
        age_public_key: String,
        /// toml, json or yaml.
        #[arg(long, default_value = "toml")]
        format: String,
        /// Directory for the file (default: <repo>/<path>).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum DbCmd {
    /// Start it (creating it on first use) and print its connection string.
    Start,
    /// Stop it.
    Stop,
}
