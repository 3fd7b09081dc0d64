use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use frostbyte_gitops::config::{Config, Flags, LogFormat, SourceConfig};
use frostbyte_gitops::domain::drift::DriftClass;
use frostbyte_gitops::domain::plan::Entries;
use frostbyte_gitops::domain::render;
use frostbyte_gitops::notify::Notification;
use frostbyte_gitops::sops::AgeKeys;
use frostbyte_gitops::source::RepoLocation;
use frostbyte_gitops::sync::{self, Ctx, Run, SavedPlan};
use frostbyte_gitops::{files, localpg, store};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes, as Terraform's -detailed-exitcode: scripts depend on them.
const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_CHANGES: u8 = 2;

#[derive(Parser)]
#[command(
    name = "frostbyte-gitops",
    version,
    about = "Sync SOPS-encrypted tenant definitions from git into the Frostbyte tenant registry"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// TOML configuration file (env FROSTBYTE_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// dev or production (env FROSTBYTE_MODE).
    #[arg(long, global = true)]
    mode: Option<String>,
    /// PostgreSQL URL or conninfo (env FROSTBYTE_CONTROL_DB_URL). Unset in dev mode: a local cluster.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Path inside a git work tree, or a git URL (env FROSTBYTE_GITOPS_REPO).
    #[arg(long, global = true)]
    repo: Option<String>,
    /// Revision to read (env FROSTBYTE_GITOPS_REF; default HEAD / the remote's default branch).
    #[arg(long = "ref", global = true)]
    git_ref: Option<String>,
    /// Tenant directory inside the repository (env FROSTBYTE_GITOPS_PATH; default tenants).
    #[arg(long, global = true)]
    path: Option<String>,
    /// age identities file (env SOPS_AGE_KEY_FILE).
    #[arg(long, global = true)]
    age_key_file: Option<String>,
    /// text or json (env FROSTBYTE_LOG_FORMAT).
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Where the local cluster and clone cache live (env FROSTBYTE_DATA_DIR; default .frostbyte).
    #[arg(long, global = true)]
    data_dir: Option<String>,
    /// warn or correct (env FROSTBYTE_DRIFT_POLICY).
    #[arg(long, global = true)]
    drift_policy: Option<String>,
    /// Accept tenant files without sops metadata (dev mode only).
    #[arg(long, global = true)]
    allow_plaintext: bool,
    /// Read the files on disk instead of a commit.
    #[arg(long, global = true)]
    worktree: bool,
    /// `run`: seconds between syncs (env FROSTBYTE_SYNC_INTERVAL; default 60).
    #[arg(long, global = true)]
    interval: Option<String>,
    /// `run`: quiet time after a file event before syncing (env FROSTBYTE_DEBOUNCE_MS; default 500).
    #[arg(long, global = true)]
    debounce_ms: Option<String>,
    /// `run`: HTTP listener address (env FROSTBYTE_LISTEN; default 127.0.0.1:8686).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// off, head or strict (env FROSTBYTE_VERIFY_COMMITS; default off in dev, head in production).
    #[arg(long, global = true)]
    verify_commits: Option<String>,
    /// OpenSSH allowed_signers file of trusted commit signers (env FROSTBYTE_ALLOWED_SIGNERS).
    #[arg(long, global = true)]
    allowed_signers: Option<String>,
    /// Armored OpenPGP public keys of trusted commit signers (env FROSTBYTE_TRUSTED_PGP_KEYS).
    #[arg(long, global = true)]
    trusted_pgp_keys: Option<String>,
    /// Only this configured source (default: every one, each planned and applied on its own).
    #[arg(long, global = true)]
    source: Option<String>,
    /// JSON output as format_version 1 (no old values in patches), for one release.
    #[arg(long, global = true, default_value_t = render::JSON_FORMAT_VERSION, value_parser = clap::value_parser!(u32).range(1..=2))]
    json_format_version: u32,
}

