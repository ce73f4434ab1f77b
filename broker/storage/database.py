"""Where the broker's PostgreSQL is: the configured server, or an embedded one.

``Database.open`` waits for a configured server (start-up beside a database
pod), makes sure it gives each connection a session of its own (a pooler in
transaction mode would not), or starts the embedded one; ``create_pool`` makes
the one asyncpg pool.
The embedded database keeps its own encryption key beside its files
(``key_ring_for``); a configured one must come with ``BROKER_ENCRYPTION_KEYS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import asyncpg

from broker.crypto import KeyRing
from broker.errors import ConfigurationError, StorageError, StorageUnavailable
from broker.settings import Settings
from broker.storage import schema
from broker.storage.connections import verify_key_ring
from broker.storage.embedded import EmbeddedPostgres, ensure_database
from broker.storage.errors import translate_storage_errors

log = logging.getLogger("broker.storage")

EMBEDDED_DATABASE = "qbo_broker"
KEY_FILE = "encryption-keys"


@dataclass
class Database:
    """Where the broker's PostgreSQL is, and the embedded server if we own one."""

    dsn: str
    embedded: EmbeddedPostgres | None = None

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        if settings.database_url is not None:
            await wait_for_database(settings.database_url, within=settings.database_wait)
            await refuse_transaction_pooling(settings.database_url)
            return cls(settings.database_url)
        embedded = EmbeddedPostgres(settings.data_dir)
        admin_dsn = await asyncio.to_thread(embedded.start)
        await ensure_database(admin_dsn, EMBEDDED_DATABASE)
        return cls(embedded.dsn(EMBEDDED_DATABASE), embedded)

    async def connect(self, application: str = "qbo-broker") -> asyncpg.Connection:
        connection: asyncpg.Connection = await asyncpg.connect(
            self.dsn, timeout=5, server_settings={"application_name": application}
        )
        return connection

    async def prepare(self, keys: KeyRing, application: str = "qbo-broker") -> None:
        """Apply the migrations, then refuse a key ring that could not open what is stored."""
        async with translate_storage_errors():
            connection = await self.connect(application)
            try:
                await schema.migrate(connection)
                await verify_key_ring(connection, keys)
            finally:
                await connection.close()

    async def command_pool(self, application: str, *, command_timeout: float) -> asyncpg.Pool:
        """A small pool (two connections) for a command run by hand."""
        async with translate_storage_errors():
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=2,
                timeout=5,
                command_timeout=command_timeout,
                server_settings={"application_name": application},
            )
        assert pool is not None
        return pool

    async def close(self) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def key_ring_for(settings: Settings) -> KeyRing:
    """The configured key ring, or (embedded database only) one kept in the data dir."""
    settings.require_key_ring_policy()
    if settings.encryption_keys is not None:
        return settings.encryption_keys
    path = settings.data_dir / KEY_FILE
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(KeyRing.generate_spec() + "\n")
        log.info("generated an encryption key for the embedded database", extra={"path": str(path)})
    try:
        return KeyRing.parse(path.read_text())
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None


async def create_pool(dsn: str, size: int, intuit_timeout: timedelta) -> asyncpg.Pool:
    # A refresh holds its row lock while it waits on Intuit: a sibling waiting for
    # that lock must outlast the call, and PostgreSQL must never end the holder's
    # transaction (and its lock) while Intuit may still be rotating the token.
    call = int(intuit_timeout.total_seconds())
    session = (
        f"SET lock_timeout = '{call + 5}s'; "
        f"SET idle_in_transaction_session_timeout = '{max(60, 2 * call + 10)}s';"
    )

    async def init(connection: asyncpg.Connection) -> None:
        await connection.execute(session)

    async with translate_storage_errors():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=5,
            command_timeout=30,
            server_settings={"application_name": "qbo-broker"},
            init=init,
            connection_class=_settings_surviving_reset(session),
        )
    assert pool is not None
    return pool


def _settings_surviving_reset(session: str) -> type[asyncpg.Connection]:
    """A connection class whose reset on release (``RESET ALL`` among others) sets
    ``session`` again, in the same round trip.

    The settings are SET after connecting rather than sent as start-up parameters
    (which ``RESET ALL`` would keep) because PgBouncer refuses start-up parameters
    it does not know, these included.
    """

    class Connection(asyncpg.Connection):
        def get_reset_query(self) -> str:
            return f"{super().get_reset_query()}\n{session}"

    return Connection


