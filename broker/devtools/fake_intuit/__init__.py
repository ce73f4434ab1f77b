"""The fake Intuit: a QuickBooks Online OAuth server to test against: a pure model of Intuit's
token rules (``model``), injectable trouble (``faults``) and a real HTTP
server on loopback that serves both (``server``).
"""

from broker.devtools.fake_intuit.faults import DEFAULT_GARBAGE_BODY, Fault, FaultKind, FaultPlan
from broker.devtools.fake_intuit.model import (
    AUTHORIZATION_CODE_TTL,
    IntuitModel,
    OAuthError,
    SimulatorConfig,
    SimulatorStats,
    TokenResponse,
)
from broker.devtools.fake_intuit.server import (
    AUTH_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    IntuitSimulator,
    create_app,
)

__all__ = [
    "AUTHORIZATION_CODE_TTL",
    "AUTH_PATH",
    "DEFAULT_GARBAGE_BODY",
    "REVOKE_PATH",
    "TOKEN_PATH",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "IntuitModel",
    "IntuitSimulator",
    "OAuthError",
    "SimulatorConfig",
    "SimulatorStats",
    "TokenResponse",
    "create_app",
]
