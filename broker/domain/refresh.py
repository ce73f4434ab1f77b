"""One refresh per connection at a time, in this process and across replicas.

1. Within a process, callers of one realm share a single refresh task; the task
   is shielded, so a caller that gives up (deadline, disconnect) never cancels a
   refresh that Intuit may already have rotated.
2. Across replicas, the task runs under the row's lock (``SELECT … FOR UPDATE``)
   and first re-checks whether the work is still needed: the replica that waited
   finds the token a sibling just stored and calls nobody.
3. Intuit's answer is written in the same transaction, which commits before any
   caller sees the new access token. If that commit fails, the new tokens are
   kept in memory (``broker.domain.rescue``) and written as soon as PostgreSQL
   answers again: the only live refresh token must never be dropped.
4. ``invalid_grant`` first re-reads the row and retries once if a newer refresh
   token appeared (under a held row lock no writer can commit one, so this only
   matters if the lock was lost, e.g. the session was killed; it costs one
   SELECT on a rare path); only then is the connection marked for
   reauthorization, after which Intuit is not called for it again.
5. A transient Intuit failure keeps the stored token, is recorded on the row
   and backs the realm off (``broker.domain.backoff``).

Failures leave ``locked`` as exceptions; the store commits what was recorded
on the row before letting a broker error through.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.clock import Clock
from broker.domain.backoff import Backoff
from broker.domain.cache import TokenCache
from broker.domain.model import (
    ConnectionStatus,
    IssuedTokens,
    LockedConnection,
    Outcome,
    TokenSnapshot,
    Trigger,
)
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import ConnectionStore, IntuitClient, LockedRow, RefreshObserver
from broker.domain.rescue import UnstoredTokens, UnstoredWrite
from broker.errors import (
    InvalidGrant,
    ReauthorizationRequired,
    StorageError,
    StorageUnavailable,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger("broker.tokens")

ZERO = timedelta(0)


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What ``refresh`` did: the connection now, and whether Intuit was asked."""

    snapshot: TokenSnapshot
    performed: bool


class Refresher:
    def __init__(
        self,
        *,
        store: ConnectionStore,
        intuit: IntuitClient,
        policy: RefreshPolicy,
        clock: Clock,
        cache: TokenCache,
        observer: RefreshObserver,
        backoff: Backoff,
        unstored: UnstoredTokens,
    ) -> None:
        self._store = store
        self._intuit = intuit
        self._policy = policy
        self._clock = clock
        self._cache = cache
        self._observer = observer
        self._backoff = backoff
        self._unstored = unstored
        self._inflight: dict[str, asyncio.Task[Refreshed]] = {}

    async def refresh(
        self, realm_id: str, trigger: Trigger, min_validity: timedelta = ZERO
    ) -> Refreshed:
        """Refresh ``realm_id`` unless someone already did what ``trigger`` needs.

        Shared by GetAccessToken, RefreshConnection and the sweep, so none of them
        ever refreshes a connection another one is refreshing. A caller that
        joined a refresh which did not give it what it needs starts (or joins)
        one more, at most; then it takes what there is.
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
                task.add_done_callback(lambda done: self._forget(realm_id, done))
                return await asyncio.shield(task)
            joined = await asyncio.shield(task)
            if trigger is Trigger.MANUAL or not self._policy.still_needed(
                trigger, joined.snapshot, self._clock(), min_validity
            ):
                break
        assert joined is not None
        return Refreshed(joined.snapshot, performed=False)

    async def finish(self) -> None:
        """Wait for every refresh in flight (shutdown)."""
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _forget(self, realm_id: str, task: asyncio.Task[Refreshed]) -> None:
        if self._inflight.get(realm_id) is task:
            del self._inflight[realm_id]
        if not task.cancelled():
            task.exception()  # retrieved here so a refresh nobody waited for logs no warning

    async def _refresh_locked(
        self, realm_id: str, trigger: Trigger, min_validity: timedelta
    ) -> Refreshed:
        await self._unstored.write(realm_id)  # the live token may be only in memory
        ticket = self._cache.ticket()
        issued: UnstoredWrite | None = None
        try:
            async with self._store.locked(realm_id) as row:
                locked = row.current
                require_active(locked.snapshot)
                now = self._clock()
                # Re-checked under the lock: a sibling replica may have done it while we waited.
                if not self._policy.still_needed(trigger, locked.snapshot, now, min_validity):
                    result = Refreshed(locked.snapshot, performed=False)
                else:
                    issued = await self._renew(row, locked, trigger, now)
                    result = Refreshed(await row.store_tokens(issued.update), performed=True)
        except StorageError:
            if issued is not None:
                self._unstored.keep(realm_id, issued)
                raise StorageUnavailable(
                    "the database failed while storing refreshed tokens; they are kept and "
                    "will be stored as soon as it answers"
                ) from None
            raise
        except ReauthorizationRequired:
            self._cache.forget(realm_id)  # no more tokens from memory for this one
            raise
        self._backoff.clear(realm_id)
        self._cache.put(result.snapshot, ticket)
        return result

    async def _renew(
        self, row: LockedRow, locked: LockedConnection, trigger: Trigger, now: datetime
    ) -> UnstoredWrite:
        """Ask Intuit for new tokens; a failure is recorded on the row, then raised."""
        realm_id = locked.snapshot.realm_id
        deadline = locked.snapshot.reconnect_deadline
        if deadline is not None and now >= deadline:
            reason = "the grant passed Intuit's five-year limit"
            await row.mark_reauthorization_required(reason)
            raise ReauthorizationRequired(realm_id, reason)
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
            raise ReauthorizationRequired(realm_id, reason) from exc
        except UpstreamError as exc:
            self._observer.refresh_finished(trigger, Outcome.UPSTREAM_ERROR)
            wait = self._backoff.failed(realm_id, exc, now)
            if isinstance(exc, UpstreamUnavailable) and exc.retry_after is None:
                exc.retry_after = wait  # callers learn when to come back
            await row.record_error(str(exc))
            raise
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
        return UnstoredWrite(used.refresh_token or "", update)

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


def require_active(snapshot: TokenSnapshot) -> None:
    if snapshot.status is ConnectionStatus.REVOKED:
        raise ReauthorizationRequired(snapshot.realm_id, "the connection was revoked")
    if snapshot.status is not ConnectionStatus.ACTIVE:
        raise ReauthorizationRequired(
            snapshot.realm_id, "Intuit no longer accepts this grant; the customer must reconnect"
        )
