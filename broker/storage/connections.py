"""The connection store on PostgreSQL (asyncpg), tokens encrypted at rest.

Every transaction that writes a token (a refresh's answer, a rescued answer, an
import) or announces a refresh commits with ``synchronous_commit = on`` (or
the server's ``remote_apply`` where that is set), whatever the server's
default: an acknowledged write of the only live refresh token must survive a
crash. Replication is the operator's part (docs/operations.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
from asyncpg.transaction import Transaction

from broker.crypto import KeyRing
from broker.domain.model import (
    ConnectionFilter,
    ConnectionInfo,
    ConnectionPage,
    ConnectionStatus,
    ImportRequest,
    LockedConnection,
    LostCause,
    RealmFilter,
    RefreshIntent,
    TokenSnapshot,
    TokenUpdate,
)
from broker.errors import (
    AmbiguousUser,
    BrokerError,
    ConfigurationError,
    ConnectionActive,
    ConnectionNotFound,
    RealmOwnedByAnotherUser,
    StorageError,
)
from broker.storage.errors import translate_storage_errors
from broker.storage.keys import key_ids_in_use, open_sealed, seal
from broker.storage.types import AnyConnection

_SNAPSHOT_COLUMNS = """realm_id, user_id, status, access_token, access_token_expires_at,
    encryption_key_id, refresh_token_created_at, refresh_token_expires_at,
    reconnect_deadline, row_version"""
_INFO_COLUMNS = """realm_id, user_id, status, access_token_expires_at, refresh_token_created_at,
    refresh_token_expires_at, reconnect_deadline, last_refreshed_at, last_used_at, last_error,
    lost_cause"""
_ACQUIRE_TIMEOUT = 10.0
_EVERY_REALM = RealmFilter(True, (), (), False, (), ())
_INTENT = """
SELECT i.token_fingerprint, i.replica, i.answer_held,
       coalesce(r.last_seen > now() - interval '30 seconds', false)
       OR pg_postmaster_start_time() > now() - interval '30 seconds' AS replica_alive
