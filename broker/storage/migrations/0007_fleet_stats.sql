-- The fleet's gauges, computed by one replica at most once a minute and read
-- by every replica: a scrape never runs an aggregate, whatever the number of
-- replicas or scrapers.
CREATE TABLE broker_fleet_stats (
    id          integer     PRIMARY KEY CHECK (id = 1),
    computed_at timestamptz NOT NULL,
    stats       jsonb       NOT NULL
);

-- Reconnect deadlines approaching (30 and 90 days), counted from an index.
CREATE INDEX quickbooks_connections_active_deadline
    ON quickbooks_connections (reconnect_deadline)
    WHERE status = 'active';
