"""TLS to the database: what each ``sslmode`` in BROKER_DATABASE_URL does, end to end.

A PostgreSQL of this module's own listens on 127.0.0.1 with a certificate for
``localhost`` signed by a test CA, and its pg_hba.conf takes TLS sessions only.
pgserver's binaries (the embedded server) are built without OpenSSL, so this one
is Debian's (``apt-get install postgresql``); without such a build the module skips.

Every check goes through the broker's own code (``wait_for_database``,
``create_pool``, ``Database.connect``, a full ``BrokerServer``), which hands the
URL to asyncpg unchanged, so asyncpg's reading of the URL is the broker's:

- ``verify-full`` + ``sslrootcert``: the chain and the host name are checked;
- ``verify-ca``: the chain only; ``require``: encrypted, nothing checked (unless
  an ``sslrootcert`` is given, then the chain is checked as with ``verify-ca``);
- no ``sslmode`` (TCP): ``prefer``: TLS if the server offers it, unverified, and
  plaintext if it declines, so an active attacker can downgrade the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

from broker.clock import FakeClock
from broker.domain.sweep import SweepKind, SweepOutcome
from broker.errors import StorageError, StorageUnavailable
from broker.server import BrokerServer
from broker.settings import Settings
from broker.storage.database import Database, create_pool, wait_for_database
from broker.storage.embedded import embedded_bin_dir
from tests.conftest import StartBroker
from tests.pki import Authority, Issued
from tests.support import SWEEP_BY_HAND, eventually

PASSWORD = "db-Pa55-w0rd"
"""In every URL here. The server trusts TLS sessions and never asks for it: it must
never show up in an error."""

BROKER_DATABASE = "broker_tls"
SSL_REQUEST = struct.pack("!ll", 8, 80877103)


def _tls_capable_bin_dir() -> Path | None:
    """PostgreSQL programs built with OpenSSL: pgserver's (the embedded server) are not."""
    candidates = [embedded_bin_dir()]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if not (folder / "pg_config").exists() or not (folder / "postgres").exists():
            continue
        configure = subprocess.run(  # noqa: S603 - PostgreSQL's own pg_config
            [str(folder / "pg_config"), "--configure"], capture_output=True, text=True, check=False
        ).stdout
        if "--with-openssl" in configure or "--with-ssl=openssl" in configure:
            return folder
    return None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: PostgreSQL refuses root, so an unprivileged user if we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.skip("running as root with no unprivileged user (postgres, pgserver) to run PostgreSQL")


