"""Schema migrations on a real, empty PostgreSQL: applied once however many replicas
start together, refused when the code and the database disagree, and the table the
original application's queries expect."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from broker.crypto import KeyRing
from broker.errors import StorageError
from broker.storage import schema
from broker.storage.embedded import EmbeddedPostgres
from tests.conftest import throwaway_database

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def empty_database(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    """The DSN of a database with nothing in it (not cloned from the migrated template)."""
    async with throwaway_database(postgres) as dsn:
        yield dsn


@pytest.fixture
async def empty_db(empty_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(empty_database)
    yield connection
    await connection.close()


async def recorded(connection: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await connection.fetch(
        "SELECT version, checksum FROM broker_schema_migrations ORDER BY version"
    )
    return [(row["version"], row["checksum"]) for row in rows]


async def table_exists(connection: asyncpg.Connection, name: str) -> bool:
    exists: bool = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
    return exists


async def test_migrate_applies_everything_once(empty_db: asyncpg.Connection) -> None:
    bundled = schema.bundled_migrations()
    assert bundled, "the package ships its migrations"
    assert not await table_exists(empty_db, "quickbooks_connections")

    assert await schema.migrate(empty_db) == len(bundled)

    assert await table_exists(empty_db, "quickbooks_connections")
    assert await recorded(empty_db) == [(m.version, m.checksum) for m in bundled]
    assert await schema.migrate(empty_db) == 0
    assert len(await recorded(empty_db)) == len(bundled)


async def test_ten_replicas_migrating_at_once_apply_each_migration_once(
    empty_database: str,
) -> None:
    connections = [await asyncpg.connect(empty_database) for _ in range(10)]
    try:
        applied = await asyncio.gather(*(schema.migrate(c) for c in connections))
        assert await recorded(connections[0]) == [
            (m.version, m.checksum) for m in schema.bundled_migrations()
        ]
    finally:
        for connection in connections:
            await connection.close()

    assert sum(applied) == len(schema.bundled_migrations())
    assert sorted(applied)[:-1] == [0] * 9  # one replica did the work, the rest found none


async def test_a_migration_edited_after_it_was_applied_is_an_error(
    empty_db: asyncpg.Connection,
) -> None:
    await schema.migrate(empty_db)
    bundled = schema.bundled_migrations()
    edited = [replace(bundled[0], sql=bundled[0].sql + "\n-- a later edit\n"), *bundled[1:]]

    with pytest.raises(StorageError, match=bundled[0].name):
        await schema.migrate(empty_db, edited)


async def test_a_database_migrated_by_a_newer_broker_is_an_error(
    empty_db: asyncpg.Connection,
) -> None:
    await schema.migrate(empty_db)
    newer = [
        *schema.bundled_migrations(),
        schema.Migration(9001, "9001_from_the_future.sql", "CREATE TABLE future_thing (id int)"),
    ]
    assert await schema.migrate(empty_db, newer) == 1

    with pytest.raises(StorageError, match="9001"):
        await schema.migrate(empty_db)  # the older code, which does not know 9001


async def test_a_failing_migration_leaves_nothing_half_applied(
    empty_db: asyncpg.Connection,
) -> None:
    broken = [
        *schema.bundled_migrations(),
        schema.Migration(
            9002,
            "9002_broken.sql",
            "CREATE TABLE half_done (id int); SELECT * FROM no_such_table;",
        ),
    ]

    with pytest.raises(StorageError):
        await schema.migrate(empty_db, broken)

    assert not await table_exists(empty_db, "half_done")
    assert 9002 not in dict(await recorded(empty_db))
    assert await schema.migrate(empty_db) == 0  # the good ones stayed applied


async def test_pending_migrations_names_what_is_missing(empty_db: asyncpg.Connection) -> None:
    names = [m.name for m in schema.bundled_migrations()]

    assert await schema.pending_migrations(empty_db) == names
    await schema.migrate(empty_db, [])  # bookkeeping table only
    assert await schema.pending_migrations(empty_db) == names
    await schema.migrate(empty_db)
    assert await schema.pending_migrations(empty_db) == []


async def run_migrate_command(database_url: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": database_url,
        "BROKER_ENCRYPTION_KEYS": KeyRing.generate_spec("k1"),
        "BROKER_LOG_FORMAT": "text",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "migrate",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_migrate_command_applies_and_reports(empty_database: str) -> None:
    count = len(schema.bundled_migrations())

    code, out, err = await run_migrate_command(empty_database)
    assert code == 0, err
    assert f"applied {count} migration" in out

    code, out, err = await run_migrate_command(empty_database)
    assert code == 0, err
    assert "applied 0 migration" in out

    connection = await asyncpg.connect(empty_database)
    try:
        assert await schema.pending_migrations(connection) == []
    finally:
        await connection.close()


async def test_the_connections_table_has_the_contracts_columns(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'quickbooks_connections'"
    )
    columns = {row["column_name"]: row["data_type"] for row in rows}

    assert {
        "user_id",
        "realm_id",
        "refresh_token_created_at",
        "refresh_token_expires_at",
        "access_token_expires_at",
        "status",
    } <= set(columns)
    for moment in ("refresh_token_created_at", "refresh_token_expires_at"):
        assert columns[moment] == "timestamp with time zone"
    assert columns["access_token_expires_at"] == "timestamp with time zone"
    # The runbook's query from origin-hybrid-refresh-design.md works as written.
    await db.execute(
        "INSERT INTO quickbooks_connections (realm_id, user_id, status)"
        " VALUES ('123', 'u1', 'active')"
    )
    outcome = await db.execute(
        "UPDATE quickbooks_connections SET refresh_token_created_at = NOW() - INTERVAL '35 days'"
        " WHERE user_id = 'u1'"
    )
    assert outcome == "UPDATE 1"
    age = await db.fetchval(
        "SELECT NOW() - refresh_token_created_at FROM quickbooks_connections WHERE realm_id = '123'"
    )
    assert abs(age - timedelta(days=35)) < timedelta(minutes=1)


async def test_the_contracts_status_spellings_are_accepted(db: asyncpg.Connection) -> None:
    for number, status in enumerate(("active", "reauthorization_required", "revoked")):
        await db.execute(
            "INSERT INTO quickbooks_connections (realm_id, user_id, status) VALUES ($1, 'u1', $2)",
            f"realm-{number}",
            status,
        )
    assert await db.fetchval("SELECT count(*) FROM quickbooks_connections") == 3


@pytest.mark.parametrize(
    ("realm_id", "user_id", "status"),
    [
        pytest.param("123", "u1", "dead", id="unknown-status"),
        pytest.param("123", "u1", "ACTIVE", id="status-wrong-case"),
        pytest.param("12/3", "u1", "active", id="slash-in-realm"),
        pytest.param("", "u1", "active", id="empty-realm"),
        pytest.param("1" * 65, "u1", "active", id="realm-too-long"),
        pytest.param("123", "", "active", id="empty-user"),
        pytest.param("123", "u" * 256, "active", id="user-too-long"),
    ],
)
async def test_the_table_rejects_rows_outside_the_contract(
    db: asyncpg.Connection, realm_id: str, user_id: str, status: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO quickbooks_connections (realm_id, user_id, status) VALUES ($1, $2, $3)",
            realm_id,
            user_id,
            status,
        )
