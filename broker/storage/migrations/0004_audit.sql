-- The audit trail of admin calls, allowed or denied (token hand-outs are audited
-- in the log only: there are thousands a second). Never a token.
CREATE TABLE broker_audit_events (
    id        bigserial   PRIMARY KEY,
    at        timestamptz NOT NULL,
    principal text,
    method    text        NOT NULL,
    realm_id  text,
    outcome   text        NOT NULL,
    replica   text        NOT NULL
);

CREATE INDEX broker_audit_events_at ON broker_audit_events (at);
CREATE INDEX broker_audit_events_realm ON broker_audit_events (realm_id, at)
    WHERE realm_id IS NOT NULL;
