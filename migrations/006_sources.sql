-- Many sources: which source owns each tenant, and the replicas that share the sources.

-- A tenant belongs to the source that created it (source identity: repository without
-- credentials, '#', tenant path). A file in another source claiming it is refused; moving it is
-- `tenant move`, with a TENANT_SOURCE_CHANGED event. No foreign key, as for gitops_applied: the
-- claim outlives a row deleted by hand.
CREATE TABLE gitops_owners (
    tenant_id  text        PRIMARY KEY,
    source     text        NOT NULL,
    -- The source's configured name when it claimed the tenant: for messages only.
    source_name text,
    file_path  text        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gitops_owners_source_idx ON gitops_owners (source);

-- Until now one source wrote everything: what it applied, it owns.
INSERT INTO gitops_owners (tenant_id, source, file_path, claimed_at)
SELECT tenant_id, source, file_path, applied_at FROM gitops_applied;

ALTER TABLE audit_events DROP CONSTRAINT audit_events_event_type_known;
ALTER TABLE audit_events ADD CONSTRAINT audit_events_event_type_known
    CHECK (event_type IN ('TENANT_CREATED', 'TENANT_PROVISION_STARTED', 'TENANT_PROVISIONED', 'TENANT_CONFIG_UPDATED',
                          'TENANT_SUSPENDED', 'TENANT_RESUMED', 'TENANT_DECOMMISSION_REQUESTED', 'TENANT_DECOMMISSIONED',
                          'TENANT_SOURCE_CHANGED'));
