-- The usage ledger shared by every gateway replica. One row per request; rows arrive from each
-- replica's local spool (SQLite) in id order, keyed by (instance_id, local_id), so shipping the
-- same row twice is a no-op and none is counted twice.
CREATE TABLE usage (
    instance_id       text             NOT NULL,   -- the replica's spool (kept inside its ledger.db)
    local_id          bigint           NOT NULL,   -- the row's id in that spool
    request_id        text             NOT NULL,   -- the client's x-request-id (may repeat) or ours
    tenant            text             NOT NULL,
    key_id            text             NOT NULL,
    tier              text             NOT NULL,
    route             text             NOT NULL,
    requested_model   text             NOT NULL,
    served_model      text,
    pool              text,
    provider          text,
    region            text,
    stream            boolean          NOT NULL,
    prompt_tokens     integer          NOT NULL,
    completion_tokens integer          NOT NULL,
    status            integer          NOT NULL,
    error             text,
    ttft_ms           double precision,
    ttlt_ms           double precision,
    retries           integer          NOT NULL,
    fallback          boolean          NOT NULL,
    created_at        double precision NOT NULL,   -- unix time at the gateway
    shipped_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, local_id)
);
CREATE INDEX usage_tenant_time ON usage (tenant, created_at);
CREATE INDEX usage_time ON usage (created_at);
CREATE INDEX usage_request ON usage (request_id);
