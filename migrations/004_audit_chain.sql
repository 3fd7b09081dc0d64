-- Tamper evidence for audit_events. Each event carries chain_hash = sha256(prev_hash || content),
-- where prev_hash is the previous event's chain_hash (32 zero bytes before the first) and content
-- is audit_event_content() of its own columns. `frostbyte-gitops audit verify` recomputes the
-- chain outside the database, so an event edited, deleted, inserted or reordered by anyone who
-- did not also rewrite every later hash (and the head) is found; `--anchor` catches a full rewrite.

ALTER TABLE audit_events ADD COLUMN prev_hash bytea, ADD COLUMN chain_hash bytea;

-- The newest committed event's seq and hash, so that deleting the newest events shows. Its row
-- lock serialises writers of events until their transaction ends, so event_seq order, chain order
-- and commit order agree. It is written once per transaction, at commit (audit_chain_head_follow):
-- a row updated once per event would grow a chain of row versions that every later event of the
-- same transaction has to walk.
CREATE TABLE audit_chain_head (
    singleton boolean PRIMARY KEY DEFAULT true CONSTRAINT audit_chain_head_one_row CHECK (singleton),
    last_seq  bigint  NOT NULL,
    last_hash bytea   NOT NULL CONSTRAINT audit_chain_head_hash_length CHECK (length(last_hash) = 32)
);

-- Length-prefixed fields, so that no two different events share a content string. The verifier
-- builds the same string from the same columns.
CREATE FUNCTION audit_event_content(p_event_id uuid, p_seq bigint, p_tenant_id text, p_event_type text,
                                    p_occurred_at timestamptz, p_actor text, p_details jsonb, p_previous uuid)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT string_agg(octet_length(f)::text || ':' || f, '|' ORDER BY n)
      FROM unnest(ARRAY[
               p_event_id::text,
               p_seq::text,
               p_tenant_id,
               p_event_type,
               to_char(p_occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               p_actor,
               p_details::text,
               coalesce(p_previous::text, '')
           ]) WITH ORDINALITY AS u(f, n)
$$;

-- Existing events join the chain in event_seq order.
ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete;
DO $$
DECLARE
    r audit_events;
    h bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
    last bigint := 0;
BEGIN
    FOR r IN SELECT * FROM audit_events ORDER BY event_seq LOOP
        UPDATE audit_events SET prev_hash = h,
               chain_hash = sha256(h || convert_to(audit_event_content(r.event_id, r.event_seq, r.tenant_id, r.event_type,
                                                                      r.occurred_at, r.actor, r.details, r.previous_event_id), 'UTF8'))
         WHERE event_id = r.event_id
        RETURNING chain_hash INTO h;
        last := r.event_seq;
    END LOOP;
    INSERT INTO audit_chain_head (last_seq, last_hash) VALUES (last, h);
END;
$$;
ALTER TABLE audit_events ALTER COLUMN prev_hash SET NOT NULL, ALTER COLUMN chain_hash SET NOT NULL;

-- The refusals fire whatever session_replication_role says (a replica-mode session skips ordinary
-- triggers); only the table's owner can disable them, and the app role owns nothing.
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_update_delete;
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;
CREATE TRIGGER audit_chain_head_no_delete
    BEFORE DELETE OR TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_chain_head ENABLE ALWAYS TRIGGER audit_chain_head_no_delete;

CREATE FUNCTION audit_chain_head_follow() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    -- Deferred to commit, once per event; only the transaction's newest event moves the head.
    IF NEW.event_seq = (SELECT max(event_seq) FROM public.audit_events) THEN
        UPDATE public.audit_chain_head SET last_seq = NEW.event_seq, last_hash = NEW.chain_hash;
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER audit_chain_head_follow
    AFTER INSERT ON audit_events DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION audit_chain_head_follow();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_chain_head_follow;

-- Still the one way to write an event. SECURITY DEFINER with a fixed search_path: it runs with
-- its owner's rights, so the app role needs EXECUTE on it and no right on audit_events at all.
CREATE OR REPLACE FUNCTION emit_audit_event(p_tenant_id text, p_event_type text, p_actor text, p_details jsonb)
RETURNS uuid LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    v_previous uuid;
    v_prev_hash bytea;
    v_id uuid := gen_random_uuid();
    v_seq bigint;
    v_at timestamptz := now();
    v_details jsonb := coalesce(p_details, '{}'::jsonb);
    v_hash bytea;
BEGIN
    PERFORM 1 FROM public.audit_chain_head FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_chain_head is missing: the audit trail was tampered with';
    END IF;
    -- After the lock: the newest event, committed by whoever held it before, or ours.
    SELECT chain_hash INTO v_prev_hash FROM public.audit_events ORDER BY event_seq DESC LIMIT 1;
    v_prev_hash := coalesce(v_prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    IF p_event_type = 'TENANT_CONFIG_UPDATED' THEN
        SELECT event_id INTO v_previous
          FROM public.audit_events
         WHERE tenant_id = p_tenant_id AND event_type = 'TENANT_CONFIG_UPDATED'
         ORDER BY event_seq DESC
         LIMIT 1;
    END IF;
    v_seq := nextval(pg_get_serial_sequence('public.audit_events', 'event_seq'));
    v_hash := sha256(v_prev_hash || convert_to(public.audit_event_content(v_id, v_seq, p_tenant_id, p_event_type, v_at,
                                                                        p_actor, v_details, v_previous), 'UTF8'));
    INSERT INTO public.audit_events (event_id, event_seq, tenant_id, event_type, occurred_at, actor, details,
                                     previous_event_id, prev_hash, chain_hash)
    OVERRIDING SYSTEM VALUE
    VALUES (v_id, v_seq, p_tenant_id, p_event_type, v_at, p_actor, v_details, v_previous, v_prev_hash, v_hash);
    RETURN v_id;
END;
$$;
REVOKE ALL ON FUNCTION emit_audit_event(text, text, text, jsonb) FROM PUBLIC;
