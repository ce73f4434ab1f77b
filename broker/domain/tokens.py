"""The token service: hand out access tokens, refresh them exactly once, lose nothing.

GetAccessToken's path: a warm token answers from memory (a dict lookup and two
date comparisons, no database, no lock, no log line); otherwise the row is
read, and refreshed first when the policy says so (``broker.domain.refresh``).
While Intuit or the database fails, a stored access token that still works is
served even if it has less life left than asked.

Each call reads the clock once and takes every decision at that moment. The
parts: ``refresh`` (one refresh at a time), ``rescue`` (tokens not yet
stored), ``usage`` (``last_used_at`` batching), ``backoff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from broker.clock import Clock
from broker.domain.backoff import Backoff
from broker.domain.cache import TokenCache
from broker.domain.model import ConnectionStatus, TokenSnapshot, Trigger
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import ConnectionStore, IntuitClient, RefreshObserver
from broker.domain.refresh import Refreshed, Refresher, require_active
from broker.domain.rescue import UnstoredTokens
from broker.domain.usage import UsageTracker
from broker.errors import (
    AmbiguousUser,
    ClientRejected,
    ConnectionNotFound,
    PermissionDenied,
    RefreshPending,
    ShuttingDown,
    StorageUnavailable,
    UpstreamUnavailable,
)

log = logging.getLogger("broker.tokens")

ZERO = timedelta(0)
_NOT_NOW = (UpstreamUnavailable, ClientRejected, StorageUnavailable, RefreshPending, ShuttingDown)
"""Refresh failures after which a stored access token that still works is served."""
_NO_ACCESS_TOKEN_RETRY = timedelta(seconds=1)


class TokenService:
    def __init__(
        self,
        *,
        store: ConnectionStore,
        intuit: IntuitClient,
        policy: RefreshPolicy,
        clock: Clock,
        cache: TokenCache,
        observer: RefreshObserver,
        replica: str,
        max_concurrent_refreshes: int,
    ) -> None:
        self._store = store
        self._intuit = intuit
        self._policy = policy
        self._clock = clock
        self._cache = cache
        self._backoff = Backoff()
        self._usage = UsageTracker(store)
        self.unstored = UnstoredTokens(store)
        self._refresher = Refresher(
            store=store,
            intuit=intuit,
            policy=policy,
            clock=clock,
            cache=cache,
            observer=observer,
            backoff=self._backoff,
            unstored=self.unstored,
            replica=replica,
            max_concurrent=max_concurrent_refreshes,
        )
        self._flusher: asyncio.Task[None] | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        """GetAccessToken calls answered from memory, and the others (for the metrics)."""

    @property
    def policy(self) -> RefreshPolicy:
        return self._policy

    # -- GetAccessToken ---------------------------------------------------------------

    async def get_access_token(
        self,
        *,
        realm_id: str | None,
        user_id: str | None,
        min_validity: timedelta,
        may_read: Callable[[str], bool] | None = None,
    ) -> TokenSnapshot:
        """The connection's access token, refreshed first if it would not last.

        ``may_read``: the caller may read only some realms; a connection asked for
        by user is checked once its realm is known (PermissionDenied), and an
        unknown user is then PermissionDenied too (no existence oracle).
        """
        now = self._clock()
        key = realm_id if realm_id is not None else self._cache.realm_of_user(user_id or "")
        cached = self._cache.get(key) if key is not None else None
        if cached is not None:
            if may_read is not None and not may_read(cached.realm_id):
                raise PermissionDenied("this call on this realm")
            if self._policy.trigger_on_use(cached, now, min_validity) is None:
                self._usage.touch(cached.realm_id, now)
                self.cache_hits += 1
                return cached
            wait = self._backoff.left(cached.realm_id, now)
            if wait is not None:  # Intuit failed moments ago: answer without touching storage
                self.cache_hits += 1
                return self._served_while_failing(cached, now, wait)
        self.cache_misses += 1
        return await self._get_slow(realm_id, user_id, min_validity, key, now, may_read)

    async def _get_slow(
        self,
        realm_id: str | None,
        user_id: str | None,
        min_validity: timedelta,
        key: str | None,
        now: datetime,
        may_read: Callable[[str], bool] | None,
    ) -> TokenSnapshot:
        ticket = self._cache.ticket()
        try:
            snapshot = await self._store.load(realm_id=realm_id, user_id=user_id)
        except StorageUnavailable:
            # PostgreSQL is away: a token we still hold and that still works beats none.
            last_known = self._cache.last_known(key) if key is not None else None
            if (
                last_known is not None
                and last_known.access_token_valid_for(now, ZERO)
                and (may_read is None or may_read(last_known.realm_id))
            ):
                return last_known
            raise
        except (ConnectionNotFound, AmbiguousUser):
            if may_read is not None:
                raise PermissionDenied("this call on this realm") from None
            raise
        if may_read is not None and not may_read(snapshot.realm_id):
            raise PermissionDenied("this call on this realm")
        require_active(snapshot)
        self._cache.put(snapshot, ticket, sole_for_user=user_id is not None)
        trigger = self._policy.trigger_on_use(snapshot, now, min_validity)
        if trigger is not None:
            snapshot = await self._refresh_or_fall_back(snapshot, trigger, min_validity, now)
        self._usage.touch(snapshot.realm_id, now)
        return snapshot

    def _served_while_failing(
        self, snapshot: TokenSnapshot, now: datetime, wait: timedelta
    ) -> TokenSnapshot:
        if snapshot.access_token_valid_for(now, ZERO):
            self._usage.touch(snapshot.realm_id, now)
            return snapshot
        raise UpstreamUnavailable(
            "refreshing this connection failed moments ago; not asking Intuit again yet",
            retry_after=wait,
        )

    async def _refresh_or_fall_back(
        self, snapshot: TokenSnapshot, trigger: Trigger, min_validity: timedelta, now: datetime
    ) -> TokenSnapshot:
        wait = self._backoff.left(snapshot.realm_id, now)
        if wait is not None:
            return self._served_while_failing(snapshot, now, wait)
        if trigger is Trigger.PROACTIVE:
            age = now - (snapshot.refresh_token_created_at or now)
            log.info(
                "refresh token is %d days old, renewing it proactively",
                age.days,
                extra={"realm_id": snapshot.realm_id, "trigger": trigger.value},
            )
        try:
            fresh = (
                await self._refresher.refresh(snapshot.realm_id, trigger, min_validity)
            ).snapshot
        except (
            UpstreamUnavailable,
            ClientRejected,
            StorageUnavailable,
            RefreshPending,
            ShuttingDown,
        ):
            if snapshot.access_token_valid_for(now, ZERO):
                return snapshot  # while Intuit (or storage) fails, a working token beats none
            raise
        for candidate in (fresh, snapshot):
            if candidate.access_token_valid_for(now, ZERO):
                return candidate
        if fresh.access_token is None:
            # Intuit answered with a new refresh token (stored) but no usable access token.
            reason = "Intuit's answer carried no usable access token (its refresh token was stored)"
        else:
            reason = "the refreshed access token expired before it could be handed out"
        raise UpstreamUnavailable(reason, retry_after=_NO_ACCESS_TOKEN_RETRY)

    # -- refresh and revoke -----------------------------------------------------------

    async def refresh(
        self, realm_id: str, trigger: Trigger, min_validity: timedelta = ZERO
    ) -> Refreshed:
        """Refresh now unless someone already did what ``trigger`` needs (sweep, admin).

        A realm backing off after an Intuit failure is not sent to Intuit again
        before its time, whoever asks.
        """
        wait = self._backoff.left(realm_id, self._clock())
        if wait is not None:
            raise UpstreamUnavailable(
                "refreshing this connection failed moments ago; not asking Intuit again yet",
                retry_after=wait,
            )
        return await self._refresher.refresh(realm_id, trigger, min_validity)

    async def revoke(self, realm_id: str) -> None:
        """Revoke the grant at Intuit, then mark the connection revoked and erase its tokens.

        Under the row lock, so no refresh runs meanwhile. If Intuit cannot be
        reached nothing changes (UpstreamUnavailable); a grant Intuit no longer
        knows counts as revoked.
        """
        await asyncio.shield(self._end_grant(realm_id, forget=False))

    async def delete(self, realm_id: str) -> None:
        """Revoke the grant at Intuit (or find it already dead), then forget the connection."""
        await asyncio.shield(self._end_grant(realm_id, forget=True))

    async def _end_grant(self, realm_id: str, *, forget: bool) -> None:
        await self.unstored.write(realm_id)  # the live refresh token may be only in memory
        async with self._store.locked(realm_id) as row:
            locked = row.current
            revoked = locked.snapshot.status is ConnectionStatus.REVOKED
            token = locked.refresh_token or locked.snapshot.access_token
            if not revoked and token is not None:
                await self._intuit.revoke(token, realm_id=realm_id)
            if forget:
                await row.delete()
            elif not revoked:
                await row.mark_revoked()
        self.connection_replaced(realm_id)
        log.info(
            "connection deleted" if forget else "connection revoked", extra={"realm_id": realm_id}
        )

    def connection_replaced(self, realm_id: str) -> None:
        """New tokens were stored by other means (an import): forget what we knew."""
        self._cache.forget(realm_id)
        self._backoff.clear(realm_id)

    # -- lifecycle --------------------------------------------------------------------

    async def flush_usage(self) -> None:
        await self._usage.flush()

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._usage.flush_forever(), name="flush-usage")

    def stop_refreshing(self) -> None:
        """Shutdown begins: send nothing more to Intuit (sent refreshes go on)."""
        self._refresher.stop_starting()

    async def drain(self, deadline: float) -> None:
        """Until ``deadline`` (``time.monotonic``): let every refresh sent to Intuit end and
        be stored, then keep trying to write tokens held only in memory."""
        sent = self._refresher.sent
        if sent:
            log.info("waiting for refreshes sent to Intuit", extra={"refreshes": len(sent)})
        await self._refresher.finish(within=deadline - time.monotonic())
        while len(self.unstored) and time.monotonic() < deadline:
            await self.unstored.write_all()
            if len(self.unstored):
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def close(self) -> None:
        """Stop the background tasks; name every connection whose new tokens are lost."""
        for realm_id in self._refresher.sent:
            log.error(
                "shutting down while a refresh sent to Intuit is unfinished; if Intuit rotated "
                "the token, this connection will need reauthorization",
                extra={"realm_id": realm_id},
            )
        for realm_id in self.unstored.realms:
            log.error(
                "shutting down with refreshed tokens the database never took; "
                "this connection will need reauthorization",
                extra={"realm_id": realm_id},
            )
        await self.unstored.close()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._usage.flush()
