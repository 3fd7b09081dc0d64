//! Text, Markdown and JSON views of validation results, plans and drift reports.

use super::drift::{DriftClass, FieldDrift, TenantDrift, counts};
use super::escape::{html, md_cell, md_code, text};
use super::issue::Issue;
use super::json::JsonText;
use super::plan::{Action, Effective, EffectiveFrom, Entries, Op, PatchOp, Plan, SecretChange, TenantPlan};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use std::fmt::Write;

/// GitHub refuses comments over 65,536 characters; stay clear of it.
pub const MARKDOWN_LIMIT: usize = 65_000;

/// Version of the JSON layouts below; bumped on any incompatible change.
pub const JSON_FORMAT_VERSION: u32 = 2;

/// JSON documents as an earlier format_version had them, for consumers not yet moved (selectable
/// for one release): version 1 has no `old` values in patches.
pub fn json_format_version(mut v: Value, version: u32) -> Value {
    if version == 1 {
        v["format_version"] = json!(1);
        if let Some(tenants) = v.get_mut("tenants").and_then(Value::as_array_mut) {
            tenants.iter_mut().for_each(|t| tenant_at_version(t, version));
        }
    }
    v
}

/// A plan's entry as `version` of the layout has it.
fn tenant_at_version(t: &mut Value, version: u32) {
    if version == 1 {
        for op in t.get_mut("patch").and_then(Value::as_array_mut).into_iter().flatten() {
            op.as_object_mut().map(|o| o.remove("old"));
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Header {
    /// The commit the desired state was read at (none with `--worktree`).
    pub commit: Option<String>,
    /// What the desired state was compared with: "database" or "ref <rev> (<commit>)".
    pub against: String,
    /// Whether the commit passes signature verification, in words (none when it is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

fn short(commit: &Option<String>) -> String {
    commit.as_deref().map_or_else(|| "the work tree".to_string(), |c| c.chars().take(12).collect())
}

fn code_or_worktree(commit: &Option<String>) -> String {
    match commit {
        Some(_) => format!("`{}`", short(commit)),
        None => short(commit),
    }
}

// ---------- validation ----------

/// `at`: what was checked, "commit <id>" or "the work tree".
pub fn issues_text(files: usize, issues: &[Issue], at: &str) -> String {
    let mut out = String::new();
    for i in issues {
        let _ = writeln!(out, "error: {i}");
    }
    let bad: std::collections::BTreeSet<&str> = issues.iter().filter(|i| !i.is_configuration()).map(|i| i.file.as_str()).collect();
    let _ = writeln!(out, "{} file(s) checked, {} invalid, {} problem(s), at {at}", files, bad.len(), issues.len());
    out
}

pub fn issues_markdown(files: usize, issues: &[Issue]) -> String {
    let mut out = String::from("### Tenant file validation\n\n");
    if issues.is_empty() {
        let _ = writeln!(out, "All {files} tenant file(s) are valid.");
        return out;
    }
    let _ = writeln!(
        out,
        "{} problem(s) in {files} file(s):\n\n| File | Line | Field | Problem |\n|---|---|---|---|",
        issues.len()
    );
    for i in issues {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            md_code(&i.file),
            i.line.map(|l| l.to_string()).unwrap_or_default(),
            i.pointer.as_deref().map(md_code).unwrap_or_default(),
            md_cell(&i.message)
        );
    }
    out
}

pub fn issues_json(files: usize, issues: &[Issue]) -> String {
    serde_json::to_string_pretty(&issues_value(files, issues)).expect("serialisable") + "\n"
}

pub fn issues_value(files: usize, issues: &[Issue]) -> Value {
    json!({"format_version": JSON_FORMAT_VERSION, "files": files, "valid": issues.is_empty(), "issues": issues})
}

// ---------- plans ----------

#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn c<'a>(&self, code: &'a str, s: &'a str) -> Painted<'a> {
        Painted { on: self.0, code, s }
    }
}

/// Text in a colour when colour is on; written where it is used, not copied first.
struct Painted<'a> {
    on: bool,
    code: &'a str,
    s: &'a str,
}

