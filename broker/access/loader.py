"""The authorization policy file, re-read when it changes on disk.

A policy that does not parse at start stops the broker (exit 2); a change
that does not parse later keeps the last good policy and is logged at ERROR,
once per change. Kubernetes updates a mounted ConfigMap by swapping a symlink,
so the file's identity and modification time are both watched.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from broker.access.policy import Policy, PolicyError
from broker.errors import ConfigurationError

log = logging.getLogger("broker.access")

CHECK_EVERY = 1.0
"""Seconds between two looks at the file."""

_Stamp = tuple[int, int, int]


class PolicyFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = self._look()
        try:
            self.current = Policy.parse(self._path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"BROKER_AUTHZ_POLICY_FILE: cannot read it ({exc})") from None
        except PolicyError as exc:
            raise ConfigurationError(f"BROKER_AUTHZ_POLICY_FILE: {exc}") from None
        self._announce()

    def check(self) -> bool:
        """Re-read the file if it changed; True when a new policy took effect."""
        stamp = self._look()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = Policy.parse(self._path.read_text())
        except (OSError, UnicodeDecodeError, PolicyError) as exc:
            log.error(
                "the authorization policy file changed and does not parse; "
                "keeping the last good policy",
                extra={"path": str(self._path), "error": str(exc), "policy": self.current.name},
            )
            return False
        self.current = policy
        self._announce()
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            self.check()

    def _announce(self) -> None:
        log.info("authorization policy in effect", extra={"policy": self.current.name})
        for warning in self.current.warnings:
            log.warning("authorization policy: %s", warning, extra={"policy": self.current.name})

    def _look(self) -> _Stamp:
        try:
            status = os.stat(self._path)
        except OSError:
            return (0, 0, 0)
        return (status.st_ino, status.st_mtime_ns, status.st_size)
