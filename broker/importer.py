"""Moving the original application's connections into the broker: ``qbo-broker import``.

The original (Node) application keeps its grants in its own PostgreSQL table,
``quickbooks_connections``, tokens in plain text, columns undocumented. This
reads that table and writes each usable grant through the broker's own import
path (``PostgresConnectionStore.import_connection``, encrypted at rest), one
realm at a time. The command around it (arguments, the broker's database, the
audit trail, the progress bar, exit codes) is ``broker.import_command``.

How the source is read
    Its columns are found in ``information_schema.columns``; ``realm_id``,
    ``user_id`` and ``refresh_token`` must be there, the rest is mapped from the
    names the original app is likely to use (``_OPTIONAL``; the report says which
    column fed which field). Everything is read in one ``REPEATABLE READ``
    transaction made ``READ ONLY`` (``SET TRANSACTION READ ONLY``: every statement on
    the source runs inside it), through a server-side cursor, ``BATCH`` rows at a
    time: at no point are more tokens than one batch (plus the copies of the realm at
    its edge) in memory.

Duplicates
    The query orders the rows by realm (``ORDER BY realm_id::text COLLATE "C"``)
    so every copy of a realm arrives next to the others, whichever batch they
    straddle: the freshest usable copy is chosen in Python, with the same parsed,
    UTC-normalised dates that are imported (a ``refresh_token_created_at`` in the
    future counts as unknown there too), and the other copies are skipped as
    ``duplicate realm (older copy)``. The sort is PostgreSQL's (it spills to disk,
    not to our memory); collecting the realm ids first instead would take a second
    pass and still need the winner of each duplicate picked by SQL with dates in
    whatever form the source keeps them.

What is written
    A realm the broker holds as ACTIVE is never overwritten (the broker's token
    may have rotated since the old app last saw it): ``replace_active`` stays
    False and the store's refusal is counted as ``already active in the broker``.
    A realm the broker holds as needing reauthorization, or revoked, IS replaced:
    the old app's copy may be the live one. Either way, a broker row whose
    refresh token equals the source's is ``already imported`` and not touched, so
    running the import again writes nothing. ``dry_run`` does all of the reading,
    checking and comparing and writes nothing.

Nothing here logs or prints a token; the source is named as host:port/db only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from broker.api import validation
from broker.domain.model import (
    ConnectionFilter,
    ConnectionInfo,
    ConnectionStatus,
    ImportRequest,
    RealmFilter,
)
from broker.domain.policy import RefreshPolicy
from broker.errors import (
    BrokerError,
    ConfigurationError,
    ConnectionActive,
    ConnectionNotFound,
    InvalidRequest,
    StorageError,
    StorageUnavailable,
)
from broker.storage.connections import PostgresConnectionStore

DEFAULT_TABLE = "quickbooks_connections"
BATCH = 1000
"""Source rows fetched (and tokens held in memory) at a time."""
CONCURRENCY = 8
"""Realms written at once (each its own durable transaction: commits group)."""

# Why a row was not imported (``ImportReport.skipped``).
REALM_MISSING = "realm_id missing"
REALM_MALFORMED = "realm_id malformed (not 1-64 letters, digits, '-' or '_')"
USER_MISSING = "user_id missing"
USER_MALFORMED = "user_id malformed (not 1-255 printable characters)"
REFRESH_MISSING = "refresh_token missing"
REFRESH_MALFORMED = "refresh_token malformed (not 1-4096 printable ASCII characters)"
DUPLICATE = "duplicate realm (older copy)"
ALREADY_ACTIVE = "already active in the broker"
ALREADY_IMPORTED = "already imported"

# What was adjusted on a row that was (or would be) imported (``ImportReport.notes``).
ACCESS_WITHOUT_EXPIRY = "access token without an expiry: left out (refreshed on first use)"
ACCESS_EXPIRED = "access token already expired: left out (refreshed on first use)"
ACCESS_TOO_LONG = "access token expiry more than an hour ahead: left out (refreshed on first use)"
ACCESS_MALFORMED = "access token malformed: left out (refreshed on first use)"
CREATED_UNKNOWN = "refresh_token_created_at unknown: the broker renews it at first use or sweep"
CREATED_IN_FUTURE = "refresh_token_created_at in the future: treated as unknown"
EXPIRY_BEFORE_CREATED = "refresh_token_expires_at not after refresh_token_created_at: ignored"
REFRESH_PAST_EXPIRY = "refresh token past its recorded expiry: imported, the broker will find out"
REPLACED_LOST = "replaced a broker connection that needed reauthorization"
REPLACED_REVOKED = "replaced a broker connection that was revoked"

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces (as ImportConnection)
_FUTURE_TOLERANCE = timedelta(minutes=5)  # as ImportConnection's refresh_token_created_at
_ACCESS_TOKEN_LIFE = timedelta(hours=1) + _FUTURE_TOLERANCE
_EPOCH_MILLIS_ABOVE = 10**11  # 10^11 s is the year 5138; 10^11 ms is 1973
_OLDEST = datetime.min.replace(tzinfo=UTC)

_REQUIRED = ("realm_id", "user_id", "refresh_token")
_OPTIONAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("access_token", ("access_token",)),
    ("access_token_expires_at", ("access_token_expires_at", "token_expires_at", "expires_at")),
    ("refresh_token_created_at", ("refresh_token_created_at",)),
    ("refresh_token_expires_at", ("refresh_token_expires_at", "x_refresh_token_expires_at")),
    ("freshness", ("updated_at", "created_at")),
)
_TIME_FIELDS = frozenset(name for name, _ in _OPTIONAL) - {"access_token"}
_TEXT_TYPES = frozenset({"text", "character varying", "character", "USER-DEFINED"})
_NAIVE_TYPES = frozenset({"timestamp without time zone", "date"})
_EPOCH_TYPES = frozenset({"bigint", "integer", "smallint", "numeric", "double precision", "real"})
_TIME_TYPES = (
    _NAIVE_TYPES | _EPOCH_TYPES | {"timestamp with time zone", "text", "character varying"}
)


class ImportSourceError(ConfigurationError):
    """The source cannot be imported as given: a bad URL, table or credentials (exit 2)."""


class ImportFailed(StorageError):
    """A database failed mid-import; ``report`` says what was done before (exit 3).

    Running the import again is safe: what was imported counts as already imported.
    """

    def __init__(self, message: str, report: ImportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ImportReport:
    source: str
    """host:port/db (never the URL: it may carry a password)."""
    table: str = ""
    dry_run: bool = False
    columns: dict[str, str | None] = field(default_factory=dict)
    """Each field the broker stores, and the source column that fed it (None: none did)."""
    assumptions: list[str] = field(default_factory=list)
    """How the source's values were read (naive timestamps as UTC, epoch units, ...)."""
    rows: int = 0
    """Source rows read."""
    imported: int = 0
    would_import: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    """Adjustments made to rows that were (or would be) imported."""

    def summary(self) -> str:
        """What an operator reads: counts, reasons, the column mapping. Never a token."""
        head = f"import from {self.source} table {self.table}"
        if self.dry_run:
            head = f"dry run (nothing written) of the {head}"
        lines = [f"{head}: {self.rows} row(s) read"]
        if self.dry_run:
            lines.append(f"  would import {self.would_import}")
        else:
            lines.append(f"  imported {self.imported}")
        total = sum(self.skipped.values())
        lines.append(f"  skipped {total}" + (":" if total else ""))
        lines += [f"    {count:>7}  {reason}" for reason, count in self.skipped.most_common()]
        if self.notes:
            lines.append("  adjusted (still imported):")
            lines += [f"    {count:>7}  {note}" for note, count in self.notes.most_common()]
        if self.columns:
            lines.append("  columns used:")
            lines += [
                f"    {name:<26} <- {column or '(no such column)'}"
                for name, column in self.columns.items()
            ]
        lines += [f"  {assumption}" for assumption in self.assumptions]
        return "\n".join(lines)


