"""Tokens at rest: AES-256-GCM under a key ring.

``BROKER_ENCRYPTION_KEYS`` is ``key_id:base64(32 bytes)[,key_id:base64(32 bytes)…]``;
the first entry is the primary that encrypts new writes, the others only
decrypt, so keys can rotate without a flag day. Each stored value is
``nonce (12 bytes) || ciphertext+tag``; the key id sits in its own column beside
it, and the associated data binds the ciphertext to its realm, column and key
id, so a value copied to another row or column does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigurationError, DecryptionFailed

_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_NONCE_BYTES = 12
_VERIFIER_PLAINTEXT = b"qbo-token-broker key check"


@dataclass(frozen=True)
class KeyRing:
    """The encryption keys, primary first. ``repr`` never shows key material."""

    primary_id: str
    _keys: dict[str, AESGCM] = field(repr=False)

    @classmethod
    def parse(cls, spec: str) -> KeyRing:
        """Parse the ``BROKER_ENCRYPTION_KEYS`` format; every mistake is a ConfigurationError."""
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        if not entries:
            raise ConfigurationError("BROKER_ENCRYPTION_KEYS is empty")
        keys: dict[str, AESGCM] = {}
        for position, entry in enumerate(entries, start=1):
            key_id, sep, encoded = entry.partition(":")
            where = f"BROKER_ENCRYPTION_KEYS entry {position}"
            if not sep or not _KEY_ID.fullmatch(key_id):
                raise ConfigurationError(
                    f"{where}: expected key_id:base64key with a key id of 1 to 32 "
                    "letters, digits, '.', '_' or '-'"
                )
            if key_id in keys:
                raise ConfigurationError(f"{where}: key id {key_id!r} appears twice")
            try:
                material = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigurationError(f"{where} ({key_id!r}): the key is not base64") from None
            if len(material) != 32:
                raise ConfigurationError(
                    f"{where} ({key_id!r}): the key must be 32 bytes, got {len(material)}"
                )
            keys[key_id] = AESGCM(material)
        return cls(primary_id=entries[0].partition(":")[0], _keys=keys)

    @staticmethod
    def generate_spec(key_id: str = "k1") -> str:
        """A new single-key ring in the environment format."""
        return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def encrypt(self, plaintext: str, context: str) -> tuple[bytes, str]:
        """Encrypt under the primary key; returns (value, key id)."""
        nonce = os.urandom(_NONCE_BYTES)
        aad = _aad(context, self.primary_id)
        sealed = self._keys[self.primary_id].encrypt(nonce, plaintext.encode(), aad)
        return nonce + sealed, self.primary_id

    def decrypt(self, value: bytes, key_id: str, context: str) -> str:
        key = self._keys.get(key_id)
        if key is None:
            raise DecryptionFailed(f"{context}: key id {key_id!r} is not in the key ring")
        try:
            plaintext = key.decrypt(
                value[:_NONCE_BYTES], value[_NONCE_BYTES:], _aad(context, key_id)
            )
        except (InvalidTag, ValueError):
            raise DecryptionFailed(
                f"{context}: the value does not decrypt with key {key_id!r} "
                "(wrong key material or a tampered row)"
            ) from None
        return plaintext.decode()

    def verifier(self, key_id: str) -> bytes:
        """A value that proves, later, that ``key_id`` still names the same key material."""
        value, _ = self._with_primary(key_id).encrypt(_VERIFIER_PLAINTEXT.decode(), "key-check")
        return value

    def matches_verifier(self, key_id: str, verifier: bytes) -> bool:
        try:
            return self.decrypt(verifier, key_id, "key-check") == _VERIFIER_PLAINTEXT.decode()
        except DecryptionFailed:
            return False

    def _with_primary(self, key_id: str) -> KeyRing:
        return KeyRing(primary_id=key_id, _keys=self._keys)


def _aad(context: str, key_id: str) -> bytes:
    return f"qbo-broker|{context}|{key_id}".encode()