impl std::fmt::Display for Painted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.on {
            true => write!(f, "\x1b[{}m{}\x1b[0m", self.code, self.s),
            false => f.write_str(self.s),
        }
    }
}

/// The lines one operation shows as, each given to `line` with its sign, escaped: an added object
/// is shown leaf by leaf, as Terraform shows a new resource's attributes.
fn op_lines(op: &PatchOp, mut line: impl FnMut(char, &str)) {
    let object = op
        .value
        .as_ref()
        .filter(|v| v.as_str().starts_with('{') && v.as_str() != "{}")
        .map(JsonText::value);
    match (op.op, object, op.secret) {
        (Op::Add, Some(v), None) => {
            let mut buf = String::new();
            crate::domain::json::for_each_leaf(&v, &mut op.path.clone(), &mut |p, leaf| {
                buf.clear();
                let _ = match leaf.as_str() == Some(crate::domain::json::REDACTED) {
                    true => write!(buf, "{p} (secret)"),
                    false => write!(buf, "{p} = {}", shown(&leaf.to_string())),
                };
                line('+', &text(&buf));
            });
        }
        _ => {
            let (sign, s) = op_line(op);
            line(sign, &s);
        }
    }
}

fn op_line(op: &PatchOp) -> (char, String) {
    let sign = match op.op {
        Op::Add => '+',
        Op::Remove => '-',
        Op::Replace => '~',
    };
    let text = match (op.secret, &op.old, &op.value) {
        (Some(SecretChange::Added), _, _) => format!("{} (secret added)", op.path),
        (Some(SecretChange::Changed), _, _) => format!("{} (secret changed)", op.path),
        (Some(SecretChange::Removed), _, Some(v)) => format!("{} = {} (was a secret)", op.path, shown(v.as_str())),
        (Some(SecretChange::Removed), _, None) => format!("{} (secret removed)", op.path),
        (None, Some(old), Some(new)) => format!("{}: {} -> {}", op.path, shown(old.as_str()), shown(new.as_str())),
        (None, Some(old), None) => format!("{} = {}", op.path, shown(old.as_str())),
        (None, None, Some(v)) => format!("{} = {}", op.path, shown(v.as_str())),
        (None, None, None) => op.path.clone(),
    };
    (sign, self::text(&text).into_owned())
}

/// Values longer than this many characters are shortened in plans.
pub const SHOWN_VALUE_CHARS: usize = 80;