#[derive(Args, Clone, Copy)]
struct PruneArgs {
    /// Decommission tenants whose file was deleted from the source that owns them, whatever the
    /// source's `prune` setting says.
    #[arg(long)]
    prune: bool,
    /// Prune even past the source's prune_max_fraction, or every tenant of a source.
    #[arg(long)]
    allow_mass_prune: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum OutFormat {
    Text,
    Json,
    Markdown,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Cmd {
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
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        /// Check everything that needs no key (names, structure, sops metadata, the schema of the
        /// plaintext parts, recipients): for pull-request jobs, which must not hold one.
        #[arg(long)]
        no_decrypt: bool,
    },
    /// Show what a sync would change. Exit 0 no changes, 2 changes, 1 error.
    Plan {
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        /// Save the plan for `apply FILE`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Compare with the tenant files at this revision instead of the database.
        #[arg(long)]
        against_ref: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        color: Color,
        #[command(flatten)]
        prune: PruneArgs,
    },
    /// Apply a saved plan, or plan and apply now.
    Apply {
        /// A plan saved with `plan --out`.
        plan_file: Option<PathBuf>,
        #[arg(long)]
        allow_non_fast_forward: bool,
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        #[command(flatten)]
        prune: PruneArgs,
    },
    /// Fetch, plan and apply in one go (for cron).
    Sync {
        #[arg(long)]
        allow_non_fast_forward: bool,
        /// Read every file and row, whatever the incremental state says.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        prune: PruneArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
    },
    /// Report how the database differs from git. Exit 0 in sync, 2 drift, 1 error.
    Drift {
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
enum SecretsCmd {
    /// Encrypt a plaintext file in place, to the recipients of its .sops.yaml creation rule and
    /// the tenant's own age_public_key.
    Encrypt { file: PathBuf },
    /// Print the decrypted file.
    Decrypt { file: PathBuf },
    /// Edit the plaintext in $EDITOR; re-encrypt if it changed and is still a valid tenant file.
    Edit { file: PathBuf },
    /// Re-encrypt the data key of tenant files to the recipients the creation rules name now.
    Updatekeys {
        /// Files to update (default: every tenant file under the configured path).
        files: Vec<PathBuf>,
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
enum AuditCmd {
    /// Recompute the audit chain and check every tenant's config_version against its config
    /// events. Exit 0 intact, 1 naming the first event edited, deleted, inserted or reordered.
    Verify {
        #[arg(long, value_enum, default_value = "text")]
        format: OutFormat,
        /// A file recording the head of the last good verification: the event it names must still
        /// be there unchanged (this catches a rewrite of the whole chain); updated when intact.
        #[arg(long)]
        anchor: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
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
enum DbCmd {
    /// Start it (creating it on first use) and print its connection string.
    Start,
    /// Stop it.
    Stop,
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB); from
/// then on such blocks come from the heap, and their memory is kept once they are freed. With the
/// threshold fixed and two arenas, a first sync of 100,000 tenants peaked at 81 MiB instead of
/// 98, in the same time. glibc's own environment variables, when set, are left to decide.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (var, param, value) in [
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 128 * 1024),
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { libc::mallopt(param, value) };
        }
    }
}

fn flags(g: &Global) -> Flags {
    let mut f = Flags::default();
    let mut put = |k: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            f.0.insert(k, v.clone());
        }
    };
    put("mode", &g.mode);
    put("database_url", &g.database_url);
    put("repo", &g.repo);
    put("ref", &g.git_ref);
    put("path", &g.path);
    put("age_key_file", &g.age_key_file);
    put("log_format", &g.log_format);
    put("data_dir", &g.data_dir);
    put("drift_policy", &g.drift_policy);
    put("interval", &g.interval);
    put("debounce_ms", &g.debounce_ms);
    put("listen", &g.listen);
    put("verify_commits", &g.verify_commits);
    put("allowed_signers", &g.allowed_signers);
    put("trusted_pgp_keys", &g.trusted_pgp_keys);
    if g.allow_plaintext {
        f.0.insert("allow_plaintext", "true".into());
    }
    if g.worktree {
        f.0.insert("worktree", "true".into());
    }
    f
}

fn resolve_config(g: &Global) -> Result<Config> {
    let file_path = g.config.clone().or_else(|| std::env::var_os("FROSTBYTE_CONFIG").map(PathBuf::from));
    let text = file_path
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading config file {}", p.display())))
        .transpose()?;
    let shown_path = file_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let file = text.as_deref().map(|t| (shown_path.as_str(), t));
    let env = |k: &str| std::env::var(k).ok();
    Config::resolve(&flags(g), &env, file, std::env::var_os("HOME").map(PathBuf::from)).map_err(|e| anyhow!("invalid configuration:\n{e}"))
}

fn load_keys(cfg: &Config) -> Result<AgeKeys> {
    let mut keys = AgeKeys::default();
    if let Some(path) = &cfg.age_key_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading age key file {}", path.display()))?;
        keys.add_text(&text, &path.display().to_string()).map_err(|e| anyhow!(e))?;
    }
    if let Some(text) = &cfg.age_key {
        keys.add_text(text, "SOPS_AGE_KEY").map_err(|e| anyhow!(e))?;
    }
    Ok(keys)
}

