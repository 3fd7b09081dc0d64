//! The application role: what the agent may do in the database, and nothing more.

use super::{StoreError, q};
use tokio_postgres::GenericClient;

/// Grants `role` what the agent needs and nothing more: it reads and writes `tenants` and the
/// agent's own tables, reads the audit trail, and writes events only through `emit_audit_event`.
/// Refused when the role does not exist, is the one migrating, can bypass privileges, or owns
/// anything here (an owner can disable triggers and rewrite history).
pub async fn grant_app_role(client: &impl GenericClient, role: &str) -> Result<(), StoreError> {
    let row = client
        .query_opt(
            "SELECT r.rolsuper OR r.rolbypassrls, r.rolname = current_user,
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relowner = r.oid AND n.nspname NOT IN ('pg_catalog', 'information_schema'))
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE p.proowner = r.oid AND n.nspname NOT IN ('pg_catalog', 'information_schema'))
               FROM pg_roles r WHERE r.rolname = $1",
            &[&role],
        )
        .await
        .map_err(q("looking up the app role"))?;
    let refuse = |why: String| Err(StoreError::AppRole { role: role.to_string(), why });
    let Some(row) = row else {
        return refuse("no such role (create it first, e.g. CREATE ROLE ... LOGIN PASSWORD ...)".into());
    };
    let (privileged, is_migrator, owned): (bool, bool, i64) = (row.get(0), row.get(1), row.get(2));
    if is_migrator {
        return refuse("it is the role running the migrations, which owns the tables; the agent needs a role of its own".into());
    }
    if privileged {
        return refuse("it is a superuser or bypasses row security".into());
    }
    if owned > 0 {
        return refuse(format!("it owns {owned} table(s), view(s) or function(s) in this database"));
    }
    let r = quote_ident(role);
    let sql = format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {r};
         REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {r};
         GRANT USAGE ON SCHEMA public TO {r};
         GRANT SELECT, INSERT, UPDATE ON tenants TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE ON gitops_sources, gitops_applied, gitops_owners TO {r};
         GRANT SELECT, INSERT ON gitops_settings TO {r};
         GRANT SELECT, INSERT, DELETE ON gitops_runs, gitops_audit_checks, gitops_tenant_drift TO {r};
         GRANT SELECT ON schema_migrations, audit_events, audit_chain_head TO {r};
         GRANT EXECUTE ON FUNCTION emit_audit_event(text, text, text, jsonb) TO {r};
         GRANT EXECUTE ON FUNCTION emit_audit_events(text[], text[], text[], jsonb[]) TO {r};
         GRANT EXECUTE ON FUNCTION transition_tenant_state(text, text, text, jsonb) TO {r};"
    );
    client.batch_execute(&sql).await.map_err(q(format!("granting role {role}")))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
