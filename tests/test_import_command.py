"""``qbo-broker import``: the original application's table, as it may really look, moved in.

The source is a throwaway database on the test PostgreSQL holding the original
(Node) application's ``quickbooks_connections`` with plain-text tokens and the
kinds of rows a real one accumulates: NULLs in every optional column, a NULL
refresh token, a malformed realm, two copies of one realm, a realm the broker
already serves, a realm the broker lost. The grants are live at the fake Intuit,
so "usable" means a running broker answers GetAccessToken with them.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from broker import importer
from broker._proto import broker_pb2 as pb
from broker.domain.model import ConnectionStatus
from broker.import_command import (
    DEFAULT_TABLE,
    EXIT_BAD_SOURCE,
    EXIT_DATABASE,
    EXIT_DONE,
    METHOD,
    add_import_command,
    run_import,
)
from broker.importer import (
    ACCESS_WITHOUT_EXPIRY,
    ALREADY_ACTIVE,
    ALREADY_IMPORTED,
    CREATED_IN_FUTURE,
    CREATED_UNKNOWN,
    DUPLICATE,
    REALM_MALFORMED,
    REALM_MISSING,
    REFRESH_MALFORMED,
    REFRESH_MISSING,
    REPLACED_LOST,
    USER_MISSING,
    ImportFailed,
    ImportReport,
    ImportSourceError,
    import_from,
    source_location,
)
from broker.importer import DEFAULT_TABLE as IMPORTER_DEFAULT_TABLE
from broker.settings import Settings
from broker.storage.connections import PostgresConnectionStore
from broker.storage.database import create_pool
from broker.storage.embedded import EmbeddedPostgres
from tests.conftest import StartBroker, throwaway_database
from tests.support import SWEEP_BY_HAND, RunningBroker, eventually

DAYS = timedelta(days=1)
PASSWORD = "Old-App-S3cret"

ORIGIN_SCHEMA = """
CREATE TABLE quickbooks_connections (
    id SERIAL PRIMARY KEY,
    user_id VARCHAR(255),
    realm_id VARCHAR(255),
    access_token TEXT,
    refresh_token TEXT,
    token_expires_at TIMESTAMP,
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
);
-- add_refresh_token_tracking.sql
ALTER TABLE quickbooks_connections ADD COLUMN refresh_token_created_at TIMESTAMP;
"""
"""The original app's table as its migrations leave it (naive timestamps, nullable)."""

FULL = "9130000000000001"  # everything set: the access token is served as imported
NO_EXPIRY = "9130000000000002"  # an access token without an expiry
NO_DATES = "9130000000000003"  # every optional column NULL
FUTURE = "9130000000000004"  # refresh_token_created_at in the future
DUPLICATED = "9130000000000005"  # two copies, the older one inserted last
ACTIVE = "9130000000000006"  # already served by the broker: never overwritten
LOST = "9130000000000007"  # the broker needs reauthorization: replaced
IMPORTED = (FULL, NO_EXPIRY, NO_DATES, FUTURE, DUPLICATED, LOST)
REFUSED = Counter(
    {
        DUPLICATE: 1,
        REFRESH_MISSING: 1,
        REALM_MALFORMED: 1,
        REALM_MISSING: 1,
        USER_MISSING: 1,
        REFRESH_MALFORMED: 1,
    }
)
"""Rows no run imports, whatever the broker holds."""


def naive(moment: datetime) -> datetime:
    """As the original app's TIMESTAMP columns hold it: UTC, without a zone."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def with_password(dsn: str) -> str:
    """The test server trusts local connections; the password is there to be hidden."""
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


async def insert(dsn: str, rows: list[dict[str, Any]]) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for row in rows:
            names = ", ".join(row)
            places = ", ".join(f"${n}" for n in range(1, len(row) + 1))
            await connection.execute(
                f"INSERT INTO quickbooks_connections ({names}) VALUES ({places})", *row.values()
            )
    finally:
        await connection.close()


async def origin_database(dsn: str, rows: list[dict[str, Any]]) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(ORIGIN_SCHEMA)
    finally:
        await connection.close()
    await insert(dsn, rows)


async def broker_rows(database: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch("SELECT * FROM quickbooks_connections ORDER BY realm_id")
    finally:
        await connection.close()
    return [dict(row) for row in rows]


async def audit_events(database: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database)
    try:
        return await connection.fetch(
            "SELECT principal, method, realm_id, outcome FROM broker_audit_events "
            "WHERE method = $1 ORDER BY realm_id",
            METHOD,
        )
    finally:
        await connection.close()


async def make_reauthorization_required(broker: RunningBroker, realm_id: str) -> None:
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(realm_id) or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.admin.RefreshConnection(pb.RefreshConnectionRequest(realm_id=realm_id))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
async def source(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    """The DSN of an empty database to play the original application's."""
    async with throwaway_database(postgres) as dsn:
        yield dsn