fn load_signers(cfg: &Config) -> Result<frostbyte_gitops::verify::TrustedSigners> {
    let signers = frostbyte_gitops::verify::TrustedSigners::load(cfg.allowed_signers.as_deref(), cfg.trusted_pgp_keys.as_deref())?;
    if cfg.verify_commits != frostbyte_gitops::verify::VerifyMode::Off && signers.is_empty() {
        return Err(anyhow!(
            "verify_commits is {} but no trusted signer is configured: set allowed_signers (FROSTBYTE_ALLOWED_SIGNERS) or trusted_pgp_keys (FROSTBYTE_TRUSTED_PGP_KEYS)",
            cfg.verify_commits
        ));
    }
    Ok(signers)
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FROSTBYTE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,frostbyte_gitops=info"));
    // tokio-postgres logs every query's parameters at debug level, and parameters carry decrypted
    // config. A directive cannot keep them out (a more specific one in FROSTBYTE_LOG would win), so
    // a second filter drops them whatever FROSTBYTE_LOG says.
    let no_parameters = tracing_subscriber::filter::filter_fn(|meta| !(meta.target().starts_with("tokio_postgres") && *meta.level() > tracing::Level::INFO));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match cfg.log_format {
        LogFormat::Json => layer.json().with_filter(filter.and(no_parameters)).boxed(),
        LogFormat::Text => layer.with_ansi(std::io::stderr().is_terminal()).with_filter(filter.and(no_parameters)).boxed(),
    };
    tracing_subscriber::registry().with(layer).init();
}

fn real_main(cli: Cli) -> Result<u8> {
    let _ = JSON_VERSION.set(cli.global.json_format_version);
    let cfg = resolve_config(&cli.global)?;
    init_logging(&cfg);
    match &cli.cmd {
        Cmd::Config => {
            print!("{}", cfg.render());
            return Ok(EXIT_OK);
        }
        Cmd::Db { cmd } => return db_command(&cfg, cmd),
        _ => {}
    }
    let keys = load_keys(&cfg)?;
    match &cli.cmd {
        Cmd::Secrets { cmd } => return secrets(&cfg, &keys, cmd),
        Cmd::Tenant {
            cmd: TenantCmd::New {
                tenant_id,
                age_public_key,
                format,
                dir,
            },
        } => return new_tenant(&cfg, tenant_id, age_public_key, format, dir.as_ref()),
        _ => {}
    }
    // Keys are in hand before any thread starts; nothing reads them from the environment later.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ctx = context(cfg, keys, &cli.cmd)?;
    if let Cmd::Run = cli.cmd {
        return rt.block_on(async {
            let db = sync::connect(&ctx.cfg).await?;
            frostbyte_gitops::agent::run(std::sync::Arc::new(ctx), db).await?;
            Ok(EXIT_OK)
        });
    }
    rt.block_on(dispatch(&ctx, cli.cmd, cli.global.source.as_deref()))
}

/// What every command that reads tenants shares: the settings, the keys, the signers it trusts
/// and where it reports.
fn context(cfg: Config, keys: AgeKeys, cmd: &Cmd) -> Result<Ctx> {
    let progress = matches!(
        cmd,
        Cmd::Validate { format: OutFormat::Text, .. } | Cmd::Plan { format: OutFormat::Text, .. } | Cmd::Sync { format: OutFormat::Text, .. }
    );
    let signers = load_signers(&cfg)?;
    let notifier = std::sync::Arc::new(frostbyte_gitops::notify::Notifier::new(&notify_targets(&cfg.notifications))?);
    Ok(Ctx {
        cfg,
        keys,
        signers,
        progress,
        notifier,
    })
}

/// The receivers as the notifier takes them, from the settings that describe them.
fn notify_targets(configs: &[frostbyte_gitops::config::NotificationConfig]) -> Vec<frostbyte_gitops::notify::Target> {
    use frostbyte_gitops::config::{NotifyEvent, NotifyFormat};
    use frostbyte_gitops::notify::{Event, Format, Target};
    configs
        .iter()
        .map(|c| Target {
            url: c.url.clone(),
            secret_file: c.secret_file.clone(),
            events: c
                .events
                .iter()
                .map(|e| match e {
                    NotifyEvent::Applied => Event::Applied,
                    NotifyEvent::Failed => Event::Failed,
                    NotifyEvent::Refused => Event::Refused,
                    NotifyEvent::Drift => Event::Drift,
                })
                .collect(),
            format: match c.format {
                NotifyFormat::Generic => Format::Generic,
                NotifyFormat::Slack => Format::Slack,
            },
        })
        .collect()
}

fn db_command(cfg: &Config, cmd: &DbCmd) -> Result<u8> {
    match cmd {
        DbCmd::Start => {
            // The same path `sync` takes: the cluster, then the database in it.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let mut local = cfg.clone();
            local.database_url = None;
            local.mode = frostbyte_gitops::config::Mode::Dev;
            let db = rt.block_on(sync::connect(&local))?;
            println!("{}", db.url);
        }
        DbCmd::Stop => localpg::stop(&cfg.data_dir.join("pgdata"))?,
    }
    Ok(EXIT_OK)
}

