"""``qbo-broker dev``: the broker on an embedded PostgreSQL against the built-in simulator.

A newcomer sees the whole thing work with no Intuit account: the simulator
plays QuickBooks (rotation, dead old tokens, ``invalid_grant``, faults), a few
demo companies sit at telling refresh-token ages, and the guide printed at
start-up shows how to call the broker.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta

from broker.clock import system_clock
from broker.devtools.fake_intuit import IntuitModel, IntuitSimulator, SimulatorConfig
from broker.domain.model import ImportRequest
from broker.errors import ConfigurationError
from broker.server import BrokerServer
from broker.settings import Secret, Settings, is_loopback
from broker.storage.embedded import embedded_bin_dir

log = logging.getLogger("broker.devtools")


@dataclass(frozen=True)
class DemoCompany:
    realm_id: str
    user_id: str
    refresh_token_age: timedelta
    story: str
    access_token_expired: bool = False
    revoked_at_intuit: bool = False


DEMO_COMPANIES = (
    DemoCompany(
        "9130350000000001",
        "alice@example.com",
        timedelta(days=2),
        "healthy; its access token has expired, so the first call refreshes it",
        access_token_expired=True,
    ),
    DemoCompany(
        "9130350000000002",
        "bob@example.com",
        timedelta(days=35),
        "refresh token 35 days old: the first call renews it proactively",
    ),
    DemoCompany(
        "9130350000000003",
        "carol@example.com",
        timedelta(days=65),
        "idle, refresh token 65 days old: the catch-up sweep renews it 10-30 s after start",
    ),
    DemoCompany(
        "9130350000000004",
        "dave@example.com",
        timedelta(days=96),
        "refresh token 96 days old, five days from expiry: the catch-up sweep renews it too",
    ),
    DemoCompany(
        "9130350000000005",
        "erin@example.com",
        timedelta(days=10),
        "the customer disconnected the app at Intuit: the first call (its access token "
        "has expired) answers FAILED_PRECONDITION / REAUTHORIZATION_REQUIRED",
        access_token_expired=True,
        revoked_at_intuit=True,
    ),
    DemoCompany(
        "9130350000000006",
        "frank@example.com",
        timedelta(days=10),
        "healthy: the one to age by hand (see the runbook below)",
    ),
)


def refuse_anything_real(settings: Settings, simulator_addr: str) -> None:
    """dev re-seeds demo rows and talks to a fake Intuit: never near real data or a network."""
    if settings.database_url is not None:
        raise ConfigurationError(
            "qbo-broker dev runs on its own embedded database: unset BROKER_DATABASE_URL "
            "(dev re-creates demo connections and would overwrite real ones)"
        )
    for name, address in (
        ("BROKER_GRPC_ADDR", settings.grpc_addr),
        ("BROKER_HTTP_ADDR", settings.http_addr),
        ("--simulator-addr", simulator_addr),
    ):
        if not is_loopback(address):
            raise ConfigurationError(
                f"qbo-broker dev listens on loopback only; {name} is {address}"
            )


async def run(settings: Settings, simulator_host: str, simulator_port: int) -> None:
    refuse_anything_real(settings, f"{simulator_host}:{simulator_port}")
    model = IntuitModel(SimulatorConfig(), system_clock)
    async with IntuitSimulator(model, host=simulator_host, port=simulator_port) as simulator:
        settings = dataclasses.replace(
            settings,
            client_id=model.config.client_id,
            client_secret=Secret(model.config.client_secret),
            auth_url=simulator.auth_url,
            token_url=simulator.token_url,
            revoke_url=simulator.revoke_url,
            api_url=simulator.api_base_url,
            redirect_uri=settings.redirect_uri or f"http://{settings.http_addr}/oauth/callback",
        )
        broker = BrokerServer(settings)

        async def seed_and_explain(running: BrokerServer) -> None:
            await seed(running, model)
            print(guide(running, simulator.base_url), file=sys.stderr, flush=True)

        await broker.serve_until_signalled(on_ready=seed_and_explain)


async def seed(broker: BrokerServer, model: IntuitModel) -> None:
    """(Re)create the demo companies at Intuit and in the broker: every run starts the same."""
    assert broker.components is not None
    now = model.now()
    for company in DEMO_COMPANIES:
        issued_at = now - company.refresh_token_age
        grant = model.create_grant(
            company.realm_id,
            refresh_token_issued_at=issued_at,
            access_token_issued_at=issued_at if company.access_token_expired else now,
        )
        await broker.components.admin.import_connection(
            ImportRequest(
                realm_id=company.realm_id,
                user_id=company.user_id,
                refresh_token=grant.refresh_token,
                access_token=grant.access_token,
                access_token_expires_at=now + timedelta(seconds=grant.expires_in),
                refresh_token_created_at=issued_at,
                refresh_token_expires_at=now + timedelta(seconds=grant.x_refresh_token_expires_in),
                replace_active=True,  # re-created at every start, on purpose
            )
        )
        if company.revoked_at_intuit:
            model.revoke(grant.refresh_token)


def guide(broker: BrokerServer, simulator_url: str) -> str:
    grpc_addr = f"127.0.0.1:{broker.grpc_port}"
    http = f"http://127.0.0.1:{broker.http_port}"
    rows = "\n".join(f"    {c.realm_id}  {c.user_id:<18}  {c.story}" for c in DEMO_COMPANIES)
    first = DEMO_COMPANIES[0].realm_id
    dsn = broker.database.dsn if broker.database else ""
    psql = shutil.which("psql") or str(embedded_bin_dir() / "psql")
    return f"""