# -- the source ---------------------------------------------------------------------


def source_location(url: str) -> str:
    """host:port/db of a postgresql:// URL (ImportSourceError for anything else)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImportSourceError("--from-database is not a valid URL (a bad port?)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ImportSourceError(
            "--from-database must be a postgresql:// URL (postgresql://user@host:5432/db; "
            "leave the password to PGPASSWORD or ~/.pgpass)"
        )
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", [""])[0] or "localhost"
    shown_port = port or query.get("port", ["5432"])[0]
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0] or "(default)"
    return f"{host}:{shown_port}/{database}"


def _secrets_of(url: str) -> list[str]:
    """The URL's password, as written and decoded, to scrub from error messages."""
    parts = urlsplit(url)
    found = [parts.password, unquote(parts.password)] if parts.password else []
    found += parse_qs(parts.query).get("password", [])
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


@dataclass(frozen=True)
class _Column:
    name: str
    data_type: str

    @property
    def sql(self) -> str:
        return '"' + self.name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Layout:
    table: str
    """schema.table as found."""
    columns: dict[str, _Column]
    """Field name (``_REQUIRED`` and ``_OPTIONAL``) to the source column feeding it."""

    @property
    def sql_table(self) -> str:
        schema, _, name = self.table.partition(".")
        return f"{_Column(schema, '').sql}.{_Column(name, '').sql}"

    def select(self) -> str:
        def value(name: str, cast: str = "") -> str:
            column = self.columns.get(name)
            return f"{column.sql}{cast}" if column else "NULL"

        realm = value("realm_id", "::text")
        return f"""SELECT {realm} AS realm_id, {value("user_id", "::text")} AS user_id,
                       {value("refresh_token", "::text")} AS refresh_token,
                       {value("access_token", "::text")} AS access_token,
                       {value("access_token_expires_at")} AS access_token_expires_at,
                       {value("refresh_token_created_at")} AS refresh_token_created_at,
                       {value("refresh_token_expires_at")} AS refresh_token_expires_at,
                       {value("freshness")} AS freshness
                   FROM {self.sql_table}
                   ORDER BY {realm} COLLATE "C"
                """

    def mapping(self) -> dict[str, str | None]:
        fields = (*_REQUIRED, *(name for name, _ in _OPTIONAL))
        return {name: self.columns[name].name if name in self.columns else None for name in fields}

    def assumptions(self) -> list[str]:
        said = []
        naive = [c.name for n, c in self.columns.items() if n in _TIME_FIELDS and _is_naive(c)]
        if naive:
            said.append(f"timestamps without a time zone, read as UTC: {', '.join(naive)}")
        epoch = [
            c.name
            for n, c in self.columns.items()
            if n in _TIME_FIELDS and c.data_type in _EPOCH_TYPES
        ]
        if epoch:
            said.append(
                f"numbers read as Unix time (milliseconds when above 10^11, else seconds): "
                f"{', '.join(epoch)}"
            )
        text = [
            c.name
            for n, c in self.columns.items()
            if n in _TIME_FIELDS and c.data_type in ("text", "character varying")
        ]
        if text:
            said.append(
                f"text read as ISO 8601 (without an offset: UTC; unreadable: unknown): "
                f"{', '.join(text)}"
            )
        if "refresh_token_expires_at" not in self.columns:
            said.append("refresh token expiry: 101 days after its issue time, where known")
        return said