@pytest.fixture
async def store(database: str, settings: Settings) -> AsyncIterator[PostgresConnectionStore]:
    assert settings.encryption_keys is not None
    pool = await create_pool(database, 10, timedelta(seconds=2))
    yield PostgresConnectionStore(pool, settings.encryption_keys)
    await pool.close()


class Origin:
    """The original app's table for the main scenario, and the tokens it holds."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.now = broker.clock()
        self.tokens: dict[str, str] = {}  # what the source holds, to look for it elsewhere
        self.rows: list[dict[str, Any]] = []

    def grant(self, realm_id: str, **dates: datetime) -> tuple[str, str]:
        issued = self.broker.intuit.model.create_grant(realm_id, **dates)
        self.tokens[f"{realm_id} refresh"] = issued.refresh_token
        self.tokens[f"{realm_id} access"] = issued.access_token
        return issued.refresh_token, issued.access_token

    def row(self, **values: Any) -> None:
        for name, value in values.items():
            if isinstance(value, datetime):
                values[name] = naive(value)
            elif name.endswith("_token") and value:
                self.tokens.setdefault(f"row {len(self.rows)} {name}", value)
        self.rows.append(values)

    async def build(self) -> None:
        now = self.now
        refresh, access = self.grant(
            FULL, refresh_token_issued_at=now - 10 * DAYS, access_token_issued_at=now
        )
        self.row(
            realm_id=FULL,
            user_id="alice@example.com",
            access_token=access,
            refresh_token=refresh,
            token_expires_at=now + timedelta(minutes=59),
            refresh_token_created_at=now - 10 * DAYS,
            created_at=now - 200 * DAYS,
            updated_at=now - 10 * DAYS,
        )
        refresh, access = self.grant(NO_EXPIRY)
        self.row(
            realm_id=NO_EXPIRY,
            user_id="bob@example.com",
            access_token=access,
            refresh_token=refresh,
            token_expires_at=None,
            refresh_token_created_at=now - 1 * DAYS,
        )
        refresh, _ = self.grant(NO_DATES)
        self.row(
            realm_id=NO_DATES,
            user_id="carol@example.com",
            access_token=None,
            refresh_token=refresh,
            token_expires_at=None,
            refresh_token_created_at=None,
            created_at=None,
            updated_at=None,
        )
        refresh, _ = self.grant(FUTURE)
        self.row(
            realm_id=FUTURE,
            user_id="dave@example.com",
            refresh_token=refresh,
            refresh_token_created_at=now + 3 * DAYS,
        )
        refresh, _ = self.grant(DUPLICATED, refresh_token_issued_at=now - 2 * DAYS)
        self.row(  # the newer copy first: the order of the rows must not matter
            realm_id=DUPLICATED,
            user_id="erin@example.com",
            refresh_token=refresh,
            refresh_token_created_at=now - 2 * DAYS,
            updated_at=now - 2 * DAYS,
        )
        self.row(
            realm_id=DUPLICATED,
            user_id="erin@example.com",
            refresh_token="AB11-old-copy-rotated-long-ago-" + "x" * 20,
            refresh_token_created_at=now - 40 * DAYS,
            updated_at=now - 40 * DAYS,
        )
        await self.broker.seed(ACTIVE, "frank@example.com")
        self.row(
            realm_id=ACTIVE,
            user_id="frank@example.com",
            refresh_token="AB11-the-old-apps-copy-of-an-active-realm",
            refresh_token_created_at=now - 50 * DAYS,
        )
        await self.broker.seed(LOST, "grace@example.com")
        await make_reauthorization_required(self.broker, LOST)
        refresh, _ = self.grant(LOST, refresh_token_issued_at=now - 5 * DAYS)
        self.row(
            realm_id=LOST,
            user_id="grace@example.com",
            refresh_token=refresh,
            refresh_token_created_at=now - 5 * DAYS,
        )
        # Rows nobody can import.
        self.row(realm_id="9130000000000008", user_id="heidi@example.com", refresh_token=None)
        self.row(realm_id="not a realm!", user_id="ivan@example.com", refresh_token="AB11-a")
        self.row(realm_id=None, user_id="judy@example.com", refresh_token="AB11-b")
        self.row(realm_id="9130000000000011", user_id=None, refresh_token="AB11-c")
        self.row(realm_id="9130000000000012", user_id="mallory", refresh_token="AB11 spaced")


@pytest.fixture
async def origin(start_broker: StartBroker, source: str) -> Origin:
    broker = await start_broker(**SWEEP_BY_HAND)
    built = Origin(broker)
    await built.build()
    await origin_database(source, built.rows)
    return built


def assert_tells_no_secret(text: str, origin: Origin) -> None:
    assert PASSWORD not in text
    for what, token in origin.tokens.items():
        assert token not in text, f"the {what} token is printed"


# -- the import, scenario by scenario ------------------------------------------------------


@pytest.mark.parametrize("batch", [1, importer.BATCH])
async def test_a_dry_run_says_what_would_happen_and_writes_nothing(
    origin: Origin,
    source: str,
    store: PostgresConnectionStore,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
) -> None:
    """With batch 1, the two copies of DUPLICATED arrive in different batches."""
    monkeypatch.setattr(importer, "BATCH", batch)
    before = await broker_rows(database)
    calls: list[tuple[str, str]] = []

    report = await import_from(
        with_password(source),
        DEFAULT_TABLE,
        store,
        dry_run=True,
        now=origin.now,
        audit=lambda realm_id, outcome: calls.append((realm_id, outcome)),
    )

    assert report.dry_run
    assert (report.would_import, report.imported) == (len(IMPORTED), 0)
    assert dict(report.skipped) == REFUSED + Counter({ALREADY_ACTIVE: 1})  # no zero counts
    assert report.notes[REPLACED_LOST] == 1
    assert await broker_rows(database) == before
    assert calls == []
    summary = report.summary()
    assert "dry run (nothing written)" in summary
    assert f"would import {len(IMPORTED)}" in summary
    assert_tells_no_secret(summary, origin)


async def test_the_import_moves_usable_rows_in_encrypted_and_refuses_the_rest(
    origin: Origin, source: str, store: PostgresConnectionStore, database: str
) -> None:
    broker = origin.broker
    now = origin.now
    active_before = next(r for r in await broker_rows(database) if r["realm_id"] == ACTIVE)
    calls: list[tuple[str, str]] = []
    progress: list[tuple[int, int]] = []

    report = await import_from(
        with_password(source),
        DEFAULT_TABLE,
        store,
        dry_run=False,
        now=now,
        progress=lambda done, total: progress.append((done, total)),
        audit=lambda realm_id, outcome: calls.append((realm_id, outcome)),
    )

    # The counts and the reasons.
    assert report.imported == len(IMPORTED)
    assert report.skipped == REFUSED + Counter({ALREADY_ACTIVE: 1})
    assert report.rows == len(origin.rows)
    assert progress[-1] == (len(origin.rows), len(origin.rows))
    assert sorted(calls) == sorted(
        [(realm, "OK") for realm in IMPORTED] + [(ACTIVE, "CONNECTION_ACTIVE")]
    )
    assert report.notes[ACCESS_WITHOUT_EXPIRY] == 1
    assert report.notes[CREATED_IN_FUTURE] == 1
    assert report.notes[CREATED_UNKNOWN] == 1  # NO_DATES (FUTURE has its own note)
    assert report.notes[REPLACED_LOST] == 1
    assert report.columns == {
        "realm_id": "realm_id",
        "user_id": "user_id",
        "refresh_token": "refresh_token",
        "access_token": "access_token",
        "access_token_expires_at": "token_expires_at",
        "refresh_token_created_at": "refresh_token_created_at",
        "refresh_token_expires_at": None,
        "freshness": "updated_at",
    }
    summary = report.summary()
    assert "read as UTC: token_expires_at, refresh_token_created_at, updated_at" in summary
    assert f"imported {len(IMPORTED)}" in summary
    assert "1  already active in the broker" in summary
    assert_tells_no_secret(summary, origin)
    assert_tells_no_secret(repr(report), origin)

    # Encrypted at rest: no token of the source is anywhere in the broker's table.
    rows = {row["realm_id"]: row for row in await broker_rows(database)}
    assert set(rows) == {*IMPORTED, ACTIVE}
    stored = b"".join(
        bytes(row[column] or b"") for row in rows.values() for column in ("refresh_token",)
    ) + b"".join(bytes(row["access_token"] or b"") for row in rows.values())
    for what, token in origin.tokens.items():
        assert token.encode() not in stored, f"the {what} token is stored in plain text"

    # The dates, as the source had them (naive read as UTC; the future one forgotten).
    assert rows[FULL]["refresh_token_created_at"] == now - 10 * DAYS
    assert rows[FULL]["access_token_expires_at"] == now + timedelta(minutes=59)
    assert rows[FULL]["refresh_token_expires_at"] == now - 10 * DAYS + 101 * DAYS
    assert rows[NO_EXPIRY]["access_token"] is None  # left out: no expiry to trust
    assert rows[NO_DATES]["refresh_token_created_at"] is None
    assert rows[FUTURE]["refresh_token_created_at"] is None
    assert rows[DUPLICATED]["refresh_token_created_at"] == now - 2 * DAYS  # the newer copy
    assert rows[LOST]["status"] == ConnectionStatus.ACTIVE.value
    assert rows[LOST]["refresh_token_created_at"] == now - 5 * DAYS
    assert rows[ACTIVE] == active_before  # untouched, to the byte

    # Usable: the running broker serves them. FULL's access token as imported; the others
    # are refreshed at Intuit with the imported refresh token (the older copy of
    # DUPLICATED, or the source's copy of ACTIVE, would be refused there).
    reply = await broker.get_token(FULL)
    assert reply.access_token == origin.tokens[f"{FULL} access"]
    assert broker.refreshes(FULL) == 0
    for realm in (NO_EXPIRY, NO_DATES, FUTURE, DUPLICATED):
        reply = await broker.get_token(realm)
        assert broker.token_works(realm, reply.access_token)
        assert broker.refreshes(realm) == 1

    async def lost_one_is_served() -> bool:  # once the broker's cache has heard of it
        try:
            return broker.token_works(LOST, (await broker.get_token(LOST)).access_token)
        except grpc.aio.AioRpcError:
            return False

    await eventually(lost_one_is_served, what="the replaced connection is served")
    reply = await broker.get_token(ACTIVE)
    assert broker.token_works(ACTIVE, reply.access_token)
    assert broker.refreshes(ACTIVE) == 0


async def test_a_second_run_imports_nothing_and_says_why(
    origin: Origin, source: str, store: PostgresConnectionStore, database: str
) -> None:
    first = await import_from(source, DEFAULT_TABLE, store, dry_run=False, now=origin.now)
    assert first.imported == len(IMPORTED)
    after_first = await broker_rows(database)
    calls: list[tuple[str, str]] = []

    again = await import_from(
        source,
        DEFAULT_TABLE,
        store,
        dry_run=False,
        now=origin.now,
        audit=lambda realm_id, outcome: calls.append((realm_id, outcome)),
    )

    assert again.imported == 0
    assert again.skipped == REFUSED + Counter({ALREADY_IMPORTED: len(IMPORTED), ALREADY_ACTIVE: 1})
    assert await broker_rows(database) == after_first  # not even rewritten
    assert calls == [(ACTIVE, "CONNECTION_ACTIVE")]  # the only write attempted
    dry = await import_from(source, DEFAULT_TABLE, store, dry_run=True, now=origin.now)
    assert (dry.would_import, dry.skipped) == (0, again.skipped)


async def test_a_broker_copy_with_the_same_refresh_token_is_already_imported_even_if_lost(
    origin: Origin, source: str, store: PostgresConnectionStore
) -> None:
    """A lost realm whose token the source also holds: that copy is as dead as the broker's."""
    await import_from(source, DEFAULT_TABLE, store, dry_run=False, now=origin.now)
    await make_reauthorization_required(origin.broker, NO_DATES)

    again = await import_from(source, DEFAULT_TABLE, store, dry_run=False, now=origin.now)

    assert again.imported == 0
    assert again.skipped[ALREADY_IMPORTED] == len(IMPORTED)
    info = await store.get_info(NO_DATES)
    assert info.status is ConnectionStatus.REAUTHORIZATION_REQUIRED


