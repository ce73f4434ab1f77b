"""PostgreSQL: the connection store, migrations, the change feed, the embedded server."""
