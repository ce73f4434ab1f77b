-- The background sweep: what it selects must come from an index, not a scan
-- of every row, and its runs are remembered so replicas agree on what is done.

-- Due by age (and unknown age: NULLs are in the index too), and the age
-- distribution metric: both read only active rows, ordered by issue time.
CREATE INDEX quickbooks_connections_active_created
    ON quickbooks_connections (refresh_token_created_at)
    WHERE status = 'active';

-- Due by expiry: anything that would lapse before the next run.
CREATE INDEX quickbooks_connections_active_expires
    ON quickbooks_connections (refresh_token_expires_at)
    WHERE status = 'active';

-- Connections by status (the qbo_broker_connections gauge).
CREATE INDEX quickbooks_connections_status ON quickbooks_connections (status);

-- One row a sweep run, on whichever replica ran it.
CREATE TABLE broker_sweep_runs (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('scheduled', 'startup', 'catch_up', 'manual')),
    replica     text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    outcome     text        CHECK (outcome IN ('completed', 'interrupted', 'aborted')),
    examined    integer     NOT NULL DEFAULT 0,
    refreshed   integer     NOT NULL DEFAULT 0,
    failed      integer     NOT NULL DEFAULT 0
);

CREATE INDEX broker_sweep_runs_completed
    ON broker_sweep_runs (started_at)
    WHERE outcome = 'completed';
