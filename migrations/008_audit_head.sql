-- The chain head follows a batch of events once, not once per event.
--
-- audit_chain_head_follow was a deferred trigger queued for every event: at commit, one PL/pgSQL
-- call per event (20,000 after a cold sync of 10,000 tenants, most of its commit). Now
-- emit_audit_events moves the head itself, once per call, and the trigger is queued only for
-- events written otherwise: emit_audit_event writes one event per call, and moving the head for
-- each would grow a chain of row versions that every later event of the transaction has to walk
-- (10,000 in one transaction: 1.5 s, against 30 ms for 1,000). Each function sets
-- frostbyte.audit_batch for its own duration, so what a caller set it to changes nothing.
DROP TRIGGER audit_chain_head_follow ON audit_events;
CREATE CONSTRAINT TRIGGER audit_chain_head_follow
    AFTER INSERT ON audit_events DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (current_setting('frostbyte.audit_batch', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION audit_chain_head_follow();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_chain_head_follow;

ALTER FUNCTION emit_audit_event(text, text, text, jsonb) SET frostbyte.audit_batch = 'off';

-- As in 007, with the head moved at the end, and a config event's stored predecessor found by one
-- backward index probe per config event with no predecessor in the call, instead of a
-- scan of every listed tenant's config events.
CREATE OR REPLACE FUNCTION emit_audit_events(p_tenant_ids text[], p_event_types text[], p_actors text[], p_details jsonb[])
RETURNS SETOF uuid LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public SET frostbyte.audit_batch = 'on' AS $$
DECLARE
    n int := coalesce(cardinality(p_tenant_ids), 0);
    v_seq_name text := pg_get_serial_sequence('public.audit_events', 'event_seq');
    v_first bigint;
    v_at timestamptz := now();
    v_at_text text := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    v_hash bytea;
    v_ids uuid[];
    v_prevs uuid[];
    v_prev_hashes bytea[] := '{}';
    v_hashes bytea[] := '{}';
    v_details jsonb[] := '{}';
    f text[];
    c text;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    IF cardinality(p_event_types) <> n OR cardinality(p_actors) <> n OR cardinality(p_details) <> n THEN
        RAISE EXCEPTION 'emit_audit_events: the four arrays must have the same length';
    END IF;
    PERFORM 1 FROM public.audit_chain_head FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_chain_head is missing: the audit trail was tampered with';
    END IF;
    SELECT chain_hash INTO v_hash FROM public.audit_events ORDER BY event_seq DESC LIMIT 1;
    v_hash := coalesce(v_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    v_first := nextval(v_seq_name);
    IF n > 1 THEN
        PERFORM setval(v_seq_name, v_first + n - 1);
    END IF;
    v_ids := ARRAY(SELECT gen_random_uuid() FROM generate_series(1, n));
    -- A config event's predecessor: the tenant's previous config event in this call, else its
    -- newest one in the table.
    -- A config event's predecessor: the tenant's previous config event in this call, else its
    -- newest one in the table (one backward index probe, only for events that need it).
    WITH u AS (
        SELECT * FROM unnest(p_tenant_ids, p_event_types, v_ids) WITH ORDINALITY AS u(tenant_id, event_type, id, i)
    ), in_call AS (
        SELECT i, lag(id) OVER (PARTITION BY tenant_id ORDER BY i) AS prev FROM u WHERE event_type = 'TENANT_CONFIG_UPDATED'
    )
    SELECT array_agg(CASE WHEN u.event_type = 'TENANT_CONFIG_UPDATED' THEN coalesce(c.prev, s.event_id) END ORDER BY u.i)
      INTO v_prevs
      FROM u LEFT JOIN in_call c USING (i)
      LEFT JOIN LATERAL (
          SELECT e.event_id FROM public.audit_events e
           WHERE u.event_type = 'TENANT_CONFIG_UPDATED' AND c.prev IS NULL
             AND e.tenant_id = u.tenant_id AND e.event_type = 'TENANT_CONFIG_UPDATED'
           ORDER BY e.event_seq DESC LIMIT 1) s ON true;
    FOR i IN 1..n LOOP
        v_details := v_details || coalesce(p_details[i], '{}'::jsonb);
        -- audit_event_content(), inlined: the same length-prefixed fields in the same order.
        f := ARRAY[v_ids[i]::text, (v_first + i - 1)::text, p_tenant_ids[i], p_event_types[i], v_at_text, p_actors[i],
                   v_details[i]::text, coalesce(v_prevs[i]::text, '')];
        c := octet_length(f[1])::text || ':' || f[1] || '|' || octet_length(f[2])::text || ':' || f[2] || '|'
          || octet_length(f[3])::text || ':' || f[3] || '|' || octet_length(f[4])::text || ':' || f[4] || '|'
          || octet_length(f[5])::text || ':' || f[5] || '|' || octet_length(f[6])::text || ':' || f[6] || '|'
          || octet_length(f[7])::text || ':' || f[7] || '|' || octet_length(f[8])::text || ':' || f[8];
        v_prev_hashes := v_prev_hashes || v_hash;
        v_hash := sha256(v_hash || convert_to(c, 'UTF8'));
        v_hashes := v_hashes || v_hash;
    END LOOP;
    INSERT INTO public.audit_events (event_id, event_seq, tenant_id, event_type, occurred_at, actor, details,
                                     previous_event_id, prev_hash, chain_hash)
    OVERRIDING SYSTEM VALUE
    SELECT u.id, v_first + u.i - 1, u.tenant_id, u.event_type, v_at, u.actor, u.details, u.prev, u.prev_hash, u.hash
      FROM unnest(v_ids, p_tenant_ids, p_event_types, p_actors, v_details, v_prevs, v_prev_hashes, v_hashes)
           WITH ORDINALITY AS u(id, tenant_id, event_type, actor, details, prev, prev_hash, hash, i);
    -- The deferred trigger is not queued for these events: the head moves here, once per call.
    UPDATE public.audit_chain_head SET last_seq = v_first + n - 1, last_hash = v_hash;
    RETURN QUERY SELECT unnest(v_ids);
END;
$$;