/// A value as a plan shows it: its JSON, shortened with an ellipsis past [`SHOWN_VALUE_CHARS`].
pub(crate) fn shown(s: &str) -> String {
    if s.chars().count() <= SHOWN_VALUE_CHARS {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(SHOWN_VALUE_CHARS - 1).collect();
    cut.push('…');
    cut
}

fn effective(e: &Effective) -> String {
    let from = match e.from {
        EffectiveFrom::TenantFile => "from the tenant file",
        EffectiveFrom::PlatformDefault => "the platform default, resolved by readers",
    };
    format!("{} ({from})", text(&e.value))
}

fn version_span(t: &TenantPlan) -> String {
    match (t.current_version, t.next_version) {
        (Some(a), Some(b)) => format!("version {a} -> {b}"),
        (None, Some(b)) => format!("version {b}"),
        (Some(a), None) => format!("version {a}"),
        (None, None) => String::new(),
    }
}

/// Whether a plan is shown before it is applied ("will be created") or after ("created").
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tense {
    Plan,
    Applied,
}

pub fn plan_text(plan: &Plan, header: &Header, color: bool) -> String {
    let mut out = Vec::new();
    write_plan_text(&mut out, plan, header, color, Tense::Plan).expect("writing to memory");
    String::from_utf8(out).expect("rendered as UTF-8")
}

/// A plan (or, in the past tense, what `apply` and `sync` did), written to `out` a window of
/// tenants at a time: the text of a first sync of 100,000 tenants is 94 MB, and built whole it
/// was held twice (blocks, then the joined string).
pub fn write_plan_text(out: &mut impl std::io::Write, plan: &impl Entries, header: &Header, color: bool, tense: Tense) -> std::io::Result<()> {
    let p = Paint(color);
    let title = if tense == Tense::Plan { "Plan for" } else { "Applied" };
    writeln!(out, "{title} {} against {}:", short(&header.commit), text(&header.against))?;
    if let Some(sig) = &header.signature {
        writeln!(out, "Signature: {}", text(sig))?;
    }
    writeln!(out)?;
    // Each tenant's lines stand alone: a window's blocks are rendered on all cores, a batch of
    // tenants into one buffer.
    plan.try_for_each_window(&mut |window| {
        let blocks: Vec<String> = window
            .par_chunks(64)
            .map(|batch| {
                let mut b = String::new();
                batch.iter().for_each(|t| tenant_text(&mut b, t, p, tense));
                b
            })
            .collect();
        blocks.iter().try_for_each(|b| out.write_all(b.as_bytes()))
    })?;
    let mut tail = String::new();
    let s = plan.summary();
    if !s.has_changes() && s.orphaned == 0 && s.conflict == 0 {
        let _ = writeln!(tail, "No changes. The database matches {} ({} tenant(s)).", short(&header.commit), s.unchanged);
    } else {
        let line = if tense == Tense::Plan { s.line() } else { s.past_line() };
        let _ = writeln!(
            tail,
            "\n{}: {line} ({} unchanged).",
            if tense == Tense::Plan { "Plan" } else { "Applied" },
            s.unchanged
        );
    }
    out.write_all(tail.as_bytes())
}

/// Appends one tenant's lines of a plan or of what was applied.
fn tenant_text(out: &mut String, t: &TenantPlan, p: Paint, tense: Tense) {
    let will = if tense == Tense::Plan { "will be " } else { "" };
    let file = text(t.file.as_deref().unwrap_or(""));
    let id = text(&t.tenant_id);
    match t.action {
        Action::Create | Action::Update => {
            let (code, sign, verb) = if t.action == Action::Create {
                ("32", "+", "created")
            } else {
                ("33", "~", "updated")
            };
            let span = match (tense, t.current_version, t.next_version) {
                (Tense::Applied, Some(a), Some(b)) => format!("{a} -> {b}"),
                _ => version_span(t),
            };
            let _ = writeln!(out, "  {} {} {will}{verb} ({span})  {}", p.c(code, sign), p.c("1", &id), file);
        }
        Action::Decommission => {
            let _ = writeln!(out, "  {} {} {will}decommissioned (its file {file} was deleted)", p.c("31", "-"), p.c("1", &id));
        }
        Action::Orphaned => {
            let _ = writeln!(
                out,
                "  {} {} is orphaned: in the database, not in git (left alone)",
                p.c("31", "!"),
                p.c("1", &id)
            );
        }
        Action::Conflict => {
            let _ = writeln!(
                out,
                "  {} {} is in conflict: git changed it and so did someone outside git ({}); left alone under drift policy warn; git would change:",
                p.c("31", "!"),
                p.c("1", &id),
                text(&t.out_of_band.join(", "))
            );
        }
        Action::Unchanged => {
            if !t.out_of_band.is_empty() {
                let _ = writeln!(
                    out,
                    "  {} {} was changed outside git; drift policy leaves it ({})",
                    p.c("35", "?"),
                    p.c("1", &id),
                    text(&t.out_of_band.join(", "))
                );
            }
            return;
        }
    }
    if let Some(e) = &t.embedding_endpoint {
        let _ = writeln!(out, "      embedding endpoint: {}", effective(e));
    }
    for op in &t.patch {
        op_lines(op, |sign, text| {
            let code = match sign {
                '+' => "32",
                '-' => "31",
                _ => "33",
            };
            let _ = writeln!(out, "      {} {text}", p.c(code, sign.encode_utf8(&mut [0; 4])));
        });
    }
    if t.action == Action::Update && !t.out_of_band.is_empty() {
        let _ = writeln!(out, "      (overwrites changes made outside git: {})", text(&t.out_of_band.join(", ")));
    }
}

/// A plan as a pull-request comment: a summary, a table of the tenants it changes, and a folded
/// diff for each, cut short (and saying so) to stay under [`MARKDOWN_LIMIT`].
pub fn plan_markdown(plan: &Plan, header: &Header) -> String {
    let mut head = markdown_head(plan, header);
    let shown: Vec<&TenantPlan> = plan
        .tenants
        .iter()
        .filter(|t| t.action != Action::Unchanged || !t.out_of_band.is_empty())
        .collect();
    if shown.is_empty() {
        head.push_str("No changes.\n");
        return head;
    }
    let blocks: Vec<String> = shown
        .iter()
        .filter(|t| !t.patch.is_empty() || !t.out_of_band.is_empty())
        .map(|t| markdown_block(t))
        .collect();
    fit_markdown(head + &markdown_table(&shown) + "\n", &blocks)
}

fn markdown_head(plan: &Plan, header: &Header) -> String {
    let s = plan.summary();
    let mut head = String::new();
    let _ = writeln!(head, "### Frostbyte plan for {}\n", code_or_worktree(&header.commit));
    let _ = writeln!(
        head,
        "Compared with {}: **{}** ({} unchanged).\n",
        md_cell(&header.against),
        s.line(),
        s.unchanged
    );
    if let Some(sig) = &header.signature {
        let _ = writeln!(head, "Signature: {}\n", md_cell(sig));
    }
    head
}

fn markdown_table(shown: &[&TenantPlan]) -> String {
    let mut table = String::from("| Tenant | Action | Version | File |\n|---|---|---|---|\n");
    for t in shown {
        let action = match t.action {
            Action::Unchanged => "drift left (warn)",
            Action::Create => "create",
            Action::Update => "update",
            Action::Orphaned => "orphaned",
            Action::Decommission => "decommission",
            Action::Conflict => "conflict (left alone)",
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} |",
            md_code(&t.tenant_id),
            action,
            version_span(t),
            t.file.as_deref().map(md_code).unwrap_or_default()
        );
    }
    table
}