def _is_naive(column: _Column) -> bool:
    return column.data_type in _NAIVE_TYPES


def _normal(name: str) -> str:
    return name.lower().replace("_", "")


def _pick(
    found: Sequence[_Column], candidates: Sequence[str], usable: frozenset[str]
) -> _Column | None:
    """The first candidate present (exactly, else ignoring case and underscores: realmId)."""
    for candidate in candidates:
        for exact in (True, False):
            for column in found:
                same = (
                    column.name == candidate
                    if exact
                    else _normal(column.name) == _normal(candidate)
                )
                if same and column.data_type in usable:
                    return column
    return None


_COLUMNS = """
SELECT c.table_schema::text AS table_schema, c.column_name::text AS column_name,
       c.data_type::text AS data_type
FROM information_schema.columns AS c
WHERE c.table_name = $1
  AND CASE WHEN $2::text = '' THEN c.table_schema = ANY(current_schemas(false))
           ELSE c.table_schema = $2 END
ORDER BY array_position(current_schemas(false), c.table_schema::name), c.ordinal_position"""


async def _discover(connection: asyncpg.Connection, table: str) -> _Layout:
    if not _TABLE.fullmatch(table):
        raise ImportSourceError(
            "--table must be a table name, optionally schema-qualified "
            "(letters, digits and '_', not starting with a digit: public.quickbooks_connections)"
        )
    schema, _, name = table.rpartition(".")
    rows = await connection.fetch(_COLUMNS, name, schema)
    if not rows and table != table.lower():  # typed as in SQL, where unquoted names fold
        rows = await connection.fetch(_COLUMNS, name.lower(), schema.lower())
        schema, name = schema.lower(), name.lower()
    if not rows:
        raise ImportSourceError(
            f"no table {table!s} in that database"
            + ("" if schema else " (searched the schemas on its search_path)")
        )
    found_schema = rows[0]["table_schema"]
    found = [
        _Column(row["column_name"], row["data_type"])
        for row in rows
        if row["table_schema"] == found_schema
    ]
    qualified = f"{found_schema}.{name}"
    columns: dict[str, _Column] = {}
    missing = []
    for required in _REQUIRED:
        column = _pick(found, (required,), frozenset(c.data_type for c in found))
        if column is None:
            missing.append(required)
        else:
            columns[required] = column
    if missing:
        present = ", ".join(c.name for c in found)
        raise ImportSourceError(
            f"table {qualified} has no {', '.join(missing)} column: it is not the original "
            f"app's connections table (its columns: {present}). Is --table right?"
        )
    refresh = columns["refresh_token"]
    if refresh.data_type not in _TEXT_TYPES:
        also = (
            " (its tokens are encrypted: is this the broker's own database?)"
            if refresh.data_type == "bytea"
            else ""
        )
        raise ImportSourceError(
            f"{qualified}.{refresh.name} is {refresh.data_type}, not text: "
            f"the import reads plain-text refresh tokens{also}"
        )
    for optional, candidates in _OPTIONAL:
        usable = _TEXT_TYPES if optional == "access_token" else _TIME_TYPES
        column = _pick(found, candidates, usable)
        if column is not None:
            columns[optional] = column
    return _Layout(qualified, columns)


