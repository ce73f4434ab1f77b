"""Which keys seal the stored tokens, and re-sealing them with the primary (key rotation).

A key can leave ``BROKER_ENCRYPTION_KEYS`` once no row is sealed with it any more;
``verify_key_ring`` (connections.py) asks ``key_ids_in_use`` at every start.
``rotate`` gets there while brokers keep serving: it takes the rows of every
older key a batch at a time under ``FOR UPDATE SKIP LOCKED`` (a row a refresh
holds right now is passed over and taken on a later pass, never waited for),
opens each sealed column with the old key and seals it again with the primary.
It is resumable by construction: a run picks up whatever is not on the primary.

Re-sealing changes the ciphertext, never the token: a broker that reads the row
before or after gets the same token (its ring holds both keys), and a refresh
that holds the row writes it with the primary anyway. Token values and key
material never reach a log line or an exception message from here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg

from broker.crypto import KeyRing
from broker.errors import DecryptionFailed
from broker.storage.errors import translate_storage_errors
from broker.storage.types import AnyConnection

log = logging.getLogger("broker.storage")

SEALED_COLUMNS = ("access_token", "refresh_token")
"""The columns of quickbooks_connections that hold a ciphertext (named by encryption_key_id)."""

DEFAULT_GIVE_UP_AFTER = 120.0
"""Seconds a row may stay locked before ``rotate`` leaves it for the next run."""

_FIRST_WAIT = 0.05
_LONGEST_WAIT = 1.0
_TRACKED = 10_000  # rows left at the end of a pass whose lock time is followed

_KEY_IDS_IN_USE = """
WITH RECURSIVE used (key_id) AS (
    SELECT min(encryption_key_id) FROM quickbooks_connections
    UNION ALL
    SELECT (SELECT min(c.encryption_key_id) FROM quickbooks_connections AS c
            WHERE c.encryption_key_id > used.key_id)
    FROM used WHERE used.key_id IS NOT NULL
)
SELECT key_id FROM used WHERE key_id IS NOT NULL"""
"""A loose index scan of quickbooks_connections_encryption_key (migration 0005): one
index descent per distinct key id, however many rows each key sealed."""

_LEFT = """SELECT count(*) FROM quickbooks_connections
    WHERE encryption_key_id = ANY($1::text[]) AND realm_id <> ALL($2::text[])"""
_LEFT_REALMS = """SELECT realm_id FROM quickbooks_connections
    WHERE encryption_key_id = ANY($1::text[]) AND realm_id <> ALL($2::text[])
    ORDER BY realm_id LIMIT $3"""
_NEXT_BATCH = """SELECT realm_id, access_token, refresh_token FROM quickbooks_connections
    WHERE encryption_key_id = $1 AND realm_id > $2 AND realm_id <> ALL($3::text[])
    ORDER BY realm_id LIMIT $4
    FOR UPDATE SKIP LOCKED"""
_RESEAL = """UPDATE quickbooks_connections
    SET access_token = $2, refresh_token = $3, encryption_key_id = $4
    WHERE realm_id = $1 AND encryption_key_id = $5"""


# -- the sealed columns ---------------------------------------------------------------------


def sealing_context(realm_id: str, column: str) -> str:
    """The context (associated data) a column's ciphertext is bound to: its realm and column."""
    return f"{realm_id}:{column}"


def seal(keys: KeyRing, realm_id: str, column: str, token: str) -> tuple[bytes, str]:
    """``token`` sealed with the primary for ``column`` of ``realm_id``: (value, key id)."""
    return keys.encrypt(token, sealing_context(realm_id, column))


def open_sealed(keys: KeyRing, realm_id: str, column: str, value: bytes, key_id: str) -> str:
    """The token in a sealed column; DecryptionFailed names the realm, column and key id."""
    return keys.decrypt(value, key_id, sealing_context(realm_id, column))


# -- which keys are in use ---------------------------------------------------------------------


async def key_ids_in_use(connection: AnyConnection | asyncpg.Pool) -> set[str]:
    """The key ids that seal at least one stored token, read from the rows themselves."""
    async with translate_storage_errors():
        rows = await connection.fetch(_KEY_IDS_IN_USE)
    return {row["key_id"] for row in rows}


# -- rotation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationReport:
    primary_id: str
    re_encrypted: int
    """Rows this run sealed again with the primary."""
    remaining: int
    """Rows still sealed with another key when the run ended."""
    skipped_locked: tuple[str, ...] = ()
    """Realms left alone: their row stayed locked for ``give_up_after`` seconds."""
    undecryptable: tuple[str, ...] = ()
    """Realms whose values did not open with the key their row names (tampered or wrong key)."""
    interrupted: bool = False
    """``stop`` was set before the rows ran out."""

    @property
    def finished(self) -> bool:
        """Every stored token is sealed with the primary: the older keys can go."""
        return self.remaining == 0


