-- A run's index reads a few small columns of every row of its source. With those columns in the
-- primary keys' indexes it is an index-only scan, instead of a walk over heaps that hold whole
-- documents (at 100,000 tenants: 112 MB of gitops_applied and 78 MB of tenants, for 20 MB of
-- columns). Nothing references either key, so each is rebuilt in place.
ALTER TABLE tenants DROP CONSTRAINT tenants_pkey,
    ADD CONSTRAINT tenants_pkey PRIMARY KEY (tenant_id) INCLUDE (config_version, updated_at);
ALTER TABLE gitops_applied DROP CONSTRAINT gitops_applied_pkey,
    ADD CONSTRAINT gitops_applied_pkey PRIMARY KEY (tenant_id)
        INCLUDE (source, commit_id, file_path, config_version, document_digest, applied_at);