/// One tenant's folded diff.
fn markdown_block(t: &TenantPlan) -> String {
    let mut b = String::new();
    let what = match t.action {
        Action::Create => "create",
        Action::Update => "update",
        Action::Conflict => "conflict: changed in git and outside git",
        _ => "changed outside git",
    };
    let _ = writeln!(
        b,
        "<details><summary><code>{}</code>: {what}, {} change(s)</summary>",
        html(&t.tenant_id),
        t.patch.len() + t.out_of_band.len()
    );
    if let Some(e) = &t.embedding_endpoint {
        // Before the fence: inside it every line is a diff line.
        let _ = write!(b, "\nEmbedding endpoint: {}\n", md_cell(&effective(e)));
    }
    b.push_str("\n```diff\n");
    // Every line starts with its sign and holds no line break (op_lines escapes them), so no
    // line of a file's making can close the fence.
    for op in &t.patch {
        op_lines(op, |sign, line| {
            let _ = writeln!(b, "{sign} {line}");
        });
    }
    for path in &t.out_of_band {
        let _ = writeln!(b, "! {} (changed outside git)", text(path));
    }
    b.push_str("```\n\n</details>\n");
    b
}

/// `out` followed by as many of `blocks` as fit under [`MARKDOWN_LIMIT`], and a note of what was
/// left out.
fn fit_markdown(mut out: String, blocks: &[String]) -> String {
    let total = blocks.len();
    let mut left_chars: usize = blocks.iter().map(String::len).sum();
    for (i, b) in blocks.iter().enumerate() {
        let note = format!(
            "\n> **Plan cut short:** {} of {total} tenant blocks ({left_chars} characters) left out to stay under {MARKDOWN_LIMIT} characters. Run `frostbyte-gitops plan` for the whole plan.\n",
            total - i
        );
        let tail_room = if i + 1 == total { 0 } else { note.len() };
        if out.len() + b.len() + tail_room > MARKDOWN_LIMIT {
            if out.len() + note.len() > MARKDOWN_LIMIT {
                // Even the table is too long: cut it at a line boundary.
                let cut = out[..MARKDOWN_LIMIT - note.len()].rfind('\n').unwrap_or(0);
                out.truncate(cut + 1);
            }
            out.push_str(&note);
            return out;
        }
        out.push_str(b);
        left_chars -= b.len();
    }
    out
}

