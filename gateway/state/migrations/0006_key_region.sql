-- A key's region (issue 17): where its requests are served when they name none in an
-- x-infermesh-region header; NULL: the region of the gateway that took them.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS region text;