@dataclass
class PostgresWithTls:
    """A PostgreSQL of this module's own, run as the unprivileged owner of its files."""

    bin_dir: Path
    folder: Path
    owner: pwd.struct_passwd | None
    port: int = 0

    @property
    def pgdata(self) -> Path:
        return self.folder / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "run"

    def run(self, program: str, *args: str) -> None:
        log = self.folder / "commands.log"
        with log.open("a") as output:
            done = subprocess.run(  # noqa: S603 - PostgreSQL's programs, our arguments
                [str(self.bin_dir / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=self.folder,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                timeout=60,
                check=False,
                **self._as_owner(),
            )
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{log.read_text()[-3000:]}")

    def _as_owner(self) -> dict[str, Any]:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def own(self, path: Path, mode: int) -> None:
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        path.chmod(mode)

    def install(self, certificate: Issued) -> None:
        """server.crt/server.key in the data dir, 0600 and the server's: PostgreSQL refuses a
        key that others can read."""
        for name, content in (
            ("server.crt", certificate.cert_pem),
            ("server.key", certificate.key_pem),
        ):
            path = self.pgdata / name
            path.write_bytes(content)
            self.own(path, 0o600)

    def start(self) -> None:
        self.run(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(self.socket_dir / "log"), "-w", "start"
        )

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")


@dataclass
class TlsPostgres:
    server: PostgresWithTls
    ca: Path
    """The CA that signed the server's certificate (which names ``localhost`` only)."""
    other_ca: Path
    """A CA that signed nothing the server presents."""
    good: Issued
    rogue: Issued
    """A certificate for ``localhost`` from the other CA: what an impostor would show."""

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, database: str = "postgres", *, host: str = "localhost", **query: str) -> str:
        tail = f"?{urlencode(query)}" if query else ""
        return f"postgresql://postgres:{PASSWORD}@{host}:{self.port}/{database}{tail}"

    def admin_dsn(self, database: str = "postgres") -> str:
        """Over the Unix socket (trusted, no TLS): for setting up and looking on."""
        socket_dir = quote(str(self.server.socket_dir))
        return f"postgresql://postgres@/{database}?host={socket_dir}&port={self.port}"

    async def present(self, certificate: Issued) -> None:
        """Make the running server present ``certificate`` from its next TLS session on."""
        await asyncio.to_thread(self.server.install, certificate)
        admin = await asyncpg.connect(self.admin_dsn())
        try:
            assert await admin.fetchval("SELECT pg_reload_conf()")
        finally:
            await admin.close()

    @property
    def secrets(self) -> list[bytes]:
        return [self.good.key_pem, self.rogue.key_pem]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


HBA = """\
local     all  all                 trust
hostssl   all  all  127.0.0.1/32   trust
hostnossl all  all  0.0.0.0/0      reject
host      all  all  ::1/128        reject
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _start_tls_postgres(server: PostgresWithTls, certificate: Issued) -> None:
    """initdb, a Unix-socket-only start for ALTER SYSTEM, then a restart on 127.0.0.1 + TLS."""
    server.folder.chmod(0o755)  # the server's user walks through to its own folders
    for folder in (server.pgdata, server.socket_dir):
        folder.mkdir()
        server.own(folder, 0o700 if folder == server.pgdata else 0o755)
    server.run(
        "initdb", "-D", str(server.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
        "--locale=C", "--no-sync",
    )  # fmt: skip
    with (server.pgdata / "postgresql.conf").open("a") as conf:
        conf.write(f"listen_addresses = ''\nunix_socket_directories = '{server.socket_dir}'\n")
    server.install(certificate)
    server.start()
    admin_dsn = f"postgresql://postgres@/postgres?host={quote(str(server.socket_dir))}"

    async def configure() -> None:
        admin = await asyncpg.connect(admin_dsn)
        try:
            for setting, value in (
                ("ssl", "on"),
                ("ssl_cert_file", _literal(str(server.pgdata / "server.crt"))),
                ("ssl_key_file", _literal(str(server.pgdata / "server.key"))),
                ("listen_addresses", _literal("127.0.0.1")),
                ("port", str(server.port)),
            ):
                await admin.execute(f"ALTER SYSTEM SET {setting} = {value}")
        finally:
            await admin.close()

    with ThreadPoolExecutor(1) as thread:  # a loop of its own, away from the tests' loop
        thread.submit(asyncio.run, configure()).result()
    (server.pgdata / "pg_hba.conf").write_text(HBA)
    server.stop()
    server.start()


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    bin_dir = _tls_capable_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL built with OpenSSL (pgserver's is not): "
            "apt-get install postgresql for these tests"
        )
    # Not under pytest's tmp_path (see conftest's ``postgres``).
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-tls-"))
    server = PostgresWithTls(bin_dir, folder, _server_user(), _free_port())
    authority, other = Authority("qbo-broker test database CA"), Authority("another CA")
    clients = folder / "client"
    clients.mkdir()
    (clients / "ca.crt").write_bytes(authority.pem)
    (clients / "other-ca.crt").write_bytes(other.pem)
    tls = TlsPostgres(
        server=server,
        ca=clients / "ca.crt",
        other_ca=clients / "other-ca.crt",
        good=authority.server("localhost"),
        rogue=other.server("localhost"),
    )
    try:
        _start_tls_postgres(server, tls.good)
        yield tls
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_ambient_tls_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the URL speaks: no PGSSL* variables, no ~/.postgresql/root.crt or client cert."""
    for name in list(os.environ):
        if name.startswith("PGSSL") or name in ("PGHOST", "PGPORT", "PGSERVICE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# -- helpers ------------------------------------------------------------------------------


async def _encrypted(connection: asyncpg.Connection | PoolConnectionProxy) -> bool:
    on: bool = await connection.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    return on


async def connects_like_the_broker(url: str) -> None:
    """Every way the broker connects works, and every session it gets is TLS."""
    await wait_for_database(url, within=timedelta(0))
    pool = await create_pool(url, 2, timedelta(seconds=2))
    try:
        async with pool.acquire() as pooled:
            assert await _encrypted(pooled)
    finally:
        await pool.close()
    extra = await Database(url).connect("qbo-broker-feed")  # the change feed, the sweep lock
    try:
        assert await _encrypted(extra)
    finally:
        await extra.close()


async def refused_for_its_certificate(tls: TlsPostgres, url: str) -> str:
    """Every way the broker connects refuses the server's certificate; returns start-up's error."""
    with pytest.raises(StorageError) as waited:  # at once: no wait fixes a certificate
        await wait_for_database(url, within=timedelta(seconds=60), every=0.01)
    assert not isinstance(waited.value, StorageUnavailable)
    with pytest.raises(StorageUnavailable):
        await create_pool(url, 2, timedelta(seconds=2))
    with pytest.raises(ssl.SSLCertVerificationError):
        await Database(url).connect("qbo-broker-feed")
    message = str(waited.value)
    assert "SSLCertVerificationError" in message
    assert "certificate verify failed" in message
    assert_discreet(tls, message)
    return message


def assert_discreet(tls: TlsPostgres, message: str) -> None:
    assert PASSWORD not in message
    assert "PRIVATE KEY" not in message
    for secret in tls.secrets:
        body = b"".join(secret.splitlines()[1:-1]).decode()
        assert body[:40] not in message


# -- sslmode=verify-full ------------------------------------------------------------------


async def test_verify_full_with_the_databases_ca_connects(tls_postgres: TlsPostgres) -> None:
    await connects_like_the_broker(
        tls_postgres.url(sslmode="verify-full", sslrootcert=str(tls_postgres.ca))
    )


async def test_verify_full_refuses_a_server_signed_by_another_ca(
    tls_postgres: TlsPostgres,
) -> None:
    url = tls_postgres.url(sslmode="verify-full", sslrootcert=str(tls_postgres.other_ca))

    message = await refused_for_its_certificate(tls_postgres, url)

    assert message.startswith(f"BROKER_DATABASE_URL: localhost:{tls_postgres.port}: ")


async def test_verify_full_refuses_a_certificate_for_another_name(
    tls_postgres: TlsPostgres,
) -> None:
    # The certificate names localhost; 127.0.0.1 is the same server under another name.
    url = tls_postgres.url(
        host="127.0.0.1", sslmode="verify-full", sslrootcert=str(tls_postgres.ca)
    )

    message = await refused_for_its_certificate(tls_postgres, url)

    assert message.startswith(f"BROKER_DATABASE_URL: 127.0.0.1:{tls_postgres.port}: ")
    assert "certificate verify failed" in message
    assert "mismatch" in message
    # verify-ca checks the chain only: the same name mismatch passes.
    await connects_like_the_broker(
        tls_postgres.url(host="127.0.0.1", sslmode="verify-ca", sslrootcert=str(tls_postgres.ca))
    )


async def test_verify_full_without_a_ca_file_fails_and_says_so(tls_postgres: TlsPostgres) -> None:
    # No sslrootcert and no ~/.postgresql/root.crt: asyncpg will not fall back to the
    # system's CAs, it refuses before connecting.
    with pytest.raises(StorageError) as unnamed:
        await wait_for_database(
            tls_postgres.url(sslmode="verify-full"), within=timedelta(0), every=0.01
        )
    assert "root certificate file" in str(unnamed.value)
    assert_discreet(tls_postgres, str(unnamed.value))

    missing = tls_postgres.ca.parent / "missing.crt"
    with pytest.raises(StorageError) as absent:
        await wait_for_database(
            tls_postgres.url(sslmode="verify-full", sslrootcert=str(missing)),
            within=timedelta(0),
            every=0.01,
        )
    assert "No such file" in str(absent.value)
    assert_discreet(tls_postgres, str(absent.value))


# -- sslmode=require, verify-ca -----------------------------------------------------------


async def test_require_encrypts_without_verifying(tls_postgres: TlsPostgres) -> None:
    # No CA at all, and a name the certificate does not carry: still connects.
    await connects_like_the_broker(tls_postgres.url(sslmode="require"))
    await connects_like_the_broker(tls_postgres.url(host="127.0.0.1", sslmode="require"))
    # With an sslrootcert, require checks the chain (as libpq does), not the name.
    await refused_for_its_certificate(
        tls_postgres, tls_postgres.url(sslmode="require", sslrootcert=str(tls_postgres.other_ca))
    )
    await connects_like_the_broker(
        tls_postgres.url(host="127.0.0.1", sslmode="require", sslrootcert=str(tls_postgres.ca))
    )


async def test_verify_ca_checks_the_chain(tls_postgres: TlsPostgres) -> None:
    await refused_for_its_certificate(
        tls_postgres,
        tls_postgres.url(sslmode="verify-ca", sslrootcert=str(tls_postgres.other_ca)),
    )


async def test_this_server_refuses_plaintext(tls_postgres: TlsPostgres) -> None:
    """The setting the other tests rely on: a session that works here is a TLS one."""
    with pytest.raises(StorageError) as refused:
        await wait_for_database(
            tls_postgres.url(sslmode="disable"), within=timedelta(0), every=0.01
        )
    assert "no encryption" in str(refused.value)
    assert_discreet(tls_postgres, str(refused.value))


# -- no sslmode: asyncpg's default is prefer ----------------------------------------------


async def test_no_sslmode_means_tls_if_offered_and_never_verified(
    tls_postgres: TlsPostgres,
) -> None:
    await connects_like_the_broker(tls_postgres.url())
    await connects_like_the_broker(tls_postgres.url(host="127.0.0.1"))
    # An sslrootcert without an sslmode is ignored: prefer never loads it.
    await connects_like_the_broker(tls_postgres.url(sslrootcert=str(tls_postgres.other_ca)))


@dataclass
class Downgrader:
    """A man in the middle that declines TLS and asks for the password in clear."""

    port: int = 0
    ssl_requests: int = 0
    startups: list[bytes] = field(default_factory=list)
    passwords: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(8)
            if first == SSL_REQUEST:
                self.ssl_requests += 1
                writer.write(b"N")
                await writer.drain()
                first = await reader.readexactly(4)
            else:
                first = first[:4]
            (length,) = struct.unpack("!l", first[:4])
            self.startups.append(await reader.readexactly(length - 4))
            writer.write(b"R" + struct.pack("!ll", 8, 3))  # AuthenticationCleartextPassword
            await writer.drain()
            kind = await reader.readexactly(1)
            (length,) = struct.unpack("!l", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            if kind == b"p":
                self.passwords.append(body.rstrip(b"\0"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def downgrader() -> AsyncIterator[Downgrader]:
    man = Downgrader()
    server = await asyncio.start_server(man.handle, "127.0.0.1", 0)
    man.port = server.sockets[0].getsockname()[1]
    async with server:
        yield man


async def test_no_sslmode_hands_the_password_to_a_server_that_declines_tls(
    tls_postgres: TlsPostgres, downgrader: Downgrader
) -> None:
    url = f"postgresql://postgres:{PASSWORD}@localhost:{downgrader.port}/postgres"

    with pytest.raises(StorageError):
        await wait_for_database(url, within=timedelta(0), every=0.01)

    assert downgrader.ssl_requests >= 1  # it asked for TLS, was told no, and went on
    assert downgrader.passwords == [PASSWORD.encode()]

    # verify-full stops at the refusal: nothing else is sent.
    secure = f"{url}?sslmode=verify-full&sslrootcert={quote(str(tls_postgres.ca))}"
    downgrader.passwords.clear()
    downgrader.startups.clear()
    with pytest.raises(StorageUnavailable) as refused:
        await wait_for_database(secure, within=timedelta(0), every=0.01)
    assert "rejected SSL upgrade" in str(refused.value)
    assert downgrader.startups == []
    assert downgrader.passwords == []
    assert_discreet(tls_postgres, str(refused.value))


# -- a whole broker -----------------------------------------------------------------------


@pytest.fixture
async def broker_database(tls_postgres: TlsPostgres) -> AsyncIterator[str]:
    admin = await asyncpg.connect(tls_postgres.admin_dsn())
    try:
        await admin.execute(f"CREATE DATABASE {BROKER_DATABASE}")
        yield tls_postgres.url(
            BROKER_DATABASE, sslmode="verify-full", sslrootcert=str(tls_postgres.ca)
        )
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {BROKER_DATABASE} WITH (FORCE)")
        await admin.close()


async def test_a_broker_on_verify_full_verifies_every_connection_it_opens(
    tls_postgres: TlsPostgres,
    broker_database: str,
    start_broker: StartBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = await start_broker(database_url=broker_database, **SWEEP_BY_HAND)
    components = running.components
    admin = await asyncpg.connect(tls_postgres.admin_dsn())
    try:
        sessions = await admin.fetch(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s "
            "USING (pid) WHERE a.datname = $1",
            BROKER_DATABASE,
        )
        names = {row["application_name"] for row in sessions}
        assert {"qbo-broker", "qbo-broker-feed"} <= names
        assert all(row["ssl"] for row in sessions)
        report = await components.sweeper.run(SweepKind.MANUAL)  # the sweep's lock session
        assert report.outcome is SweepOutcome.COMPLETED

        # The server now shows a certificate from another CA (an impostor), and every
        # session the broker holds is cut: each reconnection must refuse it.
        await tls_postgres.present(tls_postgres.rogue)
        with caplog.at_level(logging.WARNING, logger="broker.storage"):
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                BROKER_DATABASE,
            )
            await eventually(lambda: not components.feed.connected, what="the feed noticing")

            def feed_refused() -> bool:
                return any(
                    "certificate verify failed" in str(getattr(record, "error", ""))
                    for record in caplog.records
                )

            await eventually(feed_refused, what="the change feed refusing the impostor")
        with pytest.raises(StorageUnavailable) as sweep:
            await components.sweeper.run(SweepKind.MANUAL)
        assert "certificate verify failed" in str(sweep.value)

        async def pool_refuses() -> bool:
            try:
                async with components.pool.acquire(timeout=5) as connection:
                    await connection.fetchval("SELECT 1")
            except ssl.SSLCertVerificationError:
                return True
            except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
                pass  # a session cut under it, not yet noticed: try again
            return False

        await eventually(pool_refuses, what="the pool refusing the impostor")
        assert not components.feed.connected

        # The real certificate again: the broker comes back by itself.
        await tls_postgres.present(tls_postgres.good)
        await eventually(lambda: components.feed.connected, within=20, what="the feed back")
        report = await components.sweeper.run(SweepKind.MANUAL)
        assert report.outcome is SweepOutcome.COMPLETED
    finally:
        await tls_postgres.present(tls_postgres.good)
        await admin.close()


async def test_a_broker_on_verify_full_does_not_start_against_an_impostor(
    tls_postgres: TlsPostgres, broker_database: str, settings: Settings, clock: FakeClock
) -> None:
    # The broker trusts another CA than the one that signed the server's certificate.
    wrong = tls_postgres.url(
        BROKER_DATABASE, sslmode="verify-full", sslrootcert=str(tls_postgres.other_ca)
    )
    broker = BrokerServer(
        replace(settings, database_url=wrong, database_wait=timedelta(0)), clock=clock
    )
    try:
        with pytest.raises(StorageError) as refused:
            await broker.start()
    finally:
        await broker.stop()

    message = str(refused.value)
    assert message.startswith(f"BROKER_DATABASE_URL: localhost:{tls_postgres.port}: ")
    assert "certificate verify failed" in message
    assert_discreet(tls_postgres, message)