fn new_tenant(cfg: &Config, tenant_id: &str, age_public_key: &str, format: &str, dir: Option<&PathBuf>) -> Result<u8> {
    let dir = match dir {
        Some(dir) => dir.clone(),
        None => local_tenant_dir(cfg)?,
    };
    let path = dir.join(format!("{tenant_id}.{format}"));
    files::new_tenant(&path, tenant_id, age_public_key)?;
    println!("Wrote {}", path.display());
    Ok(EXIT_OK)
}

/// The JSON format version asked for with --json-format-version.
static JSON_VERSION: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn print_json(v: &serde_json::Value) {
    let version = JSON_VERSION.get().copied().unwrap_or(render::JSON_FORMAT_VERSION);
    let v = render::json_format_version(v.clone(), version);
    println!("{}", serde_json::to_string_pretty(&v).expect("serialisable"));
}

async fn dispatch(ctx: &Ctx, cmd: Cmd, only: Option<&str>) -> Result<u8> {
    match cmd {
        Cmd::Tenant {
            cmd: TenantCmd::Move { tenant_id, to },
        } => tenant_move(ctx, &tenant_id, &to).await,
        Cmd::Tenant {
            cmd: TenantCmd::State { tenant_id, state, reason },
        } => tenant_state(ctx, &tenant_id, &state, reason).await,
        Cmd::Config | Cmd::Db { .. } | Cmd::Secrets { .. } | Cmd::Tenant { .. } | Cmd::Run => unreachable!("handled before dispatch"),
        Cmd::Migrate { app_role } => migrate(ctx, app_role).await,
        Cmd::Audit {
            cmd: AuditCmd::Verify { format, anchor },
        } => audit_verify(ctx, format, anchor.as_deref()).await,
        Cmd::Validate { format, no_decrypt } => validate(ctx, only, format, no_decrypt),
        Cmd::Plan {
            format,
            out,
            against_ref,
            color,
            prune,
        } => plan(ctx, only, format, out, against_ref, color, prune).await,
        Cmd::Apply {
            plan_file,
            allow_non_fast_forward,
            format,
            prune,
        } => apply(ctx, only, plan_file, allow_non_fast_forward, format, prune).await,
        Cmd::Sync {
            allow_non_fast_forward,
            format,
            full,
            prune,
        } => apply_and_report(ctx, only, || Run::Apply { allow_non_fast_forward }, format, full, prune).await,
        Cmd::Drift { format, fail_on, full } => drift(ctx, only, format, &fail_on, full).await,
    }
}

async fn tenant_move(ctx: &Ctx, tenant_id: &str, to: &str) -> Result<u8> {
    let target = ctx.sources(Some(to))?[0];
    let source = frostbyte_gitops::source::Source::open(&ctx.source_spec(target))?;
    let db = sync::connect(&ctx.cfg).await?;
    sync::prepare(&ctx.cfg, &db).await?;
    let mut client = store::client(&db.pool).await?;
    let event = store::move_tenant(&mut client, tenant_id, &source.id, &target.name, sync::ACTOR).await?;
    println!(
        "Tenant {} now belongs to source {} ({}) (audit event {event}).",
        frostbyte_gitops::domain::escape::text(tenant_id),
        target.name,
        source.id
    );
    Ok(EXIT_OK)
}

async fn tenant_state(ctx: &Ctx, tenant_id: &str, state: &str, reason: Option<String>) -> Result<u8> {
    let db = sync::connect(&ctx.cfg).await?;
    sync::prepare(&ctx.cfg, &db).await?;
    let mut client = store::client(&db.pool).await?;
    let details = serde_json::json!({ "reason": reason });
    let event = store::transition_tenant_state(&mut client, tenant_id, state, sync::ACTOR, &details).await?;
    println!("Tenant {tenant_id} is now {state} (audit event {event}).");
    Ok(EXIT_OK)
}

async fn migrate(ctx: &Ctx, app_role: Option<String>) -> Result<u8> {
    let db = sync::connect(&ctx.cfg).await?;
    let mut client = db.client(&ctx.cfg).await?;
    let applied = store::migrate(&mut client).await?;
    if applied.is_empty() {
        println!("Migrations: nothing to apply ({} applied already).", store::MIGRATIONS.len());
    } else {
        println!("Applied migrations: {}", applied.join(", "));
    }
    if let Some(role) = app_role {
        store::grant_app_role(&**client, &role).await?;
        println!("Granted role {role:?} what the agent needs (tenants, its own tables, emit_audit_event).");
    }
    Ok(EXIT_OK)
}

