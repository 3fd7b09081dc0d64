-- What the agent remembers between runs.

-- The last commit applied from each source (repository + path).
CREATE TABLE gitops_sources (
    source              text        PRIMARY KEY,
    last_applied_commit text        NOT NULL,
    commit_time         timestamptz,
    applied_at          timestamptz NOT NULL DEFAULT now()
);

-- What the agent last wrote to each tenant, so that a hand edit (drift) can be told from a change
-- that is merged but not yet applied. Secrets are stored only as keyed digests. No foreign key:
-- the record outlives a row deleted by hand, which is how such a deletion is recognised.
CREATE TABLE gitops_applied (
    tenant_id       text        PRIMARY KEY,
    source          text        NOT NULL,
    commit_id       text        NOT NULL,
    file_path       text        NOT NULL,
    config_version  bigint      NOT NULL,
    document_digest text        NOT NULL,
    sealed_document jsonb       NOT NULL,
    secret_paths    text[]      NOT NULL DEFAULT '{}',
    applied_at      timestamptz NOT NULL DEFAULT now()
);

-- Key for the digests above; made once per database by the agent.
CREATE TABLE gitops_settings (
    singleton  boolean PRIMARY KEY DEFAULT true CONSTRAINT gitops_settings_one_row CHECK (singleton),
    digest_key bytea   NOT NULL CONSTRAINT gitops_settings_key_length CHECK (length(digest_key) = 32)
);
