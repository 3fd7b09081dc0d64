//! validate, plan, apply, sync and drift: the commands that read tenants and compare them with
//! the database, each over every selected source.

use super::args::*;
use super::output::*;
use super::{EXIT_CHANGES, EXIT_ERROR, EXIT_OK};
use anyhow::{Context, Result, anyhow};
use frostbyte_gitops::compose;
use frostbyte_gitops::config::SourceConfig;
use frostbyte_gitops::domain::drift::DriftClass;
use frostbyte_gitops::domain::escape::text;
use frostbyte_gitops::domain::plan::Entries;
use frostbyte_gitops::domain::render;
use frostbyte_gitops::notify::Notification;
use frostbyte_gitops::store::runs::RunTrigger;
use frostbyte_gitops::sync::{self, Ctx, Run, SavedPlan};
use std::io::IsTerminal;
use std::path::PathBuf;

pub(crate) async fn validate(ctx: &Ctx, only: Option<&str>, format: OutFormat, no_decrypt: bool) -> Result<u8> {
    let sources = ctx.sources(only)?;
    let read = async |src: &SourceConfig| {
        Ok(frostbyte_gitops::source::Source::open(&ctx.source_spec(src))
            .map_err(sync::SyncError::from)
            .and_then(|source| {
                let desired = sync::validate(&source, src, ctx, ctx.cfg.worktree, !no_decrypt)?;
                // Files edited but not committed are not what was checked: say so.
                let uncommitted = match ctx.cfg.worktree {
                    true => vec![],
                    false => source.uncommitted().unwrap_or_default(),
                };
                Ok((desired, uncommitted))
            }))
    };
    let show = |_: &SourceConfig, (d, uncommitted): (sync::Desired, Vec<String>)| {
        match format {
            OutFormat::Text => print!("{}", render::issues_text(d.files, &d.issues, &d.at())),
            OutFormat::Markdown => print!("{}", render::issues_markdown(d.files, &d.issues)),
            OutFormat::Json => {
                let mut v = render::issues_value(d.files, &d.issues);
                v["commit"] = serde_json::json!(d.commit.as_ref().map(|c| &c.id));
                print_json(&v);
            }
        }
        if !uncommitted.is_empty() {
            let shown: Vec<String> = uncommitted.iter().take(5).map(|p| text(p).into_owned()).collect();
            let more = if uncommitted.len() > 5 {
                format!(" and {} more", uncommitted.len() - 5)
            } else {
                String::new()
            };
            eprintln!(
                "note: {} tenant file(s) in the work tree differ from the commit checked ({}{more}): `validate --worktree` checks them as they are on disk",
                uncommitted.len(),
                shown.join(", ")
            );
        }
        if d.issues.is_empty() { EXIT_OK } else { EXIT_ERROR }
    };
    per_source(&sources, format, Command::Reads, read, show).await
}

/// `plan`: against the database (saved with --out) or against another revision's files.
pub(crate) async fn plan(
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
            let db = compose::connect(&ctx.cfg).await?;
            compose::prepare(&ctx.cfg, &db).await?;
            Against::Database(db)
        }
    };
    let each = async |src: &SourceConfig| plan_source(ctx, src, &against, prune, out.as_deref()).await;
    let show = |src: &SourceConfig, (header, plan): (render::Header, frostbyte_gitops::domain::plan::Plan)| {
        match format {
            OutFormat::Text => print_plan_text(&plan, &header, color, render::Tense::Plan),
            OutFormat::Markdown => print!("{}", render::plan_markdown(&plan, &header)),
            OutFormat::Json => print_plan_json(&plan, &header, &[("source", serde_json::json!(src.name))]),
        }
        if plan.has_changes() || plan.summary().conflict > 0 {
            EXIT_CHANGES
        } else {
            EXIT_OK
        }
    };
    per_source(&sources, format, Command::Reads, each, show).await
}

/// What `plan` compares the files with.
pub(crate) enum Against<'a> {
    Ref(&'a str),
    Database(compose::Database),
}

