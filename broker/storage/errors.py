"""asyncpg's exceptions become the broker's storage errors here, once."""

from __future__ import annotations

import asyncio
from types import TracebackType

import asyncpg
from asyncpg.exceptions._base import DataError as _ClientDataError

from broker.errors import StorageError, StorageUnavailable

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    asyncio.TimeoutError,  # connect or pool-acquire timeout
    asyncpg.exceptions.ConnectionDoesNotExistError,  # connection closed under us
    asyncpg.InterfaceError,  # pool closing, connection released
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, restart, terminated backend
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout while another holder hangs
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)


class translate_storage_errors:
    """Re-raise asyncpg and socket errors as StorageUnavailable / StorageError."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, StorageError):
            return
        if isinstance(exc, (_ClientDataError, asyncpg.DataError)):
            # Client-side argument errors quote the argument, which may be a token.
            raise StorageError(
                f"database rejected a query argument ({type(exc).__name__})"
            ) from None
        if isinstance(exc, _UNAVAILABLE):
            raise StorageUnavailable(f"database unavailable: {_describe(exc)}") from exc
        if isinstance(exc, asyncpg.PostgresError):
            raise StorageError(f"database error: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    # asyncpg messages name the statement's problem, never bound parameter values.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
