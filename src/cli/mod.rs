//! The binary's edge: parses the command line, composes the parts, runs one command and maps
//! its outcome to an exit code (0 nothing to do or done, 1 error, 2 changes or drift, as
//! Terraform's -detailed-exitcode).

use admin_cmds::*;
use anyhow::{Context, Result};
use args::*;
use boot::*;
use clap::Parser;
use frostbyte_gitops::compose;
use frostbyte_gitops::sync::{Ctx, Run};
use output::*;
use status_cmds::*;
use std::process::ExitCode;
use sync_cmds::*;
use tenant_cmds::*;

mod admin_cmds;
pub(crate) mod args;
mod boot;
mod output;
mod status_cmds;
mod sync_cmds;
mod tenant_cmds;

/// Exit codes, as Terraform's -detailed-exitcode: scripts depend on them.
pub(crate) const EXIT_OK: u8 = 0;
pub(crate) const EXIT_ERROR: u8 = 1;
pub(crate) const EXIT_CHANGES: u8 = 2;

pub fn main() -> ExitCode {
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

pub(crate) fn real_main(cli: Cli) -> Result<u8> {
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
            let db = compose::connect(&ctx.cfg).await?;
            frostbyte_gitops::agent::run(std::sync::Arc::new(ctx), db).await?;
            Ok(EXIT_OK)
        });
    }
    rt.block_on(dispatch(&ctx, cli.cmd, cli.global.source.as_deref()))
}

pub(crate) async fn dispatch(ctx: &Ctx, cmd: Cmd, only: Option<&str>) -> Result<u8> {
    match cmd {
        Cmd::Tenant {
            cmd: TenantCmd::Move { tenant_id, to },
        } => tenant_move(ctx, &tenant_id, &to).await,
        Cmd::Tenant {
            cmd: TenantCmd::State { tenant_id, state, reason },
        } => tenant_state(ctx, &tenant_id, &state, reason).await,
        Cmd::Tenant {
            cmd: TenantCmd::History { tenant_id, format },
        } => tenant_history(ctx, &tenant_id, format).await,
        Cmd::Tenant {
            cmd: TenantCmd::Show { tenant_id, version, format },
        } => tenant_show(ctx, &tenant_id, version, format.into()).await,
        Cmd::Tenant {
            cmd: TenantCmd::Restore { tenant_id, version, out },
        } => tenant_restore(ctx, only, &tenant_id, version, out.as_deref()).await,
        Cmd::Config | Cmd::Db { .. } | Cmd::Secrets { .. } | Cmd::Tenant { .. } | Cmd::Run => unreachable!("handled before dispatch"),
        Cmd::Migrate { app_role } => migrate(ctx, app_role).await,
        Cmd::Audit {
            cmd: AuditCmd::Verify { format, anchor },
        } => audit_verify(ctx, format.into(), anchor.as_deref()).await,
        Cmd::Validate { format, no_decrypt } => validate(ctx, only, format, no_decrypt).await,
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
        } => apply(ctx, only, plan_file, allow_non_fast_forward, format.into(), prune).await,
        Cmd::Sync {
            allow_non_fast_forward,
            format,
            full,
            prune,
        } => apply_and_report(ctx, only, || Run::Apply { allow_non_fast_forward }, format.into(), full, prune).await,
        Cmd::Drift { format, fail_on, full } => drift(ctx, only, format, &fail_on, full).await,
        Cmd::Status { format } => status(ctx, only, format).await,
    }
}
