-- The realms the caller that asked for a link may connect (its authorization
-- policy's answer for CreateConnectLink, as JSON), checked when the browser comes
-- back with a company. NULL: every realm.
ALTER TABLE broker_connect_sessions ADD COLUMN realm_access jsonb;
