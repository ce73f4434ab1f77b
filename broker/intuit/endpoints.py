"""Where Intuit's OAuth lives, per environment, and the protocol details both sides share.

Intuit serves OAuth for sandbox and production companies from the same
authorization, token and revocation endpoints; what differs is the discovery
document and the accounting API's host. ``QB_ENVIRONMENT`` picks the set;
``QB_AUTH_URL``, ``QB_TOKEN_URL`` and ``QB_REVOKE_URL`` override single
endpoints (tests, ``dev``, egress proxies).
"""

from __future__ import annotations

from dataclasses import dataclass

HARD_EXPIRY_HEADER = "x-include-refresh-token-hard-expires-in"
"""Sent with every token request: Intuit then states the five-year limit in its answer."""
TID_HEADER = "intuit_tid"
"""Intuit's trace id on every answer; its support asks for it."""
ACCOUNTING_SCOPE = "com.intuit.quickbooks.accounting"

_AUTH = "https://appcenter.intuit.com/connect/oauth2"
_TOKEN = "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"  # noqa: S105 - a URL
_REVOKE = "https://developer.api.intuit.com/v2/oauth2/tokens/revoke"


@dataclass(frozen=True)
class IntuitEnvironment:
    name: str
    auth_url: str
    token_url: str
    revoke_url: str
    discovery_url: str
    api_base_url: str


ENVIRONMENTS = {
    "sandbox": IntuitEnvironment(
        "sandbox",
        _AUTH,
        _TOKEN,
        _REVOKE,
        discovery_url="https://developer.intuit.com/.well-known/openid_sandbox_configuration/",
        api_base_url="https://sandbox-quickbooks.api.intuit.com",
    ),
    "production": IntuitEnvironment(
        "production",
        _AUTH,
        _TOKEN,
        _REVOKE,
        discovery_url="https://developer.intuit.com/.well-known/openid_configuration/",
        api_base_url="https://quickbooks.api.intuit.com",
    ),
}
