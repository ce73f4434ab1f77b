"""The ``qbo-broker`` console script, before anything loads gRPC.

gRPC installs fork handlers when it is imported unless told not to, and a
child forked while its threads run (the embedded PostgreSQL's ``pg_ctl``) can
crash in them. The broker never uses gRPC in a child, so it turns them off,
which only works before the first ``import grpc``.
"""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from broker.cli import main as run

    return run()
