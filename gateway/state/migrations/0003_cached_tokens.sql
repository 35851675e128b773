-- Input tokens the worker's prefix cache served (usage.prompt_tokens_details.cached_tokens), a
-- class of their own: prompt_tokens holds the uncached input only, so the two never overlap.
ALTER TABLE usage ADD COLUMN cached_tokens integer NOT NULL DEFAULT 0;