class _SourceErrors:
    """asyncpg's errors on the source become ImportSourceError (fix the URL or the table)
    or StorageError (the source database failed), with the URL's password scrubbed."""

    _FIX_THE_URL: tuple[type[BaseException], ...] = (
        asyncpg.InvalidPasswordError,
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
        asyncpg.InsufficientPrivilegeError,
        asyncpg.UndefinedTableError,
        asyncpg.UndefinedColumnError,
        asyncpg.ClientConfigurationError,
        ValueError,  # asyncpg's DSN parsing
    )

    def __init__(self, where: str, secrets: list[str]) -> None:
        self._where = where
        self._secrets = secrets

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, BrokerError):
            return
        if isinstance(exc, self._FIX_THE_URL):
            raise ImportSourceError(f"source {self._where}: {self._describe(exc)}") from None
        if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
            raise StorageUnavailable(
                f"source database {self._where} unavailable: {self._describe(exc)}"
            ) from None
        if isinstance(exc, asyncpg.PostgresError):
            raise StorageError(f"source database {self._where}: {self._describe(exc)}") from None

    def _describe(self, exc: BaseException) -> str:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.asynccontextmanager
async def _open_source(dsn: str, errors: _SourceErrors) -> AsyncIterator[asyncpg.Connection]:
    async with errors:
        # Every statement runs in the READ ONLY transaction (no startup parameter for it:
        # a pgbouncer in front, as on Neon's pooler URLs, refuses unknown ones), and no
        # named prepared statements, which a pooler in transaction mode cannot keep.
        connection: asyncpg.Connection = await asyncpg.connect(
            dsn,
            timeout=10,
            statement_cache_size=0,
            server_settings={"application_name": "qbo-broker-import"},
        )
    try:
        yield connection
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.wait_for(connection.close(), 5)


# -- one row --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Candidate:
    request: ImportRequest
    notes: tuple[str, ...]
    rank: tuple[bool, datetime, bool, datetime]
    """Freshness among copies of one realm: issue time (known first), then freshness column."""


def _moment(value: object) -> tuple[datetime | None, bool]:
    """A source value as an aware UTC datetime; (None, True) when present but unreadable."""
    if value is None:
        return None, False
    try:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, date):
            moment = datetime(value.year, value.month, value.day)
        elif isinstance(value, int | float | Decimal) and not isinstance(value, bool):
            seconds = float(value)
            if abs(seconds) >= _EPOCH_MILLIS_ABOVE:
                seconds /= 1000
            moment = datetime.fromtimestamp(seconds, UTC)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value.strip())
        else:
            return None, True
    except (ValueError, OverflowError, OSError):
        return None, True
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC), False
    return moment.astimezone(UTC), False


