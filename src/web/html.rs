//! The status page's HTML. Every string from a file, a row, a setting or an error goes through
//! [`e`] (or [`href`] in a link): tenant names and values are hostile. No script anywhere.

use super::{AuditPage, Overview, SourcePage, TenantList, TenantPage};
use crate::domain::escape;
use crate::domain::history::{self, Version};
use crate::status::SourceStatus;
use crate::store::runs::RunRecord;
use std::fmt::Write;

pub const STYLE: &str = include_str!("style.css");

/// Text for HTML, in an element or a double-quoted attribute.
fn e(s: &str) -> String {
    escape::html(s)
}

/// What a link keeps as it is: RFC 3986's unreserved characters.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// A path segment or query value for a link.
fn href(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

fn layout(title: &str, body: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · frostbyte-gitops</title><link rel="stylesheet" href="/static/style.css"></head>
<body><header><a class="brand" href="/">frostbyte-gitops</a><nav><a href="/">Overview</a><a href="/tenants">Tenants</a><a href="/audit">Audit</a></nav></header>
<main>{body}</main></body></html>
"#,
        e(title)
    )
}

pub fn login(message: Option<&str>) -> String {
    let note = message.map(|m| format!(r#"<p class="bad">{}</p>"#, e(m))).unwrap_or_default();
    layout(
        "Sign in",
        &format!(
            r#"<h1>Sign in</h1>{note}<p>This listener is not on loopback: the status page asks for its token (<code>status_token</code>).</p>
<form method="post" action="/login"><label>Token <input type="password" name="token" autocomplete="current-password" required></label> <button type="submit">Sign in</button></form>"#
        ),
    )
}

fn verdict(s: &SourceStatus) -> String {
    match s.attention() {
        None => r#"<span class="ok">healthy</span>"#.into(),
        Some(why) => format!(r#"<span class="bad">{}</span>"#, e(&why)),
    }
}

fn drift_links(counts: Option<&std::collections::BTreeMap<String, u64>>) -> String {
    match counts {
        None => "no drift report yet".into(),
        Some(c) => c
            .iter()
            .map(|(class, n)| format!(r#"<a class="drift-{c}" href="/tenants?drift={h}">{c} {n}</a>"#, c = e(class), h = href(class)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn run_line(r: &RunRecord) -> String {
    let error = r.error.as_deref().map(|x| format!(r#"<div class="error">{}</div>"#, e(x))).unwrap_or_default();
    format!(
        r#"<span class="outcome-{o}">{o}</span> at {} ({} ms, {}, on {}): {} created, {} updated, {} decommissioned, {} in conflict{error}"#,
        e(&r.started_at),
        r.duration_ms,
        r.trigger.as_str(),
        e(&r.replica),
        r.created,
        r.updated,
        r.decommissioned,
        r.conflicts,
        o = r.outcome.as_str()
    )
}

fn source_card(s: &SourceStatus) -> String {
    let applied = match (&s.last_applied_commit, &s.applied_at) {
        (Some(c), at) => format!("<code>{}</code> at {}", e(&c[..c.len().min(12)]), e(at.as_deref().unwrap_or("?"))),
        (None, _) => "nothing yet".into(),
    };
    let last = s.last_run.as_ref().map_or_else(|| "never".to_string(), run_line);
    format!(
        r#"<section class="source"><h2><a href="/sources/{h}">{n}</a> {v}</h2><table>
<tr><th>Repository</th><td><code>{repo}</code> ({r}, path <code>{p}</code>)</td></tr>
<tr><th>Applied</th><td>{applied}</td></tr>
<tr><th>Signature</th><td>{sig}</td></tr>
<tr><th>Synced by</th><td>{lease}</td></tr>
<tr><th>Last run</th><td>{last}</td></tr>
<tr><th>Drift</th><td>{drift}</td></tr></table></section>"#,
        h = href(&s.name),
        n = e(&s.name),
        v = verdict(s),
        repo = e(&s.repository),
        r = s.git_ref.as_deref().map_or("the default branch".into(), e),
        p = e(&s.path),
        sig = s.signature.as_deref().map_or("not checked".into(), e),
        lease = s.lease_holder.as_deref().map_or("no agent holds the lease".into(), e),
        drift = drift_links(s.drift.as_ref())
    )
}

pub fn overview(o: &Overview) -> String {
    let mut body = String::from("<h1>Overview</h1>");
    for s in &o.status.sources {
        body.push_str(&source_card(s));
    }
    let _ = write!(
        body,
        r#"<section><h2>The last {} hours</h2><figure>{}<figcaption>Runs per hour: <span class="applied">applied</span>, <span class="failed">failed or refused</span></figcaption></figure><figure>{}<figcaption>Drifted tenants at each hour's last drift report</figcaption></figure></section>"#,
        o.hours.len(),
        super::svg::runs_per_hour(&o.hours),
        super::svg::drift_per_hour(&o.hours)
    );
    body.push_str(&audit_summary(&o.status.audit));
    layout("Overview", &body)
}

fn audit_summary(a: &crate::status::AuditStatus) -> String {
    let head = match (a.head_seq, &a.head_hash) {
        (Some(seq), Some(hash)) => format!("head event {seq}, hash <code>{}</code>", e(&hash[..hash.len().min(16)])),
        _ => "no events yet".into(),
    };
    let check = match &a.last_check {
        None => "never verified (run <code>frostbyte-gitops audit verify</code>)".into(),
        Some(c) if c.intact => format!(r#"<span class="ok">verified intact</span> at {} ({} events)"#, e(&c.checked_at), c.events),
        Some(c) => format!(
            r#"<span class="bad">broken</span> at {}: {}"#,
            e(&c.checked_at),
            e(c.problem.as_deref().unwrap_or("?"))
        ),
    };
    format!(r#"<section><h2><a href="/audit">Audit trail</a></h2><p>{head}; {check}</p></section>"#)
}

pub fn source(p: &SourcePage) -> String {
    let mut body = source_card(&p.status);
    body.push_str("<h2>Runs</h2><table class=\"list\"><tr><th>Started</th><th>Outcome</th><th>Trigger</th><th>Commit</th><th>Changes</th><th>Replica</th><th>Error</th></tr>");
    for r in &p.runs {
        let _ = write!(
            body,
            r#"<tr><td>{}</td><td class="outcome-{o}">{o}</td><td>{}</td><td><code>{}</code></td><td>+{} ~{} -{} !{}</td><td>{}</td><td class="error">{}</td></tr>"#,
            e(&r.started_at),
            r.trigger.as_str(),
            e(r.commit_fetched.as_deref().map_or("", |c| &c[..c.len().min(12)])),
            r.created,
            r.updated,
            r.decommissioned,
            r.conflicts,
            e(&r.replica),
            e(r.error.as_deref().unwrap_or("")),
            o = r.outcome.as_str()
        );
    }
    body.push_str("</table>");
    layout(&format!("Source {}", p.status.name), &body)
}

pub fn tenants(l: &TenantList) -> String {
    let mut body = String::from("<h1>Tenants</h1><p class=\"filters\">Drift: <a href=\"/tenants\">all</a>");
    for class in crate::domain::drift::DriftClass::ALL {
        let _ = write!(body, r#" <a href="/tenants?drift={c}">{c}</a>"#, c = class.as_str());
    }
    body.push_str("</p><table class=\"list\"><tr><th>Tenant</th><th>State</th><th>Version</th><th>Source</th><th>File</th><th>Drift</th></tr>");
    for t in &l.tenants {
        let drift = if t.drift.is_empty() { "in-sync".to_string() } else { t.drift.join(", ") };
        let _ = write!(
            body,
            r#"<tr><td><a href="/tenants/{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"#,
            href(&t.tenant_id),
            e(&t.tenant_id),
            e(&t.state),
            t.config_version,
            e(t.source.as_deref().unwrap_or("")),
            e(t.file.as_deref().unwrap_or("")),
            e(&drift)
        );
    }
    body.push_str("</table>");
    if let Some(next) = &l.next_after {
        let class = l.class.as_deref().map(|c| format!("drift={}&", href(c))).unwrap_or_default();
        let _ = write!(body, r#"<p><a rel="next" href="/tenants?{class}after={}">Next page</a></p>"#, href(next));
    }
    layout("Tenants", &body)
}

fn version_block(v: &Version) -> String {
    let esc = |s: &str| e(s);
    let mut out = format!("<li><p>{}</p><ul class=\"changes\">", history::version_line(v, &esc));
    for c in &v.changes {
        let _ = write!(out, "<li><code>{}</code></li>", history::change_line(c, &esc));
    }
    out.push_str("</ul></li>");
    out
}

pub fn tenant(p: &TenantPage) -> String {
    let l = &p.lifecycle;
    let mut body = format!(
        r#"<h1>Tenant {id}</h1><table>
<tr><th>State</th><td>{state}</td></tr><tr><th>Created</th><td>{created}</td></tr>
<tr><th>Provisioning started</th><td>{ps}</td></tr><tr><th>Provisioned</th><td>{pd}</td></tr>
<tr><th>Version</th><td>{version}</td></tr><tr><th>Last changed</th><td>{updated}</td></tr>
<tr><th>Source</th><td>{source}</td></tr><tr><th>File</th><td><code>{file}</code></td></tr></table>"#,
        id = e(&p.tenant_id),
        state = e(&l.state),
        created = e(&l.created_at),
        ps = e(l.provisioning_started_at.as_deref().unwrap_or("-")),
        pd = e(l.provisioned_at.as_deref().unwrap_or("-")),
        version = l.config_version,
        updated = e(&l.updated_at),
        source = e(p.book.source_name.as_deref().unwrap_or("nobody")),
        file = e(p.book.file.as_deref().unwrap_or("")),
    );
    body.push_str("<h2>Drift</h2>");
    match &p.book.drift {
        None => body.push_str("<p>In sync at its source's last drift report.</p>"),
        Some(d) => body.push_str(&drift_detail(d, p.book.drift_recorded_at.as_deref())),
    }
    let _ = write!(
        body,
        "<h2>Document</h2><p>As the row holds it, secrets redacted.</p><pre>{}</pre>",
        e(&serde_json::to_string_pretty(&p.document).expect("a document serialises"))
    );
    body.push_str("<h2>Versions</h2><ol class=\"versions\" reversed>");
    for v in p.versions.iter().rev() {
        body.push_str(&version_block(v));
    }
    body.push_str("</ol>");
    layout(&format!("Tenant {}", p.tenant_id), &body)
}

fn drift_detail(d: &serde_json::Value, at: Option<&str>) -> String {
    let classes: Vec<String> = d["classes"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).map(e).collect();
    let mut out = format!(
        r#"<p class="bad">{}</p><p>At the drift report of {}.</p>"#,
        classes.join(", "),
        e(at.unwrap_or("?"))
    );
    let fields = d["modified"].as_array().into_iter().flatten();
    let mut rows = String::new();
    for f in fields {
        let shown = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "(absent)".to_string(),
            v => e(&crate::domain::render::shown(&v.to_string())),
        };
        let (git, db) = match f["secret"].as_bool() {
            Some(true) => ("(secret differs)".to_string(), "(secret differs)".to_string()),
            _ => (shown(&f["git"]), shown(&f["database"])),
        };
        let _ = write!(
            rows,
            "<tr><td><code>{}</code></td><td><code>{git}</code></td><td><code>{db}</code></td></tr>",
            e(f["path"].as_str().unwrap_or("?"))
        );
    }
    if !rows.is_empty() {
        let _ = write!(out, r#"<table class="list"><tr><th>Field</th><th>Git</th><th>Database</th></tr>{rows}</table>"#);
    }
    let pending: Vec<String> = d["pending_paths"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).map(e).collect();
    if !pending.is_empty() {
        let _ = write!(
            out,
            "<p>Git has changes not applied yet at: <code>{}</code></p>",
            pending.join("</code>, <code>")
        );
    }
    out
}

pub fn audit(p: &AuditPage) -> String {
    let mut body = String::from("<h1>Audit trail</h1>");
    body.push_str(&audit_summary(&p.audit));
    body.push_str("<table class=\"list\"><tr><th>Seq</th><th>When</th><th>Tenant</th><th>Event</th><th>Version</th><th>Actor</th></tr>");
    for ev in &p.events {
        let _ = write!(
            body,
            r#"<tr><td>{}</td><td>{}</td><td><a href="/tenants/{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            ev.seq,
            e(&ev.occurred_at),
            href(&ev.tenant_id),
            e(&ev.tenant_id),
            e(&ev.event_type),
            ev.to_version.map(|v| v.to_string()).unwrap_or_default(),
            e(&ev.actor)
        );
    }
    body.push_str("</table>");
    if let Some(before) = p.next_before {
        let _ = write!(body, r#"<p><a rel="next" href="/audit?before={before}">Older events</a></p>"#);
    }
    layout("Audit trail", &body)
}

pub fn not_found(what: &str) -> String {
    layout("Not found", &format!("<h1>Not found</h1><p>{}</p>", e(what)))
}
