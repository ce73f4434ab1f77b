"""``qbo-broker keys rotate``: every stored token sealed again with the primary key.

The rotation itself is ``broker.storage.keys.rotate``; this is the command
around it: the database, the key ring and migrations as ``serve`` finds them, a
progress bar on a terminal, SIGINT/SIGTERM ending the run after the current
batch, one summary line on stdout and the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from broker.progress import progress_bar
from broker.settings import MIGRATE, VARIABLES, Settings

KEYS = "keys"
ROTATE = "rotate"
EXIT_FINISHED = 0
EXIT_INCOMPLETE = 1
EXITS = (
    "exit 0 when no stored token is left on an older key, 1 when the run was interrupted or "
    "left rows behind (locked for too long, or not decryptable; run it again), 2 on a "
    "configuration error (such as a ring without a key some row still uses), 3 when the "
    "database fails"
)
_SHOWN = 10  # realm ids named in the summary line, at most


def add_keys_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys`` (and its subcommand ``rotate``) to ``qbo-broker``'s subcommands."""
    keys = commands.add_parser(
        KEYS,
        help="the keys that encrypt stored tokens (keys rotate)",
        description="Manage the keys of BROKER_ENCRYPTION_KEYS that encrypt stored tokens.",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    actions.add_parser(
        ROTATE,
        help="re-encrypt every stored token with the primary key, while brokers keep serving",
        description="Re-encrypt every stored token with the primary key (the first entry of "
        "BROKER_ENCRYPTION_KEYS) while brokers keep serving. Start it once every broker runs "
        "with the new key first and the older ones after it. Rows go a batch at a time; a row "
        "that a refresh holds right now is passed over and tried again, never waited for. A "
        "progress bar shows on a terminal; SIGINT/SIGTERM stop it after the current batch, "
        "and running it again carries on where it stopped. Once it reports that none is left, "
        "the older keys can be removed from BROKER_ENCRYPTION_KEYS: a broker refuses to start "
        "without a key that some stored token still uses, and names it.",
        epilog=_environment_help() + f"\n\n{EXITS}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_keys_command(settings: Settings, options: argparse.Namespace) -> int:
    """The ``keys`` entry of ``broker.cli.RUNNERS``."""
    if options.keys_command == ROTATE:
        return asyncio.run(run_rotate(settings))
    raise AssertionError(f"unknown keys subcommand {options.keys_command!r}")  # argparse


async def run_rotate(settings: Settings) -> int:
    """Rotate against the configured database; ConfigurationError/StorageError propagate."""

    from broker.storage.audit import audit_command
    from broker.storage.database import Database, key_ring_for
    from broker.storage.keys import key_ids_in_use, rotate

    keys = key_ring_for(settings)
    database = await Database.open(settings)
    try:
        await database.prepare(keys, "qbo-broker-keys")
        pool = await database.command_pool("qbo-broker-keys", command_timeout=60)
        try:
            stop = asyncio.Event()
            with _stop_on_signals(stop), progress_bar("keys rotate", "row") as progress:
                report = await rotate(
                    pool,
                    keys,
                    progress=progress,
                    stop=stop,
                    give_up_after=give_up_after(settings),
                )
            in_use = await key_ids_in_use(pool)
            outcome = (
                "OK" if report.finished else ("CANCELLED" if report.interrupted else "ABORTED")
            )
            await audit_command(pool, "qbo-broker keys rotate", outcome)
        finally:
            await pool.close()
    finally:
        await database.close()

    done = f"{report.re_encrypted} re-encrypted with key {report.primary_id}"
    if report.finished:
        retired = sorted(keys.key_ids - in_use - {keys.primary_id})
        removable = (
            f"; {', '.join(retired)} can now be removed from BROKER_ENCRYPTION_KEYS"
            if retired
            else ""
        )
        print(f"keys rotate: finished: {done}, none left on an older key{removable}")
        return EXIT_FINISHED
    left = f"{done}, {report.remaining} left on older keys"
    if report.interrupted:
        print(f"keys rotate: interrupted: run it again to finish ({left})")
        return EXIT_INCOMPLETE
    reasons = []
    if report.skipped_locked:
        reasons.append(f"locked for too long: {_some(report.skipped_locked)}")
    if report.undecryptable:
        reasons.append(f"would not decrypt: {_some(report.undecryptable)}")
    print(f"keys rotate: incomplete: {left} ({'; '.join(reasons) or 'written meanwhile'})")
    return EXIT_INCOMPLETE


def give_up_after(settings: Settings) -> float:
    """Seconds a row may stay locked before the run leaves it for the next one.

    A broker's refresh holds its row while it waits on Intuit, and PostgreSQL
    ends a broker's transaction idle that long, max(60, 2 x QB_HTTP_TIMEOUT_SECONDS
    + 10) s (``broker.storage.database.create_pool``): a lock held longer than that
    is not a refresh, and waiting on would not help.
    """
    call = int(settings.intuit_timeout.total_seconds())
    return float(max(60, 2 * call + 10) + 5)


@contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            if handler is not None:
                signal.signal(signum, handler)


def _some(realms: tuple[str, ...]) -> str:
    shown = ", ".join(realms[:_SHOWN])
    return shown + (f" and {len(realms) - _SHOWN} more" if len(realms) > _SHOWN else "")


def _environment_help() -> str:
    lines = ["environment:"]
    for variable in VARIABLES:
        if MIGRATE in variable.commands or variable.field == "intuit_timeout":
            default = variable.default_text
            shown = f" (default {default})" if default else ""
            lines.append(f"  {variable.name}\n      {variable.meaning}{shown}")
    return "\n".join(lines)
