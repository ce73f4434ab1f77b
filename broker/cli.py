"""``qbo-broker``: the command line.

    qbo-broker serve     run the broker (gRPC + HTTP)
    qbo-broker dev       the broker on embedded PostgreSQL + the QuickBooks simulator
    qbo-broker migrate   apply database migrations and exit
    qbo-broker sweep     run the background sweep once, now, and exit
    qbo-broker simulate  the refresh policies on a simulated fleet (no database, no Intuit)
    qbo-broker keygen    print a new BROKER_ENCRYPTION_KEYS entry

Configuration comes from the environment (see the README); every command reads
it once, here, into a ``Settings``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import asyncpg
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from broker import logs, simulation
from broker.app import Broker
from broker.clock import system_clock
from broker.core import Core, Database
from broker.crypto import KeyRing
from broker.domain.sweep import SweepKind, SweepOutcome, SweepReport
from broker.errors import ConfigurationError, StorageError, SweepInProgress
from broker.metrics import BrokerMetrics
from broker.settings import Settings
from broker.storage import schema
from broker.storage.errors import translate_storage_errors

EXIT_INCOMPLETE = 1
EXIT_CONFIG = 2
EXIT_STORAGE = 3
EXIT_BUSY = 4


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if options.command == "keygen":
        print(KeyRing.generate_spec(options.key_id))
        return 0
    if options.command == "simulate":
        return simulation.main(options)
    try:
        settings = Settings.from_env(os.environ)
        log_format = settings.log_format
        if options.command == "dev" and "BROKER_LOG_FORMAT" not in os.environ:
            log_format = "text"
        logs.configure(settings.log_level, log_format, secrets=[settings.client_secret.value])
        if options.command == "serve":
            settings.require_intuit_credentials()
            asyncio.run(Broker(settings).serve_until_signalled())
        elif options.command == "dev":
            from broker import dev  # the simulator is only loaded for dev

            host, _, port = options.simulator_addr.rpartition(":")
            asyncio.run(dev.run(settings, host, int(port)))
        elif options.command == "migrate":
            applied = asyncio.run(_migrate(settings))
            print(f"applied {applied} migration(s)")
        elif options.command == "sweep":
            settings.require_intuit_credentials()
            report = asyncio.run(_sweep(settings))
            print(
                f"sweep {report.outcome.value if report.outcome else 'not run'}: "
                f"examined {report.examined}, refreshed {report.refreshed}, "
                f"failed {report.failed}, already renewed {report.skipped}"
            )
            return 0 if report.outcome is SweepOutcome.COMPLETED else EXIT_INCOMPLETE
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
    return 0


async def _migrate(settings: Settings) -> int:
    database = await Database.open(settings)
    try:
        async with translate_storage_errors():
            connection = await asyncpg.connect(database.dsn)
            try:
                return await schema.migrate(connection)
            finally:
                await connection.close()
    finally:
        await database.close()


async def _sweep(settings: Settings) -> SweepReport:
    database = await Database.open(settings)
    try:
        core = await Core.open(
            settings,
            clock=system_clock,
            metrics=BrokerMetrics(CollectorRegistry()),
            database=database,
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, core.sweeper.stop)  # stop at the next connection
        bar = tqdm(unit="connection", desc="sweep", disable=not sys.stderr.isatty())

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            return await core.run_sweep(SweepKind.MANUAL, progress)
        finally:
            bar.close()
            await core.close()
    finally:
        await database.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbo-broker",
        description="Holds every QuickBooks Online OAuth credential and hands out access tokens.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the broker (gRPC + HTTP); SIGTERM stops it gracefully")
    dev = commands.add_parser(
        "dev", help="run on embedded PostgreSQL against the built-in QuickBooks simulator"
    )
    dev.add_argument(
        "--simulator-addr",
        default="127.0.0.1:8090",
        help="where the QuickBooks simulator listens (default %(default)s)",
    )
    commands.add_parser("migrate", help="apply database migrations and exit")
    commands.add_parser(
        "sweep",
        help="renew due connections now (exit 0 when the run completed, 1 when cut short, "
        "4 when another sweep is running)",
    )
    simulate = commands.add_parser(
        "simulate",
        help="the refresh policies on a simulated fleet against Intuit's rules, side by side",
        description=simulation.__doc__.splitlines()[0] if simulation.__doc__ else None,
    )
    simulation.add_arguments(simulate)
    keygen = commands.add_parser("keygen", help="print a new BROKER_ENCRYPTION_KEYS entry")
    keygen.add_argument(
        "--key-id", default="k1", help="the id of the new key (default %(default)s)"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
