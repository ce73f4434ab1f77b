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
6. A refresh that may rotate the token is announced first (a ``RefreshIntent``,
   committed before the request leaves), and the announcement is settled in
   the transaction that stores the answer. One that stays tells whose loss a
   later ``invalid_grant`` is (``lost_in_flight``), and stops a sibling from
   sending the old token while the replica that may hold the new one is alive.
   A refresh that failed with no answer (timeout, reset, 5xx) stays announced
   but marked as holding nothing, so siblings go ahead. A refresh that cannot
   rotate (a token younger than a day) is simply asked again when its answer
   is lost.
7. From ``stop_starting`` on (shutdown), no new request is sent to Intuit (not
   even a retry); the ones already sent run to their end and are stored, and
   are never cancelled by the shutdown deadline.
8. At most ``max_concurrent`` refreshes hold a row lock at once: each holds one
   pooled connection for its lock and takes a second to announce itself, so
   without a bound a burst of refreshes could take every connection and wait
   for a second one that never comes.

Failures leave ``locked`` as exceptions; the store commits what was recorded
on the row before letting a broker error through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from broker.clock import Clock
from broker.domain.backoff import Backoff
from broker.domain.cache import TokenCache
from broker.domain.model import (
    ConnectionStatus,
    IssuedTokens,
    LockedConnection,
    LostCause,
    Outcome,
    TokenSnapshot,
    Trigger,
    fingerprint,
)
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import ConnectionStore, IntuitClient, LockedRow, RefreshObserver
from broker.domain.rescue import UnstoredTokens, UnstoredWrite
from broker.errors import (
    InvalidGrant,
    ReauthorizationRequired,
    RefreshPending,
    ShuttingDown,
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
        replica: str,
        max_concurrent: int,
    ) -> None:
        self._replica = replica
        self._slots = asyncio.Semaphore(max(1, max_concurrent))
        self._store = store
        self._intuit = intuit
        self._policy = policy
        self._clock = clock
        self._cache = cache
        self._observer = observer
        self._backoff = backoff
        self._unstored = unstored
        self._inflight: dict[str, asyncio.Task[Refreshed]] = {}
        self._sent: set[str] = set()
        self._stopping = False

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

    def stop_starting(self) -> None:
        """Send nothing more to Intuit; refreshes already sent go on to be stored."""
        self._stopping = True

    async def finish(self, within: float) -> None:
        """Wait up to ``within`` seconds for every refresh in flight (shutdown).

        The refreshes are never cancelled here: one still at Intuit when the time is
        up stays in ``sent``, for ``close`` to name.
        """
        if self._inflight and within > 0:
            await asyncio.wait(list(self._inflight.values()), timeout=within)

    @property
    def sent(self) -> list[str]:
        """Realms whose refresh is at Intuit, or answered and not yet stored."""
        return sorted(self._sent)

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
            async with self._slots, self._store.locked(realm_id) as row:
                locked = row.current
                require_active(locked.snapshot)
                now = self._clock()
                # Re-checked under the lock: a sibling replica may have done it while we waited.
                if not self._policy.still_needed(trigger, locked.snapshot, now, min_validity):
                    result = Refreshed(locked.snapshot, performed=False)
                else:
                    issued = await self._renew(row, locked, trigger, now)
                    answered = time.monotonic()
                    result = Refreshed(await row.store_tokens(issued.update), performed=True)
            if issued is not None:
                self._observer.answer_stored(time.monotonic() - answered)
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
        finally:
            self._sent.discard(realm_id)
        self._backoff.clear(realm_id)
        self._cache.put(result.snapshot, ticket)
        return result

    async def _renew(
        self, row: LockedRow, locked: LockedConnection, trigger: Trigger, now: datetime
    ) -> UnstoredWrite:
        """Ask Intuit for new tokens; a failure is recorded on the row, then raised."""
        snapshot = locked.snapshot
        realm_id = snapshot.realm_id
        deadline = snapshot.reconnect_deadline
        if deadline is not None and now >= deadline:
            await self._lose(row, snapshot, LostCause.HARD_LIMIT, trigger, None)
        if self._stopping:
            raise ShuttingDown("the broker is shutting down; no new refresh is sent to Intuit")
        token = locked.refresh_token
        if token is None:
            await self._lose(row, snapshot, LostCause.REVOKED_AT_INTUIT, trigger, None)
        intent = await row.intent()
        if (
            intent is not None
            and intent.replica != self._replica
            and intent.replica_alive
            and intent.answer_held
        ):
            # A sibling sent this token and may hold Intuit's answer (the database was
            # away when it tried to store it). Sending the old token now would kill
            # the grant for nothing: its answer lands within seconds. (A sibling whose
            # refresh failed with no answer holds nothing: then we go ahead.)
            raise RefreshPending(
                "another replica refreshed this connection and is storing the result"
            )
        sent = fingerprint(token)
        in_doubt = intent is not None and intent.token_fingerprint == sent
        may_rotate = self._policy.may_rotate(snapshot, now)
        if may_rotate:
            await self._store.record_intent(realm_id, sent, self._replica)
        self._sent.add(realm_id)
        try:
            issued, used = await self._call_intuit(row, locked, retry_lost_answer=not may_rotate)
        except InvalidGrant as exc:
            self._observer.refresh_finished(trigger, Outcome.INVALID_GRANT)
            cause = self._policy.loss_cause(snapshot, now, in_doubt=in_doubt)
            await self._lose(row, snapshot, cause, trigger, exc)
        except UpstreamError as exc:
            self._observer.refresh_finished(trigger, Outcome.UPSTREAM_ERROR)
            wait = self._backoff.failed(realm_id, exc, now)
            if isinstance(exc, UpstreamUnavailable) and exc.retry_after is None:
                exc.retry_after = wait  # callers learn when to come back
            await row.record_error(str(exc), settle_intent=not exc.may_have_rotated)
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

    async def _lose(
        self,
        row: LockedRow,
        snapshot: TokenSnapshot,
        cause: LostCause,
        trigger: Trigger,
        exc: InvalidGrant | None,
    ) -> NoReturn:
        """The customer must reconnect: record why, count it, say it, raise it."""
        realm_id = snapshot.realm_id
        reason = _LOSS_REASONS[cause]
        fields = {
            "realm_id": realm_id,
            "trigger": trigger.value,
            "cause": cause.value,
            "intuit_tid": exc.intuit_tid if exc is not None else None,
        }
        if cause is LostCause.LOST_IN_FLIGHT:
            log.error(
                "connection lost: a refresh of ours rotated this token and its answer was "
                "never stored; the customer must reconnect",
                extra=fields,
            )
        else:
            log.warning("connection needs reauthorization", extra=fields)
        await row.mark_reauthorization_required(reason, cause)
        self._observer.connection_lost(cause)
        raise ReauthorizationRequired(realm_id, reason) from exc

    async def _call_intuit(
        self,
        row: LockedRow,
        locked: LockedConnection,
        *,
        retry_lost_answer: bool,
    ) -> tuple[IssuedTokens, LockedConnection]:
        realm_id = locked.snapshot.realm_id
        assert locked.refresh_token is not None
        try:
            return await self._ask(locked.refresh_token, realm_id, retry_lost_answer), locked
        except InvalidGrant:
            again = await row.reread()
            if again.refresh_token is None or again.refresh_token == locked.refresh_token:
                raise
            if self._stopping:
                raise ShuttingDown(
                    "the broker is shutting down; the newer stored token is left for later"
                ) from None
            log.warning(
                "invalid_grant, but a newer refresh token was stored meanwhile; retrying with it",
                extra={"realm_id": realm_id},
            )
            return await self._intuit.refresh(again.refresh_token, realm_id=realm_id), again

    async def _ask(self, token: str, realm_id: str, retry_lost_answer: bool) -> IssuedTokens:
        try:
            return await self._intuit.refresh(token, realm_id=realm_id)
        except UpstreamUnavailable as exc:
            if not (exc.answer_lost and retry_lost_answer) or self._stopping:
                raise
            # This token is too young to rotate: Intuit hands it back unchanged, so
            # asking again cannot kill anything, and waiting would help nobody.
            log.info("Intuit's answer was lost; asking again at once", extra={"realm_id": realm_id})
            return await self._intuit.refresh(token, realm_id=realm_id)


_LOSS_REASONS = {
    LostCause.REVOKED_AT_INTUIT: "Intuit rejected the refresh token (invalid_grant)",
    LostCause.LOST_IN_FLIGHT: (
        "Intuit rejected the refresh token (invalid_grant): a refresh of ours rotated it "
        "and its answer was lost"
    ),
    LostCause.EXPIRED: "the refresh token expired (invalid_grant)",
    LostCause.HARD_LIMIT: "the grant passed Intuit's five-year limit",
}


def require_active(snapshot: TokenSnapshot) -> None:
    if snapshot.status is ConnectionStatus.REVOKED:
        raise ReauthorizationRequired(snapshot.realm_id, "the connection was revoked")
    if snapshot.status is not ConnectionStatus.ACTIVE:
        raise ReauthorizationRequired(
            snapshot.realm_id, "Intuit no longer accepts this grant; the customer must reconnect"
        )
