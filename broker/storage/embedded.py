"""An embedded PostgreSQL for ``qbo-broker dev``, tests, and deployments without a database URL.

The server binaries come from the ``pgserver`` package (no system PostgreSQL
needed). It keeps its files in ``<data dir>/postgres`` and listens only on a
Unix socket inside that folder. Running as root, pgserver starts the server as
an unprivileged ``pgserver`` user, since PostgreSQL refuses root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg

from broker.errors import ConfigurationError
from broker.storage.errors import translate_storage_errors

log = logging.getLogger("broker.storage")


def _pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
        try:
            import pgserver
        except ImportError:
            raise ConfigurationError(
                "BROKER_DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
                "set BROKER_DATABASE_URL, or install qbo-token-broker[embedded]"
            ) from None
    return pgserver


def embedded_bin_dir() -> Path:
    """Where pgserver keeps the PostgreSQL binaries (psql, pg_dump, …)."""
    return Path(_pgserver().__file__).parent / "pginstall" / "bin"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "postgres"
        self._server: Any = None
        self._socket_dir = ""
        self.joined = False
        """The server was running before this process came: it is not ours to stop."""

    def start(self) -> str:
        """Start (or join) the server; blocking, so call it from a thread. Returns its DSN."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        running = _pgserver().utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        self.joined = running is not None and running.is_running()
        if self.joined:
            log.info(
                "joining the embedded PostgreSQL already running",
                extra={"pgdata": str(self.pgdata)},
            )
        try:
            cleanup = None if self.joined else "stop"
            with _scrubbed_environment():  # the server inherits it: no keys, no secrets
                self._server = _pgserver().get_server(self.pgdata, cleanup_mode=cleanup)
        except Exception as exc:
            log_file = self.pgdata / "log"
            raise ConfigurationError(
                f"could not start the embedded PostgreSQL in {self.pgdata} "
                f"({type(exc).__name__}); see {log_file}"
            ) from exc
        self._socket_dir = str(self._server.get_postmaster_info().socket_dir)
        return str(self._server.get_uri())

    @property
    def socket_dir(self) -> str:
        return self._socket_dir

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@/{quote(database)}?host={quote(self.socket_dir)}"

    def stop(self) -> None:
        """Stop the server if this process started it; a joined server is left running."""
        if self.joined:
            self._server = None
            return
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        if (self.pgdata / "postmaster.pid").exists():
            # pgserver stops only the process it started; after a restart that is a
            # different one, which would be left running.
            self.pg_ctl(["-w", "-m", "fast", "stop"])

    def pg_ctl(self, args: list[str]) -> None:
        """Run pg_ctl on this server, as the user that owns its files (never root)."""
        owner = self.pgdata.stat().st_uid
        user = pwd.getpwuid(owner).pw_name if owner != os.getuid() else None
        _pgserver()._commands.pg_ctl(
            args, pgdata=self.pgdata, user=user, timeout=30, env=_kept_environment()
        )


_KEPT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_RUNTIME_DIR")
"""All a PostgreSQL server needs from our environment; secrets (the key ring, the Intuit
client secret, database URLs) stay out of it, where ``COPY … FROM PROGRAM`` could read them."""


def _kept_environment() -> dict[str, str]:
    return _kept_environment_of(dict(os.environ))


@contextlib.contextmanager
def _scrubbed_environment() -> Iterator[None]:
    """pgserver starts the server with our environment: hand it only what it needs.

    Only called while nothing else runs (start-up, before the listeners), so
    swapping the process environment for a moment is safe.
    """
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_kept_environment_of(saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _kept_environment_of(environment: dict[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in environment.items()
        if name in _KEPT or name.startswith("LC_")
    }


async def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database ``name`` if it does not exist (the embedded server starts with none)."""
    async with translate_storage_errors():
        connection = await asyncpg.connect(admin_dsn)
        try:
            exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                # Another process may create it first.
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