pub fn plan_json(plan: &Plan, header: &Header) -> Value {
    let mut out = Vec::new();
    write_plan_json(&mut out, plan, header, &[], JSON_FORMAT_VERSION).expect("writing to memory");
    serde_json::from_slice(&out).expect("written as JSON")
}

/// A plan as pretty JSON (`extra` members after the plan's own, at `version` of the layout),
/// written to `out` a tenant at a time: the plan of a first sync of 100,000 tenants, built as one
/// document, was several times the memory of the tenants' plans.
pub fn write_plan_json(out: &mut impl std::io::Write, plan: &impl Entries, header: &Header, extra: &[(&str, Value)], version: u32) -> std::io::Result<()> {
    use serde::ser::{Error, SerializeMap, SerializeSeq, Serializer};
    struct Tenants<'p, P>(&'p P, u32);
    impl<P: Entries> Serialize for Tenants<'_, P> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(None)?;
            let mut failed = None;
            let visited = self.0.try_for_each_window(&mut |window| {
                for t in window {
                    let written = match self.1 {
                        JSON_FORMAT_VERSION => seq.serialize_element(t),
                        older => {
                            let mut v = serde_json::to_value(t).map_err(std::io::Error::other)?;
                            tenant_at_version(&mut v, older);
                            seq.serialize_element(&v)
                        }
                    };
                    if let Err(e) = written {
                        failed = Some(e);
                        return Err(std::io::Error::other("serialising"));
                    }
                }
                Ok(())
            });
            match (failed, visited) {
                (Some(e), _) => Err(e),
                (None, Err(e)) => Err(S::Error::custom(e)),
                (None, Ok(())) => seq.end(),
            }
        }
    }
    let summary = plan.summary();
    let mut ser = serde_json::Serializer::pretty(&mut *out);
    let mut map = ser.serialize_map(None)?;
    map.serialize_entry("format_version", &version)?;
    map.serialize_entry("commit", &header.commit)?;
    map.serialize_entry("against", &header.against)?;
    map.serialize_entry("summary", &summary)?;
    map.serialize_entry("has_changes", &summary.has_changes())?;
    map.serialize_entry("tenants", &Tenants(plan, version))?;
    for (k, v) in extra {
        map.serialize_entry(k, v)?;
    }
    SerializeMap::end(map)?;
    writeln!(out)
}

// ---------- drift ----------

pub fn drift_text(report: &[TenantDrift], header: &Header) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Drift of the database against {}:\n", short(&header.commit));
    if report.iter().all(|t| t.in_sync()) {
        let _ = writeln!(out, "  Every tenant is in sync.");
    }
    for t in report.iter().filter(|t| !t.in_sync()) {
        let classes: Vec<&str> = t.classes.iter().map(|c| c.as_str()).collect();
        let when = t.updated_at.as_deref().map(|u| format!(" (row last changed {})", text(u))).unwrap_or_default();
        let _ = writeln!(out, "  {}: {}{when}", text(&t.tenant_id), classes.join(" + "));
        for p in &t.pending_paths {
            let _ = writeln!(out, "      pending  {}", text(p));
        }
        for f in &t.modified {
            let _ = writeln!(out, "      modified {}", field_drift(f));
        }
    }
    let _ = writeln!(out, "\n{}", drift_summary(report));
    out
}

/// `/config/plan: git "pro", database "enterprise"`; a secret only says that it differs.
fn field_drift(f: &FieldDrift) -> String {
    if f.secret {
        return format!("{} (secret differs)", text(&f.path));
    }
    let v = |v: &Option<Value>| v.as_ref().map_or_else(|| "(absent)".to_string(), |v| shown(&v.to_string()));
    text(&format!("{}: git {}, database {}", f.path, v(&f.git), v(&f.database))).into_owned()
}

