"""The simulator's model behind the broker's IntuitClient protocol, without HTTP.

For driving the real token service against Intuit's rules in-process: core
tests, and fleet simulations that would drown in sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from broker.devtools.fake_intuit.model import IntuitModel, OAuthError, TokenResponse
from broker.domain.model import IssuedTokens
from broker.intuit import answers


class ModelIntuitClient:
    """Implements ``broker.domain.ports.IntuitClient`` on an ``IntuitModel``."""

    def __init__(self, model: IntuitModel, *, redirect_uri: str = "") -> None:
        self.model = model
        self._redirect_uri = redirect_uri

    async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens:
        return issued_tokens(self._call(lambda: self.model.refresh(refresh_token), realm_id))

    async def exchange_code(self, code: str, *, realm_id: str) -> IssuedTokens:
        exchange = self._call(lambda: self.model.exchange_code(code, self._redirect_uri), realm_id)
        return issued_tokens(exchange)

    async def revoke(self, token: str, *, realm_id: str) -> None:
        self.model.revoke(token)

    async def opens_company(self, access_token: str, *, realm_id: str) -> bool:
        return self.model.access_token_valid(access_token, realm_id)

    @staticmethod
    def _call(operation: Callable[[], TokenResponse], realm_id: str) -> TokenResponse:
        try:
            return operation()
        except OAuthError as exc:
            raise answers.failure(exc.status, exc.error, realm_id=realm_id) from None


def issued_tokens(response: TokenResponse) -> IssuedTokens:
    return IssuedTokens(
        access_token=response.access_token,
        refresh_token=response.refresh_token,
        expires_in=timedelta(seconds=response.expires_in),
        refresh_token_expires_in=timedelta(seconds=response.x_refresh_token_expires_in),
        hard_expires_in=timedelta(seconds=response.x_refresh_token_hard_expires_in),
        intuit_tid=None,
    )