qbo-broker dev is running (Ctrl-C stops it).

  gRPC     {grpc_addr}   (reflection on: grpcurl -plaintext {grpc_addr} list)
  HTTP     {http}/metrics  {http}/readyz
  Intuit   {simulator_url}   (the built-in QuickBooks simulator)
  data     {broker.settings.data_dir.resolve()}   (embedded PostgreSQL and its key)

Demo companies (re-created at every start):
{rows}

Get a token:
  grpcurl -plaintext -d '{{"realm_id": "{first}"}}' {grpc_addr} \\
      qbo.broker.v1.TokenBrokerService/GetAccessToken

  or from Python:
    from broker.client import BrokerClient
    async with BrokerClient("{grpc_addr}") as broker:
        token = await broker.get_access_token(realm_id="{first}")

See a connection:
  grpcurl -plaintext -d '{{"realm_id": "{first}"}}' {grpc_addr} \\
      qbo.broker.v1.ConnectionAdminService/GetConnection

The runbook: age frank's refresh token to 35 days by hand, use the connection,
and watch the log renew it (trigger=proactive, refresh_token_rotated=True):
  {psql} '{dsn}' -c \\
    "UPDATE quickbooks_connections SET refresh_token_created_at = NOW() - INTERVAL '35 days'
     WHERE user_id = 'frank@example.com'"
  grpcurl -plaintext -d '{{"user_id": "frank@example.com"}}' {grpc_addr} \\
      qbo.broker.v1.TokenBrokerService/GetAccessToken

Connect a new company as a customer would (open the printed URL in a browser; the
fake Intuit consents at once and picks a new company):
  grpcurl -plaintext -d '{{"user_id": "grace@example.com"}}' {grpc_addr} \\
      qbo.broker.v1.ConnectionAdminService/CreateConnectLink

Watch connections change as they happen (another terminal):
  grpcurl -plaintext -d '{{}}' {grpc_addr} qbo.broker.v1.ConnectionAdminService/WatchConnections

Make Intuit fail (the next 3 token requests answer 503):
  curl -X POST {simulator_url}/_simulator/faults \\
      -d '{{"kind": "server_error", "status": 503, "times": 3}}'
"""