FROM broker_refresh_intents AS i LEFT JOIN broker_replicas AS r ON r.replica = i.replica
WHERE i.realm_id = $1"""
"""A sibling counts as alive while its heartbeat (every 5 s) is fresh, and for 30 s
after the database itself restarted (the siblings are reconnecting)."""
_SETTLE_INTENT = "DELETE FROM broker_refresh_intents WHERE realm_id = $1"


class PostgresConnectionStore:
    """Implements ``broker.domain.ports.ConnectionStore``."""

    def __init__(self, pool: asyncpg.Pool, keys: KeyRing) -> None:
        self._pool = pool
        self._keys = keys
        self._commit_level: str | None = None

    async def _durably(self, connection: AnyConnection) -> None:
        """Make the current transaction's commit wait for the WAL flush (never weaker
        than the server's own setting)."""
        if self._commit_level is None:
            server = await connection.fetchval("SHOW synchronous_commit")
            self._commit_level = "remote_apply" if server == "remote_apply" else "on"
        await connection.execute(f"SET LOCAL synchronous_commit TO {self._commit_level}")

    # -- reads --------------------------------------------------------------------------

    async def load(self, *, realm_id: str | None, user_id: str | None) -> TokenSnapshot:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            if realm_id is not None:
                rows = await connection.fetch(
                    f"SELECT {_SNAPSHOT_COLUMNS} FROM quickbooks_connections WHERE realm_id = $1",
                    realm_id,
                )
            else:
                rows = await connection.fetch(
                    f"SELECT {_SNAPSHOT_COLUMNS} FROM quickbooks_connections "
                    "WHERE user_id = $1 ORDER BY realm_id LIMIT 2",
                    user_id,
                )
        if not rows:
            raise ConnectionNotFound(
                "no connection for that realm" if realm_id else "no connection for that user"
            )
        if len(rows) > 1:
            raise AmbiguousUser()
        return self._snapshot(rows[0])

    async def get_info(self, realm_id: str) -> ConnectionInfo:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            row = await connection.fetchrow(
                f"SELECT {_INFO_COLUMNS} FROM quickbooks_connections WHERE realm_id = $1", realm_id
            )
        if row is None:
            raise ConnectionNotFound("no connection for that realm")
        return info_from_row(row)

    async def list_connections(
        self,
        where: ConnectionFilter,
        *,
        limit: int,
        after: str | None,
        realms: RealmFilter | None = None,
    ) -> ConnectionPage:
        seen = realms or _EVERY_REALM
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            rows = await connection.fetch(
                f"""SELECT {_INFO_COLUMNS} FROM quickbooks_connections
                    WHERE ($1::text IS NULL OR realm_id > $1)
                      AND ($2::text IS NULL OR status = $2)
                      AND ($3::text IS NULL OR user_id = $3)
                      AND ($5 OR realm_id = ANY($6::text[]) OR realm_id LIKE ANY($7::text[]))
                      AND NOT ($8 OR realm_id = ANY($9::text[]) OR realm_id LIKE ANY($10::text[]))
                    ORDER BY realm_id LIMIT $4""",
                after,
                where.status.value if where.status else None,
                where.user_id,
                limit + 1,
                seen.allow_all,
                list(seen.allow_exact),
                list(seen.allow_prefixes),
                seen.deny_all,
                list(seen.deny_exact),
                list(seen.deny_prefixes),
            )
        infos = [info_from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        return ConnectionPage(infos, infos[-1].realm_id if more and infos else None)

    # -- the refresh path -----------------------------------------------------------------

    @asynccontextmanager
    async def locked(self, realm_id: str) -> AsyncIterator[_LockedRow]:
        """The row under ``SELECT … FOR UPDATE`` for the block.

        Leaving the block normally, or by a broker error other than a storage
        error (a failure the block recorded on the row, then raised), commits;
        leaving it any other way rolls back.
        """
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            transaction = connection.transaction()
            await transaction.start()
            try:
                await self._durably(connection)
                row = await _select_for_update(connection, realm_id)
                yield _LockedRow(connection, self, row)
            except BrokerError as exc:
                if isinstance(exc, StorageError):
                    await _rollback(transaction)
                else:
                    await transaction.commit()
                raise
            except BaseException:
                await _rollback(transaction)
                raise
            else:
                await transaction.commit()

    async def write_if_refresh_token_is(
        self, realm_id: str, expected_refresh_token: str, update: TokenUpdate
    ) -> bool:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
            connection.transaction(),
        ):
            await self._durably(connection)
            row = await _select_for_update(connection, realm_id)
            if self._refresh_token(row) != expected_refresh_token:
                return False
            await self._write_tokens(connection, realm_id, update)
            return True

    async def record_intent(self, realm_id: str, token_fingerprint: str, replica: str) -> None:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
            connection.transaction(),
        ):
            await self._durably(connection)
            await connection.execute(
                """INSERT INTO broker_refresh_intents (realm_id, token_fingerprint, replica)
                   VALUES ($1, $2, $3)
                   ON CONFLICT (realm_id) DO UPDATE SET
                       token_fingerprint = EXCLUDED.token_fingerprint,
                       replica = EXCLUDED.replica, sent_at = now(), answer_held = true""",
                realm_id,
                token_fingerprint,
                replica,
            )

    async def record_usage(self, last_used: Mapping[str, datetime]) -> None:
        """Best effort: a row locked by a refresh right now is skipped, never waited for.

        (A refresh holds its row while it waits on Intuit; queueing behind it would
        hold the locks of every row already updated, stalling refreshes elsewhere.)
        """
        realms = list(last_used)
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            await connection.execute(
                """UPDATE quickbooks_connections AS c SET last_used_at = u.used_at
                   FROM unnest($1::text[], $2::timestamptz[]) AS u(realm_id, used_at)
                   WHERE c.realm_id = u.realm_id
                     AND c.realm_id IN (SELECT realm_id FROM quickbooks_connections
                                        WHERE realm_id = ANY($1) FOR UPDATE SKIP LOCKED)
                     AND (c.last_used_at IS NULL OR c.last_used_at < u.used_at)""",
                realms,
                [last_used[realm] for realm in realms],
            )

    # -- admin --------------------------------------------------------------------------

    async def import_connection(
        self, request: ImportRequest, update: TokenUpdate
    ) -> ConnectionInfo:
        access, refresh, key_id = self._seal(request.realm_id, update)
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
            connection.transaction(),
        ):
            await self._durably(connection)
            row = await connection.fetchrow(
                f"""INSERT INTO quickbooks_connections AS c (
                        realm_id, user_id, status, access_token, access_token_expires_at,
                        refresh_token, encryption_key_id, refresh_token_created_at,
                        refresh_token_expires_at, reconnect_deadline, last_error)
                    VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, $9, NULL)
                    ON CONFLICT (realm_id) DO UPDATE SET
                        user_id = EXCLUDED.user_id, status = 'active',
                        access_token = EXCLUDED.access_token,
                        access_token_expires_at = EXCLUDED.access_token_expires_at,
                        refresh_token = EXCLUDED.refresh_token,
                        encryption_key_id = EXCLUDED.encryption_key_id,
                        refresh_token_created_at = EXCLUDED.refresh_token_created_at,
                        refresh_token_expires_at = EXCLUDED.refresh_token_expires_at,
                        reconnect_deadline = EXCLUDED.reconnect_deadline,
                        last_error = NULL, lost_cause = NULL
                    WHERE c.status <> 'active' OR $10
                    RETURNING {_INFO_COLUMNS}""",
                request.realm_id,
                request.user_id,
                access,
                update.access_token_expires_at,
                refresh,
                key_id,
                update.refresh_token_created_at,
                update.refresh_token_expires_at,
                update.reconnect_deadline,
                request.replace_active,
            )
            if row is None:
                raise ConnectionActive(request.realm_id)
            await connection.execute(_SETTLE_INTENT, request.realm_id)
        return info_from_row(row)

    async def owner_of(self, realm_id: str) -> str | None:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            owner: str | None = await connection.fetchval(
                "SELECT user_id FROM quickbooks_connections WHERE realm_id = $1", realm_id
            )
        return owner

    async def connect(self, realm_id: str, user_id: str, update: TokenUpdate) -> ConnectionInfo:
        """A grant the customer just gave: stored durably, unless the realm is another user's."""
        access, refresh, key_id = self._seal(realm_id, update)
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
            connection.transaction(),
        ):
            await self._durably(connection)
            # One statement decides: a SELECT … FOR UPDATE first locks nothing when the row
            # does not exist yet, and two users' flows for a new company would both pass.
            row = await connection.fetchrow(
                f"""INSERT INTO quickbooks_connections AS c (
                        realm_id, user_id, status, access_token, access_token_expires_at,
                        refresh_token, encryption_key_id, refresh_token_created_at,
                        refresh_token_expires_at, reconnect_deadline, last_refreshed_at)
                    VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, $9, $10)
                    ON CONFLICT (realm_id) DO UPDATE SET
                        status = 'active', access_token = EXCLUDED.access_token,
                        access_token_expires_at = EXCLUDED.access_token_expires_at,
                        refresh_token = EXCLUDED.refresh_token,
                        encryption_key_id = EXCLUDED.encryption_key_id,
                        refresh_token_created_at = EXCLUDED.refresh_token_created_at,
                        refresh_token_expires_at = EXCLUDED.refresh_token_expires_at,
                        reconnect_deadline = EXCLUDED.reconnect_deadline,
                        last_refreshed_at = EXCLUDED.last_refreshed_at,
                        last_error = NULL, lost_cause = NULL
                    WHERE c.user_id = EXCLUDED.user_id
                    RETURNING {_INFO_COLUMNS}""",
                realm_id,
                user_id,
                access,
                update.access_token_expires_at,
                refresh,
                key_id,
                update.refresh_token_created_at,
                update.refresh_token_expires_at,
                update.reconnect_deadline,
                update.refreshed_at,
            )
            if row is None:
                raise RealmOwnedByAnotherUser(f"realm {realm_id} belongs to another user")
            await connection.execute(_SETTLE_INTENT, realm_id)
        return info_from_row(row)

    # -- encryption -----------------------------------------------------------------------

    def _seal(self, realm_id: str, update: TokenUpdate) -> tuple[bytes | None, bytes, str]:
        refresh, key_id = seal(self._keys, realm_id, "refresh_token", update.refresh_token)
        access = None
        if update.access_token is not None:
            access, _ = seal(self._keys, realm_id, "access_token", update.access_token)
        return access, refresh, key_id

    def _snapshot(self, row: asyncpg.Record) -> TokenSnapshot:
        realm_id = row["realm_id"]
        access = row["access_token"]
        return TokenSnapshot(
            realm_id=realm_id,
            user_id=row["user_id"],
            status=ConnectionStatus(row["status"]),
            access_token=(
                None
                if access is None
                else open_sealed(
                    self._keys, realm_id, "access_token", access, row["encryption_key_id"]
                )
            ),
            access_token_expires_at=row["access_token_expires_at"],
            refresh_token_created_at=row["refresh_token_created_at"],
            refresh_token_expires_at=row["refresh_token_expires_at"],
            reconnect_deadline=row["reconnect_deadline"],
            row_version=row["row_version"],
        )

    def _refresh_token(self, row: asyncpg.Record) -> str | None:
        sealed = row["refresh_token"]
        if sealed is None:
            return None
        return open_sealed(
            self._keys, row["realm_id"], "refresh_token", sealed, row["encryption_key_id"]
        )

    def _locked(self, row: asyncpg.Record) -> LockedConnection:
        return LockedConnection(self._snapshot(row), self._refresh_token(row))

    async def _write_tokens(
        self, connection: AnyConnection, realm_id: str, update: TokenUpdate
    ) -> asyncpg.Record:
        access, refresh, key_id = self._seal(realm_id, update)
        row = await connection.fetchrow(
            f"""UPDATE quickbooks_connections SET
                    status = 'active', access_token = $2, access_token_expires_at = $3,
                    refresh_token = $4, encryption_key_id = $5, refresh_token_created_at = $6,
                    refresh_token_expires_at = $7, reconnect_deadline = $8,
                    last_refreshed_at = $9, last_error = NULL, lost_cause = NULL
                WHERE realm_id = $1
                RETURNING {_SNAPSHOT_COLUMNS}, refresh_token""",
            realm_id,
            access,
            update.access_token_expires_at,
            refresh,
            key_id,
            update.refresh_token_created_at,
            update.refresh_token_expires_at,
            update.reconnect_deadline,
            update.refreshed_at,
        )
        assert row is not None  # the row is locked by this transaction
        await connection.execute(_SETTLE_INTENT, realm_id)  # its answer is stored now
        return row