fn drift_summary(report: &[TenantDrift]) -> String {
    let c = counts(report);
    let parts: Vec<String> = DriftClass::ALL.iter().map(|k| format!("{} {}", c[k], k.as_str())).collect();
    format!("{} tenant(s): {}", report.len(), parts.join(", "))
}

pub fn drift_markdown(report: &[TenantDrift], header: &Header) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Frostbyte drift against {}\n\n{}\n",
        code_or_worktree(&header.commit),
        drift_summary(report)
    );
    let drifted: Vec<&TenantDrift> = report.iter().filter(|t| !t.in_sync()).collect();
    if drifted.is_empty() {
        out.push_str("Every tenant is in sync.\n");
        return out;
    }
    out.push_str("| Tenant | Drift | Pending fields | Modified fields |\n|---|---|---|---|\n");
    for t in drifted {
        let classes: Vec<&str> = t.classes.iter().map(|c| c.as_str()).collect();
        let code = |v: &[String]| v.iter().map(|p| md_code(p)).collect::<Vec<_>>().join(", ");
        let modified: Vec<String> = t.modified.iter().map(|f| md_cell(&field_drift(f))).collect();
        let when = t
            .updated_at
            .as_deref()
            .map(|u| format!(" (row last changed {})", md_cell(u)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {}{when} | {} | {} |",
            md_code(&t.tenant_id),
            classes.join(" + "),
            code(&t.pending_paths),
            modified.join("<br>")
        );
    }
    out
}

