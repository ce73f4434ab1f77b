-- Knowing which losses are ours, and sweeps that die.

-- Why a connection needs the customer again: revoked_at_intuit (Intuit said
-- invalid_grant and no refresh of ours was in doubt), lost_in_flight (a refresh
-- of ours rotated the token and its answer never arrived or was never stored),
-- expired (past its rolling expiry), hard_limit (past the reconnect deadline).
ALTER TABLE quickbooks_connections
    ADD COLUMN lost_cause text
        CHECK (lost_cause IN ('revoked_at_intuit', 'lost_in_flight', 'expired', 'hard_limit'));

-- A refresh that may rotate the token is announced here, committed, before it
-- is sent to Intuit, and cleared in the transaction that stores its answer.
-- A row that stays is a refresh whose outcome is in doubt: Intuit may have
-- rotated the token it names (by fingerprint, never the token itself).
CREATE TABLE broker_refresh_intents (
    realm_id          text        PRIMARY KEY,
    token_fingerprint text        NOT NULL,
    replica           text        NOT NULL,
    sent_at           timestamptz NOT NULL DEFAULT now()
);

-- Every replica says it is alive every few seconds (database time), so a
-- sibling can tell an intent of a live replica (its answer may still be
-- written) from one of a replica that died.
CREATE TABLE broker_replicas (
    replica   text        PRIMARY KEY,
    last_seen timestamptz NOT NULL DEFAULT now()
);

-- A run whose replica died stays "running" until the next run closes it.
ALTER TABLE broker_sweep_runs DROP CONSTRAINT broker_sweep_runs_outcome_check;
ALTER TABLE broker_sweep_runs ADD CONSTRAINT broker_sweep_runs_outcome_check
    CHECK (outcome IN ('completed', 'interrupted', 'aborted', 'abandoned'));
