-- Whether the replica that announced a refresh may still hold Intuit's answer.
-- true from the announcement on; false once the refresh failed without an answer
-- (a timeout, a reset, a 5xx): the token may have been rotated (the intent stays,
-- so a later invalid_grant is known to be ours), but nobody holds a newer one,
-- so siblings need not wait for it.
ALTER TABLE broker_refresh_intents
    ADD COLUMN answer_held boolean NOT NULL DEFAULT true;
