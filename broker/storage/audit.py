"""Admin calls' audit events in ``broker_audit_events``, a batch per statement."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Sequence

import asyncpg

from broker.access.audit import AuditEvent, AuditTrail
from broker.storage.errors import translate_storage_errors

_ACQUIRE_TIMEOUT = 5.0


class PostgresAuditSink:
    """Implements ``broker.access.audit.AuditSink``."""

    def __init__(self, pool: asyncpg.Pool, replica: str) -> None:
        self._pool = pool
        self._replica = replica

    async def write(self, events: Sequence[AuditEvent]) -> None:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            await connection.execute(
                """INSERT INTO broker_audit_events
                       (at, principal, method, realm_id, outcome, replica)
                   SELECT e.at, e.principal, e.method, e.realm_id, e.outcome, $6
                   FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[])
                       AS e(at, principal, method, realm_id, outcome)""",
                [event.at for event in events],
                [event.principal for event in events],
                [event.method for event in events],
                [event.realm_id for event in events],
                [event.outcome for event in events],
                self._replica,
            )


async def audit_command(pool: asyncpg.Pool, command: str, outcome: str) -> None:
    """One audit event for a command run by hand (``broker_audit_events`` and the log)."""
    trail = AuditTrail(PostgresAuditSink(pool, replica_of_command()))
    trail.record(command_principal(), command, None, outcome, admin=True)
    await trail.flush()


def command_principal() -> str:
    """Who ran a command: the operating-system user on this host (a container's bare uid
    has no name: then the uid)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def replica_of_command() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/cli"
