//! `status`: what the database says of each source and of the audit trail.

use super::args::*;
use super::output::*;
use super::{EXIT_CHANGES, EXIT_OK};
use anyhow::Result;
use frostbyte_gitops::compose;
use frostbyte_gitops::domain::escape::{md_cell, text};
use frostbyte_gitops::status::{self, SourceStatus, Status};
use frostbyte_gitops::store;
use frostbyte_gitops::sync::Ctx;

pub(crate) async fn status(ctx: &Ctx, only: Option<&str>, format: OutFormat) -> Result<u8> {
    let sources = ctx.sources(only)?;
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let client = store::client(&db.pool).await?;
    let status = status::gather(&**client, &sources).await?;
    match format {
        OutFormat::Json => {
            let mut v = serde_json::to_value(&status)?;
            v["healthy"] = serde_json::json!(status.healthy());
            print_json(&v);
        }
        OutFormat::Text => print!("{}", as_text(&status, |s| text(s).into_owned())),
        OutFormat::Markdown => print!("{}", as_markdown(&as_text(&status, md_cell))),
    }
    Ok(if status.healthy() { EXIT_OK } else { EXIT_CHANGES })
}

/// The text's sources as headings and their lines as lists (its strings escaped already).
fn as_markdown(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("  ") {
            Some(item) => format!("- {}\n", item.trim_end()),
            None if l.starts_with("Source ") => format!("\n### {l}\n\n"),
            None => format!("\n{l}\n"),
        })
        .collect()
}

/// The status as lines; `esc` makes a string from a file, a row or an error safe to print.
fn as_text(status: &Status, esc: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    for s in &status.sources {
        source_text(s, &esc, &mut out);
    }
    let a = &status.audit;
    let head = match (a.head_seq, &a.head_hash) {
        (Some(seq), Some(hash)) => format!("head {seq} {}", &hash[..hash.len().min(16)]),
        _ => "no events yet".into(),
    };
    let check = match &a.last_check {
        None => "never verified (run `frostbyte-gitops audit verify`)".into(),
        Some(c) if c.intact => format!("verified intact at {} ({} events)", c.checked_at, c.events),
        Some(c) => format!("BROKEN at {}: {}", c.checked_at, esc(c.problem.as_deref().unwrap_or("?"))),
    };
    out.push_str(&format!("Audit trail: {head}; {check}\n"));
    out
}

fn source_text(s: &SourceStatus, esc: &impl Fn(&str) -> String, out: &mut String) {
    let verdict = match s.attention() {
        None => "healthy".to_string(),
        Some(why) => format!("needs attention: {why}"),
    };
    out.push_str(&format!("Source {}: {verdict}\n", esc(&s.name)));
    let git_ref = s.git_ref.as_deref().map_or_else(|| "the default branch".to_string(), esc);
    out.push_str(&format!("  repository    {} ({git_ref}, path {})\n", esc(&s.repository), esc(&s.path)));
    let applied = match (&s.last_applied_commit, &s.applied_at) {
        (Some(c), at) => format!("{} at {}", &c[..c.len().min(12)], at.as_deref().unwrap_or("?")),
        (None, _) => "nothing yet".into(),
    };
    out.push_str(&format!("  applied       {applied}\n"));
    if let Some(sig) = &s.signature {
        out.push_str(&format!("  signature     {}\n", esc(sig)));
    }
    let lease = s.lease_holder.as_deref().map_or_else(|| "no agent holds the lease".to_string(), esc);
    out.push_str(&format!("  synced by     {lease}\n"));
    if let Some(r) = &s.last_run {
        out.push_str(&format!(
            "  last run      {} at {}, {} ms, by {} ({}): {} created, {} updated, {} decommissioned, {} in conflict\n",
            r.outcome.as_str(),
            r.started_at,
            r.duration_ms,
            r.trigger.as_str(),
            esc(&r.replica),
            r.created,
            r.updated,
            r.decommissioned,
            r.conflicts
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("  error         {}\n", esc(e)));
        }
    }
    if let Some(d) = &s.drift {
        let counts: Vec<String> = d.iter().map(|(class, n)| format!("{class} {n}")).collect();
        out.push_str(&format!("  drift         {}\n", counts.join(", ")));
    }
}