def _check(row: asyncpg.Record, now: datetime) -> _Candidate | str:
    """The import request a source row makes, or why it makes none."""
    realm_id = row["realm_id"]
    if not realm_id:
        return REALM_MISSING
    user_id = row["user_id"]
    refresh_token = row["refresh_token"]
    try:
        validation.realm(realm_id)
    except InvalidRequest:
        return REALM_MALFORMED
    if not user_id:
        return USER_MISSING
    try:
        validation.user(user_id)
    except InvalidRequest:
        return USER_MALFORMED
    if not refresh_token:
        return REFRESH_MISSING
    if len(refresh_token) > validation.MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(refresh_token):
        return REFRESH_MALFORMED
    notes: list[str] = []
    unreadable: list[str] = []

    def moment(name: str) -> datetime | None:
        value, bad = _moment(row[name])
        if bad:
            unreadable.append(name)
        return value

    access_token: str | None = row["access_token"] or None
    access_expires = moment("access_token_expires_at")
    if access_token is not None:
        if len(access_token) > validation.MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(access_token):
            notes.append(ACCESS_MALFORMED)
        elif access_expires is None:
            notes.append(ACCESS_WITHOUT_EXPIRY)
        elif access_expires <= now:
            notes.append(ACCESS_EXPIRED)
        elif access_expires > now + _ACCESS_TOKEN_LIFE:  # Intuit's live an hour: a bad date
            notes.append(ACCESS_TOO_LONG)
        if notes:
            access_token = None
    if access_token is None:
        access_expires = None
    created = moment("refresh_token_created_at")
    if created is not None and created > now + _FUTURE_TOLERANCE:
        notes.append(CREATED_IN_FUTURE)
        created = None
    elif created is None:
        notes.append(CREATED_UNKNOWN)
    expires = moment("refresh_token_expires_at")
    if expires is not None and created is not None and expires <= created:
        notes.append(EXPIRY_BEFORE_CREATED)
        expires = None
    if expires is not None and expires <= now:
        notes.append(REFRESH_PAST_EXPIRY)
    fresh = moment("freshness")
    notes += [f"unreadable {name} value: treated as unknown" for name in unreadable]
    request = ImportRequest(
        realm_id=realm_id,
        user_id=user_id,
        refresh_token=refresh_token,
        access_token=access_token,
        access_token_expires_at=access_expires,
        refresh_token_created_at=created,
        refresh_token_expires_at=expires,
        replace_active=False,
    )
    rank = (created is not None, created or _OLDEST, fresh is not None, fresh or _OLDEST)
    return _Candidate(request, tuple(notes), rank)


# -- the run ------------------------------------------------------------------------


async def import_from(
    source_dsn: str,
    table: str,
    store: PostgresConnectionStore,
    *,
    dry_run: bool,
    now: datetime,
    progress: Callable[[int, int], None] | None = None,
    audit: Callable[[str, str], None] | None = None,
) -> ImportReport:
    """Import every usable connection of ``table`` at ``source_dsn`` into ``store``.

    ``progress(rows_read, rows_total)`` after each batch; ``audit(realm_id, outcome)``
    once per realm whose write was attempted ("OK", "CONNECTION_ACTIVE",
    "STORAGE_ERROR"; never in a dry run, nor for a realm already imported, which
    is not touched). Raises ImportSourceError (bad URL, table, credentials) before
    anything is written, or ImportFailed (a StorageError: the source or the broker's
    database failed; it carries the report so far).
    """
    report = ImportReport(source=source_location(source_dsn), table=table, dry_run=dry_run)
    try:
        await _import(source_dsn, table, store, report, now, progress, audit)
    except StorageError as exc:
        if not report.rows:
            raise ImportFailed(str(exc), report) from exc
        raise ImportFailed(
            f"{exc} (import stopped after {report.rows} row(s) read; running it again is "
            "safe: what was imported counts as already imported)",
            report,
        ) from exc
    return report