pub fn drift_json(report: &[TenantDrift], header: &Header) -> Value {
    let c: serde_json::Map<String, Value> = counts(report).into_iter().map(|(k, v)| (k.as_str().to_string(), json!(v))).collect();
    json!({"format_version": JSON_FORMAT_VERSION, "commit": header.commit, "counts": c, "tenants": report})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hooli moves from enterprise to pro, gains a contact, loses a feature, gets a long display
    /// name and a new secret value: the plan a reviewer reads, whole.
    fn reviewed_plan() -> Plan {
        use crate::domain::plan::{ActualTenant, PlanOptions, plan};
        use crate::domain::tenant::DesiredTenant;
        let doc = |config: Value| json!({"age_public_key": "age1x", "endpoints": {}, "config": config});
        let secrets: crate::domain::json::SecretPaths = ["/config/secrets/db_password".to_string()].into();
        let old = doc(json!({
            "plan": "enterprise",
            "display_name": "Hooli",
            "features": {"sso": true, "beta": true},
            "contacts": [{"name": "Ops", "email": "ops@hooli.example"}],
            "secrets": {"db_password": "old-pw-1"}
        }));
        let new = doc(json!({
            "plan": "pro",
            "display_name": "Hooli XYZ, the company formerly known as Hooli, now with a display name far longer than any screen",
            "features": {"sso": true},
            "contacts": [{"name": "Ops", "email": "ops@hooli.example"}, {"name": "Sec", "email": "sec@hooli.example"}],
            "secrets": {"db_password": "new-pw-2"}
        }));
        let desired = DesiredTenant::new("hooli".into(), "tenants/hooli.toml".into(), &new, secrets.clone());
        let actual = ActualTenant {
            tenant_id: "hooli".into(),
            state: "active".into(),
            config_version: 4,
            document: JsonText::of(&old),
            applied: None,
            known_secrets: secrets,
            updated_at: None,
        };
        plan(
            &[desired],
            &[actual],
            PlanOptions {
                key: b"k",
                correct_drift: true,
            },
        )
    }

    fn header() -> Header {
        Header {
            commit: Some("377f5f3efb2413fb8e9181a28ba48503dfdd2db3".into()),
            against: "the database".into(),
            signature: None,
        }
    }

    #[test]
    fn text_plans_show_old_and_new_values_and_never_a_secret() {
        let text = plan_text(&reviewed_plan(), &header(), false);
        let expected = "Plan for 377f5f3efb24 against the database:

  ~ hooli will be updated (version 4 -> 5)  tenants/hooli.toml
      ~ /config/plan: \"enterprise\" -> \"pro\"
      ~ /config/display_name: \"Hooli\" -> \"Hooli XYZ, the company formerly known as Hooli, now with a display name far lo…
      - /config/features/beta = true
      + /config/contacts/1/name = \"Sec\"
      + /config/contacts/1/email = \"sec@hooli.example\"
      ~ /config/secrets/db_password (secret changed)

Plan: 0 to create, 1 to update, 0 orphaned (0 unchanged).
";
        assert_eq!(text, expected);
        assert!(!text.contains("pw-"), "{text}");
    }

    #[test]
    fn markdown_plans_show_the_same_lines_in_a_collapsed_block() {
        let md = plan_markdown(&reviewed_plan(), &header());
        for line in [
            "| `hooli` | update | version 4 -> 5 | `tenants/hooli.toml` |",
            "<details><summary><code>hooli</code>: update, 5 change(s)</summary>",
            "~ /config/plan: \"enterprise\" -> \"pro\"",
            "+ /config/contacts/1/email = \"sec@hooli.example\"",
            "~ /config/secrets/db_password (secret changed)",
            "- /config/features/beta = true",
        ] {
            assert!(md.contains(line), "missing {line:?} in\n{md}");
        }
        assert!(md.find("| Tenant |").unwrap() < md.find("<details>").unwrap(), "summary table first");
        assert!(!md.contains("pw-"), "{md}");
    }

    #[test]
    fn drift_reports_show_git_and_database_values_and_withhold_secrets() {
        use crate::domain::drift::{DriftClass, FieldDrift};
        let long = "x".repeat(200);
        let report = vec![TenantDrift {
            tenant_id: "globex".into(),
            classes: vec![DriftClass::Pending, DriftClass::Modified],
            file: Some("tenants/globex.toml".into()),
            config_version: Some(3),
            last_applied_commit: None,
            modified_paths: vec![
                "/config/plan".into(),
                "/config/notes".into(),
                "/config/secrets/api_key".into(),
                "/config/region".into(),
            ],
            pending_paths: vec!["/config/limits/max_users".into()],
            modified: vec![
                FieldDrift {
                    path: "/config/plan".into(),
                    git: Some(json!("pro")),
                    database: Some(json!("enterprise")),
                    secret: false,
                },
                FieldDrift {
                    path: "/config/notes".into(),
                    git: None,
                    database: Some(json!(long)),
                    secret: false,
                },
                FieldDrift {
                    path: "/config/secrets/api_key".into(),
                    git: None,
                    database: None,
                    secret: true,
                },
                FieldDrift {
                    path: "/config/region".into(),
                    git: Some(json!("eu-west-1")),
                    database: None,
                    secret: false,
                },
            ],
            updated_at: Some("2026-11-27T10:04:00Z".into()),
        }];
        let text = drift_text(&report, &header());
        let expected = format!(
            "Drift of the database against 377f5f3efb24:

  globex: pending + modified (row last changed 2026-11-27T10:04:00Z)
      pending  /config/limits/max_users
      modified /config/plan: git \"pro\", database \"enterprise\"
      modified /config/notes: git (absent), database \"{}…
      modified /config/secrets/api_key (secret differs)
      modified /config/region: git \"eu-west-1\", database (absent)

1 tenant(s): 0 in-sync, 1 pending, 1 modified, 0 missing, 0 orphaned
",
            "x".repeat(78)
        );
        assert_eq!(text, expected);
        let md = drift_markdown(&report, &header());
        assert!(
            md.contains("| `globex` | pending + modified (row last changed 2026-11-27T10:04:00Z) | `/config/limits/max_users` | /config/plan: git \"pro\", database \"enterprise\"<br>"),
            "{md}"
        );
        assert!(md.contains("<br>/config/secrets/api_key (secret differs)<br>"), "{md}");
    }

    #[test]
    fn json_plans_keep_the_patch_and_add_old_values_beside_it() {
        let v = plan_json(&reviewed_plan(), &header());
        assert_eq!(v["format_version"], json!(JSON_FORMAT_VERSION));
        let patch = &v["tenants"][0]["patch"];
        assert_eq!(patch[0], json!({"op": "replace", "path": "/config/plan", "value": "pro", "old": "enterprise"}));
        assert_eq!(patch[2], json!({"op": "remove", "path": "/config/features/beta", "old": true}));
        assert_eq!(
            patch[3],
            json!({"op": "add", "path": "/config/contacts/1", "value": {"name": "Sec", "email": "sec@hooli.example"}})
        );
        assert_eq!(
            patch[4],
            json!({"op": "replace", "path": "/config/secrets/db_password", "value": "[REDACTED]", "secret": "changed", "old": "[REDACTED]"})
        );
        let v1 = json_format_version(v, 1);
        assert_eq!(v1["format_version"], json!(1));
        assert_eq!(v1["tenants"][0]["patch"][0], json!({"op": "replace", "path": "/config/plan", "value": "pro"}));
    }

    /// The JSON written a tenant at a time is, byte for byte, the document built whole and
    /// printed (as every plan was before), at both layouts, with members after the plan's.
    #[test]
    fn streamed_json_plans_are_the_document_printed_whole() {
        let mut plan = reviewed_plan();
        plan.tenants.extend(big_plan(3).tenants);
        for version in [1, JSON_FORMAT_VERSION] {
            for plan in [&plan, &Plan::default()] {
                let mut whole = json!({
                    "format_version": JSON_FORMAT_VERSION,
                    "commit": header().commit,
                    "against": header().against,
                    "summary": plan.summary(),
                    "has_changes": plan.has_changes(),
                    "tenants": plan.tenants,
                });
                whole["applied"] = json!(3);
                whole["source"] = json!("main");
                let expected = serde_json::to_string_pretty(&json_format_version(whole, version)).unwrap() + "\n";
                let mut out = Vec::new();
                write_plan_json(&mut out, plan, &header(), &[("applied", json!(3)), ("source", json!("main"))], version).unwrap();
                assert_eq!(String::from_utf8(out).unwrap(), expected);
            }
        }
    }

    fn big_plan(n: usize) -> Plan {
        Plan {
            tenants: (0..n)
                .map(|i| TenantPlan {
                    tenant_id: format!("tenant-{i:05}"),
                    action: Action::Update,
                    file: Some(format!("tenants/tenant-{i:05}.toml")),
                    current_version: Some(1),
                    next_version: Some(2),
                    patch: (0..20)
                        .map(|j| PatchOp {
                            op: Op::Replace,
                            path: format!("/config/limits/field_{j}"),
                            value: Some(JsonText::of(&json!(j))),
                            secret: None,
                            old: Some(JsonText::of(&json!(j + 1))),
                        })
                        .collect(),
                    out_of_band: vec![],
                    desired_digest: None,
                    actual_digest: None,
                    embedding_endpoint: None,
                })
                .collect(),
        }
    }

    #[test]
    fn markdown_is_cut_under_the_limit_with_a_note() {
        let md = plan_markdown(
            &big_plan(2000),
            &Header {
                commit: Some("abc".into()),
                against: "database".into(),
                signature: None,
            },
        );
        assert!(md.len() <= MARKDOWN_LIMIT, "{}", md.len());
        assert!(md.contains("Plan cut short"), "no note");
        let small = plan_markdown(&big_plan(3), &Header::default());
        assert!(!small.contains("cut short"));
        assert_eq!(small.matches("<details>").count(), 3);
    }

    /// The embedding endpoint is said between a block's summary and its diff, outside the fence.
    #[test]
    fn markdown_says_the_embedding_endpoint_before_the_diff() {
        let mut plan = big_plan(2);
        plan.tenants[0].embedding_endpoint = Some(Effective {
            value: "https://embed.example.com".into(),
            from: EffectiveFrom::TenantFile,
        });
        let md = plan_markdown(&plan, &Header::default());
        let block = |i: usize| md.split("<details>").nth(i + 1).expect("a block").to_string();
        assert!(
            block(0).contains("</summary>\n\nEmbedding endpoint: https://embed.example.com (from the tenant file)\n\n```diff\n~ "),
            "{}",
            block(0)
        );
        assert!(block(1).contains("</summary>\n\n```diff\n~ "), "{}", block(1));
        assert!(!block(1).contains("Embedding"));
    }
}
