"""A real PgBouncer (Debian's, from ``tools/debian-tool.sh``) between the broker and PostgreSQL.

In session mode the broker works through it end to end. In transaction mode it
would silently break the change feed and the advisory locks, so every command
refuses it at start with a message that says what it saw and what to do.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from broker.crypto import KeyRing
from broker.errors import ConfigurationError
from broker.storage.database import create_pool, refuse_transaction_pooling
from broker.storage.embedded import EmbeddedPostgres
from tests.conftest import StartBroker
from tests.support import eventually

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "debian-tool.sh"
REALM = "9130350000000001"


def _pgbouncer_program() -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("tools/debian-tool.sh needs Debian's apt-get and dpkg-deb to fetch PgBouncer")
    done = subprocess.run(  # noqa: S603 - our own script
        [str(TOOL), "pgbouncer", "usr/sbin/pgbouncer", "pgbouncer", "libc-ares2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"tools/debian-tool.sh failed:\n{done.stderr}"
    return Path(done.stdout.strip())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PgBouncer:
    """One PgBouncer process in front of the tests' PostgreSQL, any database name passed on."""

    def __init__(self, program: Path, postgres: EmbeddedPostgres, mode: str, pool_size: int):
        # PgBouncer refuses root; it runs as the server's owner, who may open its socket.
        self.owner = pwd.getpwuid(postgres.pgdata.stat().st_uid)
        self.folder = Path(tempfile.mkdtemp(prefix=f"qbo-pgbouncer-{mode}-"))
        self.port = _free_port()
        users = self.folder / "users.txt"
        users.write_text('"postgres" ""\n')
        config = self.folder / "pgbouncer.ini"
        config.write_text(
            f"""[databases]
* = host={postgres.socket_dir}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = {mode}
default_pool_size = {pool_size}
logfile = {self.folder / "log"}
"""
        )
        for path in (self.folder, users, config):
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        libraries = program.parents[2] / "usr" / "lib" / "x86_64-linux-gnu"
        self.process = subprocess.Popen(  # noqa: S603 - Debian's pgbouncer, our config
            [str(program), str(config)],
            env={"LD_LIBRARY_PATH": str(libraries), "PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.owner.pw_uid,
            group=self.owner.pw_gid,
            extra_groups=[],
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {self.process.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)  # polling a port: there is no event to await
        raise RuntimeError(f"pgbouncer did not listen within 30 s: {self.log()}")

    def url(self, dsn: str) -> str:
        """The test database of ``dsn`` (a Unix-socket DSN), through this PgBouncer."""
        database = dsn.split("@/", 1)[1].split("?", 1)[0]
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


MakeBouncer = Callable[[str, int], PgBouncer]


@pytest.fixture(scope="module")
def pgbouncer_program() -> Path:
    return _pgbouncer_program()


@pytest.fixture
def pgbouncer(pgbouncer_program: Path, postgres: EmbeddedPostgres) -> Iterator[MakeBouncer]:
    started: list[PgBouncer] = []

    def make(mode: str, pool_size: int = 5) -> PgBouncer:
        bouncer = PgBouncer(pgbouncer_program, postgres, mode, pool_size)
        started.append(bouncer)
        return bouncer

    yield make
    for bouncer in started:
        bouncer.stop()


async def test_a_direct_connection_passes_the_probe(database: str) -> None:
    await refuse_transaction_pooling(database)


async def test_the_pool_keeps_its_session_settings_across_releases(database: str) -> None:
    pool = await create_pool(database, size=1, intuit_timeout=timedelta(seconds=30))
    try:
        for _ in range(3):  # one connection: each acquire after the first reuses it, reset
            async with pool.acquire() as connection:
                assert await connection.fetchval("SHOW lock_timeout") == "35s"
                assert (
                    await connection.fetchval("SHOW idle_in_transaction_session_timeout") == "70s"
                )
                await connection.execute("SET lock_timeout = '1s'")  # a stray SET is undone
    finally:
        await pool.close()


async def test_a_transaction_pool_is_refused_for_moving_a_connection_between_sessions(
    pgbouncer: MakeBouncer, database: str
) -> None:
    bouncer = pgbouncer("transaction", 5)

    with pytest.raises(ConfigurationError) as refused:
        await refuse_transaction_pooling(bouncer.url(database))

    message = str(refused.value)
    assert f"127.0.0.1:{bouncer.port} does not keep one server session per connection" in message
    assert "one connection ran in server process" in message
    assert "pool_mode = transaction" in message
    assert "docs/deploy.md#pgbouncer-and-other-poolers" in message


async def test_a_transaction_pool_of_one_is_refused_for_making_a_connection_wait(
    pgbouncer: MakeBouncer, database: str
) -> None:
    bouncer = pgbouncer("transaction", 1)

    with pytest.raises(ConfigurationError, match="a connection waited for another's transaction"):
        await refuse_transaction_pooling(bouncer.url(database), within=1.0)


async def test_the_broker_works_through_a_session_pool(
    pgbouncer: MakeBouncer, database: str, db: asyncpg.Connection, start_broker: StartBroker
) -> None:
    bouncer = pgbouncer("session", 20)
    broker = await start_broker(database_url=bouncer.url(database))
    await broker.seed(REALM, access_token_left=None)

    token = await broker.get_token(REALM)
    assert broker.refreshes(REALM) == 1
    assert broker.token_works(REALM, token.access_token)
    assert (await broker.get_token(REALM)).access_token == token.access_token  # from the cache
    # The session settings a refresh relies on (Intuit timeout 2 s), set after connecting:
    # PgBouncer refuses them as start-up parameters.
    components = broker.broker.components
    assert components is not None
    async with components.pool.acquire() as connection:
        assert await connection.fetchval("SHOW lock_timeout") == "7s"
        assert await connection.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"

    # The change feed (LISTEN through the pool) drops the cached token when the row changes.
    await db.execute(
        "UPDATE quickbooks_connections SET status = 'revoked' WHERE realm_id = $1", REALM
    )

    async def refused() -> bool:
        try:
            await broker.get_token(REALM)
        except grpc.aio.AioRpcError as error:
            return error.code() is grpc.StatusCode.FAILED_PRECONDITION
        return False

    await eventually(refused, what="the revocation reached the cache through the pool")


def test_serve_and_migrate_refuse_a_transaction_pool_at_start(
    pgbouncer: MakeBouncer, database: str
) -> None:
    bouncer = pgbouncer("transaction", 5)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BROKER_DATABASE_URL": bouncer.url(database),
        "BROKER_ENCRYPTION_KEYS": KeyRing.generate_spec(),
        "BROKER_DATABASE_WAIT_SECONDS": "5",
        "BROKER_INSECURE": "true",
        "QB_CLIENT_ID": "id",
        "QB_CLIENT_SECRET": "secret",
        "QB_REDIRECT_URI": "https://example.com/oauth/callback",
    }
    for command in ("migrate", "serve"):
        done = subprocess.run(  # noqa: S603 - our own entry point
            [sys.executable, "-m", "broker", command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

        assert done.returncode == 2, (command, done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        assert "does not keep one server session per connection" in last, (command, last)