class _LockedRow:
    """Implements ``broker.domain.ports.LockedRow`` inside one transaction."""

    def __init__(
        self, connection: AnyConnection, store: PostgresConnectionStore, row: asyncpg.Record
    ) -> None:
        self._connection = connection
        self._store = store
        self._current = store._locked(row)

    @property
    def current(self) -> LockedConnection:
        return self._current

    async def reread(self) -> LockedConnection:
        self._current = self._store._locked(
            await _select_for_update(self._connection, self._current.snapshot.realm_id)
        )
        return self._current

    async def store_tokens(self, update: TokenUpdate) -> TokenSnapshot:
        row = await self._store._write_tokens(
            self._connection, self._current.snapshot.realm_id, update
        )
        self._current = self._store._locked(row)
        return self._current.snapshot

    async def intent(self) -> RefreshIntent | None:
        row = await self._connection.fetchrow(_INTENT, self._realm_id)
        if row is None:
            return None
        return RefreshIntent(
            row["token_fingerprint"],
            row["replica"],
            bool(row["replica_alive"]),
            answer_held=row["answer_held"],
        )

    async def mark_reauthorization_required(self, reason: str, cause: LostCause) -> None:
        await self._connection.execute(
            """UPDATE quickbooks_connections
               SET status = 'reauthorization_required', last_error = $2, lost_cause = $3
               WHERE realm_id = $1""",
            self._realm_id,
            reason,
            cause.value,
        )
        await self._connection.execute(_SETTLE_INTENT, self._realm_id)

    async def mark_revoked(self) -> None:
        await self._connection.execute(
            """UPDATE quickbooks_connections
               SET status = 'revoked', access_token = NULL, access_token_expires_at = NULL,
                   refresh_token = NULL, encryption_key_id = NULL,
                   last_error = 'revoked through the broker', lost_cause = NULL
               WHERE realm_id = $1""",
            self._realm_id,
        )
        await self._connection.execute(_SETTLE_INTENT, self._realm_id)

    async def delete(self) -> None:
        """The row and every token, gone."""
        await self._connection.execute(
            "DELETE FROM quickbooks_connections WHERE realm_id = $1", self._realm_id
        )
        await self._connection.execute(_SETTLE_INTENT, self._realm_id)

    async def record_error(self, message: str, *, settle_intent: bool) -> None:
        await self._connection.execute(
            "UPDATE quickbooks_connections SET last_error = $2 WHERE realm_id = $1",
            self._realm_id,
            message[:500],
        )
        if settle_intent:
            await self._connection.execute(_SETTLE_INTENT, self._realm_id)
        else:  # still in doubt, but no answer is held anywhere: siblings may go ahead
            await self._connection.execute(
                "UPDATE broker_refresh_intents SET answer_held = false WHERE realm_id = $1",
                self._realm_id,
            )

    @property
    def _realm_id(self) -> str:
        return self._current.snapshot.realm_id


