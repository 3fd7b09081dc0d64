//! Commands on the database itself: db start and stop, migrate, audit verify.

use super::args::*;
use super::output::*;
use super::{EXIT_ERROR, EXIT_OK};
use anyhow::{Context, Result, anyhow};
use frostbyte_gitops::compose;
use frostbyte_gitops::config::Config;
use frostbyte_gitops::sync::Ctx;
use frostbyte_gitops::{localpg, store};

pub(crate) fn db_command(cfg: &Config, cmd: &DbCmd) -> Result<u8> {
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
            let db = rt.block_on(compose::connect(&local))?;
            println!("{}", db.url);
        }
        DbCmd::Stop => localpg::stop(&cfg.data_dir.join("pgdata"))?,
    }
    Ok(EXIT_OK)
}

pub(crate) async fn migrate(ctx: &Ctx, app_role: Option<String>) -> Result<u8> {
    let db = compose::connect(&ctx.cfg).await?;
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

pub(crate) async fn audit_verify(ctx: &Ctx, format: OutFormat, anchor: Option<&std::path::Path>) -> Result<u8> {
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
    let db = compose::connect(&ctx.cfg).await?;
    compose::prepare(&ctx.cfg, &db).await?;
    let client = store::client(&db.pool).await?;
    let report = store::verify_audit(&client, anchored).await?;
    let problem = match (&report.broken, report.version_mismatches.len()) {
        (Some(b), _) => Some(b.to_string()),
        (None, 0) => None,
        (None, n) => Some(format!("{n} tenant(s) whose config_version differs from their TENANT_CONFIG_UPDATED events")),
    };
    let events = i64::try_from(report.events).unwrap_or(i64::MAX);
    store::runs::record_audit_check(&**client, events, report.head_seq, &report.head_hash, problem.as_deref()).await?;
    match format {
        OutFormat::Json => print_json(&serde_json::to_value(&report)?),
        _ => {
            if let Some(b) = &report.broken {
                println!("Audit trail broken: {b}");
            }
            for m in &report.version_mismatches {
                let why = match m.config_events > m.config_version {
                    true => {
                        " (its row was most likely deleted outside git and created again from version 1; docs/security.md, \"A row deleted by hand\", gives the repair)"
                    }
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