# -- the command, end to end ----------------------------------------------------------------


def options(source: str, table: str = DEFAULT_TABLE, dry_run: bool = False) -> argparse.Namespace:
    return argparse.Namespace(from_database=source, table=table, dry_run=dry_run)


async def test_the_command_imports_audits_and_prints_a_summary_without_secrets(
    origin: Origin,
    source: str,
    settings: Settings,
    database: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = await run_import(settings, options(with_password(source), dry_run=True))
    dry = capsys.readouterr()
    assert code == EXIT_DONE, dry.err
    assert f"would import {len(IMPORTED)}" in dry.out
    assert await audit_events(database) == []

    code = await run_import(settings, options(with_password(source), "public." + DEFAULT_TABLE))

    out, err = capsys.readouterr()
    assert code == EXIT_DONE, err
    print(out)
    assert f"import from {source_location(source)} table public.quickbooks_connections" in out
    assert f"imported {len(IMPORTED)}" in out
    assert f"skipped {sum(REFUSED.values()) + 1}:" in out
    assert "1  duplicate realm (older copy)" in out
    assert_tells_no_secret(out + err, origin)
    events = await audit_events(database)
    assert sorted((e["realm_id"], e["outcome"]) for e in events) == sorted(
        [(realm, "OK") for realm in IMPORTED] + [(ACTIVE, "CONNECTION_ACTIVE")]
    )
    assert {e["principal"] for e in events} == {events[0]["principal"]}
    assert events[0]["principal"].startswith("cli:")
    assert "@" in events[0]["principal"]


async def test_a_source_that_is_not_postgresql_is_refused_before_anything_opens(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_import(settings, options(f"mysql://root:{PASSWORD}@db/app"))

    err = capsys.readouterr().err
    assert code == EXIT_BAD_SOURCE
    assert "must be a postgresql:// URL" in err
    assert PASSWORD not in err


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("connections; DROP TABLE x", "--table must be a table name"),
        ("public.nope", "no table public.nope"),
        ("wrong_shape", "has no user_id, refresh_token column"),
    ],
)
async def test_a_bad_table_is_exit_2_with_a_clear_message(
    source: str,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    table: str,
    says: str,
) -> None:
    connection = await asyncpg.connect(source)
    try:
        await connection.execute("CREATE TABLE wrong_shape (id serial, realm_id text)")
    finally:
        await connection.close()

    code = await run_import(settings, options(with_password(source), table))

    err = capsys.readouterr().err
    assert code == EXIT_BAD_SOURCE
    assert says in err
    assert PASSWORD not in err


