"""The gRPC servicers: check the request and the caller's realm, call the core, convert back.

Every method runs under ``@guarded`` (``broker.api.guard``): the caller is
authorized for the method before it runs, for each realm it touches inside it
(``current_call().require``), and audited once whatever happens.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api import convert, validation
from broker.api.guard import Guard, current_call, guarded, guarded_stream
from broker.clock import Clock
from broker.domain.admin import ConnectionAdmin
from broker.domain.connect import ConnectFlow
from broker.domain.model import TokenSnapshot
from broker.domain.sweep import Sweeper, SweepKind
from broker.domain.tokens import TokenService
from broker.domain.watch import ConnectionWatch
from broker.errors import ConnectionNotFound

Context = grpc.aio.ServicerContext[Any, Any]


class TokenBrokerServicer(pb_grpc.TokenBrokerServiceServicer):
    SERVICE = pb.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name

    def __init__(self, tokens: TokenService, guard: Guard) -> None:
        self._tokens = tokens
        self.guard = guard
        # A warm snapshot is served thousands of times: build its answer once. Entries
        # vanish with the snapshot when the cache lets go of it.
        self._answers: weakref.WeakKeyDictionary[TokenSnapshot, pb.GetAccessTokenResponse] = (
            weakref.WeakKeyDictionary()
        )

    @guarded(admin=False)
    async def GetAccessToken(
        self, request: pb.GetAccessTokenRequest, context: Context
    ) -> pb.GetAccessTokenResponse:
        query = validation.token_query(request)
        call = current_call()
        may_read = None
        if query.realm_id is not None:
            call.require(query.realm_id)  # before looking: no existence oracle
        elif not call.access.everything:
            may_read = call.access.allows  # by user: checked once the realm is known
        snapshot = await self._tokens.get_access_token(
            realm_id=query.realm_id,
            user_id=query.user_id,
            min_validity=query.min_validity,
            may_read=may_read,
        )
        call.realm_id = snapshot.realm_id
        answer = self._answers.get(snapshot)
        if answer is None:
            answer = self._answers[snapshot] = convert.token_response(snapshot)
        return answer


class ConnectionAdminServicer(pb_grpc.ConnectionAdminServiceServicer):
    SERVICE = pb.DESCRIPTOR.services_by_name["ConnectionAdminService"].full_name

    def __init__(
        self,
        *,
        admin: ConnectionAdmin,
        sweeper: Sweeper,
        connect: ConnectFlow,
        watch: ConnectionWatch,
        clock: Clock,
        guard: Guard,
        heartbeat: timedelta,
    ) -> None:
        self._admin = admin
        self._sweeper = sweeper
        self._connect = connect
        self._watch = watch
        self._clock = clock
        self.guard = guard
        self._heartbeat = heartbeat.total_seconds()

    @guarded(admin=True)
    async def ImportConnection(
        self, request: pb.ImportConnectionRequest, context: Context
    ) -> pb.ImportConnectionResponse:
        imported = validation.import_request(request, self._clock())
        current_call().require(imported.realm_id)
        info = await self._admin.import_connection(imported)
        return pb.ImportConnectionResponse(connection=convert.connection(info))

    @guarded(admin=True)
    async def GetConnection(
        self, request: pb.GetConnectionRequest, context: Context
    ) -> pb.GetConnectionResponse:
        info = await self._admin.get(self._realm(request.realm_id))
        return pb.GetConnectionResponse(connection=convert.connection(info))

    @guarded(admin=True)
    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: Context
    ) -> pb.ListConnectionsResponse:
        query = validation.list_query(request)
        access = current_call().access
        page = await self._admin.list(
            query.where,
            limit=query.limit,
            after=query.after,
            realms=None if access.everything else access.sql(),
        )
        return pb.ListConnectionsResponse(
            connections=[convert.connection(info) for info in page.connections],
            next_page_token=validation.page_token(page.next_after),
        )

    @guarded(admin=True)
    async def RefreshConnection(
        self, request: pb.RefreshConnectionRequest, context: Context
    ) -> pb.RefreshConnectionResponse:
        info = await self._admin.refresh(self._realm(request.realm_id))
        return pb.RefreshConnectionResponse(connection=convert.connection(info))

    @guarded(admin=True)
    async def RevokeConnection(
        self, request: pb.RevokeConnectionRequest, context: Context
    ) -> pb.RevokeConnectionResponse:
        info = await self._admin.revoke(self._realm(request.realm_id))
        return pb.RevokeConnectionResponse(connection=convert.connection(info))

    @guarded(admin=True)
    async def RunSweep(self, request: pb.RunSweepRequest, context: Context) -> pb.RunSweepResponse:
        current_call().require_everything()
        report = await self._sweeper.run(SweepKind.MANUAL)
        return pb.RunSweepResponse(
            examined=report.examined, refreshed=report.refreshed, failed=report.failed
        )

    @guarded(admin=True)
    async def CreateConnectLink(
        self, request: pb.CreateConnectLinkRequest, context: Context
    ) -> pb.CreateConnectLinkResponse:
        user_id = validation.user(request.user_id)
        return_url = validation.return_url(request.return_url) if request.return_url else None
        access = current_call().access
        # The link may connect only what this caller may: checked when the company is known.
        link = await self._connect.create_link(
            user_id, return_url, None if access.everything else access
        )
        return pb.CreateConnectLinkResponse(
            url=link.url, expires_at=convert.timestamp(link.expires_at)
        )

    @guarded(admin=True)
    async def DeleteConnection(
        self, request: pb.DeleteConnectionRequest, context: Context
    ) -> pb.DeleteConnectionResponse:
        realm_id = self._realm(request.realm_id)
        await self._admin.delete(realm_id)
        return pb.DeleteConnectionResponse(realm_id=realm_id)

    @guarded_stream(admin=True)
    async def WatchConnections(
        self, request: pb.WatchConnectionsRequest, context: Context
    ) -> AsyncIterator[pb.WatchConnectionsResponse]:
        user_id = validation.user(request.user_id) if request.user_id else None
        call = current_call()
        async with self._watch.watch() as watcher:
            while True:
                change = await watcher.next(self._heartbeat)
                access = call.reauthorize()  # the policy may have changed since the last one
                if change is None:
                    yield pb.WatchConnectionsResponse(heartbeat=convert.timestamp(self._clock()))
                    continue
                if not access.allows(change.realm_id):
                    continue
                if change.deleted:
                    yield pb.WatchConnectionsResponse(deleted_realm_id=change.realm_id)
                    continue
                try:
                    info = await self._admin.get(change.realm_id)
                except ConnectionNotFound:
                    continue  # deleted right after this change; its deletion comes next
                if user_id is None or info.user_id == user_id:
                    yield pb.WatchConnectionsResponse(connection=convert.connection(info))

    @staticmethod
    def _realm(value: str) -> str:
        realm_id = validation.realm(value)
        current_call().require(realm_id)
        return realm_id
