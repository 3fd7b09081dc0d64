//! Start-up, once per process: settings resolved from flags, environment and file, keys and
//! signers loaded, logging set up, and the context every command shares composed.

use super::args::*;
use anyhow::{Context, Result, anyhow};
use frostbyte_gitops::config::{Config, Flags, LogFormat, Setting};
use frostbyte_gitops::sops::AgeKeys;
use frostbyte_gitops::sync::Ctx;
use std::io::IsTerminal;
use std::path::PathBuf;

/// glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB); from
/// then on such blocks come from the heap, and their memory is kept once they are freed. With the
/// threshold fixed and two arenas, a first sync of 100,000 tenants peaked at 81 MiB instead of
/// 98, in the same time. glibc's own environment variables, when set, are left to decide.
pub(crate) fn tune_malloc() {
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

/// The settings given as flags. Which flag sets which setting is the setting's definition
/// (`Setting::flag`); a test holds clap's arguments to it.
pub(crate) fn flags(g: &Global) -> Flags {
    let mut f = Flags::default();
    let given = [
        (Setting::Mode, &g.mode),
        (Setting::DatabaseUrl, &g.database_url),
        (Setting::Repo, &g.repo),
        (Setting::Ref, &g.git_ref),
        (Setting::Path, &g.path),
        (Setting::AgeKeyFile, &g.age_key_file),
        (Setting::LogFormat, &g.log_format),
        (Setting::DataDir, &g.data_dir),
        (Setting::DriftPolicy, &g.drift_policy),
        (Setting::Interval, &g.interval),
        (Setting::DebounceMs, &g.debounce_ms),
        (Setting::Listen, &g.listen),
        (Setting::VerifyCommits, &g.verify_commits),
        (Setting::AllowedSigners, &g.allowed_signers),
        (Setting::TrustedPgpKeys, &g.trusted_pgp_keys),
    ];
    for (key, value) in given {
        if let Some(v) = value {
            f.0.insert(key, v.clone());
        }
    }
    for (key, on) in [(Setting::AllowPlaintext, g.allow_plaintext), (Setting::Worktree, g.worktree)] {
        if on {
            f.0.insert(key, "true".into());
        }
    }
    f
}

pub(crate) fn resolve_config(g: &Global) -> Result<Config> {
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

pub(crate) fn load_keys(cfg: &Config) -> Result<AgeKeys> {
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

pub(crate) fn load_signers(cfg: &Config) -> Result<frostbyte_gitops::verify::TrustedSigners> {
    let signers = frostbyte_gitops::verify::TrustedSigners::load(cfg.allowed_signers.as_deref(), cfg.trusted_pgp_keys.as_deref())?;
    if cfg.verify_commits != frostbyte_gitops::domain::commit::VerifyMode::Off && signers.is_empty() {
        // Files given but holding no signer (only comments, say) are named: the setting is there.
        let given: Vec<String> = [&cfg.allowed_signers, &cfg.trusted_pgp_keys]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect();
        if !given.is_empty() {
            return Err(anyhow!(
                "verify_commits is {} but {} names no trusted signer (it is empty, or only comments)",
                cfg.verify_commits,
                given.join(" and ")
            ));
        }
        return Err(anyhow!(
            "verify_commits is {} but no trusted signer is configured: set allowed_signers (FROSTBYTE_ALLOWED_SIGNERS) or trusted_pgp_keys (FROSTBYTE_TRUSTED_PGP_KEYS)",
            cfg.verify_commits
        ));
    }
    Ok(signers)
}

pub(crate) fn init_logging(cfg: &Config) {
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

/// What every command that reads tenants shares: the settings, the keys, the signers it trusts
/// and where it reports.
pub(crate) fn context(cfg: Config, keys: AgeKeys, cmd: &Cmd) -> Result<Ctx> {
    let progress = matches!(
        cmd,
        Cmd::Validate { format: OutFormat::Text, .. } | Cmd::Plan { format: OutFormat::Text, .. } | Cmd::Sync { format: TextOrJson::Text, .. }
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
pub(crate) fn notify_targets(configs: &[frostbyte_gitops::config::NotificationConfig]) -> Vec<frostbyte_gitops::notify::Target> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Every setting with a flag is set by that flag; the rest have none on the command line.
    #[test]
    fn each_flag_sets_the_setting_its_definition_names() {
        for key in Setting::all() {
            let Some(flag) = key.flag() else { continue };
            let mut args = vec!["frostbyte-gitops", flag];
            if !key.is_bool() {
                args.push("x");
            }
            args.push("config");
            let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{flag}: {e}"));
            let f = flags(&cli.global);
            assert_eq!(f.0.keys().collect::<Vec<_>>(), [&key], "{flag}");
        }
    }

    /// Every option of every command says what it does in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, at: &str, missing: &mut Vec<String>) {
            for arg in cmd
                .get_arguments()
                .filter(|a| a.get_long().is_some() && a.get_id() != "help" && a.get_id() != "version")
            {
                if arg.get_help().is_none() {
                    missing.push(format!("{at} --{}", arg.get_long().unwrap_or_default()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{at} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<Cli as clap::CommandFactory>::command(), "frostbyte-gitops", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