async def _rollback(transaction: Transaction) -> None:
    # A connection that broke mid-transaction cannot roll back; the pool discards it.
    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        await transaction.rollback()


async def _select_for_update(connection: AnyConnection, realm_id: str) -> asyncpg.Record:
    row = await connection.fetchrow(
        f"SELECT {_SNAPSHOT_COLUMNS}, refresh_token FROM quickbooks_connections "
        "WHERE realm_id = $1 FOR UPDATE",
        realm_id,
    )
    if row is None:
        raise ConnectionNotFound("no connection for that realm")
    return row


def info_from_row(row: asyncpg.Record) -> ConnectionInfo:
    """A connection's non-secret columns (``ConnectionInfo``) from a row that has them."""
    return ConnectionInfo(
        realm_id=row["realm_id"],
        user_id=row["user_id"],
        status=ConnectionStatus(row["status"]),
        access_token_expires_at=row["access_token_expires_at"],
        refresh_token_created_at=row["refresh_token_created_at"],
        refresh_token_expires_at=row["refresh_token_expires_at"],
        reconnect_deadline=row["reconnect_deadline"],
        last_refreshed_at=row["last_refreshed_at"],
        last_used_at=row["last_used_at"],
        last_error=row["last_error"],
        lost_cause=LostCause(row["lost_cause"]) if row["lost_cause"] else None,
    )


