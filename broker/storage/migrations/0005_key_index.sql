-- Which keys still seal a token, and the rows a key rotation has left to do
-- (broker/storage/keys.py): both read this index, never the whole table.
--
-- "Key ids in use" walks it as a loose index scan (one descent per distinct key
-- id, so a handful of reads however many rows); `qbo-broker keys rotate` reads
-- the rows of one old key in realm order from it, a batch at a time. Revoked
-- rows hold no token (and no key id) and stay out of it.
CREATE INDEX quickbooks_connections_encryption_key
    ON quickbooks_connections (encryption_key_id, realm_id)
    WHERE encryption_key_id IS NOT NULL;
