-- The connections the broker holds: one row a QuickBooks company (realm).
-- Token values are AES-256-GCM ciphertexts (broker/crypto.py); the key that
-- sealed them is named in encryption_key_id.
CREATE TABLE quickbooks_connections (
    realm_id                 text        PRIMARY KEY
                             CHECK (realm_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    user_id                  text        NOT NULL
                             CHECK (char_length(user_id) BETWEEN 1 AND 255),
    status                   text        NOT NULL DEFAULT 'active'
                             CHECK (status IN ('active', 'reauthorization_required', 'revoked')),
    access_token             bytea,
    access_token_expires_at  timestamptz,
    refresh_token            bytea,
    encryption_key_id        text,
    refresh_token_created_at timestamptz,
    refresh_token_expires_at timestamptz,
    reconnect_deadline       timestamptz,
    last_refreshed_at        timestamptz,
    last_used_at             timestamptz,
    last_error               text,
    row_version              bigint      NOT NULL DEFAULT 1,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CHECK ((access_token IS NULL AND refresh_token IS NULL) OR encryption_key_id IS NOT NULL)
);

CREATE INDEX quickbooks_connections_user_id ON quickbooks_connections (user_id);

-- One row a key that ever sealed a token: its id and a value only that key
-- opens. At start-up the broker refuses a key ring that lacks one of these ids
-- or carries different material under the same id.
CREATE TABLE broker_encryption_keys (
    key_id     text        PRIMARY KEY,
    verifier   bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Every change that matters to a cached token bumps row_version and tells
-- every replica, which drop their in-memory copy (broker/domain/cache.py).
-- Hand-written SQL (the runbook's "set refresh_token_created_at 35 days back")
-- is seen the same way. last_used_at alone changes nothing.
CREATE FUNCTION quickbooks_connections_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed quickbooks_connections%ROWTYPE;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        NEW.row_version := OLD.row_version + 1;
        NEW.updated_at := now();
    END IF;
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    PERFORM pg_notify(
        'qbo_broker_connection_changed',
        json_build_object('realm_id', changed.realm_id,
                          'row_version', changed.row_version,
                          'user_id', changed.user_id)::text
    );
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER quickbooks_connections_changed_on_update
    BEFORE UPDATE ON quickbooks_connections
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.user_id IS DISTINCT FROM NEW.user_id
          OR OLD.access_token IS DISTINCT FROM NEW.access_token
          OR OLD.access_token_expires_at IS DISTINCT FROM NEW.access_token_expires_at
          OR OLD.refresh_token IS DISTINCT FROM NEW.refresh_token
          OR OLD.refresh_token_created_at IS DISTINCT FROM NEW.refresh_token_created_at
          OR OLD.refresh_token_expires_at IS DISTINCT FROM NEW.refresh_token_expires_at
          OR OLD.reconnect_deadline IS DISTINCT FROM NEW.reconnect_deadline)
    EXECUTE FUNCTION quickbooks_connections_changed();

CREATE TRIGGER quickbooks_connections_changed_on_insert_delete
    AFTER INSERT OR DELETE ON quickbooks_connections
    FOR EACH ROW
    EXECUTE FUNCTION quickbooks_connections_changed();