async def verify_key_ring(connection: AnyConnection, keys: KeyRing) -> None:
    """Refuse a key ring that could not open what is stored, before anything is served.

    A key id that still seals a stored token (``key_ids_in_use``: the rows
    themselves, not the verifier table) must be in the ring; once
    ``qbo-broker keys rotate`` has moved every row to the primary, an older key
    may leave the ring. Every key that was ever a primary left a verifier row,
    which stays after the key is retired: a ring whose key of that id does not
    open its verifier (the same id, other material) is refused, so an id is
    never reused for other material. Both refusals are a ConfigurationError
    naming the key ids, never key material. The primary registers its verifier.
    """

    async with translate_storage_errors():
        missing = sorted(await key_ids_in_use(connection) - keys.key_ids)
        if missing:
            raise ConfigurationError(
                "BROKER_ENCRYPTION_KEYS lacks key ids still used by stored tokens: "
                + ", ".join(missing)
                + " (keep them in the ring, after the new primary, and run "
                "`qbo-broker keys rotate` until it reports none left)"
            )
        rows = await connection.fetch("SELECT key_id, verifier FROM broker_encryption_keys")
        known = {row["key_id"]: row["verifier"] for row in rows}
        wrong = sorted(
            k for k, v in known.items() if k in keys.key_ids and not keys.matches_verifier(k, v)
        )
        if wrong:
            raise ConfigurationError(
                "BROKER_ENCRYPTION_KEYS holds different key material than the one that "
                "encrypted stored tokens, for key ids: " + ", ".join(wrong)
            )
        if keys.primary_id not in known:
            await connection.execute(
                "INSERT INTO broker_encryption_keys (key_id, verifier) VALUES ($1, $2) "
                "ON CONFLICT (key_id) DO NOTHING",
                keys.primary_id,
                keys.verifier(keys.primary_id),
            )
            # Another replica may have raced us with other material under the same id.
            stored = await connection.fetchval(
                "SELECT verifier FROM broker_encryption_keys WHERE key_id = $1", keys.primary_id
            )
            if not keys.matches_verifier(keys.primary_id, stored):
                raise ConfigurationError(
                    f"another broker registered key id {keys.primary_id!r} with different material"
                )
