"""The change feed: LISTEN to the table's change notices, keep listening.

One dedicated connection per process (not from the pool) listens on
``qbo_broker_connection_changed``. When it drops, the token cache stops taking
new entries; when it is back, the cache starts over, since notices sent in
between are lost. A ping every few seconds notices a connection that died
without a word; the ping is this replica's heartbeat in ``broker_replicas``
(database time), which tells siblings it is alive (``RefreshIntent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from broker.domain.cache import ChangeListener, ChangeNotice
from broker.errors import StorageError
from broker.storage.errors import translate_storage_errors

log = logging.getLogger("broker.storage")

CHANNEL = "qbo_broker_connection_changed"
HEARTBEAT = """INSERT INTO broker_replicas (replica) VALUES ($1)
               ON CONFLICT (replica) DO UPDATE SET last_seen = now()"""
FORGET_DEAD_REPLICAS = "DELETE FROM broker_replicas WHERE last_seen < now() - interval '1 day'"
_PING_EVERY = 5.0
_RECONNECT_FIRST = 0.2
_RECONNECT_MAX = 5.0


class ChangeFeed:
    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        listeners: Sequence[ChangeListener],
        replica: str,
    ) -> None:
        self._connect = connect
        self._listeners = tuple(listeners)
        self._replica = replica
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-feed")

    async def wait_connected(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), within)
        return self.connected

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = _RECONNECT_FIRST
        while True:
            try:
                await self._listen()
                delay = _RECONNECT_FIRST
            except StorageError as exc:
                log.warning("change feed unavailable, retrying", extra={"error": str(exc)})
            finally:
                if self._connected.is_set():
                    self._connected.clear()
                    for listener in self._listeners:
                        listener.feed_lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _listen(self) -> None:
        lost = asyncio.Event()
        async with translate_storage_errors():
            connection = await self._connect()
        try:
            async with translate_storage_errors():
                connection.add_termination_listener(lambda _: lost.set())
                await connection.add_listener(CHANNEL, self._on_notify)
                await connection.execute(HEARTBEAT, self._replica)
                await connection.execute(FORGET_DEAD_REPLICAS)
            for listener in self._listeners:
                listener.feed_restored()
            self._connected.set()
            log.info("change feed listening")
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), _PING_EVERY)
                if not lost.is_set():
                    async with translate_storage_errors():
                        await connection.execute(HEARTBEAT, self._replica, timeout=_PING_EVERY)
            log.warning("change feed connection lost")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 1.0)
            if not connection.is_closed():
                connection.terminate()

    def _on_notify(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            data = json.loads(str(payload))
            notice = ChangeNotice(
                realm_id=str(data["realm_id"]),
                row_version=int(data["row_version"]),
                user_id=None if data.get("user_id") is None else str(data["user_id"]),
                deleted=data.get("op") == "DELETE",
            )
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable change notice; starting over as after an outage")
            for listener in self._listeners:
                listener.feed_restored()
            return
        for listener in self._listeners:
            listener.apply(notice)
