"""Tokens at rest: the key ring, its start-up check against the database, and what a
database dump of a running broker's data shows (ciphertext, never a token)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from broker.clock import FakeClock
from broker.crypto import KeyRing
from broker.errors import ConfigurationError, DecryptionFailed
from broker.server import BrokerServer
from broker.settings import Settings
from broker.storage.connections import verify_key_ring
from tests.conftest import StartBroker

CONTEXT = "9130355000000001:refresh_token"
TOKEN = "AB11762452389YxMHfx7vsyOqMPhmHFcQP9WTrLrPRYvbz0N7"


def key(material: bytes) -> str:
    return base64.b64encode(material).decode()


K1 = key(b"\x01" * 32)
K2 = key(b"\x02" * 32)


# -- parsing BROKER_ENCRYPTION_KEYS --------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("", id="empty"),
        pytest.param(" , ,", id="only-commas"),
        pytest.param(K1, id="no-colon"),
        pytest.param(f":{K1}", id="empty-id"),
        pytest.param(f"key one:{K1}", id="space-in-id"),
        pytest.param(f"k/1:{K1}", id="slash-in-id"),
        pytest.param(f"{'k' * 33}:{K1}", id="id-too-long"),
        pytest.param(f"k1:{K1[:-4]}!!!!", id="not-base64"),
        pytest.param(f"k1:{key(bytes(range(31)))}", id="31-bytes"),
        pytest.param(f"k1:{key(bytes(range(33)))}", id="33-bytes"),
        pytest.param(f"k1:{key(bytes(range(16)))}", id="aes-128-key"),
        pytest.param(f"k1:{K1},k1:{K2}", id="duplicate-id"),
        pytest.param(f"k1:{K1},k2", id="second-entry-broken"),
    ],
)
def test_a_malformed_key_ring_is_a_configuration_error_without_key_material(spec: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        KeyRing.parse(spec)

    message = str(caught.value)
    assert "BROKER_ENCRYPTION_KEYS" in message
    for material in (K1, K2, K1[:-4], key(bytes(range(31))), key(bytes(range(33)))):
        assert material not in message
    assert caught.value.__cause__ is None  # no chained exception quoting the value either


def test_the_first_entry_is_the_primary() -> None:
    ring = KeyRing.parse(f" k2:{K2} , k1:{K1} ")

    assert ring.primary_id == "k2"
    assert ring.key_ids == {"k1", "k2"}


def test_repr_hides_key_material() -> None:
    ring = KeyRing.parse(f"k2:{K2},k1:{K1}")

    for shown in (repr(ring), str(ring)):
        assert K1 not in shown
        assert K2 not in shown
        assert "\\x01" not in shown
        assert "k2" in shown


# -- sealing tokens -----------------------------------------------------------------------


def test_a_token_round_trips_and_is_not_stored_in_the_clear() -> None:
    ring = KeyRing.parse(f"k1:{K1}")

    sealed, key_id = ring.encrypt(TOKEN, CONTEXT)

    assert key_id == "k1"
    assert TOKEN.encode() not in sealed
    assert ring.decrypt(sealed, key_id, CONTEXT) == TOKEN
    again, _ = ring.encrypt(TOKEN, CONTEXT)
    assert again != sealed  # a fresh nonce each time: equal tokens do not look equal


@pytest.mark.parametrize(
    "moved_to",
    [
        pytest.param("9130355000000002:refresh_token", id="other-realm"),
        pytest.param("9130355000000001:access_token", id="other-column"),
    ],
)
def test_a_ciphertext_copied_to_another_realm_or_column_does_not_decrypt(moved_to: str) -> None:
    ring = KeyRing.parse(f"k1:{K1}")
    sealed, key_id = ring.encrypt(TOKEN, CONTEXT)

    with pytest.raises(DecryptionFailed):
        ring.decrypt(sealed, key_id, moved_to)


@pytest.mark.parametrize("position", [0, 11, 12, 30, -1])
def test_a_flipped_byte_does_not_decrypt(position: int) -> None:
    ring = KeyRing.parse(f"k1:{K1}")
    sealed, key_id = ring.encrypt(TOKEN, CONTEXT)
    tampered = bytearray(sealed)
    tampered[position] ^= 0x01

    with pytest.raises(DecryptionFailed):
        ring.decrypt(bytes(tampered), key_id, CONTEXT)


@pytest.mark.parametrize("length", [0, 5, 12, 27])
def test_a_truncated_value_does_not_decrypt(length: int) -> None:
    ring = KeyRing.parse(f"k1:{K1}")
    sealed, key_id = ring.encrypt(TOKEN, CONTEXT)

    with pytest.raises(DecryptionFailed):
        ring.decrypt(sealed[:length], key_id, CONTEXT)


def test_the_wrong_key_or_an_unknown_key_id_does_not_decrypt() -> None:
    sealed, key_id = KeyRing.parse(f"k1:{K1}").encrypt(TOKEN, CONTEXT)

    with pytest.raises(DecryptionFailed):
        KeyRing.parse(f"k1:{K2}").decrypt(sealed, key_id, CONTEXT)
    with pytest.raises(DecryptionFailed) as caught:
        KeyRing.parse(f"k2:{K2}").decrypt(sealed, key_id, CONTEXT)
    assert "k1" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_after_rotation_old_values_still_open_and_new_ones_use_the_new_primary() -> None:
    old_ring = KeyRing.parse(f"k1:{K1}")
    old_value, old_id = old_ring.encrypt(TOKEN, CONTEXT)
    rotated = KeyRing.parse(f"k2:{K2},k1:{K1}")

    assert rotated.decrypt(old_value, old_id, CONTEXT) == TOKEN
    new_value, new_id = rotated.encrypt("a-newer-token", CONTEXT)
    assert new_id == "k2"
    assert KeyRing.parse(f"k2:{K2}").decrypt(new_value, "k2", CONTEXT) == "a-newer-token"
    with pytest.raises(DecryptionFailed):
        old_ring.decrypt(new_value, new_id, CONTEXT)


# -- the start-up check against what the database holds -------------------------------------


async def registered_keys(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT key_id FROM broker_encryption_keys ORDER BY key_id")
    return [row["key_id"] for row in rows]


async def test_the_first_start_registers_the_primary_and_the_same_ring_passes_again(
    db: asyncpg.Connection,
) -> None:
    ring = KeyRing.parse(f"k1:{K1}")
    assert await registered_keys(db) == []

    await verify_key_ring(db, ring)
    assert await registered_keys(db) == ["k1"]

    await verify_key_ring(db, KeyRing.parse(f"k1:{K1}"))
    assert await registered_keys(db) == ["k1"]


async def test_the_same_key_id_with_other_material_is_refused(db: asyncpg.Connection) -> None:
    await verify_key_ring(db, KeyRing.parse(f"k1:{K1}"))

    with pytest.raises(ConfigurationError) as caught:
        await verify_key_ring(db, KeyRing.parse(f"k1:{K2}"))

    assert "k1" in str(caught.value)
    assert K1 not in str(caught.value)
    assert K2 not in str(caught.value)


async def store_a_row_sealed_with(db: asyncpg.Connection, ring: KeyRing, realm_id: str) -> None:
    sealed, key_id = ring.encrypt("RT-sealed", f"{realm_id}:refresh_token")
    await db.execute(
        "INSERT INTO quickbooks_connections (realm_id, user_id, refresh_token, encryption_key_id) "
        "VALUES ($1, 'u1', $2, $3)",
        realm_id,
        sealed,
        key_id,
    )


async def test_a_ring_missing_a_key_that_sealed_tokens_is_refused(db: asyncpg.Connection) -> None:
    first = KeyRing.parse(f"k1:{K1}")
    await verify_key_ring(db, first)
    await store_a_row_sealed_with(db, first, "9130355000000001")

    with pytest.raises(ConfigurationError, match="k1"):
        await verify_key_ring(db, KeyRing.parse(f"k2:{K2}"))
    assert await registered_keys(db) == ["k1"]


async def test_a_rotation_registers_the_new_primary_and_then_needs_both_keys(
    db: asyncpg.Connection,
) -> None:
    await verify_key_ring(db, KeyRing.parse(f"k1:{K1}"))

    rotated = KeyRing.parse(f"k2:{K2},k1:{K1}")
    await verify_key_ring(db, rotated)
    assert await registered_keys(db) == ["k1", "k2"]
    await store_a_row_sealed_with(db, rotated, "9130355000000002")

    with pytest.raises(ConfigurationError, match="k2"):  # rolling back drops k2's tokens
        await verify_key_ring(db, KeyRing.parse(f"k1:{K1}"))


async def test_two_replicas_racing_with_different_material_under_one_id_do_not_both_start(
    database: str,
) -> None:
    connections = [await asyncpg.connect(database) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(
            verify_key_ring(connections[0], KeyRing.parse(f"k1:{K1}")),
            verify_key_ring(connections[1], KeyRing.parse(f"k1:{K2}")),
            return_exceptions=True,
        )
    finally:
        for connection in connections:
            await connection.close()

    failures = [outcome for outcome in outcomes if outcome is not None]
    assert len(failures) == 1
    assert isinstance(failures[0], ConfigurationError)


async def test_a_broker_with_the_wrong_key_refuses_to_start(
    start_broker: StartBroker, settings: Settings, clock: FakeClock
) -> None:
    first = await start_broker()
    await first.seed("9130355000000001")
    assert settings.encryption_keys is not None
    same_id_other_material = KeyRing.parse(
        f"{settings.encryption_keys.primary_id}:{key(os.urandom(32))}"
    )
    impostor = BrokerServer(replace(settings, encryption_keys=same_id_other_material), clock=clock)

    try:
        with pytest.raises(ConfigurationError) as caught:
            await impostor.start()
    finally:
        await impostor.stop()

    assert settings.encryption_keys.primary_id in str(caught.value)
    assert impostor.components is None  # it never got as far as serving
    reply = await first.get_token("9130355000000001")  # the right broker is unharmed
    assert reply.access_token


# -- what a database dump shows ----------------------------------------------------------


def pg_dump_binary() -> Path:
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin).parent / "pginstall" / "bin" / "pg_dump"


async def test_a_database_dump_holds_no_token(start_broker: StartBroker, database: str) -> None:
    realm = "9130355000000001"
    broker = await start_broker()
    await broker.seed(realm)
    access_token = (await broker.get_token(realm)).access_token
    refresh_token = broker.intuit.model.current_refresh_token(realm)
    assert refresh_token is not None
    assert broker.token_works(realm, access_token)

    dump = await asyncio.create_subprocess_exec(
        str(pg_dump_binary()),
        f"--dbname={database}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(dump.communicate(), timeout=20)
    assert dump.returncode == 0, err.decode()
    text = out.decode()

    assert realm in text  # the dump did capture the row
    for token in (access_token, refresh_token):
        assert token not in text
        assert token.encode().hex() not in text  # nor as a bytea literal of the plaintext
        assert base64.b64encode(token.encode()).decode() not in text

    connection = await asyncpg.connect(database)
    try:
        row = await connection.fetchrow(
            "SELECT access_token, refresh_token, encryption_key_id FROM quickbooks_connections"
            " WHERE realm_id = $1",
            realm,
        )
    finally:
        await connection.close()
    assert row is not None
    assert row["encryption_key_id"] is not None
    assert row["access_token"] not in (None, access_token.encode())
    assert row["refresh_token"] not in (None, refresh_token.encode())
    assert access_token.encode() not in row["access_token"]
    assert refresh_token.encode() not in row["refresh_token"]
