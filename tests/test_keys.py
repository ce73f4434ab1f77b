"""Retiring an encryption key: `qbo-broker keys rotate` re-seals every stored token with
the primary while brokers serve, and start-up asks only for the keys rows still use."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import asyncpg
import grpc
import pytest

from broker.clock import FakeClock
from broker.crypto import KeyRing
from broker.devtools.fake_intuit import Fault, FaultKind
from broker.errors import ConfigurationError
from broker.keys_command import add_keys_command, run_rotate
from broker.server import BrokerServer
from broker.settings import Settings
from broker.storage.connections import verify_key_ring
from broker.storage.keys import key_ids_in_use, open_sealed, rotate, seal
from tests.conftest import StartBroker
from tests.support import SWEEP_BY_HAND, eventually


def spec(key_id: str, byte: int) -> str:
    return f"{key_id}:{base64.b64encode(bytes([byte]) * 32).decode()}"


OLD_SPEC = spec("old", 0x0A)
NEW_SPEC = spec("new", 0x0B)
OLD = KeyRing.parse(OLD_SPEC)
NEW = KeyRing.parse(NEW_SPEC)
ROTATING = KeyRing.parse(f"{NEW_SPEC},{OLD_SPEC}")
"""What every broker runs with during a rotation: the new primary first, the old key after."""


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database, min_size=1, max_size=3)
    assert created is not None
    yield created
    await created.close()


def tokens_of(realm_id: str) -> tuple[str, str]:
    return f"access-{realm_id}-secret", f"refresh-{realm_id}-secret"


async def insert_sealed(
    db: asyncpg.Connection, keys: KeyRing, count: int, *, prefix: str = "96"
) -> list[str]:
    """``count`` rows written as a broker with ``keys`` writes them (tokens_of the realm)."""
    realms = [f"{prefix}{n:014d}" for n in range(count)]
    rows = []
    for realm in realms:
        access, refresh = tokens_of(realm)
        sealed_access, key_id = seal(keys, realm, "access_token", access)
        sealed_refresh, _ = seal(keys, realm, "refresh_token", refresh)
        rows.append((realm, f"user-{realm}", sealed_access, sealed_refresh, key_id))
    await db.executemany(
        """INSERT INTO quickbooks_connections (realm_id, user_id, access_token,
               access_token_expires_at, refresh_token, encryption_key_id, refresh_token_created_at)
           VALUES ($1, $2, $3, now() + interval '50 minutes', $4, $5, now())""",
        rows,
    )
    return realms


async def key_of(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT realm_id, encryption_key_id FROM quickbooks_connections")
    return {row["realm_id"]: row["encryption_key_id"] for row in rows}


async def row_versions(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT realm_id, row_version FROM quickbooks_connections")
    return {row["realm_id"]: row["row_version"] for row in rows}


async def stored_tokens(db: asyncpg.Connection, keys: KeyRing, realm_id: str) -> tuple[str, str]:
    row = await db.fetchrow(
        "SELECT access_token, refresh_token, encryption_key_id FROM quickbooks_connections "
        "WHERE realm_id = $1",
        realm_id,
    )
    assert row is not None
    key_id = row["encryption_key_id"]
    return (
        open_sealed(keys, realm_id, "access_token", row["access_token"], key_id),
        open_sealed(keys, realm_id, "refresh_token", row["refresh_token"], key_id),
    )


@contextlib.asynccontextmanager
async def row_locked(database: str, realm_id: str) -> AsyncIterator[None]:
    """Hold ``realm_id``'s row lock from another session, as a refresh in flight does."""
    locker = await asyncpg.connect(database)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.fetchrow(
            "SELECT realm_id FROM quickbooks_connections WHERE realm_id = $1 FOR UPDATE", realm_id
        )
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await locker.close()


# -- which keys are in use --------------------------------------------------------------------


async def test_key_ids_in_use_come_from_the_rows_not_the_verifiers(db: asyncpg.Connection) -> None:
    assert await key_ids_in_use(db) == set()
    await verify_key_ring(db, KeyRing.parse(spec("registered-only", 0x01)))
    for n, key_id in enumerate(("a", "b", "c")):
        await insert_sealed(db, KeyRing.parse(spec(key_id, 0x10 + n)), 3, prefix=f"9{n}")
    await db.execute(
        "INSERT INTO quickbooks_connections (realm_id, user_id, status) "
        "VALUES ('revoked1', 'user-revoked1', 'revoked')"
    )

    assert await key_ids_in_use(db) == {"a", "b", "c"}


# -- the start-up check -------------------------------------------------------------------------


