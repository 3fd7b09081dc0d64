-- Append-only audit log. Rows are written only through emit_audit_event().

CREATE TABLE audit_events (
    event_id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Orders events written in one transaction (they share occurred_at).
    event_seq         bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant_id         text        NOT NULL,
    event_type        text        NOT NULL
                                  CONSTRAINT audit_events_event_type_known
                                  CHECK (event_type IN ('TENANT_CREATED', 'TENANT_PROVISION_STARTED',
                                                        'TENANT_PROVISIONED', 'TENANT_CONFIG_UPDATED')),
    occurred_at       timestamptz NOT NULL DEFAULT now(),
    actor             text        NOT NULL,
    details           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- For TENANT_CONFIG_UPDATED: the tenant's previous config event, so the versions form a chain.
    -- Null for lifecycle events and for a tenant's first config event.
    previous_event_id uuid        REFERENCES audit_events (event_id)
);

CREATE INDEX audit_events_tenant_time_idx ON audit_events (tenant_id, occurred_at, event_seq);
CREATE INDEX audit_events_type_time_idx ON audit_events (event_type, occurred_at, event_seq);
-- emit_audit_event's lookup of a tenant's previous config event.
CREATE INDEX audit_events_chain_idx ON audit_events (tenant_id, event_type, event_seq);

CREATE FUNCTION audit_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();

-- The one way to write an event; other services may call it too. Runs in the caller's transaction.
CREATE FUNCTION emit_audit_event(p_tenant_id text, p_event_type text, p_actor text, p_details jsonb)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_previous uuid;
    v_id uuid;
BEGIN
    IF p_event_type = 'TENANT_CONFIG_UPDATED' THEN
        SELECT event_id INTO v_previous
          FROM audit_events
         WHERE tenant_id = p_tenant_id AND event_type = 'TENANT_CONFIG_UPDATED'
         ORDER BY event_seq DESC
         LIMIT 1;
    END IF;
    INSERT INTO audit_events (tenant_id, event_type, actor, details, previous_event_id)
    VALUES (p_tenant_id, p_event_type, p_actor, coalesce(p_details, '{}'::jsonb), v_previous)
    RETURNING event_id INTO v_id;
    RETURN v_id;
END;
$$;
