-- The tenant registry: one row per tenant, written by the GitOps agent.

CREATE TABLE tenants (
    tenant_id               text        PRIMARY KEY
                                        CONSTRAINT tenants_tenant_id_dns_label
                                        CHECK (tenant_id ~ '^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$'),
    state                   text        NOT NULL DEFAULT 'pending'
                                        CONSTRAINT tenants_state_lifecycle
                                        CHECK (state IN ('pending', 'provisioning', 'active', 'suspended',
                                                         'decommissioning', 'decommissioned')),
    config                  jsonb       NOT NULL DEFAULT '{}'::jsonb
                                        CONSTRAINT tenants_config_object CHECK (jsonb_typeof(config) = 'object'),
    config_version          bigint      NOT NULL DEFAULT 0
                                        CONSTRAINT tenants_config_version_nonnegative CHECK (config_version >= 0),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    provisioning_started_at timestamptz,
    provisioned_at          timestamptz,
    age_public_key          text        NOT NULL
                                        CONSTRAINT tenants_age_public_key_x25519
                                        CHECK (age_public_key ~ '^age1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{58}$'),
    endpoints               jsonb       NOT NULL DEFAULT '{}'::jsonb
                                        CONSTRAINT tenants_endpoints_object CHECK (jsonb_typeof(endpoints) = 'object')
);

CREATE INDEX tenants_state_idx ON tenants (state);
CREATE INDEX tenants_created_at_idx ON tenants (created_at);

-- updated_at moves only when the row really changes, so a no-op UPDATE leaves no trace. It is the
-- time of the change itself (clock_timestamp), not of its transaction's start: the agent compares
-- it with when it last wrote the row to find rows changed since.
CREATE FUNCTION tenants_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tenants_touch_updated_at
    BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenants_touch_updated_at();
