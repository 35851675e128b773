-- Per-minute rollups of the usage ledger (gateway/sla.py): one row per (minute, tenant, tier, model,
-- region), additive counts written by every replica from its own spool (upsert adds), with each
-- replica's high-water mark in rollup_marks, updated in the same transaction: every ledger row is
-- counted exactly once. usage_hour holds the same sums per hour (reports read a month from it);
-- usage_minute is read only where a minute was bad (the partial index); minute_seen names the
-- minutes with any data; probe_minute: the synthetic probes' outcomes per minute, model and region.
CREATE TABLE usage_minute (
    minute bigint NOT NULL,
    tenant text NOT NULL,
    tier text NOT NULL,
    model text NOT NULL,
    region text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    ok bigint NOT NULL DEFAULT 0,
    service_errors bigint NOT NULL DEFAULT 0,
    client_errors bigint NOT NULL DEFAULT 0,
    gone bigint NOT NULL DEFAULT 0,
    streams bigint NOT NULL DEFAULT 0,
    ttft_over_bound bigint NOT NULL DEFAULT 0,
    ttft_over_slo bigint NOT NULL DEFAULT 0,
    ttlt_samples bigint NOT NULL DEFAULT 0,
    ttlt_over_slo bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    cached_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    ttft_le_100 bigint NOT NULL DEFAULT 0,
    ttft_le_250 bigint NOT NULL DEFAULT 0,
    ttft_le_500 bigint NOT NULL DEFAULT 0,
    ttft_le_1000 bigint NOT NULL DEFAULT 0,
    ttft_le_1500 bigint NOT NULL DEFAULT 0,
    ttft_le_2000 bigint NOT NULL DEFAULT 0,
    ttft_le_3000 bigint NOT NULL DEFAULT 0,
    ttft_le_5000 bigint NOT NULL DEFAULT 0,
    ttft_le_10000 bigint NOT NULL DEFAULT 0,
    ttlt_le_1000 bigint NOT NULL DEFAULT 0,
    ttlt_le_2000 bigint NOT NULL DEFAULT 0,
    ttlt_le_4000 bigint NOT NULL DEFAULT 0,
    ttlt_le_8000 bigint NOT NULL DEFAULT 0,
    ttlt_le_15000 bigint NOT NULL DEFAULT 0,
    ttlt_le_30000 bigint NOT NULL DEFAULT 0,
    ttlt_le_60000 bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, tenant, tier, model, region)
);
CREATE INDEX usage_minute_bad ON usage_minute (minute) WHERE (service_errors > 0 OR ttft_over_bound > 0);
CREATE TABLE usage_hour (
    hour bigint NOT NULL,
    tenant text NOT NULL,
    tier text NOT NULL,
    model text NOT NULL,
    region text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    ok bigint NOT NULL DEFAULT 0,
    service_errors bigint NOT NULL DEFAULT 0,
    client_errors bigint NOT NULL DEFAULT 0,
    gone bigint NOT NULL DEFAULT 0,
    streams bigint NOT NULL DEFAULT 0,
    ttft_over_bound bigint NOT NULL DEFAULT 0,
    ttft_over_slo bigint NOT NULL DEFAULT 0,
    ttlt_samples bigint NOT NULL DEFAULT 0,
    ttlt_over_slo bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    cached_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    ttft_le_100 bigint NOT NULL DEFAULT 0,
    ttft_le_250 bigint NOT NULL DEFAULT 0,
    ttft_le_500 bigint NOT NULL DEFAULT 0,
    ttft_le_1000 bigint NOT NULL DEFAULT 0,
    ttft_le_1500 bigint NOT NULL DEFAULT 0,
    ttft_le_2000 bigint NOT NULL DEFAULT 0,
    ttft_le_3000 bigint NOT NULL DEFAULT 0,
    ttft_le_5000 bigint NOT NULL DEFAULT 0,
    ttft_le_10000 bigint NOT NULL DEFAULT 0,
    ttlt_le_1000 bigint NOT NULL DEFAULT 0,
    ttlt_le_2000 bigint NOT NULL DEFAULT 0,
    ttlt_le_4000 bigint NOT NULL DEFAULT 0,
    ttlt_le_8000 bigint NOT NULL DEFAULT 0,
    ttlt_le_15000 bigint NOT NULL DEFAULT 0,
    ttlt_le_30000 bigint NOT NULL DEFAULT 0,
    ttlt_le_60000 bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, tenant, tier, model, region)
);
CREATE TABLE minute_seen (
    minute bigint PRIMARY KEY
);
CREATE TABLE probe_minute (
    minute bigint NOT NULL,
    model text NOT NULL,
    region text NOT NULL,
    probes bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, model, region)
);
CREATE TABLE rollup_marks (
    instance_id text PRIMARY KEY,
    upto bigint NOT NULL
);
