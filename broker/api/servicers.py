"""The gRPC servicers: check the request, call the core, convert the answer."""

from __future__ import annotations

import weakref
from typing import Any

import grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api import convert, validation
from broker.api.status import grpc_errors
from broker.clock import Clock
from broker.domain.admin import ConnectionAdmin
from broker.domain.model import TokenSnapshot
from broker.domain.sweep import Sweeper, SweepKind
from broker.domain.tokens import TokenService

Context = grpc.aio.ServicerContext[Any, Any]


class TokenBrokerServicer(pb_grpc.TokenBrokerServiceServicer):
    def __init__(self, tokens: TokenService) -> None:
        self._tokens = tokens
        # A warm snapshot is served thousands of times: build its answer once. Entries
        # vanish with the snapshot when the cache lets go of it.
        self._answers: weakref.WeakKeyDictionary[TokenSnapshot, pb.GetAccessTokenResponse] = (
            weakref.WeakKeyDictionary()
        )

    @grpc_errors
    async def GetAccessToken(
        self, request: pb.GetAccessTokenRequest, context: Context
    ) -> pb.GetAccessTokenResponse:
        query = validation.token_query(request)
        snapshot = await self._tokens.get_access_token(
            realm_id=query.realm_id, user_id=query.user_id, min_validity=query.min_validity
        )
        answer = self._answers.get(snapshot)
        if answer is None:
            answer = self._answers[snapshot] = convert.token_response(snapshot)
        return answer


class ConnectionAdminServicer(pb_grpc.ConnectionAdminServiceServicer):
    def __init__(self, admin: ConnectionAdmin, sweeper: Sweeper, clock: Clock) -> None:
        self._admin = admin
        self._sweeper = sweeper
        self._clock = clock

    @grpc_errors
    async def ImportConnection(
        self, request: pb.ImportConnectionRequest, context: Context
    ) -> pb.ImportConnectionResponse:
        info = await self._admin.import_connection(
            validation.import_request(request, self._clock())
        )
        return pb.ImportConnectionResponse(connection=convert.connection(info))

    @grpc_errors
    async def GetConnection(
        self, request: pb.GetConnectionRequest, context: Context
    ) -> pb.GetConnectionResponse:
        info = await self._admin.get(validation.realm(request.realm_id))
        return pb.GetConnectionResponse(connection=convert.connection(info))

    @grpc_errors
    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: Context
    ) -> pb.ListConnectionsResponse:
        query = validation.list_query(request)
        page = await self._admin.list(query.where, limit=query.limit, after=query.after)
        return pb.ListConnectionsResponse(
            connections=[convert.connection(info) for info in page.connections],
            next_page_token=validation.page_token(page.next_after),
        )

    @grpc_errors
    async def RefreshConnection(
        self, request: pb.RefreshConnectionRequest, context: Context
    ) -> pb.RefreshConnectionResponse:
        info = await self._admin.refresh(validation.realm(request.realm_id))
        return pb.RefreshConnectionResponse(connection=convert.connection(info))

    @grpc_errors
    async def RevokeConnection(
        self, request: pb.RevokeConnectionRequest, context: Context
    ) -> pb.RevokeConnectionResponse:
        info = await self._admin.revoke(validation.realm(request.realm_id))
        return pb.RevokeConnectionResponse(connection=convert.connection(info))

    @grpc_errors
    async def RunSweep(self, request: pb.RunSweepRequest, context: Context) -> pb.RunSweepResponse:
        report = await self._sweeper.run(SweepKind.MANUAL)
        return pb.RunSweepResponse(
            examined=report.examined, refreshed=report.refreshed, failed=report.failed
        )
