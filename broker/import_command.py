"""``qbo-broker import``: the original application's connections moved into the broker.

The import itself is ``broker.importer.import_from``; this is the command
around it: the broker's database, key ring and migrations as ``serve`` finds
them, one audit event per realm written or refused (principal
``cli:<user>@<host>``, method ``qbo-broker import``), a progress bar on a
terminal, one summary on stdout and the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from broker.errors import StorageError
from broker.progress import progress_bar
from broker.settings import MIGRATE, VARIABLES, Settings, environment_help

IMPORT = "import"
DEFAULT_TABLE = "quickbooks_connections"
"""As ``broker.importer.DEFAULT_TABLE`` (not imported: parsing arguments stays light)."""
METHOD = "qbo-broker import"
"""The ``method`` of its audit events."""
EXIT_DONE = 0
EXIT_BAD_SOURCE = 2
EXIT_DATABASE = 3
EXITS = (
    "exit codes:\n"
    "  0  every row was imported or skipped for a stated reason (skips are not failures)\n"
    "  2  a bad --from-database URL or --table (not a postgresql:// URL, no such table, no\n"
    "     realm_id/user_id/refresh_token column, refused credentials), or a configuration\n"
    "     error of the broker's own (BROKER_ENCRYPTION_KEYS)\n"
    "  3  a database (the source or the broker's) failed; what was imported stays imported,\n"
    "     and running the command again carries on"
)
_DESCRIPTION = """\
Copy the QuickBooks Online connections of the original application (its PostgreSQL table
quickbooks_connections, tokens in plain text) into the broker, encrypted. The source is
only read (a read-only transaction); a realm the broker already holds as active is never
overwritten, one that needs reauthorization or was revoked is replaced by the source's
copy, and a realm whose refresh token the broker already holds is left alone, so the
command can be run again safely.

Cut-over, in order:
  1. Stop the original application's refresh job (QB_DISABLE_BACKGROUND_REFRESH=true, or
     stop the app): Intuit rotates a refresh token when it is used, and a copy refreshed by
     the old app after the import is dead in the broker.
  2. qbo-broker import --from-database URL --dry-run
     reads and checks every row and says what would be imported and what skipped, and why.
  3. qbo-broker import --from-database URL
     the same, for real; one audit event per realm written or refused.
  4. Switch the application to the broker (GetAccessToken instead of its own tokens).
     Should the old app still have refreshed a realm after step 3, the broker finds its
     copy dead (reauthorization required) at the next refresh; running the import again
     then replaces it with the app's newer copy.

Rows are skipped, with the reason counted in the summary, when realm_id, user_id or
refresh_token is missing or malformed, and for the older copies of a realm that appears
twice (the copy with the newest refresh_token_created_at, then updated_at/created_at,
wins). An access token without a usable expiry is left out (the broker refreshes on first
use); timestamps without a time zone are read as UTC. Tokens are never printed, and the
source is named as host:port/db only: leave the password out of the URL and give it in
PGPASSWORD or ~/.pgpass, since a command line is visible to other users."""


def add_import_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import`` to ``qbo-broker``'s subcommands."""
    command = commands.add_parser(
        IMPORT,
        help="copy the original application's connections into the broker (cut-over)",
        description=_DESCRIPTION,
        epilog=_environment_help() + "\n\n" + EXITS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument(
        "--from-database",
        required=True,
        metavar="URL",
        help="postgresql://user@host:5432/db of the original application's database",
    )
    command.add_argument(
        "--table",
        default=DEFAULT_TABLE,
        metavar="NAME",
        help="its connections table, optionally schema.table (default %(default)s)",
    )
    command.add_argument(
        "--dry-run",
        action="store_true",
        help="read and check everything, write nothing, say what would happen",
    )


def run_import_command(settings: Settings, options: argparse.Namespace) -> int:
    """The ``import`` entry of ``broker.cli.RUNNERS``."""
    return asyncio.run(run_import(settings, options))


async def run_import(settings: Settings, options: argparse.Namespace) -> int:
    """Import against the configured broker database; returns the exit code.

    A bad source is exit 2 and a failed database exit 3, each with one line on
    stderr; the broker's own ConfigurationError (its key ring) propagates, for
    ``broker.cli`` to report as any other command's (exit 2).
    """
    from broker.access.audit import AuditTrail
    from broker.importer import ImportFailed, ImportSourceError, import_from, source_location
    from broker.storage.audit import PostgresAuditSink, command_principal
    from broker.storage.connections import PostgresConnectionStore
    from broker.storage.database import Database, create_pool, key_ring_for
    from broker.wiring import replica_name

    source: str = options.from_database
    try:
        source_location(source)  # a bad URL is refused before anything is opened
    except ImportSourceError as exc:
        print(f"qbo-broker import: {exc}", file=sys.stderr)
        return EXIT_BAD_SOURCE
    principal = command_principal()
    keys = key_ring_for(settings)
    try:
        database = await Database.open(settings)
        try:
            await database.prepare(keys, "qbo-broker-import")
            pool = await create_pool(database.dsn, settings.db_pool_size, settings.intuit_timeout)
            trail = AuditTrail(PostgresAuditSink(pool, replica_name()))
            trail.start()
            try:

                def audit(realm_id: str, outcome: str) -> None:
                    trail.record(principal, METHOD, realm_id, outcome, admin=True)

                with progress_bar("import", "row") as progress:
                    report = await import_from(
                        source,
                        options.table,
                        PostgresConnectionStore(pool, keys),
                        dry_run=options.dry_run,
                        now=datetime.now(UTC),
                        progress=progress,
                        audit=audit,
                    )
            finally:
                await trail.close()
                await pool.close()
        finally:
            await database.close()
    except ImportSourceError as exc:
        print(f"qbo-broker import: {exc}", file=sys.stderr)
        return EXIT_BAD_SOURCE
    except ImportFailed as exc:
        if exc.report.rows:
            print(exc.report.summary())  # what was done before it stopped
        print(f"qbo-broker import: database error: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    except StorageError as exc:
        print(f"qbo-broker import: database error: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    print(report.summary())
    return EXIT_DONE


def _environment_help() -> str:
    return environment_help(
        "environment (the broker's database):",
        (v for v in VARIABLES if MIGRATE in v.commands or v.field == "db_pool_size"),
    )
