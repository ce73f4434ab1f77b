"""Access control: which caller may call which method, for which realms.

``broker.access.policy`` is pure (no gRPC, no I/O): it parses the policy and
answers questions; the transport side turns its answers into statuses.
"""

from broker.access.policy import (
    ALLOW_ALL,
    ANONYMOUS,
    DENY_ALL,
    Identity,
    Policy,
    PolicyError,
    RealmAccess,
)

__all__ = [
    "ALLOW_ALL",
    "ANONYMOUS",
    "DENY_ALL",
    "Identity",
    "Policy",
    "PolicyError",
    "RealmAccess",
]
