-- Money that adds up (issue 22): each request's price (at its tier's prices when served) and cost
-- beside it, in integer micro-dollars; API keys scoped to a set of models and a monthly spend.
ALTER TABLE usage ADD COLUMN price_micro_usd bigint NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cost_micro_usd bigint NOT NULL DEFAULT 0;
CREATE INDEX usage_key_time ON usage (key_id, created_at);
ALTER TABLE api_keys ADD COLUMN models text;                      -- comma-separated model ids; NULL: the tier's
ALTER TABLE api_keys ADD COLUMN monthly_spend_micro_usd bigint;   -- NULL: no spend limit
