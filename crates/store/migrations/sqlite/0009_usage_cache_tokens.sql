-- Of a row's prompt tokens, those the provider read from its prompt cache
-- and those it wrote to it, which are priced apart (Anthropic bills reads at
-- a tenth of the input price and writes at 1.25×): with them a row's cost
-- can be checked or recomputed after a price change. NULL when the provider
-- reported no usage, as prompt_tokens is; rows written before this
-- migration have NULL too (unknown, not zero).
ALTER TABLE usage_logs ADD COLUMN cached_tokens INTEGER;
ALTER TABLE usage_logs ADD COLUMN cache_write_tokens INTEGER;
