-- What each sync did, kept in the database so that every replica, a restart and the `status`
-- command see the same history. Written after the run, in a transaction of its own: a run that
-- fails rolls its changes back but its record stays.
CREATE TABLE gitops_runs (
    run_id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The source's configured name (its id can be respelled; its name is what people use).
    source_name    text        NOT NULL,
    -- The repository without credentials, '#', the tenant path, where the run got that far.
    source         text,
    started_at     timestamptz NOT NULL,
    duration_ms    bigint      NOT NULL CHECK (duration_ms >= 0),
    trigger        text        NOT NULL CHECK (trigger IN ('command', 'interval', 'retry', 'watch', 'webhook')),
    -- What the run read, and what the database equals once it ended (null when it failed).
    commit_fetched text,
    commit_applied text,
    outcome        text        NOT NULL CHECK (outcome IN ('applied', 'in_sync', 'failed', 'refused')),
    -- The first line of the error, for failed and refused runs.
    error          text,
    -- The commit's signature check, in words (null when verification is off).
    signature      text,
    created        integer     NOT NULL DEFAULT 0,
    updated        integer     NOT NULL DEFAULT 0,
    decommissioned integer     NOT NULL DEFAULT 0,
    conflicts      integer     NOT NULL DEFAULT 0,
    -- Drift counts per class after the run, when it reported drift.
    drift          jsonb,
    replica        text        NOT NULL
);
CREATE INDEX gitops_runs_source_idx ON gitops_runs (source_name, run_id DESC);
CREATE INDEX gitops_runs_started_idx ON gitops_runs (started_at);

-- The result of each `audit verify`, so that `status` can say when the trail was last checked.
CREATE TABLE gitops_audit_checks (
    checked_at timestamptz NOT NULL DEFAULT now() PRIMARY KEY,
    events     bigint      NOT NULL,
    head_seq   bigint      NOT NULL,
    head_hash  text        NOT NULL,
    intact     boolean     NOT NULL,
    problem    text
);

-- Each drifted tenant as the newest drift report of its source found it (the agent reports
-- drift after every run): its classes and the report's redacted detail, for the status page.
-- A tenant missing here was in sync at that report.
CREATE TABLE gitops_tenant_drift (
    tenant_id   text        PRIMARY KEY,
    source_name text        NOT NULL,
    classes     text[]      NOT NULL,
    detail      jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gitops_tenant_drift_source_idx ON gitops_tenant_drift (source_name);