fn validate(ctx: &Ctx, only: Option<&str>, format: OutFormat, no_decrypt: bool) -> Result<u8> {
    let mut code = EXIT_OK;
    let sources = ctx.sources(only)?;
    for src in &sources {
        let read = frostbyte_gitops::source::Source::open(&ctx.source_spec(src))
            .map_err(sync::SyncError::from)
            .and_then(|source| sync::validate(&source, src, ctx, ctx.cfg.worktree, !no_decrypt));
        let d = match read {
            Ok(d) => d,
            Err(e) => {
                code = worst(code, failed(&sources, src, e));
                continue;
            }
        };
        print!("{}", group_header(&sources, src, format));
        match format {
            OutFormat::Text => print!("{}", render::issues_text(d.files, &d.issues)),
            OutFormat::Markdown => print!("{}", render::issues_markdown(d.files, &d.issues)),
            OutFormat::Json => print_json(&render::issues_value(d.files, &d.issues)),
        }
        code = worst(code, if d.issues.is_empty() { EXIT_OK } else { EXIT_ERROR });
    }
    Ok(code)
}

/// `plan`: against the database (saved with --out) or against another revision's files.
async fn plan(
    ctx: &Ctx,
    only: Option<&str>,
    format: OutFormat,
    out: Option<PathBuf>,
    against_ref: Option<String>,
    color: Color,
    prune: PruneArgs,
) -> Result<u8> {
    let color = match color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    if against_ref.is_some() && out.is_some() {
        return Err(anyhow!("--out saves a plan against the database; it cannot be combined with --against-ref"));
    }
    let sources = ctx.sources(only)?;
    if out.is_some() && sources.len() > 1 {
        return Err(anyhow!("--out saves the plan of one source: name it with --source"));
    }
    let against = match &against_ref {
        Some(base) => Against::Ref(base),
        None => {
            let db = sync::connect(&ctx.cfg).await?;
            sync::prepare(&ctx.cfg, &db).await?;
            Against::Database(db)
        }
    };
    let mut code = EXIT_OK;
    for src in &sources {
        let made = plan_source(ctx, src, &against, prune, out.as_deref()).await?;
        let (header, plan) = match made {
            Ok(made) => made,
            Err(e) => {
                code = worst(code, failed(&sources, src, e));
                continue;
            }
        };
        print!("{}", group_header(&sources, src, format));
        match format {
            OutFormat::Text => print_plan_text(&plan, &header, color, render::Tense::Plan),
            OutFormat::Markdown => print!("{}", render::plan_markdown(&plan, &header)),
            OutFormat::Json => print_plan_json(&plan, &header, &[("source", serde_json::json!(src.name))]),
        }
        code = worst(
            code,
            if plan.has_changes() || plan.summary().conflict > 0 {
                EXIT_CHANGES
            } else {
                EXIT_OK
            },
        );
    }
    Ok(code)
}

/// What `plan` compares the files with.
enum Against<'a> {
    Ref(&'a str),
    Database(sync::Database),
}

/// One source's plan; saved to `out` when given. The outer error ends the command, the inner one
/// is this source's failure.
async fn plan_source(
    ctx: &Ctx,
    src: &SourceConfig,
    against: &Against<'_>,
    prune: PruneArgs,
    out: Option<&std::path::Path>,
) -> Result<Result<(render::Header, frostbyte_gitops::domain::plan::Plan), sync::SyncError>> {
    let db = match against {
        Against::Ref(base) => return Ok(sync::plan_against_ref(ctx, src, base)),
        Against::Database(db) => db,
    };
    let opts = sync::RunOptions {
        prune: prune.prune,
        allow_mass_prune: prune.allow_mass_prune,
        ..Default::default()
    };
    Ok(match sync::run(ctx, &db.pool, src, Run::Plan, opts).await {
        Ok(outcome) => {
            if let Some(path) = out {
                save_plan(path, &outcome)?;
            }
            Ok(outcome.into_plan().expect("a plan run creates nothing"))
        }
        Err(e) => Err(e),
    })
}

