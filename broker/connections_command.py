"""``qbo-broker connections``: the connections the broker holds, for an operator.

A table of connections (filtered, sorted, ``--limit`` of them), then the fleet
as the metrics see it: the age distribution of the active refresh tokens as a
text histogram, the count of each status, and the tokens and reconnect
deadlines coming due. ``--json`` writes the same as one document for scripts.

It reads only the non-secret columns (``ConnectionInfo``'s): no token, no key
ring. The rows stream from a server-side cursor a page at a time, so
``--limit 0`` on a million connections holds one page in memory; the fleet
figures are counted by the database (``compute_fleet_stats``), in the same
read-only snapshot as the rows, so the two agree. It writes one audit event
(method ``qbo-broker connections``) and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from broker.domain.model import ConnectionInfo, ConnectionStatus
from broker.errors import StorageError
from broker.settings import VARIABLES, Settings, environment_help

if TYPE_CHECKING:
    import asyncpg

    from broker.storage.fleet import FleetStats

CONNECTIONS = "connections"
METHOD = "qbo-broker connections"
"""The ``method`` of its audit event."""
EXIT_OK = 0
EXIT_DATABASE = 3
DEFAULT_LIMIT = 50
PAGE = 500
"""Rows fetched from the cursor per round trip (and at most held in memory)."""
SORTS = ("realm", "age", "expiry", "deadline")
BUCKET_DAYS = (1, 7, 14, 30, 45, 60, 75, 90, 101)
"""As ``broker.storage.fleet.AGE_BUCKETS`` (not imported: parsing arguments stays light)."""
MIN_WIDTH = 80
WIDE_FROM = 150
"""From this terminal width on, a connection is one line; below it, two or three."""

Paint = Callable[[str, "str | None"], str]
"""(text, ANSI colour or None) -> the text, coloured if colour is wanted."""

_DAY = timedelta(days=1)
_COLUMNS = """realm_id, user_id, status, access_token_expires_at, refresh_token_created_at,
    refresh_token_expires_at, reconnect_deadline, last_refreshed_at, last_used_at, last_error,
    lost_cause"""
"""Never a token column: this command cannot show what it never reads."""
_ORDER = {
    "realm": "realm_id",
    # Unknown age and expiry first: the broker treats them as due (the sweep's order).
    "age": "refresh_token_created_at ASC NULLS FIRST, realm_id",
    "expiry": "refresh_token_expires_at ASC NULLS FIRST, realm_id",
    # Unknown deadlines last: most imported rows have none, and they are not the urgent ones.
    "deadline": "reconnect_deadline ASC NULLS LAST, realm_id",
}
_UNKNOWN_AGE = """SELECT count(*) FROM quickbooks_connections
    WHERE status = 'active' AND refresh_token_created_at IS NULL"""
_SHORT_STATUS = {
    ConnectionStatus.ACTIVE: "active",
    ConnectionStatus.REAUTHORIZATION_REQUIRED: "reauth",
    ConnectionStatus.REVOKED: "revoked",
}

EXITS = (
    "exit codes:\n"
    "  0  listed (also when nothing matches, and when the reader of stdout went away)\n"
    "  2  a bad option or a configuration error (BROKER_DATABASE_URL unset and no\n"
    "     embedded database in BROKER_DATA_DIR)\n"
    "  3  the database could not be reached within BROKER_DATABASE_WAIT_SECONDS, failed,\n"
    "     or has not been migrated (run qbo-broker migrate)"
)
_DESCRIPTION = """\
Show the QuickBooks connections the broker holds, for an operator at a terminal:

  a table, one connection per entry: realm, user, status (reauth = reauthorization
    required), refresh-token age in days (unknown: the broker was never told when it
    was issued), when the refresh token expires (in N days, or expired N days ago),
    the reconnect deadline, the dates it was last refreshed and last used, why it was
    lost (lost cause) and its last error (cut to fit the terminal). Days are whole
    days (a part day is left out); dates are UTC. On a terminal of 150 columns or more
    each connection takes one line, else the dates, the lost cause and the error go
    on the lines below it.

  then the whole fleet (the options do not filter it): the refresh-token age of every
    active connection as a histogram (0-1, 1-7, 7-14, 14-30, 30-45, 45-60, 60-75,
    75-90, 90-101 days, over 101 days, unknown), the count of each status, and the
    active connections whose refresh token expires within 14 days or whose reconnect
    deadline falls within 30 or 90 days. These are counted by the database, never by
    reading the rows.

