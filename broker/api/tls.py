"""The gRPC server's TLS credentials, re-read when the files change on disk.

gRPC asks ``fetch`` before every new connection's handshake; it compares the
files' identity, size and modification time with what was loaded last and
only then reads and checks them (the key must match the certificate, every
PEM must parse). A change that does not check out keeps the previous
credentials and is logged at ERROR once. The listener is never dropped:
established connections keep their session, new ones get the new certificate.
cert-manager and Kubernetes secret volumes swap all files at once, which is
what a rotation looks like here.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.errors import ConfigurationError

log = logging.getLogger("broker.tls")

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class _Material:
    key: bytes
    chain: bytes
    client_ca: bytes | None


class ReloadingServerCredentials:
    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._files = (cert_file, key_file, *((client_ca_file,) if client_ca_file else ()))
        self._cert_file = cert_file
        self._key_file = key_file
        self._client_ca_file = client_ca_file
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._stamp = self._look()
        try:
            self._material = self._read()
        except ValueError as exc:
            raise ConfigurationError(f"BROKER_TLS_*: {exc}") from None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._material),
            self.fetch,  # type: ignore[arg-type]  # None means "no change" (grpc's docs)
            require_client_authentication=self._client_ca_file is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if the files changed and check out, else None (no change)."""
        stamp = self._look()
        with self._lock:
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                material = self._read()
            except ValueError as exc:
                log.error(
                    "the TLS files changed and do not check out; keeping the previous ones",
                    extra={"error": str(exc)},
                )
                return None
            self._material = material
        log.info("TLS certificate and client CA reloaded from disk")
        return self._configuration(material)

    def _configuration(self, material: _Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.chain)], root_certificates=material.client_ca
        )

    def _read(self) -> _Material:
        try:
            chain = self._cert_file.read_bytes()
            key = self._key_file.read_bytes()
            client_ca = self._client_ca_file.read_bytes() if self._client_ca_file else None
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        try:
            leaf = x509.load_pem_x509_certificates(chain)[0]
            private = serialization.load_pem_private_key(key, password=None)
            if client_ca is not None:
                x509.load_pem_x509_certificates(client_ca)
        except ValueError as exc:
            raise ValueError(f"a PEM file does not parse ({exc})") from None
        if leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("the private key does not belong to the certificate")
        return _Material(key=key, chain=chain, client_ca=client_ca)

    def _look(self) -> _Stamp:
        stamps = []
        for path in self._files:
            try:
                status = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
        return tuple(stamps)
