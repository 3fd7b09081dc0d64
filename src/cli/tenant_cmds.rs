//! Commands on one tenant or its file: tenant new, move and state, and secrets.

use super::args::*;
use super::output::print_json;
use super::{EXIT_CHANGES, EXIT_OK};
use anyhow::{Context, Result, anyhow};
use frostbyte_gitops::compose;
use frostbyte_gitops::config::Config;
use frostbyte_gitops::domain::escape::text;
use frostbyte_gitops::domain::history::{self, Version};
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
    use frostbyte_gitops::domain::tenant::STATES;
    if !STATES.contains(&state) {
        return Err(anyhow!("unknown state {:?} (one of: {})", text(state), STATES.join(", ")));
    }
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let mut client = store::client(&db.pool).await?;
    let details = serde_json::json!({ "reason": reason });
    let event = store::transition_tenant_state(&mut client, tenant_id, state, sync::ACTOR, &details).await?;
    println!("Tenant {tenant_id} is now {state} (audit event {event}).");
    Ok(EXIT_OK)
}

/// A tenant's versions, replayed from its audit events.
async fn versions(ctx: &Ctx, tenant_id: &str) -> Result<(store::Db, Vec<Version>)> {
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let client = store::Db::new(store::client(&db.pool).await?);
    let events = store::history::tenant_events(client.client(), tenant_id).await?;
    let versions = history::replay(&events).map_err(|e| anyhow!("the audit trail of tenant {} cannot be replayed: {e}", text(tenant_id)))?;
    if versions.is_empty() {
        return Err(anyhow!("tenant {} has no config version in the audit trail", text(tenant_id)));
    }
    Ok((client, versions))
}

pub(crate) async fn tenant_history(ctx: &Ctx, tenant_id: &str, format: OutFormat) -> Result<u8> {
    let (_, versions) = versions(ctx, tenant_id).await?;
    match format {
        OutFormat::Text => print!("{}", history::history_text(tenant_id, &versions)),
        OutFormat::Markdown => print!("{}", history::history_markdown(tenant_id, &versions)),
        OutFormat::Json => print_json(&serde_json::json!({"tenant_id": tenant_id, "versions": versions})),
    }
    Ok(EXIT_OK)
}

pub(crate) async fn tenant_show(ctx: &Ctx, tenant_id: &str, version: Option<i64>, format: OutFormat) -> Result<u8> {
    let (client, versions) = versions(ctx, tenant_id).await?;
    let v = pick(tenant_id, &versions, version)?;
    let current = versions.last().map(|l| l.version) == Some(v.version);
    // The current version is what the row should hold: a difference is an edit outside git.
    let differs = match current {
        false => None,
        true => {
            let row = store::load_actual_for(client.client(), &[tenant_id.to_string()]).await?.pop();
            row.filter(|r| r.config_version == v.version)
                .map(|r| history::differences(&v.document, &r.document.value(), &r.known_secrets))
        }
    };
    match format {
        OutFormat::Json => print_json(&serde_json::json!({
            "tenant_id": tenant_id, "version": v.version, "current": current, "document": v.document,
            "row_differs_at": differs,
        })),
        _ => {
            println!("{}", history::version_line(v, &|s| text(s).into_owned()));
            println!("{}", text(&serde_json::to_string_pretty(&v.document)?));
            match &differs {
                Some(paths) if !paths.is_empty() => println!("The row differs at {} (changed outside git since).", text(&paths.join(", "))),
                Some(_) => println!("The row holds this version."),
                None => {}
            }
        }
    }
    Ok(if differs.is_some_and(|d| !d.is_empty()) { EXIT_CHANGES } else { EXIT_OK })
}

fn pick<'v>(tenant_id: &str, versions: &'v [Version], version: Option<i64>) -> Result<&'v Version> {
    let last = versions.last().expect("checked not empty");
    let wanted = version.unwrap_or(last.version);
    versions.iter().find(|v| v.version == wanted).ok_or_else(|| {
        anyhow!(
            "tenant {} has no version {wanted} (its versions: {}..{})",
            text(tenant_id),
            versions[0].version,
            last.version
        )
    })
}

pub(crate) async fn tenant_restore(ctx: &Ctx, only: Option<&str>, tenant_id: &str, version: i64, out: Option<&std::path::Path>) -> Result<u8> {
    let (_, versions) = versions(ctx, tenant_id).await?;
    let v = pick(tenant_id, &versions, Some(version))?;
    let (Some(commit), Some(file)) = (&v.commit, &v.file) else {
        return Err(anyhow!(
            "version {version} of tenant {} records no commit and file to restore from",
            text(tenant_id)
        ));
    };
    let sources = ctx.sources(only)?;
    let mut opened = Vec::new();
    for src in &sources {
        opened.push(compose::open_source(ctx, src)?);
    }
    // The source that wrote the version; with one source configured, that one.
    let source = match opened.iter().position(|s| Some(&s.id) == v.source.as_ref()) {
        Some(i) => opened.swap_remove(i),
        None if opened.len() == 1 => opened.remove(0),
        None => {
            return Err(anyhow!(
                "version {version} came from source {}, which is not configured here; pass --source NAME",
                text(v.source.as_deref().unwrap_or("?"))
            ));
        }
    };
    let Some(bytes) = source.file_at(commit, file)? else {
        return Err(anyhow!(
            "commit {commit}, which produced version {version} of tenant {}, is not in the repository of source {}: fetch it (or restore in a clone that has it); nothing was written",
            text(tenant_id),
            text(&source.id)
        ));
    };
    let path = match out {
        Some(p) => p.to_path_buf(),
        None => source
            .worktree_path(file)
            .ok_or_else(|| anyhow!("the repository has no work tree to write {} into; pass --out FILE", text(file)))?,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "Wrote {}: tenant {} as of version {version} (commit {}). Commit it to revert the tenant; the sync after the merge writes it as a new version.",
        path.display(),
        text(tenant_id),
        &commit[..12.min(commit.len())]
    );
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
        SecretsCmd::Edit { file, from } => {
            let editor = std::env::var("EDITOR").or_else(|_| std::env::var("VISUAL")).unwrap_or_else(|_| "vi".into());
            match files::edit_file(file, keys, &editor, from.as_deref())? {
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