async def wait_for_database(dsn: str, *, within: timedelta, every: float = 1.0) -> None:
    """Wait until PostgreSQL accepts connections (start-up beside a database pod).

    Each failed attempt is logged with the host, port and error (never the URL:
    it may carry a password); after ``within`` the wait ends in one line that
    says what could not be reached.
    """
    where = _host_and_port(dsn)
    deadline = time.monotonic() + within.total_seconds()
    attempt = 0
    while True:
        attempt += 1
        try:
            async with translate_storage_errors():
                connection = await asyncpg.connect(dsn, timeout=5)
                await connection.close()
            if attempt > 1:
                log.info("the database answers", extra={"database": where, "attempts": attempt})
            return
        except StorageError as exc:
            if not isinstance(exc, StorageUnavailable):
                raise  # reachable but refusing (a password, a missing database): waiting won't help
            if isinstance(exc.__cause__, _NO_WAIT_WILL_FIX):
                # A certificate that does not verify, a CA file that is not there: say so now.
                raise StorageError(f"BROKER_DATABASE_URL: {where}: {exc}") from None
            log.warning(
                "waiting for the database",
                extra={"database": where, "attempt": attempt, "error": str(exc)},
            )
            if time.monotonic() + every > deadline:
                raise StorageUnavailable(
                    f"BROKER_DATABASE_URL: {where} did not answer within "
                    f"{within.total_seconds():g} s ({exc})"
                ) from None
            await asyncio.sleep(every)


async def refuse_transaction_pooling(dsn: str, *, within: float = 5.0) -> None:
    """Refuse a database that does not keep one server session per connection.

    The change feed (``LISTEN``), the sweep's and the migrations' advisory locks
    and the refresh intents' row locks across a call to Intuit all belong to a
    session: behind a pooler in transaction mode (PgBouncer's ``pool_mode =
    transaction``, most "serverless" proxies) each transaction may run in
    another server session, and those fail silently. The probe: connection A
    asks for its server's pid; connection B opens a transaction, which pins a
    server session (a transaction pooler hands B the one A just released, its
    most recently used); A asks again. Directly or through a session pool, A
    is still in its own session; through a transaction pool it is in another
    one, or it waits for B's. A pool that hands out idle sessions round-robin
    may slip through: deploy.md says not to use one.
    """
    where = _host_and_port(dsn)
    shared = (
        f"BROKER_DATABASE_URL: {where} does not keep one server session per connection "
        "({evidence}): a pooler in transaction mode (PgBouncer's pool_mode = transaction) "
        "silently breaks the change feed (LISTEN/NOTIFY) and the sweep's advisory lock. "
        "Point the broker at PostgreSQL itself or at a pool in session mode "
        "(docs/deploy.md#pgbouncer-and-other-poolers)"
    )
    async with translate_storage_errors():
        # No named prepared statements: a transaction pooler would lose them between
        # messages, and the probe must report the pooler, not that.
        first = await asyncpg.connect(dsn, timeout=5, statement_cache_size=0)
        second = await asyncpg.connect(dsn, timeout=5, statement_cache_size=0)
    try:
        async with translate_storage_errors():
            before = await first.fetchval("SELECT pg_backend_pid()", timeout=within)
            try:
                async with second.transaction():
                    await second.execute("SELECT 1", timeout=within)
                    after = await first.fetchval("SELECT pg_backend_pid()", timeout=within)
            except TimeoutError:
                evidence = "a connection waited for another's transaction"
                raise ConfigurationError(shared.format(evidence=evidence)) from None
            except asyncpg.InvalidSQLStatementNameError:
                evidence = "a statement vanished between two messages of one connection"
                raise ConfigurationError(shared.format(evidence=evidence)) from None
        if after != before:
            evidence = f"one connection ran in server process {before}, then in {after}"
            raise ConfigurationError(shared.format(evidence=evidence))
        if first.get_server_pid() != before:
            # The pid announced at connect is not the session's: something in between
            # (a pooler in session mode, a proxy) that passed the probe.
            log.info(
                "the database is reached through a pooler or proxy in session mode",
                extra={"database": where},
            )
    finally:
        for connection in (first, second):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 1.0)
            if not connection.is_closed():
                connection.terminate()


_NO_WAIT_WILL_FIX = (
    ssl.SSLCertVerificationError,
    asyncpg.ClientConfigurationError,
    FileNotFoundError,
)


def _host_and_port(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or parse_qs(parts.query).get("host", ["?"])[0]
    return f"{host}:{parts.port or 5432}"