async def test_the_brokers_own_table_is_refused_as_a_source(
    database: str, store: PostgresConnectionStore
) -> None:
    with pytest.raises(ImportSourceError, match=r"bytea, not text.*broker's own database"):
        await import_from(database, DEFAULT_TABLE, store, dry_run=True, now=datetime.now(UTC))


async def test_an_unreachable_source_is_exit_3_without_its_password(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_import(settings, options(f"postgresql://app:{PASSWORD}@127.0.0.1:9/app"))

    out, err = capsys.readouterr()
    assert code == EXIT_DATABASE
    assert "source database 127.0.0.1:9/app unavailable" in err
    assert PASSWORD not in out + err


async def test_the_source_is_read_in_a_read_only_transaction(
    source: str, store: PostgresConnectionStore
) -> None:
    """A 'table' that writes when read (a view over a volatile function) cannot write."""
    connection = await asyncpg.connect(source)
    try:
        await connection.execute(
            """CREATE TABLE touched (at timestamptz);
               CREATE FUNCTION touch() RETURNS text LANGUAGE plpgsql AS $$
                   BEGIN INSERT INTO touched VALUES (now()); RETURN 'AB11-token'; END $$;
               CREATE VIEW quickbooks_connections AS
                   SELECT '9130000000000001'::text AS realm_id, 'u'::text AS user_id,
                          touch() AS refresh_token"""
        )
        with pytest.raises(ImportFailed, match="read-only transaction"):
            await import_from(source, DEFAULT_TABLE, store, dry_run=True, now=datetime.now(UTC))
        assert await connection.fetchval("SELECT count(*) FROM touched") == 0
    finally:
        await connection.close()


async def test_other_column_names_and_types_are_mapped_and_reported(
    source: str, store: PostgresConnectionStore
) -> None:
    """Another shape the original app may have: a schema, camelCase, epoch milliseconds."""
    now = datetime.now(UTC).replace(microsecond=0)
    connection = await asyncpg.connect(source)
    try:
        await connection.execute(
            """CREATE SCHEMA legacy;
               CREATE TABLE legacy.qbo ("realmId" bigint, "userId" uuid, "refreshToken" text,
                   "accessToken" text, expires_at bigint, x_refresh_token_expires_at timestamptz,
                   refresh_token_created_at text, created_at timestamptz)"""
        )
        await connection.execute(
            "INSERT INTO legacy.qbo VALUES "
            "(9130000000000021, '6f1c7c2e-98e1-4d8e-9a0f-2b4f6a3c5d7e', 'AB11-rt', 'eyJ-at',"
            " $1, $2, $3, $4)",
            int((now + timedelta(minutes=30)).timestamp() * 1000),
            now + 90 * DAYS,
            (now - 11 * DAYS).isoformat(),
            now - 300 * DAYS,
        )
    finally:
        await connection.close()

    report = await import_from(source, "legacy.qbo", store, dry_run=False, now=now)

    assert report.imported == 1, report.summary()
    assert report.columns == {
        "realm_id": "realmId",
        "user_id": "userId",
        "refresh_token": "refreshToken",
        "access_token": "accessToken",
        "access_token_expires_at": "expires_at",
        "refresh_token_created_at": "refresh_token_created_at",
        "refresh_token_expires_at": "x_refresh_token_expires_at",
        "freshness": "created_at",
    }
    assert "Unix time" in report.summary()
    assert "ISO 8601" in report.summary()
    info = await store.get_info("9130000000000021")
    assert info.user_id == "6f1c7c2e-98e1-4d8e-9a0f-2b4f6a3c5d7e"
    assert info.access_token_expires_at == now + timedelta(minutes=30)
    assert info.refresh_token_created_at == now - 11 * DAYS
    assert info.refresh_token_expires_at == now + 90 * DAYS


def test_the_help_explains_the_cut_over_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="qbo-broker")
    add_import_command(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["import", "--help"])
    text = capsys.readouterr().out

    assert "Stop the original application's refresh job" in text
    assert "--dry-run" in text
    assert "exit codes:" in text
    assert "  2  a bad --from-database URL or --table" in text
    assert "  3  a database" in text
    assert DEFAULT_TABLE == IMPORTER_DEFAULT_TABLE
    parsed = parser.parse_args(["import", "--from-database", "postgresql://h/db", "--dry-run"])
    assert (parsed.table, parsed.dry_run) == (DEFAULT_TABLE, True)


