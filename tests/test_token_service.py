"""The token service on a real PostgreSQL store, with Intuit's rules in-process.

These reach the corners the end-to-end tests cannot steer into on purpose:
a token written by someone else between our refresh and its ``invalid_grant``,
a caller that gives up mid-refresh, and the warm path's promise not to touch
the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest

from broker.clock import FakeClock
from broker.crypto import KeyRing
from broker.devtools.fake_intuit import IntuitModel, SimulatorConfig
from broker.devtools.fake_intuit.in_process import ModelIntuitClient, issued_tokens
from broker.domain.cache import TokenCache
from broker.domain.model import (
    ConnectionInfo,
    ConnectionStatus,
    ImportRequest,
    IssuedTokens,
    LockedConnection,
    LostCause,
    Outcome,
    RefreshIntent,
    TokenSnapshot,
    TokenUpdate,
    Trigger,
)
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import LockedRow
from broker.domain.tokens import TokenService
from broker.errors import RealmOwnedByAnotherUser
from broker.storage.connections import PostgresConnectionStore
from tests.support import eventually

REALM = "9130350000000001"
FIVE_MINUTES = timedelta(minutes=5)


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[Trigger, Outcome]] = []
        self.lost: list[LostCause] = []

    def refresh_finished(self, trigger: Trigger, outcome: Outcome) -> None:
        self.seen.append((trigger, outcome))

    def connection_lost(self, cause: LostCause) -> None:
        self.lost.append(cause)

    def answer_stored(self, seconds: float) -> None:
        pass


@dataclass
class Core:
    service: TokenService
    store: PostgresConnectionStore
    model: IntuitModel
    clock: FakeClock
    outcomes: Outcomes
    cache: TokenCache


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


def build(
    pool: asyncpg.Pool,
    clock: FakeClock,
    store: PostgresConnectionStore | None = None,
    intuit: ModelIntuitClient | None = None,
    max_concurrent_refreshes: int = 2,  # the pool below holds 4
) -> Core:
    keys = KeyRing.parse(KeyRing.generate_spec())
    store = store or PostgresConnectionStore(pool, keys)
    model = intuit.model if intuit else IntuitModel(SimulatorConfig(strict_rotation=True), clock)
    cache = TokenCache()
    cache.feed_restored()  # no change feed here; nothing else writes behind our back
    outcomes = Outcomes()
    service = TokenService(
        store=store,
        intuit=intuit or ModelIntuitClient(model),
        policy=RefreshPolicy(),
        clock=clock,
        cache=cache,
        observer=outcomes,
        replica="test-replica",
        max_concurrent_refreshes=max_concurrent_refreshes,
    )
    return Core(service, store, model, clock, outcomes, cache)


async def seed(core: Core, *, access_left: timedelta | None, realm_id: str = REALM) -> None:
    now = core.clock()
    grant = core.model.create_grant(realm_id, refresh_token_issued_at=now - timedelta(days=2))
    request = ImportRequest(
        realm_id=realm_id,
        user_id="alice",
        refresh_token=grant.refresh_token,
        access_token=grant.access_token,
        access_token_expires_at=now + access_left if access_left else now - timedelta(minutes=1),
        refresh_token_created_at=now - timedelta(days=2),
        refresh_token_expires_at=None,
    )
    await core.store.import_connection(request, RefreshPolicy.from_import(request))


class _SiblingWritesFirst:
    """A locked row whose re-read first stores what a sibling replica obtained meanwhile."""

    def __init__(self, row: LockedRow, write: object) -> None:
        self._row = row
        self._write = write

    @property
    def current(self) -> LockedConnection:
        return self._row.current

    async def reread(self) -> LockedConnection:
        await self._write(self._row)  # type: ignore[operator]
        return await self._row.reread()

    async def store_tokens(self, update: object) -> TokenSnapshot:
        return await self._row.store_tokens(update)  # type: ignore[arg-type]

    async def intent(self) -> RefreshIntent | None:
        return await self._row.intent()

    async def mark_reauthorization_required(self, reason: str, cause: LostCause) -> None:
        await self._row.mark_reauthorization_required(reason, cause)

    async def record_error(self, message: str, *, settle_intent: bool) -> None:
        await self._row.record_error(message, settle_intent=settle_intent)

    async def mark_revoked(self) -> None:
        await self._row.mark_revoked()

    async def delete(self) -> None:
        await self._row.delete()


async def test_invalid_grant_retries_once_with_a_newer_stored_token(
    pool: asyncpg.Pool, clock: FakeClock
) -> None:
    core = build(pool, clock)
    await seed(core, access_left=None)
    stale = core.model.current_refresh_token(REALM)
    assert stale is not None
    # A sibling refreshes at Intuit first: the token we are about to send is now dead.
    sibling = core.model.refresh(stale)
    sibling_update = RefreshPolicy.apply(
        LockedConnection(
            snapshot=await core.store.load(realm_id=REALM, user_id=None), refresh_token=stale
        ),
        IssuedTokens(
            access_token=sibling.access_token,
            refresh_token=sibling.refresh_token,
            expires_in=timedelta(seconds=sibling.expires_in),
            refresh_token_expires_in=timedelta(seconds=sibling.x_refresh_token_expires_in),
            hard_expires_in=None,
            intuit_tid=None,
        ),
        clock(),
    )

    real_locked = core.store.locked

    @asynccontextmanager
    async def locked(realm_id: str) -> AsyncIterator[LockedRow]:
        async with real_locked(realm_id) as row:
            yield _SiblingWritesFirst(row, lambda inner: inner.store_tokens(sibling_update))

    core.store.locked = locked  # type: ignore[method-assign, assignment]

    snapshot = await core.service.get_access_token(
        realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES
    )

    assert snapshot.status is ConnectionStatus.ACTIVE
    assert core.model.access_token_valid(snapshot.access_token or "", REALM)
    assert core.model.stats.invalid_grants == 1  # the stale attempt ...
    assert core.outcomes.seen == [(Trigger.ACCESS_EXPIRY, Outcome.SUCCESS)]  # ... then success
    info = await core.store.get_info(REALM)
    assert info.status is ConnectionStatus.ACTIVE


async def test_a_burst_of_refreshes_never_takes_every_pooled_connection(
    pool: asyncpg.Pool, clock: FakeClock
) -> None:
    """Each refresh that may rotate holds its row lock (one connection) and announces itself
    on a second: eight at once on a pool of four must not wait on each other for ever."""
    core = build(pool, clock)
    realms = [f"91303500000001{n:02d}" for n in range(8)]
    for realm_id in realms:
        await seed(core, access_left=None, realm_id=realm_id)

    snapshots = await asyncio.wait_for(
        asyncio.gather(
            *(
                core.service.get_access_token(
                    realm_id=realm_id, user_id=None, min_validity=FIVE_MINUTES
                )
                for realm_id in realms
            )
        ),
        timeout=60,
    )

    assert [s.realm_id for s in snapshots] == realms
    assert all(core.model.access_token_valid(s.access_token or "", s.realm_id) for s in snapshots)
    assert core.outcomes.seen == [(Trigger.ACCESS_EXPIRY, Outcome.SUCCESS)] * 8


class _HeldIntuit(ModelIntuitClient):
    """Intuit that takes the refresh and answers only when released."""

    def __init__(self, model: IntuitModel) -> None:
        super().__init__(model)
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens:
        self.called.set()
        await self.release.wait()
        return await super().refresh(refresh_token, realm_id=realm_id)


async def test_the_shutdown_deadline_never_cancels_a_refresh_sent_to_intuit(
    pool: asyncpg.Pool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    model = IntuitModel(SimulatorConfig(strict_rotation=True), clock)
    intuit = _HeldIntuit(model)
    core = build(pool, clock, intuit=intuit)
    await seed(core, access_left=None)
    call = asyncio.create_task(
        core.service.get_access_token(realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES)
    )
    await asyncio.wait_for(intuit.called.wait(), 10)

    core.service.stop_refreshing()
    await core.service.drain(deadline=time.monotonic() + 0.05)  # ends with Intuit still busy
    with caplog.at_level(logging.ERROR, logger="broker"):
        await core.service.close()

    assert not call.done()  # not cancelled: its answer can still be stored
    (named,) = [r for r in caplog.records if "unfinished" in r.getMessage()]
    assert getattr(named, "realm_id", None) == REALM
    intuit.release.set()
    snapshot = await asyncio.wait_for(call, 10)
    assert model.access_token_valid(snapshot.access_token or "", REALM)


async def test_two_users_connecting_one_new_company_at_once_never_share_it(
    pool: asyncpg.Pool, clock: FakeClock
) -> None:
    """Two connect flows for a company not yet in the table finish together: one stores it,
    the other is refused; the winner's user and tokens stay."""
    core = build(pool, clock)
    realm = "9130350000000042"

    def fresh_grant() -> TokenUpdate:
        issued = issued_tokens(core.model.create_grant(realm))
        return RefreshPolicy.new_grant(issued, clock())

    grants = {"alice": fresh_grant(), "bob": fresh_grant()}
    results = await asyncio.gather(
        *(core.store.connect(realm, user, grant) for user, grant in grants.items()),
        return_exceptions=True,
    )

    refused = [r for r in results if isinstance(r, RealmOwnedByAnotherUser)]
    stored = [r for r in results if isinstance(r, ConnectionInfo)]
    assert len(refused) == 1, results
    assert len(stored) == 1, results
    winner = stored[0].user_id
    locked = await core.store.load(realm_id=realm, user_id=None)
    assert locked.user_id == winner
    assert locked.access_token == grants[winner].access_token


