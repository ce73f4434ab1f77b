"""What operators and the onboarding flow do to connections (ConnectionAdminService)."""

from __future__ import annotations

import logging

from broker.domain.model import (
    ConnectionFilter,
    ConnectionInfo,
    ConnectionPage,
    ImportRequest,
    RealmFilter,
    Trigger,
)
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import ConnectionStore
from broker.domain.tokens import TokenService

log = logging.getLogger("broker.admin")


class ConnectionAdmin:
    def __init__(self, *, store: ConnectionStore, tokens: TokenService) -> None:
        self._store = store
        self._tokens = tokens

    async def import_connection(self, request: ImportRequest) -> ConnectionInfo:
        update = RefreshPolicy.from_import(request)
        info = await self._store.import_connection(request, update)
        self._tokens.connection_replaced(request.realm_id)
        log.info("connection imported", extra={"realm_id": request.realm_id})
        return info

    async def get(self, realm_id: str) -> ConnectionInfo:
        return await self._store.get_info(realm_id)

    async def list(
        self,
        where: ConnectionFilter,
        *,
        limit: int,
        after: str | None,
        realms: RealmFilter | None = None,
    ) -> ConnectionPage:
        return await self._store.list_connections(where, limit=limit, after=after, realms=realms)

    async def revoke(self, realm_id: str) -> ConnectionInfo:
        await self._tokens.revoke(realm_id)
        return await self._store.get_info(realm_id)

    async def delete(self, realm_id: str) -> None:
        await self._tokens.delete(realm_id)

    async def refresh(self, realm_id: str) -> ConnectionInfo:
        await self._tokens.refresh(realm_id, Trigger.MANUAL)  # raises if it could not
        return await self._store.get_info(realm_id)
