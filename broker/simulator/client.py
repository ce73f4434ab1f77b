"""The simulator's model behind the broker's IntuitClient protocol, without HTTP.

For driving the real token service against Intuit's rules in-process: core
tests, and fleet simulations that would drown in sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from broker.domain.model import IssuedTokens
from broker.errors import ClientRejected, InvalidGrant, UpstreamUnavailable
from broker.simulator.model import IntuitModel, OAuthError, TokenResponse


class ModelIntuitClient:
    """Implements ``broker.domain.ports.IntuitClient`` on an ``IntuitModel``."""

    def __init__(self, model: IntuitModel, *, redirect_uri: str = "") -> None:
        self.model = model
        self._redirect_uri = redirect_uri

    async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens:
        return issued_tokens(self._call(lambda: self.model.refresh(refresh_token)))

    async def exchange_code(self, code: str, *, realm_id: str) -> IssuedTokens:
        return issued_tokens(self._call(lambda: self.model.exchange_code(code, self._redirect_uri)))

    async def revoke(self, token: str, *, realm_id: str) -> None:
        self.model.revoke(token)

    @staticmethod
    def _call(operation: Callable[[], TokenResponse]) -> TokenResponse:
        try:
            return operation()
        except OAuthError as exc:
            if exc.error == "invalid_grant":
                raise InvalidGrant("Intuit answered invalid_grant") from None
            if exc.error == "invalid_client":
                raise ClientRejected("Intuit rejected the broker's client credentials") from None
            raise UpstreamUnavailable(f"Intuit answered {exc.error}") from None


def issued_tokens(response: TokenResponse) -> IssuedTokens:
    return IssuedTokens(
        access_token=response.access_token,
        refresh_token=response.refresh_token,
        expires_in=timedelta(seconds=response.expires_in),
        refresh_token_expires_in=timedelta(seconds=response.x_refresh_token_expires_in),
        hard_expires_in=timedelta(seconds=response.x_refresh_token_hard_expires_in),
        intuit_tid=None,
    )
