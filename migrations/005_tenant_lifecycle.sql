-- The tenant lifecycle. Git owns a tenant's config; the provisioner (another service) owns its
-- state, and changes it only through transition_tenant_state(), as events go only through
-- emit_audit_event(). Legal transitions:
--
--   pending -> provisioning -> active <-> suspended
--   any state but decommissioned -> decommissioning -> decommissioned
--
-- Everything else, including a transition to the state a tenant is already in, is refused.

ALTER TABLE audit_events DROP CONSTRAINT audit_events_event_type_known;
ALTER TABLE audit_events ADD CONSTRAINT audit_events_event_type_known
    CHECK (event_type IN ('TENANT_CREATED', 'TENANT_PROVISION_STARTED', 'TENANT_PROVISIONED', 'TENANT_CONFIG_UPDATED',
                          'TENANT_SUSPENDED', 'TENANT_RESUMED', 'TENANT_DECOMMISSION_REQUESTED', 'TENANT_DECOMMISSIONED'));

CREATE FUNCTION transition_tenant_state(p_tenant_id text, p_to_state text, p_actor text, p_details jsonb)
RETURNS uuid LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    v_from text;
    v_event text;
BEGIN
    -- The row lock serialises concurrent transitions of one tenant: the second sees the first's result.
    SELECT state INTO v_from FROM public.tenants WHERE tenant_id = p_tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', p_tenant_id USING ERRCODE = 'no_data_found';
    END IF;
    v_event := CASE
        WHEN v_from = 'pending' AND p_to_state = 'provisioning' THEN 'TENANT_PROVISION_STARTED'
        WHEN v_from = 'provisioning' AND p_to_state = 'active' THEN 'TENANT_PROVISIONED'
        WHEN v_from = 'active' AND p_to_state = 'suspended' THEN 'TENANT_SUSPENDED'
        WHEN v_from = 'suspended' AND p_to_state = 'active' THEN 'TENANT_RESUMED'
        WHEN v_from NOT IN ('decommissioning', 'decommissioned') AND p_to_state = 'decommissioning' THEN 'TENANT_DECOMMISSION_REQUESTED'
        WHEN v_from = 'decommissioning' AND p_to_state = 'decommissioned' THEN 'TENANT_DECOMMISSIONED'
    END;
    IF v_event IS NULL THEN
        RAISE EXCEPTION 'tenant %: the transition from % to % is not allowed', p_tenant_id, v_from, p_to_state
            USING ERRCODE = 'check_violation',
                  HINT = 'legal: pending -> provisioning -> active <-> suspended; any -> decommissioning -> decommissioned';
    END IF;
    UPDATE public.tenants
       SET state = p_to_state,
           provisioning_started_at = CASE WHEN p_to_state = 'provisioning' THEN now() ELSE provisioning_started_at END,
           provisioned_at = CASE WHEN v_event = 'TENANT_PROVISIONED' THEN now() ELSE provisioned_at END
     WHERE tenant_id = p_tenant_id;
    RETURN public.emit_audit_event(p_tenant_id, v_event, p_actor,
                                   coalesce(p_details, '{}'::jsonb) || jsonb_build_object('from_state', v_from, 'to_state', p_to_state));
END;
$$;
REVOKE ALL ON FUNCTION transition_tenant_state(text, text, text, jsonb) FROM PUBLIC;