--json writes one JSON document instead (no table, no colour), for scripts:
  {"generated_at": ISO, "connections": [{"realm_id", "user_id", "status",
   "refresh_token_age_days", "refresh_token_created_at", "refresh_token_expires_at",
   "refresh_token_expires_in_days" (-4: expired 4 days ago), "reconnect_deadline",
   "access_token_expires_at", "last_refreshed_at", "last_used_at", "lost_cause",
   "last_error"}, ...], "truncated": true when --limit cut the list,
   "distribution": {"active": N, "buckets": [{"from_days": 0, "to_days": 1,
   "count": N}, ..., {"from_days": 101, "to_days": null, "count": N}], "unknown": N},
   "by_status": {"active": N, "reauthorization_required": N, "revoked": N},
   "expiring_within_14_days": N, "reconnect_deadlines_within": {"30": N, "90": N}}
  with ISO 8601 timestamps (UTC) and null for what is not known.

No token is ever read or shown, and no encryption key is needed. Reading the list
of customers is recorded: one audit event (method qbo-broker connections) in
broker_audit_events and the log. Nothing else is written. The rows are read a page
at a time, so --limit 0 on a large fleet streams rather than loads."""


def add_connections_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``connections`` to ``qbo-broker``'s subcommands."""
    command = commands.add_parser(
        CONNECTIONS,
        help="list the connections, their token ages and what needs attention",
        description=_DESCRIPTION,
        epilog=_environment_help() + "\n\n" + EXITS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument(
        "--status",
        choices=[status.value for status in ConnectionStatus],
        help="only connections in this status",
    )
    command.add_argument("--user", metavar="USER", help="only this user's connections (exact)")
    command.add_argument("--realm", metavar="REALM", help="only this realm (exact)")
    command.add_argument(
        "--older-than",
        type=_days,
        metavar="DAYS",
        help="only refresh tokens at least DAYS days old; tokens of unknown age are "
        "included (the broker treats them as the oldest)",
    )
    command.add_argument(
        "--expiring-within",
        type=_days,
        metavar="DAYS",
        help="only refresh tokens that expire within DAYS days, already expired ones "
        "included (an unknown expiry is not)",
    )
    command.add_argument(
        "--limit",
        type=_days,
        default=DEFAULT_LIMIT,
        metavar="N",
        help="show at most N connections (default %(default)s; 0: all of them, streamed)",
    )
    command.add_argument(
        "--sort",
        choices=SORTS,
        default="realm",
        help="realm (default); age: oldest refresh token first, unknown ages first; "
        "expiry: soonest expiry first, unknown first; deadline: soonest reconnect "
        "deadline first, unknown last",
    )
    command.add_argument(
        "--json", action="store_true", help="one JSON document on stdout (see above)"
    )


def run_connections_command(settings: Settings, options: argparse.Namespace) -> int:
    """The ``connections`` entry of ``broker.cli.RUNNERS``."""
    try:
        return asyncio.run(run_connections(settings, options))
    except _OutputClosed:  # `qbo-broker connections --limit 0 | head`: the reader has enough
        _silence_stdout()
        return EXIT_OK


# -- the run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """What the options ask for."""

    status: ConnectionStatus | None = None
    user_id: str | None = None
    realm_id: str | None = None
    older_than_days: int | None = None
    expiring_within_days: int | None = None
    limit: int = DEFAULT_LIMIT
    """0: every connection that matches."""
    sort: str = "realm"

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> Listing:
        return cls(
            status=ConnectionStatus(options.status) if options.status else None,
            user_id=options.user,
            realm_id=options.realm,
            older_than_days=options.older_than,
            expiring_within_days=options.expiring_within,
            limit=options.limit,
            sort=options.sort,
        )

    @property
    def filtered(self) -> bool:
        return any(
            value is not None
            for value in (
                self.status,
                self.user_id,
                self.realm_id,
                self.older_than_days,
                self.expiring_within_days,
            )
        )

    def select(self, now: datetime) -> tuple[str, list[object]]:
        """The query and its arguments (every value a bound parameter)."""
        clauses: list[str] = []
        args: list[object] = []

        def bind(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if self.status is not None:
            clauses.append(f"status = {bind(self.status.value)}")
        if self.user_id is not None:
            clauses.append(f"user_id = {bind(self.user_id)}")
        if self.realm_id is not None:
            clauses.append(f"realm_id = {bind(self.realm_id)}")
        if self.older_than_days is not None:
            created_by = bind(now - self.older_than_days * _DAY)
            clauses.append(
                f"(refresh_token_created_at IS NULL OR refresh_token_created_at <= {created_by})"
            )
        if self.expiring_within_days is not None:
            clauses.append(
                f"refresh_token_expires_at <= {bind(now + self.expiring_within_days * _DAY)}"
            )
        where = " AND ".join(clauses) or "true"
        limit = f" LIMIT {bind(self.limit + 1)}" if self.limit else ""
        sql = (
            f"SELECT {_COLUMNS} FROM quickbooks_connections WHERE {where} "
            f"ORDER BY {_ORDER[self.sort]}{limit}"
        )
        return sql, args


@dataclass(frozen=True)
class Fleet:
    """The fleet's figures: ``FleetStats`` and the count of active rows of unknown age."""

    stats: FleetStats
    unknown_age: int

    def buckets(self) -> list[tuple[int, int | None, int]]:
        """(from days, to days or None, count), not cumulative; unknown ages left out."""
        found: list[tuple[int, int | None, int]] = []
        below = 0
        start = 0
        for (bound, cumulative), days in zip(self.stats.age_buckets, BUCKET_DAYS, strict=False):
            assert bound == days * 86400, "broker.storage.fleet.AGE_BUCKETS changed"
            found.append((start, days, cumulative - below))
            below, start = cumulative, days
        found.append((start, None, self.active - below - self.unknown_age))
        return found

    @property
    def active(self) -> int:
        return self.stats.age_buckets[-1][1]

    def by_status(self) -> dict[str, int]:
        return {status.value: self.stats.by_status.get(status, 0) for status in ConnectionStatus}

    def deadlines_within(self, days: int) -> int:
        return self.stats.deadlines_within.get(days, 0)


async def run_connections(settings: Settings, options: argparse.Namespace) -> int:
    """List against the configured database; returns the exit code.

    A database that fails (or is not migrated) is exit 3 with one line on
    stderr; a ConfigurationError propagates for ``broker.cli`` (exit 2).
    """

    from broker.storage.audit import audit_command
    from broker.storage.database import Database
    from broker.storage.errors import translate_storage_errors
    from broker.storage.fleet import compute_fleet_stats

    listing = Listing.from_options(options)
    _require_embedded_database(settings)
    now = datetime.now(UTC)
    out = _Output()
    try:
        database = await Database.open(settings)
        try:
            pool = await database.command_pool("qbo-broker-connections", command_timeout=300)
            try:
                async with translate_storage_errors(), pool.acquire(timeout=10) as connection:
                    await _require_schema(connection)
                    await audit_command(pool, METHOD, "OK")
                    # One snapshot for the rows and the figures: they agree with each other.
                    async with connection.transaction(isolation="repeatable_read", readonly=True):
                        fleet = Fleet(
                            await compute_fleet_stats(connection, now),
                            int(await connection.fetchval(_UNKNOWN_AGE)),
                        )
                        sql, args = listing.select(now)
                        write = _write_json if options.json else _write_text
                        rows = _stream(connection.cursor(sql, *args, prefetch=PAGE))
                        async with contextlib.aclosing(rows):
                            await write(out, rows, fleet, listing, now)
                out.flush()
            finally:
                await pool.close()
        finally:
            await database.close()
    except StorageError as exc:
        out.flush_quietly()
        print(f"qbo-broker connections: database error: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    return EXIT_OK


async def _stream(cursor: Any) -> AsyncGenerator[ConnectionInfo, None]:
    from broker.storage.connections import info_from_row

    async for row in cursor:
        yield info_from_row(row)


def _require_embedded_database(settings: Settings) -> None:
    """Without BROKER_DATABASE_URL, list the embedded database only if there is one:
    a listing must not create a database (initdb) as a side effect."""
    if not settings.embedded_database:
        return
    from broker.errors import ConfigurationError
    from broker.storage.embedded import EmbeddedPostgres

    pgdata = EmbeddedPostgres(settings.data_dir).pgdata
    if not (pgdata / "PG_VERSION").exists():
        raise ConfigurationError(
            f"BROKER_DATABASE_URL is not set and BROKER_DATA_DIR ({settings.data_dir}) holds "
            "no embedded database: set BROKER_DATABASE_URL (or BROKER_DATA_DIR)"
        )


async def _require_schema(connection: asyncpg.Connection | Any) -> None:
    from broker.storage import schema

    pending = await schema.pending_migrations(connection)
    if not pending:
        return
    if len(pending) == len(schema.bundled_migrations()):
        raise StorageError(
            "the database holds no broker tables: run qbo-broker migrate (or start the broker)"
        )
    raise StorageError(
        f"the database schema is behind this version ({', '.join(pending)} not applied): "
        "run qbo-broker migrate"
    )


# -- what a connection shows ----------------------------------------------------------


def age_days(info: ConnectionInfo, now: datetime) -> int | None:
    """Whole days since the refresh token was issued (None: unknown)."""
    created = info.refresh_token_created_at
    return None if created is None else max(0, math.floor((now - created) / _DAY))


def expires_in_days(info: ConnectionInfo, now: datetime) -> int | None:
    """Whole days until the refresh token expires, negative once it has: -4 is "expired 4
    days ago", 0 within a day either side (truncated toward zero, as the table says it)."""
    expires = info.refresh_token_expires_at
    return None if expires is None else int((expires - now) / _DAY)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _date(moment: datetime | None, missing: str) -> str:
    return missing if moment is None else moment.astimezone(UTC).date().isoformat()


def _age_text(info: ConnectionInfo, now: datetime) -> str:
    days = age_days(info, now)
    return "unknown" if days is None else str(days)


def _expiry_text(info: ConnectionInfo, now: datetime) -> str:
    expires = info.refresh_token_expires_at
    if expires is None:
        return "unknown"
    days = abs(int((expires - now) / _DAY))
    if expires >= now:
        return "<1 day" if days == 0 else _plural(days, "day")
    return "expired <1 day ago" if days == 0 else f"expired {_plural(days, 'day')} ago"


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def connection_json(info: ConnectionInfo, now: datetime) -> dict[str, Any]:
    return {
        "realm_id": info.realm_id,
        "user_id": info.user_id,
        "status": info.status.value,
        "refresh_token_age_days": age_days(info, now),
        "refresh_token_created_at": _iso(info.refresh_token_created_at),
        "refresh_token_expires_at": _iso(info.refresh_token_expires_at),
        "refresh_token_expires_in_days": expires_in_days(info, now),
        "reconnect_deadline": _iso(info.reconnect_deadline),
        "access_token_expires_at": _iso(info.access_token_expires_at),
        "last_refreshed_at": _iso(info.last_refreshed_at),
        "last_used_at": _iso(info.last_used_at),
        "lost_cause": info.lost_cause.value if info.lost_cause else None,
        "last_error": info.last_error,
    }


# -- the JSON document ----------------------------------------------------------------


async def _write_json(
    out: _Output,
    rows: AsyncIterator[ConnectionInfo],
    fleet: Fleet,
    listing: Listing,
    now: datetime,
) -> None:
    """Written as the rows arrive: the list is never held whole."""
    out.write(f'{{"generated_at": {json.dumps(_iso(now))}, "connections": [')
    shown = 0
    truncated = False
    async for info in rows:
        if listing.limit and shown == listing.limit:
            truncated = True
            break
        out.write(("," if shown else "") + "\n  " + json.dumps(connection_json(info, now)))
        shown += 1
    rest = {
        "truncated": truncated,
        "distribution": {
            "active": fleet.active,
            "buckets": [
                {"from_days": start, "to_days": end, "count": count}
                for start, end, count in fleet.buckets()
            ],
            "unknown": fleet.unknown_age,
        },
        "by_status": fleet.by_status(),
        "expiring_within_14_days": fleet.stats.expiring_soon,
        "reconnect_deadlines_within": {
            "30": fleet.deadlines_within(30),
            "90": fleet.deadlines_within(90),
        },
    }
    tail = json.dumps(rest)
    out.write(("\n" if shown else "") + "], " + tail[1:] + "\n")


# -- the text -------------------------------------------------------------------------

_REALM = 19
_STATUS = 7
_AGE = 7
_EXPIRES = 21
_DATE = 10
_LOST = 17
_RED = "31"
_YELLOW = "33"
_SOON = timedelta(days=14)
_LINE_ONE = _REALM + _STATUS + _AGE + _EXPIRES + _DATE + 5
"""The first line of a connection, without the user column, separators included."""


@dataclass(frozen=True)
class _Layout:
    width: int
    colour: bool

    @property
    def wide(self) -> bool:
        return self.width >= WIDE_FROM

    @property
    def user(self) -> int:
        if self.wide:
            return 20
        return max(8, min(32, self.width - _LINE_ONE))

    @property
    def error(self) -> int:
        used = _LINE_ONE + self.user + 1 + (_DATE + 1) * 2 + _LOST + 1
        return max(10, self.width - used)

    def paint(self, text: str, colour: str | None) -> str:
        return f"\033[{colour}m{text}\033[0m" if self.colour and colour else text

    def header(self) -> Iterator[str]:
        cells = [
            _cell("REALM", _REALM),
            _cell("USER", self.user),
            _cell("STATUS", _STATUS),
            _cell("AGE (d)", _AGE, right=True),
            _cell("EXPIRES IN", _EXPIRES),
            _cell("DEADLINE", _DATE),
        ]
        if self.wide:
            cells += [
                _cell("REFRESHED", _DATE),
                _cell("USED", _DATE),
                _cell("LOST CAUSE", _LOST),
                "LAST ERROR",
            ]
            yield " ".join(cells).rstrip()
            return
        yield " ".join(cells).rstrip()
        yield "  (then: last refreshed, last used, lost cause; last error)"

    def connection(self, info: ConnectionInfo, now: datetime) -> Iterator[str]:
        status = _cell(_SHORT_STATUS[info.status], _STATUS)
        expiry = _cell(_expiry_text(info, now), _EXPIRES)
        cells = [
            _cell(info.realm_id, _REALM),
            _cell(info.user_id, self.user),
            self.paint(status, None if info.status is ConnectionStatus.ACTIVE else _RED),
            _cell(_age_text(info, now), _AGE, right=True),
            self.paint(expiry, _expiry_colour(info, now)),
            _cell(_date(info.reconnect_deadline, "unknown"), _DATE),
        ]
        refreshed = _date(info.last_refreshed_at, "never")
        used = _date(info.last_used_at, "never")
        lost = info.lost_cause.value if info.lost_cause else ""
        error = _one_line(info.last_error or "")
        if self.wide:
            cells += [
                _cell(refreshed, _DATE),
                _cell(used, _DATE),
                self.paint(_cell(lost or "-", _LOST), _RED if lost else None),
                _fit(error, self.error),
            ]
            yield " ".join(cells).rstrip()
            return
        yield " ".join(cells).rstrip()
        second = f"  refreshed {refreshed}  used {used}"
        if lost:
            second += "  lost " + self.paint(lost, _RED)
        yield second
        if error:
            yield "  error " + _fit(error, self.width - len("  error "))


async def _write_text(
    out: _Output,
    rows: AsyncIterator[ConnectionInfo],
    fleet: Fleet,
    listing: Listing,
    now: datetime,
) -> None:
    layout = _Layout(max(MIN_WIDTH, shutil.get_terminal_size().columns), _colour_wanted())
    shown = 0
    truncated = False
    async for info in rows:
        if listing.limit and shown == listing.limit:
            truncated = True
            break
        if shown == 0:
            for line in layout.header():
                out.line(line)
        for line in layout.connection(info, now):
            out.line(line)
        shown += 1
    if shown == 0:
        out.line("no connection matches" if listing.filtered else "no connections")
    elif truncated:
        out.line(f"first {shown:,} shown; more match (--limit 0 shows all). Dates UTC.")
    else:
        out.line(f"{_plural(shown, 'connection')}. Dates UTC.")
    out.line("")
    for line in fleet_text(fleet, layout.width, paint=layout.paint):
        out.line(line)


def fleet_text(fleet: Fleet, width: int, *, paint: Paint | None = None) -> list[str]:
    """The histogram, the status counts and the warnings, each line within ``width``."""
    painted = paint or _plain
    entries = [
        (f"{start}-{end} days" if end is not None else f"over {start} days", count)
        for start, end, count in fleet.buckets()
    ]
    entries.append(("unknown", fleet.unknown_age))
    label = max(len(name) for name, _ in entries)
    digits = max(len(f"{count:,}") for _, count in entries)
    bar = max(10, width - (2 + label + 1 + digits + 1))
    most = max(count for _, count in entries)
    lines = [f"Refresh-token age, {_plural(fleet.active, 'active connection')} (not filtered):"]
    for name, count in entries:
        length = 0 if most == 0 else max(1 if count else 0, round(count * bar / most))
        lines.append(f"  {name:<{label}} {count:>{digits},} {'#' * length}".rstrip())
    lines.append("")
    statuses = fleet.by_status()
    figures = [*statuses.items(), ("all", sum(statuses.values()))]
    wide = max(len(f"{count:,}") for _, count in figures)
    lines.append("Connections by status:")
    lines += [f"  {name:<24} {count:>{wide},}" for name, count in figures]
    lines.append("")
    warnings = [
        ("refresh token expires within 14 days", fleet.stats.expiring_soon),
        ("reconnect deadline within 30 days", fleet.deadlines_within(30)),
        ("reconnect deadline within 90 days", fleet.deadlines_within(90)),
    ]
    wide = max(len(f"{count:,}") for _, count in warnings)
    lines.append("Active connections coming due:")
    lines += [
        "  " + painted(f"{name:<36} {count:>{wide},}", _YELLOW if count else None)
        for name, count in warnings
    ]
    return lines


def _expiry_colour(info: ConnectionInfo, now: datetime) -> str | None:
    """Red once an active connection's refresh token has expired, yellow within 14 days."""
    expires = info.refresh_token_expires_at
    if expires is None or info.status is not ConnectionStatus.ACTIVE:
        return None
    if expires < now:
        return _RED
    return _YELLOW if expires - now <= _SOON else None


def _plain(text: str, colour: str | None) -> str:
    return text


def _colour_wanted() -> bool:
    return (
        sys.stdout.isatty()
        and "NO_COLOR" not in os.environ
        and os.environ.get("TERM", "") not in ("", "dumb")
    )


def _cell(text: str, width: int, *, right: bool = False) -> str:
    fitted = _fit(_printable(text), width)
    pad = " " * (width - _width(fitted))
    return pad + fitted if right else fitted + pad


def _fit(text: str, width: int) -> str:
    """``text`` within ``width`` terminal columns, cut with an ellipsis if longer."""
    text = _printable(text)
    if _width(text) <= width:
        return text
    kept: list[str] = []
    used = 0
    for char in text:
        size = _width(char)
        if used + size > width - 1:
            break
        kept.append(char)
        used += size
    return "".join(kept) + "…"


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _printable(text: str) -> str:
    """No control character reaches the terminal (a user id or an error could hold one)."""
    return "".join(char if char.isprintable() else "?" for char in text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- stdout ---------------------------------------------------------------------------


class _OutputClosed(Exception):
    """stdout's reader went away. Not an OSError: the database's error translation
    (``translate_storage_errors``) must not take it for a lost connection."""


class _Output:
    def write(self, text: str) -> None:
        try:
            sys.stdout.write(text)
        except BrokenPipeError as exc:
            raise _OutputClosed() from exc

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError as exc:
            raise _OutputClosed() from exc

    def flush_quietly(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not complain."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- the options ----------------------------------------------------------------------


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _environment_help() -> str:
    wanted = ("database_url", "data_dir", "database_wait", "log_level", "log_format")
    return environment_help(
        "environment (no BROKER_ENCRYPTION_KEYS needed: no token is read):",
        (variable for variable in VARIABLES if variable.field in wanted),
    )


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The options of ``qbo-broker connections ARGV`` (for tests and tools)."""
    parser = argparse.ArgumentParser(prog="qbo-broker")
    add_connections_command(parser.add_subparsers(dest="command"))
    return parser.parse_args([CONNECTIONS, *argv])