/// `apply`: a saved plan, exactly, or plan and apply now.
async fn apply(ctx: &Ctx, only: Option<&str>, plan_file: Option<PathBuf>, allow_non_fast_forward: bool, format: OutFormat, prune: PruneArgs) -> Result<u8> {
    let Some(path) = plan_file else {
        return apply_and_report(ctx, only, || Run::Apply { allow_non_fast_forward }, format, false, prune).await;
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading saved plan {}", path.display()))?;
    let saved: SavedPlan = serde_json::from_str(&text).with_context(|| format!("{} is not a saved plan", path.display()))?;
    if !(1..=render::JSON_FORMAT_VERSION).contains(&saved.format_version) {
        return Err(anyhow!(
            "{}: saved plan format {} is not supported (expected {})",
            path.display(),
            saved.format_version,
            render::JSON_FORMAT_VERSION
        ));
    }
    // The plan names its source; --source may only agree with it.
    let name = match (&saved.source_name, only) {
        (Some(saved_name), Some(given)) if saved_name != given => {
            return Err(anyhow!("{} is a plan for source {saved_name}, not {given}", path.display()));
        }
        (Some(saved_name), _) => Some(saved_name.clone()),
        (None, given) => given.map(str::to_string),
    };
    let saved = Box::new(saved);
    apply_and_report(
        ctx,
        name.as_deref(),
        || Run::ApplySaved {
            saved: saved.clone(),
            allow_non_fast_forward,
        },
        format,
        false,
        prune,
    )
    .await
}

async fn drift(ctx: &Ctx, only: Option<&str>, format: OutFormat, fail_on: &[String], full: bool) -> Result<u8> {
    let fail: Vec<DriftClass> = if fail_on.is_empty() {
        vec![DriftClass::Pending, DriftClass::Modified, DriftClass::Missing, DriftClass::Orphaned]
    } else {
        fail_on
            .iter()
            .map(|s| s.trim().parse())
            .collect::<Result<_, String>>()
            .map_err(|e| anyhow!("--fail-on: {e}"))?
    };
    let sources = ctx.sources(only)?;
    let db = sync::connect(&ctx.cfg).await?;
    sync::prepare(&ctx.cfg, &db).await?;
    let mut code = EXIT_OK;
    let mut notes = Vec::new();
    for src in &sources {
        let (header, report) = match sync::drift_report(ctx, &db.pool, src, full).await {
            Ok(r) => r,
            Err(e) => {
                code = worst(code, failed(&sources, src, e));
                continue;
            }
        };
        print!("{}", group_header(&sources, src, format));
        match format {
            OutFormat::Text => print!("{}", render::drift_text(&report, &header)),
            OutFormat::Markdown => print!("{}", render::drift_markdown(&report, &header)),
            OutFormat::Json => print_json(&with_source(render::drift_json(&report, &header), src)),
        }
        let drifted = report.iter().any(|t| t.classes.iter().any(|c| fail.contains(c)));
        code = worst(code, if drifted { EXIT_CHANGES } else { EXIT_OK });
        if report.iter().any(|t| !t.in_sync()) {
            notes.push(Notification::drift(&src.name, header.commit.as_deref(), &report));
        }
    }
    notify(ctx, notes).await;
    Ok(code)
}

/// JSON output names its source: with several, one document per source follows another.
fn with_source(mut v: serde_json::Value, src: &SourceConfig) -> serde_json::Value {
    v["source"] = serde_json::json!(src.name);
    v
}

/// An error beats changes, which beat nothing to do.
fn worst(a: u8, b: u8) -> u8 {
    match (a, b) {
        (EXIT_ERROR, _) | (_, EXIT_ERROR) => EXIT_ERROR,
        (EXIT_CHANGES, _) | (_, EXIT_CHANGES) => EXIT_CHANGES,
        _ => EXIT_OK,
    }
}

/// Reports a source that failed (naming it when there are several); the others go on.
fn failed(sources: &[&SourceConfig], src: &SourceConfig, e: sync::SyncError) -> u8 {
    failed_text(sources, src, &format!("{:#}", anyhow::Error::from(e)))
}

fn failed_text(sources: &[&SourceConfig], src: &SourceConfig, e: &str) -> u8 {
    if sources.len() == 1 {
        eprintln!("error: {e}");
    } else {
        eprintln!("error: source {}: {e}", src.name);
    }
    EXIT_ERROR
}

/// With more than one source, each one's output starts with its name.
fn group_header(sources: &[&SourceConfig], src: &SourceConfig, format: OutFormat) -> String {
    if sources.len() == 1 || format == OutFormat::Json {
        return String::new();
    }
    match format {
        OutFormat::Markdown => format!("## Source `{}`\n\n", src.name),
        _ => format!("=== source {} ===\n", src.name),
    }
}

fn save_plan(path: &std::path::Path, outcome: &sync::Outcome) -> Result<()> {
    let commit = outcome
        .header
        .commit
        .clone()
        .ok_or_else(|| anyhow!("--out needs a commit; it cannot save a --worktree plan"))?;
    let saved = SavedPlan {
        format_version: render::JSON_FORMAT_VERSION,
        source: outcome.source.clone(),
        source_name: Some(outcome.source_name.clone()),
        commit,
        created_at: chrono::Utc::now().to_rfc3339(),
        plan: outcome.plan().ok_or_else(|| anyhow!("only a plan run's plan can be saved"))?.clone(),
    };
    std::fs::write(path, serde_json::to_string_pretty(&saved)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    eprintln!("Saved the plan to {}; apply it with: frostbyte-gitops apply {}", path.display(), path.display());
    Ok(())
}

async fn audit_verify(ctx: &Ctx, format: OutFormat, anchor: Option<&std::path::Path>) -> Result<u8> {
    let anchored = match anchor.filter(|p| p.exists()) {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading anchor {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not an anchor", path.display()))?;
            let seq = v["head_seq"].as_i64().ok_or_else(|| anyhow!("{}: no head_seq", path.display()))?;
            let hash = hex::decode(v["head_hash"].as_str().unwrap_or_default()).with_context(|| format!("{}: head_hash is not hex", path.display()))?;
            Some((seq, hash))
        }
    };
    let db = sync::connect(&ctx.cfg).await?;
    sync::prepare(&ctx.cfg, &db).await?;
    let report = sync::verify_audit(&db.pool, anchored).await?;
    match format {
        OutFormat::Json => print_json(&serde_json::to_value(&report)?),
        _ => {
            if let Some(b) = &report.broken {
                println!("Audit trail broken: {b}");
            }
            for m in &report.version_mismatches {
                let why = match m.config_events > m.config_version {
                    true => " (its row was most likely deleted outside git and created again from version 1; docs/security.md, \"A row deleted by hand\", gives the repair)",
                    false => "",
                };
                println!(
                    "Tenant {}: config_version {} but {} TENANT_CONFIG_UPDATED event(s){why}",
                    frostbyte_gitops::domain::escape::text(&m.tenant_id),
                    m.config_version,
                    m.config_events
                );
            }
            if report.intact() {
                println!("Audit trail intact: {} event(s), head {} {}", report.events, report.head_seq, report.head_hash);
            }
        }
    }
    if !report.intact() {
        return Ok(EXIT_ERROR);
    }
    if let Some(path) = anchor {
        let v = serde_json::json!({"head_seq": report.head_seq, "head_hash": report.head_hash, "verified_at": chrono::Utc::now().to_rfc3339()});
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n").with_context(|| format!("writing anchor {}", path.display()))?;
    }
    Ok(EXIT_OK)
}

/// `apply` and `sync` succeed with 0 whether or not they wrote: the change is done. A conflict
/// (git and a hand edit both changed a tenant under the warn policy) is left alone and exits 2.
/// Each source is applied and committed on its own; the exit code is the worst of them.
async fn apply_and_report(ctx: &Ctx, only: Option<&str>, run: impl Fn() -> Run, format: OutFormat, full: bool, prune: PruneArgs) -> Result<u8> {
    let sources = ctx.sources(only)?;
    let db = sync::connect(&ctx.cfg).await?;
    sync::prepare(&ctx.cfg, &db).await?;
    let opts = sync::RunOptions {
        want_drift: false,
        full,
        prune: prune.prune,
        allow_mass_prune: prune.allow_mass_prune,
    };
    let mut code = EXIT_OK;
    let mut notes = Vec::new();
    for src in &sources {
        if src.repo.is_remote() {
            tracing::info!(source = %src.name, repo = %src.repo, "fetching");
        }
        let o = match sync::run(ctx, &db.pool, src, run(), opts).await {
            Ok(o) => o,
            Err(e) => {
                let event = e.notify_event();
                let text = format!("{:#}", anyhow::Error::from(e));
                notes.push(Notification::failed(event, &src.name, &text));
                code = worst(code, failed_text(&sources, src, &text));
                continue;
            }
        };
        // Without receivers nothing reads a notification, and building one reads the plan.
        if o.applied > 0 && !ctx.notifier.is_empty() {
            match Notification::applied(&src.name, o.header.commit.as_deref(), &o.entries()) {
                Ok(n) => notes.push(n),
                Err(e) => eprintln!("error: reading back the created tenants' plans: {e}; no notification of this apply"),
            }
        }
        print!("{}", group_header(&sources, src, format));
        report_applied(&o, format);
        let conflicts = o.entries().summary().conflict;
        if conflicts > 0 {
            eprintln!("{conflicts} tenant(s) in conflict were left alone: fix the rows or set drift_policy = correct");
            code = worst(code, EXIT_CHANGES);
        }
    }
    notify(ctx, notes).await;
    Ok(code)
}

/// Delivers what the run has to say; a receiver that is down costs at most about ten seconds and
/// never the exit code.
async fn notify(ctx: &Ctx, notes: Vec<Notification>) {
    if ctx.notifier.is_empty() {
        return;
    }
    let sends = notes.iter().map(|n| ctx.notifier.send(n));
    let outcomes: Vec<_> = futures_util::future::join_all(sends).await.into_iter().flatten().collect();
    let failed = outcomes.iter().filter(|d| **d == frostbyte_gitops::notify::Delivery::Failed).count();
    if failed > 0 {
        eprintln!("warning: {failed} of {} notification(s) could not be delivered", outcomes.len());
    }
}

/// A plan's text, written to stdout as it is rendered: a first sync of 100,000 tenants prints 94 MB.
fn print_plan_text(plan: &impl Entries, header: &render::Header, color: bool, tense: render::Tense) {
    let out = &mut std::io::BufWriter::new(std::io::stdout().lock());
    if let Err(e) = render::write_plan_text(out, plan, header, color, tense).and_then(|()| std::io::Write::flush(out)) {
        eprintln!("error: writing the plan to stdout: {e}");
    }
}

/// A plan's JSON document, with `extra` members, written to stdout as it is serialised.
fn print_plan_json(plan: &impl Entries, header: &render::Header, extra: &[(&str, serde_json::Value)]) {
    let version = JSON_VERSION.get().copied().unwrap_or(render::JSON_FORMAT_VERSION);
    let out = &mut std::io::BufWriter::new(std::io::stdout().lock());
    if let Err(e) = render::write_plan_json(out, plan, header, extra, version).and_then(|()| std::io::Write::flush(out)) {
        eprintln!("error: writing the plan to stdout: {e}");
    }
}

fn report_applied(o: &sync::Outcome, format: OutFormat) {
    let plan = &o.entries();
    match format {
        OutFormat::Json => print_plan_json(
            plan,
            &o.header,
            &[("applied", serde_json::json!(o.applied)), ("source", serde_json::json!(o.source_name))],
        ),
        _ => {
            if o.applied == 0 {
                let orphans = plan.summary().orphaned;
                println!(
                    "No changes: the database matches {}.{}",
                    o.header.commit.as_deref().unwrap_or("the work tree"),
                    if orphans > 0 {
                        format!(" ({orphans} orphaned tenant(s) left alone.)")
                    } else {
                        String::new()
                    }
                );
            } else {
                print_plan_text(plan, &o.header, false, render::Tense::Applied);
            }
        }
    }
}

/// The configured tenant directory, for the commands that write files: they need a checkout.
fn local_tenant_dir(cfg: &Config) -> Result<PathBuf> {
    match &cfg.repo {
        RepoLocation::Local(repo) => Ok(repo.join(&cfg.path)),
        RepoLocation::Remote(url) => Err(anyhow!(
            "repo is a remote URL ({}): this command edits files in a checkout; run it in one or give --repo PATH",
            url.public
        )),
    }
}

/// The files named, or every tenant file under the configured path.
fn tenant_files(cfg: &Config, named: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if !named.is_empty() {
        return Ok(named.to_vec());
    }
    let dir = local_tenant_dir(cfg)?;
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| frostbyte_gitops::sops::Format::from_path(&p.to_string_lossy()).is_some())
        .collect();
    v.sort();
    Ok(v)
}

/// Runs `f` on every file, reporting each failure and going on; fails at the end if any did.
fn for_each_file(list: &[PathBuf], verb: &str, mut f: impl FnMut(&PathBuf) -> Result<(), files::FileError>) -> Result<()> {
    let mut failed = 0;
    for path in list {
        if let Err(e) = f(path) {
            failed += 1;
            eprintln!("error: {e:#}");
        }
    }
    if failed > 0 {
        return Err(anyhow!("{failed} of {} file(s) could not be {verb}", list.len()));
    }
    Ok(())
}

fn secrets(cfg: &Config, keys: &AgeKeys, cmd: &SecretsCmd) -> Result<u8> {
    match cmd {
        SecretsCmd::Encrypt { file } => {
            files::encrypt_file(file)?;
            eprintln!("Encrypted {}", file.display());
        }
        SecretsCmd::Decrypt { file } => print!("{}", files::decrypt_file(file, keys)?),
        SecretsCmd::Edit { file } => {
            let editor = std::env::var("EDITOR").or_else(|_| std::env::var("VISUAL")).unwrap_or_else(|_| "vi".into());
            match files::edit_file(file, keys, &editor)? {
                files::Edited::Unchanged => eprintln!("{}: no changes", file.display()),
                files::Edited::Saved => eprintln!("{}: saved", file.display()),
            }
        }
        SecretsCmd::Updatekeys { files: list, dry_run } => {
            let list = tenant_files(cfg, list)?;
            for_each_file(&list, "updated", |path| {
                match files::update_keys(path, keys, *dry_run)? {
                    None => println!("{}: recipients up to date", path.display()),
                    Some(u) => {
                        let verb = if *dry_run { "would update" } else { "updated" };
                        let key = if u.rotated { " (new data key)" } else { "" };
                        println!("{}: {verb}: +[{}] -[{}]{key}", path.display(), u.added.join(", "), u.removed.join(", "));
                    }
                }
                Ok(())
            })?;
        }
        SecretsCmd::Rotate { files: list } => {
            let list = tenant_files(cfg, list)?;
            for_each_file(&list, "rotated", |path| {
                files::rotate_file(path, keys)?;
                println!("{}: new data key", path.display());
                Ok(())
            })?;
        }
    }
    Ok(EXIT_OK)
}