# -- scale ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_ten_thousand_rows(
    source: str, store: PostgresConnectionStore, database: str
) -> None:
    """Timing printed, not asserted (run with -s to see it)."""
    rows = 10_000
    connection = await asyncpg.connect(source)
    try:
        await connection.execute(ORIGIN_SCHEMA)
        await connection.execute(
            """INSERT INTO quickbooks_connections
                   (user_id, realm_id, access_token, refresh_token, token_expires_at,
                    refresh_token_created_at, updated_at)
               SELECT 'user-' || i, '95' || lpad((i % $1)::text, 14, '0'),
                      'eyJ' || md5(i::text) || md5('a' || i),
                      'AB11' || md5(i::text) || md5(i::text),
                      (now() at time zone 'UTC') + interval '40 minutes',
                      (now() at time zone 'UTC') - (i % 90) * interval '1 day',
                      (now() at time zone 'UTC') - (i % 7) * interval '1 hour'
               FROM generate_series(1, $2) AS i""",
            rows - 100,  # the last 100 rows are second copies of the first 100 realms
            rows,
        )
    finally:
        await connection.close()
    now = datetime.now(UTC)
    timings: dict[str, float] = {}

    async def timed(label: str, dry_run: bool) -> ImportReport:
        started = time.perf_counter()
        report = await import_from(source, DEFAULT_TABLE, store, dry_run=dry_run, now=now)
        timings[label] = time.perf_counter() - started
        return report

    dry = await timed("dry run", True)
    real = await timed("import", False)
    again = await timed("second run", False)

    assert dry.would_import == real.imported == rows - 100
    assert real.skipped == Counter({DUPLICATE: 100})
    assert again.skipped[ALREADY_IMPORTED] == rows - 100
    count = await broker_count(database)
    assert count == rows - 100
    print(
        f"\n{rows} source rows: "
        + ", ".join(f"{label} {s:.2f} s ({rows / s:,.0f} rows/s)" for label, s in timings.items())
    )


async def broker_count(database: str) -> int:
    connection = await asyncpg.connect(database)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM quickbooks_connections")
    finally:
        await connection.close()
    return count