async def _import(
    source_dsn: str,
    table: str,
    store: PostgresConnectionStore,
    report: ImportReport,
    now: datetime,
    progress: Callable[[int, int], None] | None,
    audit: Callable[[str, str], None] | None,
) -> None:
    run = _Run(store, report, dry_run=report.dry_run, audit=audit)
    errors = _SourceErrors(report.source, _secrets_of(source_dsn))
    async with _open_source(source_dsn, errors) as connection:
        async with errors:
            transaction = connection.transaction(isolation="repeatable_read")
            await transaction.start()
        try:
            async with errors:
                await connection.execute("SET TRANSACTION READ ONLY")
                layout = await _discover(connection, table)
                report.table = layout.table
                report.columns = layout.mapping()
                report.assumptions = layout.assumptions()
                total = await connection.fetchval(f"SELECT count(*) FROM {layout.sql_table}")
                cursor = await connection.cursor(layout.select())
            edge: list[_Candidate] = []  # the copies of the last realm seen, maybe not all yet
            while True:
                async with errors:
                    rows = await cursor.fetch(BATCH)
                if not rows:
                    break
                report.rows += len(rows)
                chosen: list[_Candidate] = []
                for row in rows:
                    outcome = _check(row, now)
                    if isinstance(outcome, str):
                        report.skipped[outcome] += 1
                        continue
                    if edge and edge[0].request.realm_id != outcome.request.realm_id:
                        chosen.append(run.freshest(edge))
                        edge = []
                    edge.append(outcome)
                del rows
                await run.settle(chosen)
                if progress is not None:
                    progress(report.rows, max(total, report.rows))
            if edge:
                await run.settle([run.freshest(edge)])
        finally:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await transaction.rollback()  # read only: nothing to keep


class _Run:
    def __init__(
        self,
        store: PostgresConnectionStore,
        report: ImportReport,
        *,
        dry_run: bool,
        audit: Callable[[str, str], None] | None,
    ) -> None:
        self._store = store
        self._report = report
        self._dry_run = dry_run
        self._audit = audit or (lambda realm_id, outcome: None)
        self._failure: BaseException | None = None

    def freshest(self, copies: list[_Candidate]) -> _Candidate:
        """The copy to import; the others are counted as duplicates."""
        best = max(copies, key=lambda copy: copy.rank)  # the first of equals
        if len(copies) > 1:
            self._report.skipped[DUPLICATE] += len(copies) - 1
        return best

    async def settle(self, chosen: list[_Candidate]) -> None:
        """Import (or weigh, in a dry run) one batch of distinct realms."""
        if not chosen:
            return
        present = await self._in_broker([c.request.realm_id for c in chosen])
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(candidate: _Candidate) -> None:
            async with gate:
                if self._failure is None:
                    await self._place(candidate, present.get(candidate.request.realm_id))

        # Every write is awaited, a failed one included: none is left running behind us.
        results = await asyncio.gather(*(one(c) for c in chosen), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, StorageError):
                raise result
        if self._failure is not None:
            raise self._failure

    async def _in_broker(self, realms: list[str]) -> dict[str, ConnectionInfo]:
        page = await self._store.list_connections(
            ConnectionFilter(),
            limit=len(realms),
            after=None,
            realms=RealmFilter(False, tuple(realms), (), False, (), ()),
        )
        return {info.realm_id: info for info in page.connections}

    async def _broker_refresh_token(self, realm_id: str) -> str | None:
        try:
            async with self._store.locked(realm_id) as row:
                return row.current.refresh_token
        except ConnectionNotFound:
            return None

    async def _place(self, candidate: _Candidate, existing: ConnectionInfo | None) -> None:
        request = candidate.request
        report = self._report
        notes = list(candidate.notes)
        try:
            if existing is not None:
                if await self._broker_refresh_token(request.realm_id) == request.refresh_token:
                    report.skipped[ALREADY_IMPORTED] += 1
                    return
                if existing.status is ConnectionStatus.REVOKED:
                    notes.append(REPLACED_REVOKED)
                elif existing.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
                    notes.append(REPLACED_LOST)
                elif self._dry_run:
                    report.skipped[ALREADY_ACTIVE] += 1
                    return
            if self._dry_run:
                report.would_import += 1
                report.notes.update(notes)
                return
            try:
                await self._store.import_connection(request, RefreshPolicy.from_import(request))
            except ConnectionActive:
                report.skipped[ALREADY_ACTIVE] += 1
                self._audit(request.realm_id, "CONNECTION_ACTIVE")
                return
            except StorageError:
                self._audit(request.realm_id, "STORAGE_ERROR")
                raise
            report.imported += 1
            report.notes.update(notes)
            self._audit(request.realm_id, "OK")
        except StorageError as exc:
            if self._failure is None:
                self._failure = exc
            raise
