"""``qbo-broker``: the command line.

Configuration comes from the environment (``broker.settings``); every command
reads it once, here, into a ``Settings``, and each command's ``--help`` lists
the variables it reads. ``dev`` and ``simulate`` load the development tools
(``broker.devtools``) when they run; nothing else does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker import logs
from broker.clock import system_clock
from broker.connections_command import (
    CONNECTIONS,
    add_connections_command,
    run_connections_command,
)
from broker.crypto import KeyRing
from broker.domain.sweep import SweepKind, SweepOutcome, SweepReport
from broker.errors import ConfigurationError, StorageError, SweepInProgress
from broker.import_command import IMPORT, add_import_command, run_import_command
from broker.keys_command import add_keys_command, run_keys_command
from broker.progress import progress_bar
from broker.settings import DEV, MIGRATE, SERVE, SWEEP, Settings, environment_help, variables_for
from broker.version import package_version

EXIT_INCOMPLETE = 1
EXIT_CONFIG = 2
EXIT_STORAGE = 3
EXIT_BUSY = 4


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    exits: str = "exit 0 on success, 2 on a configuration error, 3 when the database fails"


COMMANDS = (
    Command(
        SERVE,
        "run the broker: gRPC, HTTP (metrics, probes) and the sweep scheduler",
        "Run the broker until SIGTERM or SIGINT. HTTP answers first (/healthz, /readyz 503), "
        "then the database is waited for and migrated, then gRPC serves. On SIGTERM it stops "
        "taking calls, lets in-flight calls finish within BROKER_SHUTDOWN_GRACE_SECONDS, "
        "stores every refresh already sent to Intuit, and exits 0.",
    ),
    Command(
        DEV,
        "the broker on an embedded PostgreSQL against a built-in fake Intuit, with demo companies",
        "Run the broker on an embedded PostgreSQL (in BROKER_DATA_DIR) against a built-in "
        "QuickBooks OAuth simulator, with six demo companies at telling token ages, and print "
        "how to call it. Needs no Intuit account and no database.",
    ),
    Command(
        MIGRATE,
        "apply database migrations and exit",
        "Apply the broker's database migrations (under an advisory lock, so replicas starting "
        "at once apply them once) and exit. `serve` also does this at start.",
    ),
    Command(
        SWEEP,
        "renew due connections now, once, and exit",
        "Run the background sweep once against the configured database: renew every active "
        "connection whose refresh token is QB_REFRESH_TOKEN_BACKGROUND_DAYS old, of unknown "
        "age, or about to expire. A progress bar shows on a terminal; SIGINT/SIGTERM stop it "
        "at the next connection.",
        exits="exit 0 when the run completed, 1 when it was cut short, 2 on a configuration "
        "error, 3 when the database fails, 4 when another sweep is running",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["simulate"]:
        from broker.devtools.fleet_simulation import command  # dev tool: loaded only here

        return command.run(args[1:])
    parser = _parser()
    options = parser.parse_args(args)
    if options.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if options.command == "keygen":
        print(KeyRing.generate_spec(options.key_id))
        return 0
    try:
        settings = Settings.from_env(os.environ)
        log_format = settings.log_format
        if options.command == DEV and "BROKER_LOG_FORMAT" not in os.environ:
            log_format = "text"
        logs.configure(settings.log_level, log_format, secrets=[settings.client_secret.value])
        return RUNNERS[options.command](settings, options)
    except SweepInProgress as exc:
        print(f"qbo-broker: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except ConfigurationError as exc:
        print(f"qbo-broker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageError as exc:
        print(f"qbo-broker: database error: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:
        return 0


# -- the commands ---------------------------------------------------------------------


def _serve(settings: Settings, options: argparse.Namespace) -> int:
    from broker.server import BrokerServer

    settings.require_intuit_credentials()
    if settings.embedded_database:
        logging.getLogger("broker").warning(
            "BROKER_DATABASE_URL is not set: using the embedded single-machine PostgreSQL; "
            "its data stays on this disk and only one broker can use it",
            extra={"data_dir": str(settings.data_dir.resolve())},
        )
    asyncio.run(BrokerServer(settings).serve_until_signalled())
    return 0


def _dev(settings: Settings, options: argparse.Namespace) -> int:
    from broker.devtools import dev  # dev tool: loaded only here

    host, _, port = options.simulator_addr.rpartition(":")
    asyncio.run(dev.run(settings, host, int(port)))
    return 0


def _migrate(settings: Settings, options: argparse.Namespace) -> int:
    applied = asyncio.run(_apply_migrations(settings))
    print(f"applied {applied} migration(s)")
    return 0


async def _apply_migrations(settings: Settings) -> int:
    from broker.storage import schema
    from broker.storage.database import Database
    from broker.storage.errors import translate_storage_errors

    database = await Database.open(settings)
    try:
        async with translate_storage_errors():
            connection = await database.connect("qbo-broker-migrate")
            try:
                return await schema.migrate(connection)
            finally:
                await connection.close()
    finally:
        await database.close()


def _sweep(settings: Settings, options: argparse.Namespace) -> int:
    settings.require_intuit_credentials()
    report = asyncio.run(_run_sweep(settings))
    print(
        f"sweep {report.outcome.value if report.outcome else 'not run'}: "
        f"examined {report.examined}, refreshed {report.refreshed}, "
        f"failed {report.failed}, already renewed {report.skipped}"
    )
    return 0 if report.outcome is SweepOutcome.COMPLETED else EXIT_INCOMPLETE


async def _run_sweep(settings: Settings) -> SweepReport:
    from prometheus_client import CollectorRegistry

    from broker.metrics import BrokerMetrics
    from broker.storage.audit import audit_command
    from broker.storage.database import Database, key_ring_for
    from broker.wiring import assemble

    keys = key_ring_for(settings)
    database = await Database.open(settings)
    try:
        components = await assemble(
            settings,
            keys=keys,
            database=database,
            clock=system_clock,
            metrics=BrokerMetrics(CollectorRegistry()),
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, components.sweeper.stop)  # stop at the next one
        outcome = "INTERNAL"
        try:
            with progress_bar("sweep", "connection") as progress:
                report = await components.sweeper.run(SweepKind.MANUAL, progress)
            outcome = "OK" if report.outcome is SweepOutcome.COMPLETED else "ABORTED"
            return report
        except SweepInProgress:
            outcome = "ABORTED"
            raise
        finally:
            with contextlib.suppress(StorageError):
                await audit_command(components.pool, "qbo-broker sweep", outcome)
            await components.close(time.monotonic() + settings.shutdown_budget.total_seconds())
    finally:
        await database.close()


RUNNERS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    SERVE: _serve,
    DEV: _dev,
    MIGRATE: _migrate,
    SWEEP: _sweep,
    "keys": run_keys_command,
    IMPORT: run_import_command,
    CONNECTIONS: run_connections_command,
}


# -- the parser -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbo-broker",
        description="Holds every QuickBooks Online OAuth credential of a platform and hands out "
        "access tokens over gRPC. Configuration comes from the environment; each command's "
        "--help lists what it reads.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            epilog=_environment_help(command.name) + f"\n\n{command.exits}.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command.name == DEV:
            sub.add_argument(
                "--simulator-addr",
                default="127.0.0.1:8090",
                help="where the fake Intuit listens (default %(default)s)",
            )
    commands.add_parser(
        "simulate",
        help="the refresh policies on a simulated fleet, side by side (simulate --help)",
        add_help=False,
    )
    keygen = commands.add_parser(
        "keygen",
        help="print a new BROKER_ENCRYPTION_KEYS entry",
        description="Print a new key_id:base64(32 random bytes) entry for BROKER_ENCRYPTION_KEYS.",
    )
    keygen.add_argument(
        "--key-id", default="k1", help="the id of the new key (default %(default)s)"
    )
    add_keys_command(commands)
    add_import_command(commands)
    add_connections_command(commands)
    return parser


def _environment_help(command: str) -> str:
    return environment_help("environment:", variables_for(command))


if __name__ == "__main__":
    sys.exit(main())
