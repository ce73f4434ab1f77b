"""Versioned SQL migrations, safe when many replicas start at once.

The files in ``migrations/`` are applied in order of their number, each in its
own transaction, while holding a PostgreSQL advisory lock: the first replica
applies them, the others wait on the lock and then find nothing to do. Each
applied file's checksum is recorded; an edited file that was already applied is
an error, not a silent divergence.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass

import asyncpg

from broker.errors import ConfigurationError, StorageError
from broker.storage.errors import translate_storage_errors
from broker.storage.types import AnyConnection

log = logging.getLogger("broker.storage")

_MIGRATION_LOCK = 0x5142_4F42_524F_4B45 & 0x7FFF_FFFF_FFFF_FFFF  # "QBOBROKE"
_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled_migrations() -> list[Migration]:
    folder = importlib.resources.files("broker.storage") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise ConfigurationError(f"two migrations share a number: {versions}")
    return found


async def migrate(connection: asyncpg.Connection, migrations: list[Migration] | None = None) -> int:
    """Apply what is missing; returns how many migrations were applied."""
    todo = bundled_migrations() if migrations is None else migrations
    async with translate_storage_errors():
        await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            return await _apply(connection, todo)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def pending_migrations(connection: AnyConnection) -> list[str]:
    """Names of bundled migrations not yet applied (readiness checks use this)."""
    async with translate_storage_errors():
        applied = await _applied(connection)
    return [m.name for m in bundled_migrations() if m.version not in applied]


async def _applied(connection: AnyConnection) -> dict[int, str]:
    exists = await connection.fetchval("SELECT to_regclass('broker_schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await connection.fetch("SELECT version, checksum FROM broker_schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def _apply(connection: asyncpg.Connection, migrations: list[Migration]) -> int:
    await connection.execute(
        """
        CREATE TABLE IF NOT EXISTS broker_schema_migrations (
            version    integer     PRIMARY KEY,
            name       text        NOT NULL,
            checksum   text        NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    applied = await _applied(connection)
    known = {migration.version for migration in migrations}
    newer = sorted(version for version in applied if version not in known)
    if newer:
        raise StorageError(
            f"the database has migrations this broker does not know ({newer}); "
            "it was migrated by a newer version"
        )
    count = 0
    for migration in migrations:
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise StorageError(f"migration {migration.name} was changed after it was applied")
            continue
        async with connection.transaction():
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO broker_schema_migrations (version, name, checksum)"
                " VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("applied migration", extra={"migration": migration.name})
        count += 1
    return count