async def test_the_warm_path_does_not_touch_the_database(
    pool: asyncpg.Pool, clock: FakeClock
) -> None:
    core = build(pool, clock)
    await seed(core, access_left=timedelta(minutes=30))
    loads = 0
    real_load = core.store.load

    async def counting_load(*, realm_id: str | None, user_id: str | None) -> TokenSnapshot:
        nonlocal loads
        loads += 1
        return await real_load(realm_id=realm_id, user_id=user_id)

    core.store.load = counting_load  # type: ignore[method-assign]

    for _ in range(200):
        await core.service.get_access_token(realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES)
    assert loads == 1

    clock.advance(timedelta(minutes=26))  # four minutes left: not good enough any more
    await core.service.get_access_token(realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES)
    assert loads == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_refresh(
    pool: asyncpg.Pool, clock: FakeClock
) -> None:
    model = IntuitModel(SimulatorConfig(strict_rotation=True), clock)

    asked, answer = asyncio.Event(), asyncio.Event()

    class SlowIntuit(ModelIntuitClient):
        async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens:
            asked.set()
            await answer.wait()
            return await super().refresh(refresh_token, realm_id=realm_id)

    core = build(pool, clock, intuit=SlowIntuit(model))
    await seed(core, access_left=None)

    caller = asyncio.create_task(
        core.service.get_access_token(realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES)
    )
    await asyncio.wait_for(asked.wait(), 10)
    caller.cancel()  # the client's deadline passed while Intuit was rotating the token
    with pytest.raises(asyncio.CancelledError):
        await caller
    answer.set()
    await eventually(lambda: model.stats.rotations_by_realm[REALM] == 1, what="the rotation")
    # The rotated token was stored anyway: the next caller uses it without a new refresh.
    snapshot = await core.service.get_access_token(
        realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES
    )
    assert model.access_token_valid(snapshot.access_token or "", REALM)
    assert model.stats.refresh_calls == 1
    clock.advance(timedelta(hours=2))
    await core.service.get_access_token(realm_id=REALM, user_id=None, min_validity=FIVE_MINUTES)
    assert model.stats.invalid_grants == 0
