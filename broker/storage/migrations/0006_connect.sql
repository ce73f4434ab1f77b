-- The connect flow's sessions: one row a link handed out. Only hashes of the
-- link's token, of the state sent to Intuit and of the browser-binding cookie
-- are kept: a copy of this table starts no flow.
CREATE TABLE broker_connect_sessions (
    token_hash   text        PRIMARY KEY,
    user_id      text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 255),
    return_url   text        CHECK (char_length(return_url) <= 2048),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    begun_at     timestamptz,
    state_hash   text        UNIQUE,
    browser_hash text,
    finished_at  timestamptz,
    outcome      text
);

CREATE INDEX broker_connect_sessions_expires ON broker_connect_sessions (expires_at);

-- Change notices now say what happened, so a deleted connection is forgotten by
-- every replica's cache and reported to watchers as deleted.
CREATE OR REPLACE FUNCTION quickbooks_connections_changed() RETURNS trigger
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
                          'user_id', changed.user_id,
                          'op', TG_OP)::text
    );
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;
