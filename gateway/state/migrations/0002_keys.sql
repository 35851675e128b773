-- Tenants and API keys, shared by every replica. Only a key's SHA-256 is stored.
-- Every change bumps state_versions('keys'); replicas poll that one row every second and reload
-- their in-memory key map when it moved, so a created or revoked key holds everywhere within ~1 s.
CREATE TABLE tenants (
    name            text             PRIMARY KEY,
    tier            text             NOT NULL,
    created_at      double precision NOT NULL,
    debug_log_until double precision
);
CREATE TABLE api_keys (
    id          text             PRIMARY KEY,
    tenant      text             NOT NULL REFERENCES tenants (name),
    hash        text             NOT NULL UNIQUE,
    prefix      text             NOT NULL,
    created_at  double precision NOT NULL,
    revoked_at  double precision
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);
CREATE TABLE state_versions (
    name    text   PRIMARY KEY,
    version bigint NOT NULL
);
INSERT INTO state_versions (name, version) VALUES ('keys', 1);

CREATE FUNCTION infermesh_bump_keys_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE state_versions SET version = version + 1 WHERE name = 'keys';
    RETURN NULL;
END
$$;
CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION infermesh_bump_keys_version();
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION infermesh_bump_keys_version();
