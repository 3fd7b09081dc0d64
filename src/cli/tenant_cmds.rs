//! Commands on one tenant or its file: tenant new, move and state, and secrets.

use super::EXIT_OK;
use super::args::*;
use anyhow::{Context, Result, anyhow};
use frostbyte_gitops::compose;
use frostbyte_gitops::config::Config;
use frostbyte_gitops::location::RepoLocation;
use frostbyte_gitops::sops::AgeKeys;
use frostbyte_gitops::sync::{self, Ctx};
use frostbyte_gitops::{files, store};
use std::path::PathBuf;

pub(crate) fn new_tenant(cfg: &Config, tenant_id: &str, age_public_key: &str, format: &str, dir: Option<&PathBuf>) -> Result<u8> {
    let dir = match dir {
        Some(dir) => dir.clone(),
        None => local_tenant_dir(cfg)?,
    };
    let path = dir.join(format!("{tenant_id}.{format}"));
    files::new_tenant(&path, tenant_id, age_public_key)?;
    println!("Wrote {}", path.display());
    Ok(EXIT_OK)
}

pub(crate) async fn tenant_move(ctx: &Ctx, tenant_id: &str, to: &str) -> Result<u8> {
    let target = ctx.sources(Some(to))?[0];
    let source = frostbyte_gitops::source::Source::open(&ctx.source_spec(target))?;
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
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

pub(crate) async fn tenant_state(ctx: &Ctx, tenant_id: &str, state: &str, reason: Option<String>) -> Result<u8> {
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let mut client = store::client(&db.pool).await?;
    let details = serde_json::json!({ "reason": reason });
    let event = store::transition_tenant_state(&mut client, tenant_id, state, sync::ACTOR, &details).await?;
    println!("Tenant {tenant_id} is now {state} (audit event {event}).");
    Ok(EXIT_OK)
}

/// The configured tenant directory, for the commands that write files: they need a checkout.
pub(crate) fn local_tenant_dir(cfg: &Config) -> Result<PathBuf> {
    match &cfg.repo {
        RepoLocation::Local(repo) => Ok(repo.join(&cfg.path)),
        RepoLocation::Remote(url) => Err(anyhow!(
            "repo is a remote URL ({}): this command edits files in a checkout; run it in one or give --repo PATH",
            url.public
        )),
    }
}

/// The files named, or every tenant file under the configured path.
pub(crate) fn tenant_files(cfg: &Config, named: &[PathBuf]) -> Result<Vec<PathBuf>> {
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
pub(crate) fn for_each_file(list: &[PathBuf], verb: &str, mut f: impl FnMut(&PathBuf) -> Result<(), files::FileError>) -> Result<()> {
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

pub(crate) fn secrets(cfg: &Config, keys: &AgeKeys, cmd: &SecretsCmd) -> Result<u8> {
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
