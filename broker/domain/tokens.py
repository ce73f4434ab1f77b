"""The token service: hand out access tokens, refresh them exactly once, lose nothing.

How one refresh stays one refresh:

1. Within a process, callers of one realm share a single refresh task; the task
   is shielded, so a caller that gives up (deadline, disconnect) never cancels a
   refresh that Intuit may already have rotated.
2. Across replicas, the task runs under the row's lock (``SELECT … FOR UPDATE``)
   and first re-checks whether the work is still needed: the replica that waited
   finds the token a sibling just stored and calls nobody.
3. Intuit's answer is written in the same transaction, which commits before any
   caller sees the new access token. If that commit fails, the new tokens are
   kept in memory and written as soon as PostgreSQL answers again
   (``_rescue``): the only live refresh token must never be dropped.
4. ``invalid_grant`` first re-reads the row and retries once if a newer refresh
   token appeared (under a held row lock no writer can commit one, so this only
   matters if the lock was lost, e.g. the session was killed; it costs one
   SELECT on a rare path); only then is the connection marked for
   reauthorization, after which Intuit is not called for it again.
5. A transient Intuit failure keeps the stored token, backs off for that realm,
   and serves a still-valid access token meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from broker.clock import Clock
from broker.domain.cache import TokenCache
from broker.domain.model import (
    ConnectionStatus,
    IssuedTokens,
    LockedConnection,
    Outcome,
    TokenSnapshot,
    TokenUpdate,
    Trigger,
)
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import ConnectionStore, IntuitClient, LockedRow, RefreshObserver
from broker.errors import (
    BrokerError,
    ClientRejected,
    ConnectionNotFound,
    InvalidGrant,
    ReauthorizationRequired,
    StorageError,
    StorageUnavailable,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger("broker.tokens")

ZERO = timedelta(0)
_BACKOFF_FIRST = timedelta(seconds=1)
_BACKOFF_MAX = timedelta(minutes=2)
_USAGE_FLUSH_EVERY = 10.0
_RESCUE_RETRY_EVERY = 1.0


@dataclass
class _Backoff:
    failures: int = 0
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What ``refresh`` did: the connection now, and whether Intuit was asked."""

    snapshot: TokenSnapshot
    performed: bool


@dataclass(frozen=True)
class _PendingWrite:
    """Tokens Intuit issued whose commit failed: the sole copy of a live refresh token."""

    sent_refresh_token: str
    update: TokenUpdate