async def test_a_ring_without_keys_still_in_use_is_refused_naming_every_one(
    db: asyncpg.Connection,
) -> None:
    await insert_sealed(db, KeyRing.parse(spec("k1", 0x01)), 2, prefix="91")
    await insert_sealed(db, KeyRing.parse(spec("k2", 0x02)), 2, prefix="92")

    with pytest.raises(ConfigurationError) as caught:
        await verify_key_ring(db, KeyRing.parse(spec("k3", 0x03)))

    message = str(caught.value)
    assert "still used by stored tokens: k1, k2 (" in message
    assert "qbo-broker keys rotate" in message
    for key_id, byte in (("k1", 1), ("k2", 2), ("k3", 3)):
        assert spec(key_id, byte).partition(":")[2] not in message
    await verify_key_ring(db, KeyRing.parse(f"{spec('k3', 3)},{spec('k1', 1)},{spec('k2', 2)}"))


async def test_a_retired_key_id_cannot_come_back_with_other_material(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await verify_key_ring(db, OLD)
    await insert_sealed(db, OLD, 3)
    await rotate(pool, ROTATING)

    await verify_key_ring(db, NEW)  # "old" seals nothing now: it may leave the ring

    registered = await db.fetch("SELECT key_id FROM broker_encryption_keys ORDER BY key_id")
    assert [row["key_id"] for row in registered] == ["new", "old"]  # the verifier stays
    with pytest.raises(ConfigurationError, match="old"):
        await verify_key_ring(db, KeyRing.parse(f"{NEW_SPEC},{spec('old', 0x0C)}"))


async def test_a_broker_refuses_a_ring_without_a_key_in_use_and_starts_after_rotation(
    start_broker: StartBroker, settings: Settings, clock: FakeClock, pool: asyncpg.Pool
) -> None:
    realm = "9130355000000001"
    seeder = await start_broker(encryption_keys=OLD, **SWEEP_BY_HAND)
    await seeder.seed(realm)
    await seeder.broker.stop()

    refused = BrokerServer(replace(settings, encryption_keys=NEW), clock=clock)
    try:
        with pytest.raises(ConfigurationError) as caught:
            await refused.start()
    finally:
        await refused.stop()
    assert "still used by stored tokens: old (" in str(caught.value)
    assert refused.components is None  # it never got as far as serving

    report = await rotate(pool, ROTATING)
    assert report.finished

    broker = await start_broker(encryption_keys=NEW, **SWEEP_BY_HAND)
    reply = await broker.get_token(realm)
    assert broker.token_works(realm, reply.access_token)


# -- rotation ------------------------------------------------------------------------------------


async def test_rotation_under_get_access_token_load_fails_no_call(
    start_broker: StartBroker, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    realms = [f"95000000000000{n:02d}" for n in range(50)]
    expired = set(realms[::5])
    seeder = await start_broker(encryption_keys=OLD, **SWEEP_BY_HAND)
    for realm in realms:
        left = None if realm in expired else timedelta(minutes=50)
        await seeder.seed(realm, access_token_left=left)
    await seeder.broker.stop()
    assert await key_ids_in_use(db) == {"old"}

    serving = await start_broker(
        encryption_keys=ROTATING, intuit_timeout=timedelta(seconds=30), **SWEEP_BY_HAND
    )
    faults = serving.intuit.faults
    held = sorted(expired)[:2]  # refreshes in flight, holding their rows, through the rotation
    for realm in held:
        faults.add(Fault(FaultKind.HOLD, realm_id=realm))
    failures: list[str] = []
    calls: Counter[str] = Counter()
    rotation_done = asyncio.Event()

    async def call(realm: str) -> None:
        try:
            reply = await serving.get_token(realm)
            if not serving.token_works(realm, reply.access_token):
                failures.append(f"{realm}: the token does not work")
        except grpc.aio.AioRpcError as exc:
            failures.append(f"{realm}: {exc.code().name} {exc.details()}")
        calls[realm] += 1

    others = [realm for realm in realms if realm not in held]

    async def caller(offset: int) -> None:
        n = offset
        while not rotation_done.is_set():
            await call(others[n % len(others)])
            n += 1

    holders = [asyncio.create_task(call(realm)) for realm in held]
    await asyncio.wait_for(faults.wait_held(len(held)), timeout=20)
    callers = [asyncio.create_task(caller(7 * n)) for n in range(8)]
    rotation = asyncio.create_task(rotate(pool, ROTATING, batch=5))
    at_start = calls.copy()

    def every_realm_called_twice_meanwhile() -> bool:
        return all(calls[realm] >= at_start[realm] + 2 for realm in others)

    async def only_held_rows_left() -> bool:
        return {r for r, k in (await key_of(db)).items() if k == "old"} == set(held)

    await eventually(only_held_rows_left, within=30, what="every row but the held ones rotated")
    await eventually(every_realm_called_twice_meanwhile, within=30, what="calls meanwhile")
    assert not rotation.done()  # it waits for the rows the refreshes hold, without blocking them
    faults.release()
    report = await asyncio.wait_for(rotation, timeout=30)
    await asyncio.wait_for(asyncio.gather(*holders), timeout=20)
    rotation_done.set()
    await asyncio.wait_for(asyncio.gather(*callers), timeout=20)

    assert failures == []
    assert report.finished
    assert report.skipped_locked == ()
    assert report.undecryptable == ()
    assert 0 < report.re_encrypted <= len(realms) - len(held)
    assert set((await key_of(db)).values()) == {"new"}
    assert await key_ids_in_use(db) == {"new"}
    # Re-sealing refreshed nothing: only the expired access tokens were renewed, once each.
    assert {realm: serving.refreshes(realm) for realm in realms} == {
        realm: 1 if realm in expired else 0 for realm in realms
    }

    only_new = await start_broker(encryption_keys=NEW, **SWEEP_BY_HAND)
    for realm in realms:
        reply = await only_new.get_token(realm)
        assert only_new.token_works(realm, reply.access_token)
        _, refresh_token = await stored_tokens(db, NEW, realm)
        assert refresh_token == only_new.intuit.model.current_refresh_token(realm)


async def test_an_interrupted_rotation_resumes_and_finishes(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    realms = await insert_sealed(db, OLD, 10)
    versions = await row_versions(db)
    stop = asyncio.Event()
    first_progress: list[tuple[int, int]] = []

    def stop_after_a_batch(done: int, total: int) -> None:
        first_progress.append((done, total))
        if done:
            stop.set()

    first = await rotate(pool, ROTATING, batch=3, progress=stop_after_a_batch, stop=stop)

    assert (first.re_encrypted, first.remaining, first.interrupted) == (3, 7, True)
    assert not first.finished
    assert first_progress == [(0, 10), (3, 10)]
    assert sorted((await key_of(db)).values()) == ["new"] * 3 + ["old"] * 7
    assert await key_ids_in_use(db) == {"new", "old"}

    second_progress: list[tuple[int, int]] = []
    second = await rotate(
        pool, ROTATING, batch=3, progress=lambda done, total: second_progress.append((done, total))
    )

    assert (second.re_encrypted, second.remaining, second.interrupted) == (7, 0, False)
    assert second.finished
    assert second_progress == [(0, 7), (3, 7), (6, 7), (7, 7)]
    assert await key_ids_in_use(db) == {"new"}
    for realm in realms:  # the same tokens, now sealed with the new key only
        assert await stored_tokens(db, NEW, realm) == tokens_of(realm)
    after = await row_versions(db)
    assert all(after[realm] == versions[realm] + 1 for realm in realms)  # caches were told

    third = await rotate(pool, ROTATING)
    assert (third.re_encrypted, third.remaining) == (0, 0)


async def test_a_row_locked_by_a_refresh_is_not_waited_on(
    db: asyncpg.Connection, pool: asyncpg.Pool, database: str
) -> None:
    realms = await insert_sealed(db, OLD, 10)
    locked = realms[4]

    async with row_locked(database, locked):
        report = await asyncio.wait_for(
            rotate(pool, ROTATING, batch=3, give_up_after=0.2), timeout=30
        )

        assert report.skipped_locked == (locked,)
        assert (report.re_encrypted, report.remaining) == (9, 1)
        assert not report.finished
        assert not report.interrupted
        assert (await key_of(db))[locked] == "old"

    again = await rotate(pool, ROTATING, batch=3, give_up_after=0.2)

    assert (again.re_encrypted, again.remaining, again.skipped_locked) == (1, 0, ())
    assert await stored_tokens(db, NEW, locked) == tokens_of(locked)


async def test_a_row_unlocked_during_the_run_is_taken_by_the_same_run(
    db: asyncpg.Connection, pool: asyncpg.Pool, database: str
) -> None:
    realms = await insert_sealed(db, OLD, 10)
    stop = asyncio.Event()

    async with row_locked(database, realms[0]):
        rotation = asyncio.create_task(rotate(pool, ROTATING, batch=4, stop=stop))

        async def nine_rotated() -> bool:
            return list((await key_of(db)).values()).count("new") == 9

        await eventually(nine_rotated, within=30, what="every unlocked row rotated")
        assert not rotation.done()
    try:
        report = await asyncio.wait_for(rotation, timeout=30)
    finally:
        stop.set()

    assert (report.re_encrypted, report.remaining, report.skipped_locked) == (10, 0, ())


async def test_a_row_that_does_not_decrypt_is_reported_and_the_rest_rotates(
    db: asyncpg.Connection, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    realms = await insert_sealed(db, OLD, 6)
    tampered = realms[2]
    await db.execute(
        "UPDATE quickbooks_connections "
        "SET refresh_token = set_byte(refresh_token, 20, get_byte(refresh_token, 20) # 1) "
        "WHERE realm_id = $1",
        tampered,
    )

    with caplog.at_level(logging.DEBUG):
        report = await rotate(pool, ROTATING, batch=4)

    assert report.undecryptable == (tampered,)
    assert (report.re_encrypted, report.remaining) == (5, 1)
    assert not report.finished
    (logged,) = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert (getattr(logged, "realm_id", None), getattr(logged, "key_id", None)) == (tampered, "old")
    shown = "".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    for realm in realms:
        for token in tokens_of(realm):
            assert token not in shown


async def test_a_row_without_an_access_token_rotates_its_refresh_token(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    (realm,) = await insert_sealed(db, OLD, 1)
    await db.execute("UPDATE quickbooks_connections SET access_token = NULL")

    report = await rotate(pool, ROTATING)

    assert report.finished
    row = await db.fetchrow(
        "SELECT access_token, refresh_token, encryption_key_id FROM quickbooks_connections"
    )
    assert row is not None
    assert row["access_token"] is None
    assert row["encryption_key_id"] == "new"
    assert (
        open_sealed(NEW, realm, "refresh_token", row["refresh_token"], "new") == tokens_of(realm)[1]
    )


async def test_rotation_refuses_a_ring_that_cannot_open_the_rows(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await insert_sealed(db, OLD, 2)

    with pytest.raises(ConfigurationError, match="old"):
        await rotate(pool, NEW)
    await verify_key_ring(db, OLD)  # registers old's verifier
    with pytest.raises(ConfigurationError, match="old"):
        await rotate(pool, KeyRing.parse(f"{NEW_SPEC},{spec('old', 0x0C)}"))
    assert set((await key_of(db)).values()) == {"old"}


# -- the command ---------------------------------------------------------------------------------


def test_the_keys_rotate_command_has_help_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="qbo-broker")
    add_keys_command(parser.add_subparsers(dest="command"))

    options = parser.parse_args(["keys", "rotate"])
    assert (options.command, options.keys_command) == ("keys", "rotate")
    with pytest.raises(SystemExit) as missing:
        parser.parse_args(["keys"])
    assert missing.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "rotate", "--help"])
    shown = capsys.readouterr().out
    assert "primary key" in shown
    assert "BROKER_ENCRYPTION_KEYS" in shown
    assert "BROKER_DATABASE_URL" in shown
    assert "exit 0 when no stored token is left on an older key, 1 when" in " ".join(shown.split())


async def test_run_rotate_finishes_with_exit_0_and_a_summary(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await insert_sealed(db, OLD, 5)
    rotating = replace(settings, encryption_keys=ROTATING)

    assert await run_rotate(rotating) == 0

    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "keys rotate: finished: 5 re-encrypted with key new, none left on an older key; "
        "old can now be removed from BROKER_ENCRYPTION_KEYS"
    ]
    assert "\r" not in err  # no progress bar when stderr is not a terminal
    assert await key_ids_in_use(db) == {"new"}
    assert await run_rotate(replace(settings, encryption_keys=NEW)) == 0
    assert "finished: 0 re-encrypted with key new" in capsys.readouterr().out
    audited = await db.fetch("SELECT principal, method, outcome FROM broker_audit_events")
    assert [(r["method"], r["outcome"]) for r in audited] == [("qbo-broker keys rotate", "OK")] * 2
    assert all(r["principal"].startswith("cli:") for r in audited)


async def test_run_rotate_stops_on_sigint_with_exit_1_and_a_second_run_finishes(
    settings: Settings, db: asyncpg.Connection, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    realms = await insert_sealed(db, OLD, 5)
    rotating = replace(settings, encryption_keys=ROTATING)
    before = signal.getsignal(signal.SIGINT)

    async with row_locked(database, realms[0]):
        run = asyncio.create_task(run_rotate(rotating))

        async def only_the_locked_row_left() -> bool:
            return [k for k in (await key_of(db)).values() if k == "old"] == ["old"]

        await eventually(only_the_locked_row_left, within=30, what="the unlocked rows rotated")
        assert not run.done()  # waiting for the locked row (as for a refresh in flight)
        os.kill(os.getpid(), signal.SIGINT)
        code = await asyncio.wait_for(run, timeout=30)

    assert code == 1
    assert (
        "keys rotate: interrupted: run it again to finish (4 re-encrypted with key new, "
        "1 left on older keys)" in capsys.readouterr().out
    )
    assert signal.getsignal(signal.SIGINT) == before  # put back

    assert await run_rotate(rotating) == 0
    assert "finished: 1 re-encrypted" in capsys.readouterr().out


async def test_run_rotate_with_a_ring_lacking_a_key_in_use_is_a_configuration_error(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await insert_sealed(db, OLD, 1)

    with pytest.raises(ConfigurationError, match="still used by stored tokens: old"):
        await run_rotate(replace(settings, encryption_keys=NEW))