/// One source's plan; saved to `out` when given. The outer error ends the command, the inner one
/// is this source's failure.
pub(crate) async fn plan_source(
    ctx: &Ctx,
    src: &SourceConfig,
    against: &Against<'_>,
    prune: PruneArgs,
    out: Option<&std::path::Path>,
) -> Result<Result<(render::Header, frostbyte_gitops::domain::plan::Plan), sync::SyncError>> {
    let db = match against {
        Against::Ref(base) => return Ok(compose::open_source(ctx, src).and_then(|source| sync::plan_against_ref(ctx, &source, src, base))),
        Against::Database(db) => db,
    };
    let opts = sync::RunOptions {
        prune: prune.prune,
        allow_mass_prune: prune.allow_mass_prune,
        ..Default::default()
    };
    Ok(match compose::run(ctx, db, src, Run::Plan, opts).await {
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
pub(crate) async fn apply(
    ctx: &Ctx,
    only: Option<&str>,
    plan_file: Option<PathBuf>,
    allow_non_fast_forward: bool,
    format: OutFormat,
    prune: PruneArgs,
) -> Result<u8> {
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

pub(crate) async fn drift(ctx: &Ctx, only: Option<&str>, format: OutFormat, fail_on: &[String], full: bool) -> Result<u8> {
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
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let mut notes = Vec::new();
    let each = async |src: &SourceConfig| Ok(compose::drift(ctx, &db, src, full).await);
    let show = |src: &SourceConfig, (header, report): (render::Header, Vec<frostbyte_gitops::domain::drift::TenantDrift>)| {
        match format {
            OutFormat::Text => print!("{}", render::drift_text(&report, &header)),
            OutFormat::Markdown => print!("{}", render::drift_markdown(&report, &header)),
            OutFormat::Json => print_json(&with_source(render::drift_json(&report, &header), src)),
        }
        if report.iter().any(|t| !t.in_sync()) {
            notes.push(Notification::drift(&src.name, header.commit.as_deref(), &report));
        }
        let drifted = report.iter().any(|t| t.classes.iter().any(|c| fail.contains(c)));
        if drifted { EXIT_CHANGES } else { EXIT_OK }
    };
    let code = per_source(&sources, format, Command::Reads, each, show).await?;
    notify(ctx, notes).await;
    Ok(code)
}

pub(crate) fn save_plan(path: &std::path::Path, outcome: &sync::Outcome) -> Result<()> {
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

/// `apply` and `sync` succeed with 0 whether or not they wrote: the change is done. A conflict
/// (git and a hand edit both changed a tenant under the warn policy) is left alone and exits 2.
/// Each source is applied and committed on its own; the exit code is the worst of them.
pub(crate) async fn apply_and_report(ctx: &Ctx, only: Option<&str>, run: impl Fn() -> Run, format: OutFormat, full: bool, prune: PruneArgs) -> Result<u8> {
    let sources = ctx.sources(only)?;
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let opts = sync::RunOptions {
        want_drift: false,
        full,
        prune: prune.prune,
        allow_mass_prune: prune.allow_mass_prune,
    };
    let mut notes = Vec::new();
    let each = async |src: &SourceConfig| {
        if src.repo.is_remote() {
            tracing::info!(source = %src.name, repo = %src.repo, "fetching");
        }
        let o = match compose::sync_recorded(ctx, &db, src, run(), opts, RunTrigger::Command).await {
            Ok(o) => o,
            Err(e) => {
                let line = compose::first_line(&e);
                notes.push(Notification::failed(e.notify_event(), &src.name, e.commit().as_deref(), &line));
                return Ok(Err(e));
            }
        };
        // Without receivers nothing reads a notification, and building one reads the plan.
        if o.applied > 0 && !ctx.notifier.is_empty() {
            match Notification::applied(&src.name, o.header.commit.as_deref(), &o.entries()) {
                Ok(n) => notes.push(n),
                Err(e) => eprintln!("error: reading back the created tenants' plans: {e}; no notification of this apply"),
            }
        }
        Ok(Ok(o))
    };
    let show = |_: &SourceConfig, o: sync::Outcome| {
        report_applied(&o, format);
        let conflicts = o.entries().summary().conflict;
        if conflicts > 0 {
            eprintln!("{conflicts} tenant(s) in conflict were left alone: fix the rows or set drift_policy = correct");
            return EXIT_CHANGES;
        }
        EXIT_OK
    };
    let code = per_source(&sources, format, Command::Applies, each, show).await?;
    notify(ctx, notes).await;
    Ok(code)
}