@dataclass
class _Background:
    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


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
    ) -> None:
        self._store = store
        self._intuit = intuit
        self._policy = policy
        self._clock = clock
        self._cache = cache
        self._observer = observer
        self._inflight: dict[str, asyncio.Task[Refreshed]] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._pending: dict[str, _PendingWrite] = {}
        self._last_used: dict[str, datetime] = {}
        self._background = _Background()
        self._rescuer: asyncio.Task[object] | None = None

    @property
    def policy(self) -> RefreshPolicy:
        return self._policy

    # -- GetAccessToken ---------------------------------------------------------------

    async def get_access_token(
        self, *, realm_id: str | None, user_id: str | None, min_validity: timedelta
    ) -> TokenSnapshot:
        now = self._clock()
        key = realm_id if realm_id is not None else self._cache.realm_of_user(user_id or "")
        cached = self._cache.get(key) if key is not None else None
        if cached is not None:
            trigger = self._policy.trigger_on_use(cached, now, min_validity)
            if trigger is None:
                self._last_used[cached.realm_id] = now
                return cached
            wait = self._backoff_left(cached.realm_id)
            if wait is not None:  # Intuit failed moments ago: answer without touching storage
                return self._served_while_failing(cached, now, wait)
        return await self._get_slow(realm_id, user_id, min_validity, key)

    async def _get_slow(
        self, realm_id: str | None, user_id: str | None, min_validity: timedelta, key: str | None
    ) -> TokenSnapshot:
        ticket = self._cache.ticket()
        try:
            snapshot = await self._store.load(realm_id=realm_id, user_id=user_id)
        except StorageUnavailable:
            # PostgreSQL is away: a token we still hold and that still works beats none.
            last_known = self._cache.last_known(key) if key is not None else None
            if last_known is not None and last_known.access_token_valid_for(self._clock(), ZERO):
                return last_known
            raise
        _require_active(snapshot)
        self._cache.put(snapshot, ticket, sole_for_user=user_id is not None)
        now = self._clock()
        trigger = self._policy.trigger_on_use(snapshot, now, min_validity)
        if trigger is not None:
            snapshot = await self._refresh_or_fall_back(snapshot, trigger, min_validity)
        self._last_used[snapshot.realm_id] = now
        return snapshot

    def _served_while_failing(
        self, snapshot: TokenSnapshot, now: datetime, wait: timedelta
    ) -> TokenSnapshot:
        if snapshot.access_token_valid_for(now, ZERO):
            self._last_used[snapshot.realm_id] = now
            return snapshot
        raise UpstreamUnavailable(
            "refreshing this connection failed moments ago; not asking Intuit again yet",
            retry_after=wait,
        )

    async def _refresh_or_fall_back(
        self, snapshot: TokenSnapshot, trigger: Trigger, min_validity: timedelta
    ) -> TokenSnapshot:
        wait = self._backoff_left(snapshot.realm_id)
        if wait is not None:
            return self._served_while_failing(snapshot, self._clock(), wait)
        if trigger is Trigger.PROACTIVE:
            age = self._clock() - (snapshot.refresh_token_created_at or self._clock())
            log.info(
                "refresh token is %d days old, renewing it proactively",
                age.days,
                extra={"realm_id": snapshot.realm_id, "trigger": trigger.value},
            )
        try:
            fresh = (await self.refresh(snapshot.realm_id, trigger, min_validity)).snapshot
        except (UpstreamUnavailable, ClientRejected, StorageUnavailable):
            if snapshot.access_token_valid_for(self._clock(), ZERO):
                return snapshot  # while Intuit (or storage) fails, a working token beats none
            raise
        if fresh.access_token_valid_for(self._clock(), ZERO):
            return fresh
        # Intuit answered with a new refresh token (stored) but no usable access token.
        if snapshot.access_token_valid_for(self._clock(), ZERO):
            return snapshot
        raise UpstreamUnavailable(
            "Intuit's answer carried no usable access token (its refresh token was stored)",
            retry_after=timedelta(seconds=1),
        )

    # -- refresh ----------------------------------------------------------------------

    async def refresh(
        self, realm_id: str, trigger: Trigger, min_validity: timedelta = ZERO
    ) -> Refreshed:
        """Refresh ``realm_id`` unless someone already did what ``trigger`` needs.

        Shared by GetAccessToken, RefreshConnection and the sweep, so none of them
        ever refreshes a connection another one is refreshing. Every refresh runs
        as a registered, shielded task: a caller that gives up never cancels one.
        A caller that joined a refresh which did not give it what it needs starts
        (or joins) one more, at most; then it takes what there is.
        """
        joined: Refreshed | None = None
        for _ in range(2):
            task = self._inflight.get(realm_id)
            if task is None:
                task = asyncio.create_task(
                    self._refresh_locked(realm_id, trigger, min_validity),
                    name=f"refresh-{realm_id}",
                )
                self._inflight[realm_id] = task
                task.add_done_callback(lambda done: self._forget_inflight(realm_id, done))
                return await asyncio.shield(task)
            joined = await asyncio.shield(task)
            if trigger is Trigger.MANUAL or not self._policy.still_needed(
                trigger, joined.snapshot, self._clock(), min_validity
            ):
                break
        assert joined is not None
        return Refreshed(joined.snapshot, performed=False)

    def _forget_inflight(self, realm_id: str, task: asyncio.Task[Refreshed]) -> None:
        if self._inflight.get(realm_id) is task:
            del self._inflight[realm_id]
        if not task.cancelled():
            task.exception()  # retrieved here so a refresh nobody waited for logs no warning

    async def _refresh_locked(
        self, realm_id: str, trigger: Trigger, min_validity: timedelta
    ) -> Refreshed:
        await self._write_pending(realm_id)
        ticket = self._cache.ticket()
        issued: _PendingWrite | None = None
        failure: BrokerError | None = None
        try:
            async with self._store.locked(realm_id) as row:
                locked = row.current
                _require_active(locked.snapshot)
                now = self._clock()
                result = locked.snapshot
                # Re-checked under the lock: a sibling replica may have done it while we waited.
                if self._policy.still_needed(trigger, locked.snapshot, now, min_validity):
                    issued, failure = await self._ask_intuit(row, locked, trigger, now)
                    if issued is not None:
                        result = await row.store_tokens(issued.update)
        except StorageError:
            if issued is not None:
                self._keep_for_rescue(realm_id, issued)
                raise StorageUnavailable(
                    "the database failed while storing refreshed tokens; they are kept and "
                    "will be stored as soon as it answers"
                ) from None
            raise
        if failure is not None:
            if isinstance(failure, ReauthorizationRequired):
                self._cache.forget(realm_id)  # no more tokens from memory for this one
            raise failure
        self._backoff.pop(realm_id, None)
        self._cache.put(result, ticket)
        return Refreshed(result, performed=issued is not None)

    async def _ask_intuit(
        self, row: LockedRow, locked: LockedConnection, trigger: Trigger, now: datetime
    ) -> tuple[_PendingWrite | None, BrokerError | None]:
        """Refresh at Intuit: the tokens to store, or why not (already recorded on the row)."""
        realm_id = locked.snapshot.realm_id
        deadline = locked.snapshot.reconnect_deadline
        if deadline is not None and now >= deadline:
            reason = "the grant passed Intuit's five-year limit"
            await row.mark_reauthorization_required(reason)
            return None, ReauthorizationRequired(realm_id, reason)
        try:
            issued, used = await self._call_intuit(row, locked)
        except InvalidGrant as exc:
            self._observer.refresh_finished(trigger, Outcome.INVALID_GRANT)
            reason = "Intuit rejected the refresh token (invalid_grant)"
            log.warning(
                "connection needs reauthorization",
                extra={
                    "realm_id": realm_id,
                    "trigger": trigger.value,
                    "intuit_tid": exc.intuit_tid,
                },
            )
            await row.mark_reauthorization_required(reason)
            return None, ReauthorizationRequired(realm_id, reason)
        except UpstreamError as exc:
            self._observer.refresh_finished(trigger, Outcome.UPSTREAM_ERROR)
            self._back_off(realm_id, exc)
            if isinstance(exc, UpstreamUnavailable) and exc.retry_after is None:
                exc.retry_after = self._backoff_left(realm_id)  # callers learn when to come back
            await row.record_error(str(exc))
            return None, exc
        self._observer.refresh_finished(trigger, Outcome.SUCCESS)
        log.info(
            "tokens refreshed",
            extra={
                "realm_id": realm_id,
                "trigger": trigger.value,
                "intuit_tid": issued.intuit_tid,
                "refresh_token_rotated": issued.refresh_token != used.refresh_token,
            },
        )
        update = self._policy.apply(used, issued, now)
        if update.refresh_token_created_at != used.snapshot.refresh_token_created_at and (
            issued.refresh_token == used.refresh_token
        ):
            log.warning(
                "the recorded refresh-token age did not match Intuit's; corrected from its answer",
                extra={"realm_id": realm_id},
            )
        return _PendingWrite(used.refresh_token or "", update), None

    async def _call_intuit(
        self, row: LockedRow, locked: LockedConnection
    ) -> tuple[IssuedTokens, LockedConnection]:
        realm_id = locked.snapshot.realm_id
        if locked.refresh_token is None:
            raise InvalidGrant("no refresh token is stored for this connection")
        try:
            return await self._intuit.refresh(locked.refresh_token, realm_id=realm_id), locked
        except InvalidGrant:
            again = await row.reread()
            if again.refresh_token is None or again.refresh_token == locked.refresh_token:
                raise
            log.warning(
                "invalid_grant, but a newer refresh token was stored meanwhile; retrying with it",
                extra={"realm_id": realm_id},
            )
            return await self._intuit.refresh(again.refresh_token, realm_id=realm_id), again

    # -- revocation -------------------------------------------------------------------

    async def revoke(self, realm_id: str) -> None:
        """Revoke the grant at Intuit, then mark the connection revoked and erase its tokens.

        Under the row lock, so no refresh runs meanwhile. If Intuit cannot be
        reached nothing changes (UpstreamUnavailable); a grant Intuit no longer
        knows counts as revoked.
        """
        await asyncio.shield(self._revoke(realm_id))

    async def _revoke(self, realm_id: str) -> None:
        await self._write_pending(realm_id)  # the live refresh token may be only in memory
        async with self._store.locked(realm_id) as row:
            locked = row.current
            if locked.snapshot.status is ConnectionStatus.REVOKED:
                return
            token = locked.refresh_token or locked.snapshot.access_token
            if token is not None:
                await self._intuit.revoke(token, realm_id=realm_id)
            await row.mark_revoked()
        self.connection_replaced(realm_id)
        log.info("connection revoked", extra={"realm_id": realm_id})

    # -- backoff ----------------------------------------------------------------------

    def _backoff_left(self, realm_id: str) -> timedelta | None:
        state = self._backoff.get(realm_id)
        if state is None or state.until is None:
            return None
        left = state.until - self._clock()
        return left if left > ZERO else None

    def _back_off(self, realm_id: str, exc: UpstreamError) -> None:
        state = self._backoff.setdefault(realm_id, _Backoff())
        state.failures += 1
        delay = exc.retry_after if isinstance(exc, UpstreamUnavailable) else None
        if delay is None:
            ceiling = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** min(state.failures - 1, 10))
            delay = ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
        state.until = self._clock() + min(delay, _BACKOFF_MAX)

    # -- never lose a rotated token ---------------------------------------------------

    def _keep_for_rescue(self, realm_id: str, pending: _PendingWrite) -> None:
        log.error(
            "could not store refreshed tokens; keeping them in memory until the database answers",
            extra={"realm_id": realm_id},
        )
        self._pending[realm_id] = pending
        if self._rescuer is None or self._rescuer.done():
            self._rescuer = self._background.spawn(self._rescue(), "rescue-pending-tokens")

    async def _write_pending(self, realm_id: str) -> None:
        pending = self._pending.get(realm_id)
        if pending is None:
            return
        try:
            written = await self._store.write_if_refresh_token_is(
                realm_id, pending.sent_refresh_token, pending.update
            )
        except ConnectionNotFound:
            written = False  # the connection was deleted meanwhile: nothing to keep alive
        if self._pending.get(realm_id) is pending:
            del self._pending[realm_id]
        if written:
            log.info("stored refreshed tokens kept in memory", extra={"realm_id": realm_id})
        else:
            log.warning(
                "tokens kept in memory were superseded by a newer grant; dropped",
                extra={"realm_id": realm_id},
            )

    async def _rescue(self) -> None:
        while self._pending:
            for realm_id in list(self._pending):
                with contextlib.suppress(StorageError):
                    await self._write_pending(realm_id)
            if self._pending:
                await asyncio.sleep(_RESCUE_RETRY_EVERY)

    def connection_replaced(self, realm_id: str) -> None:
        """New tokens were stored by other means (an import): forget what we knew."""
        self._cache.forget(realm_id)
        self._backoff.pop(realm_id, None)

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    # -- last_used_at -----------------------------------------------------------------

    async def flush_usage(self) -> None:
        """Write the batched ``last_used_at`` times (every few seconds, not per call)."""
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        try:
            await self._store.record_usage(batch)
        except StorageError:
            for realm_id, moment in batch.items():
                self._last_used.setdefault(realm_id, moment)

    async def _flush_usage_forever(self) -> None:
        while True:
            await asyncio.sleep(_USAGE_FLUSH_EVERY)
            await self.flush_usage()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._background.spawn(self._flush_usage_forever(), "flush-usage")

    async def close(self) -> None:
        """Let refreshes finish, store what can be stored, stop the background tasks."""
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        for realm_id in list(self._pending):
            with contextlib.suppress(StorageError):
                await self._write_pending(realm_id)
        for realm_id in self._pending:
            log.critical(
                "shutting down with refreshed tokens that could not be stored; "
                "this connection will need reauthorization",
                extra={"realm_id": realm_id},
            )
        for task in list(self._background.tasks):
            task.cancel()
        await asyncio.gather(*self._background.tasks, return_exceptions=True)
        await self.flush_usage()


def _require_active(snapshot: TokenSnapshot) -> None:
    if snapshot.status is ConnectionStatus.REVOKED:
        raise ReauthorizationRequired(snapshot.realm_id, "the connection was revoked")
    if snapshot.status is not ConnectionStatus.ACTIVE:
        raise ReauthorizationRequired(
            snapshot.realm_id, "Intuit no longer accepts this grant; the customer must reconnect"
        )
