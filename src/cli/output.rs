//! How results are printed: JSON with its format version, text and Markdown plans, and the exit
//! code a run over several sources ends with.

use super::args::*;
use super::{EXIT_CHANGES, EXIT_ERROR, EXIT_OK};
use frostbyte_gitops::config::SourceConfig;
use frostbyte_gitops::domain::plan::Entries;
use frostbyte_gitops::domain::render;
use frostbyte_gitops::notify::Notification;
use frostbyte_gitops::sync::{self, Ctx};

/// The JSON format version asked for with --json-format-version.
pub(crate) static JSON_VERSION: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

pub(crate) fn print_json(v: &serde_json::Value) {
    let version = JSON_VERSION.get().copied().unwrap_or(render::JSON_FORMAT_VERSION);
    let mut v = v.clone();
    // Every document says its layout's version, first.
    if let Some(map) = v.as_object_mut().filter(|m| !m.contains_key("format_version")) {
        map.shift_insert(0, "format_version".into(), serde_json::json!(render::JSON_FORMAT_VERSION));
    }
    let v = render::json_format_version(v, version);
    println!("{}", serde_json::to_string_pretty(&v).expect("serialisable"));
}

/// JSON output names its source: with several, one document per source follows another.
pub(crate) fn with_source(mut v: serde_json::Value, src: &SourceConfig) -> serde_json::Value {
    v["source"] = serde_json::json!(src.name);
    v
}

/// An error beats changes, which beat nothing to do.
pub(crate) fn worst(a: u8, b: u8) -> u8 {
    match (a, b) {
        (EXIT_ERROR, _) | (_, EXIT_ERROR) => EXIT_ERROR,
        (EXIT_CHANGES, _) | (_, EXIT_CHANGES) => EXIT_CHANGES,
        _ => EXIT_OK,
    }
}

/// Runs a command over every selected source in turn, the one loop they all share: a source whose
/// `each` fails is reported (named when there are several) and the others go on; one that gives
/// a result is printed by `show` under its heading, which returns its exit code. The command's
/// code is the worst of them; an outer error from `each` ends the command.
pub(crate) async fn per_source<T>(
    sources: &[&SourceConfig],
    format: OutFormat,
    command: Command,
    mut each: impl AsyncFnMut(&SourceConfig) -> anyhow::Result<Result<T, sync::SyncError>>,
    mut show: impl FnMut(&SourceConfig, T) -> u8,
) -> anyhow::Result<u8> {
    let mut code = EXIT_OK;
    for src in sources {
        match each(src).await? {
            Ok(result) => {
                print!("{}", group_header(sources, src, format));
                code = worst(code, show(src, result));
            }
            Err(e) => code = worst(code, failed(sources, src, e, command)),
        }
    }
    Ok(code)
}

/// Whether a command writes: its errors say what it left (nothing), a reader's need not.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Command {
    Applies,
    Reads,
}

/// Reports a source that failed (naming it when there are several); the others go on.
pub(crate) fn failed(sources: &[&SourceConfig], src: &SourceConfig, e: sync::SyncError, command: Command) -> u8 {
    let text = error_text(&e);
    // The errors say what an apply leaves; a plan or a report applies nothing to begin with.
    let text = match command {
        Command::Applies => text,
        Command::Reads => text.replace("; nothing was applied", ""),
    };
    failed_text(sources, src, &text)
}

/// An error and its causes on one line, as `{:#}` prints them at the top.
pub(crate) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    frostbyte_gitops::compose::chain(e)
}

pub(crate) fn failed_text(sources: &[&SourceConfig], src: &SourceConfig, e: &str) -> u8 {
    if sources.len() == 1 {
        eprintln!("error: {e}");
    } else {
        eprintln!("error: source {}: {e}", src.name);
    }
    EXIT_ERROR
}

/// With more than one source, each one's output starts with its name.
pub(crate) fn group_header(sources: &[&SourceConfig], src: &SourceConfig, format: OutFormat) -> String {
    if sources.len() == 1 || format == OutFormat::Json {
        return String::new();
    }
    match format {
        OutFormat::Markdown => format!("## Source `{}`\n\n", src.name),
        _ => format!("=== source {} ===\n", src.name),
    }
}

/// Delivers what the run has to say; a receiver that is down costs at most about ten seconds and
/// never the exit code.
pub(crate) async fn notify(ctx: &Ctx, notes: Vec<Notification>) {
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
pub(crate) fn print_plan_text(plan: &impl Entries, header: &render::Header, color: bool, tense: render::Tense) {
    let out = &mut std::io::BufWriter::new(std::io::stdout().lock());
    if let Err(e) = render::write_plan_text(out, plan, header, color, tense).and_then(|()| std::io::Write::flush(out)) {
        eprintln!("error: writing the plan to stdout: {e}");
    }
}

/// A plan's JSON document, with `extra` members, written to stdout as it is serialised.
pub(crate) fn print_plan_json(plan: &impl Entries, header: &render::Header, extra: &[(&str, serde_json::Value)]) {
    let version = JSON_VERSION.get().copied().unwrap_or(render::JSON_FORMAT_VERSION);
    let out = &mut std::io::BufWriter::new(std::io::stdout().lock());
    if let Err(e) = render::write_plan_json(out, plan, header, extra, version).and_then(|()| std::io::Write::flush(out)) {
        eprintln!("error: writing the plan to stdout: {e}");
    }
}

pub(crate) fn report_applied(o: &sync::Outcome, format: OutFormat) {
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