async def rotate(
    pool: asyncpg.Pool,
    keys: KeyRing,
    *,
    batch: int = 500,
    progress: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
    give_up_after: float = DEFAULT_GIVE_UP_AFTER,
) -> RotationReport:
    """Seal every stored token with ``keys``' primary, ``batch`` rows a transaction.

    First checks the ring the way a broker's start does (and registers the
    primary's verifier, so no other material can later start under its id).
    ``progress(done, total)`` follows each batch; ``stop`` ends the run before the
    next batch. A row locked by someone else is passed over and tried again after
    each pass; one still locked after ``give_up_after`` seconds is reported and
    left for the next run. Each batch commits durably (``synchronous_commit`` on,
    or the server's ``remote_apply``): a finished run stays finished after a crash.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    from broker.storage.connections import verify_key_ring  # that module imports this one

    async with translate_storage_errors(), pool.acquire() as connection:
        await verify_key_ring(connection, keys)
        server_level = await connection.fetchval("SHOW synchronous_commit")
    level = "remote_apply" if server_level == "remote_apply" else "on"
    run = _Rotation(pool, keys, batch, level, progress)
    interrupted = await run.run(stop or asyncio.Event(), give_up_after)
    report = RotationReport(
        primary_id=keys.primary_id,
        re_encrypted=run.done,
        remaining=await run.left(()),
        skipped_locked=tuple(sorted(run.given_up)),
        undecryptable=tuple(sorted(run.undecryptable)),
        interrupted=interrupted,
    )
    log.info(
        "key rotation ended",
        extra={
            "primary_key_id": report.primary_id,
            "re_encrypted": report.re_encrypted,
            "remaining": report.remaining,
            "skipped_locked": len(report.skipped_locked),
            "undecryptable": len(report.undecryptable),
            "interrupted": report.interrupted,
        },
    )
    return report


class _Rotation:
    def __init__(
        self,
        pool: asyncpg.Pool,
        keys: KeyRing,
        batch: int,
        level: str,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self._pool = pool
        self._keys = keys
        self._batch = batch
        self._level = level
        self._progress = progress
        self._total = 0
        self.done = 0
        self.given_up: set[str] = set()
        self.undecryptable: set[str] = set()
        self._locked_since: dict[str, float] = {}

    async def run(self, stop: asyncio.Event, give_up_after: float) -> bool:
        """Passes over the older keys' rows until none is left; True if ``stop`` ended it."""
        wait = _FIRST_WAIT
        while True:
            excluded = sorted(self.given_up | self.undecryptable)
            left = await self.left(excluded)
            if left == 0:
                return False
            self._total = self.done + left
            self._report()
            moved = 0
            for key_id in await self._older_keys():
                cursor = ""
                while True:
                    if stop.is_set():
                        return True
                    step = await self._one_batch(key_id, cursor, excluded)
                    if step is None:
                        break
                    cursor, count = step
                    moved += count
            # What is left was locked when its turn came (or written since with an older key).
            now = time.monotonic()
            still = await self._left_realms(sorted(self.given_up | self.undecryptable))
            self._locked_since = {realm: self._locked_since.get(realm, now) for realm in still}
            for realm, since in self._locked_since.items():
                if now - since >= give_up_after:
                    self.given_up.add(realm)
                    log.warning(
                        "key rotation leaves a row locked for too long to the next run",
                        extra={"realm_id": realm, "locked_for": round(now - since, 1)},
                    )
            if moved:
                wait = _FIRST_WAIT
            elif still and not set(still) <= self.given_up:
                if await _stopped_within(stop, wait):
                    return True
                wait = min(2 * wait, _LONGEST_WAIT)

    async def left(self, excluded: Iterable[str]) -> int:
        older = await self._older_keys()
        if not older:
            return 0
        async with translate_storage_errors():
            count: int = await self._pool.fetchval(_LEFT, older, list(excluded))
        return count

    async def _left_realms(self, excluded: list[str]) -> list[str]:
        older = await self._older_keys()
        if not older:
            return []
        async with translate_storage_errors():
            rows = await self._pool.fetch(_LEFT_REALMS, older, excluded, _TRACKED)
        return [row["realm_id"] for row in rows]

    async def _older_keys(self) -> list[str]:
        return sorted(await key_ids_in_use(self._pool) - {self._keys.primary_id})

    async def _one_batch(
        self, key_id: str, cursor: str, excluded: list[str]
    ) -> tuple[str, int] | None:
        """Re-seal the next batch of ``key_id``'s rows after ``cursor``: (new cursor, count)."""
        async with (
            translate_storage_errors(),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            await connection.execute(f"SET LOCAL synchronous_commit TO {self._level}")
            rows = await connection.fetch(_NEXT_BATCH, key_id, cursor, excluded, self._batch)
            if not rows:
                return None
            updates = []
            for row in rows:
                resealed = self._reseal(row, key_id)
                if resealed is not None:
                    updates.append(resealed)
            if updates:
                await connection.executemany(_RESEAL, updates)
        self.done += len(updates)
        self._total = max(self._total, self.done)
        self._report()
        return rows[-1]["realm_id"], len(updates)

    def _reseal(
        self, row: asyncpg.Record, key_id: str
    ) -> tuple[str, bytes | None, bytes | None, str, str] | None:
        realm_id: str = row["realm_id"]
        values: list[bytes | None] = []
        try:
            for column in SEALED_COLUMNS:
                sealed = row[column]
                if sealed is None:
                    values.append(None)
                    continue
                token = open_sealed(self._keys, realm_id, column, sealed, key_id)
                values.append(seal(self._keys, realm_id, column, token)[0])
        except DecryptionFailed as exc:
            self.undecryptable.add(realm_id)
            log.error(
                "key rotation cannot open a stored token; the row is left as it is",
                extra={"realm_id": realm_id, "key_id": key_id, "error": str(exc)},
            )
            return None
        access, refresh = values
        return realm_id, access, refresh, self._keys.primary_id, key_id

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.done, self._total)


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
