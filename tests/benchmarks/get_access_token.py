"""GetAccessToken with a warm token, side by side with a bare grpc.aio server.

    ./bin/bench                     (or: python -m tests.benchmarks.get_access_token)
    ./bin/bench --seconds 10 --concurrency 1 16 64
    ./bin/bench --tls               both servers behind mutual TLS; the broker with a policy

Each server runs in its own process; this process is the client, and it
measures the two servers in turns, concurrency by concurrency. The bare
server implements the same TokenBrokerService and answers every call with a
copy of a real broker answer (same proto, same size), doing nothing else: the
difference is what the broker costs on top of gRPC itself. The broker runs as
`qbo-broker serve` on an embedded PostgreSQL with one connection imported
with an access token valid for the next 55 minutes, so every call is served
from memory.

Prints one table: requests per second and p50/p99 latency per concurrency,
the broker's share of the bare server's throughput and its p99 ratio, and the
CPU time each server process spent per call (user + system, from the process's
own counters: unlike throughput, hardly moved by what else runs on the machine).
"""

from __future__ import annotations

import os

# Before gRPC loads: its fork handlers can crash pg_ctl children (see broker/entry.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.crypto import KeyRing
from broker.storage.embedded import EmbeddedPostgres, ensure_database
from tests.pki import Authority, Issued

REALM = "9130350000000001"


@dataclass
class Result:
    concurrency: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    """The server process's CPU time per call, in microseconds."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


ChannelFactory = Callable[[str], grpc.aio.Channel]


def plaintext(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def mutual_tls(ca: bytes, client: Issued) -> ChannelFactory:
    credentials = grpc.ssl_channel_credentials(ca, client.key_pem, client.cert_pem)

    def open_channel(address: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )

    return open_channel


async def wait_serving(address: str, connect: ChannelFactory) -> None:
    deadline = time.monotonic() + 60
    async with connect(address) as channel:
        while True:
            try:
                await asyncio.wait_for(channel.channel_ready(), 1)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listening on {address}") from None


async def measure(
    address: str, concurrency: int, seconds: float, connect: ChannelFactory, server: int
) -> Result:
    async with connect(address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        request = pb.GetAccessTokenRequest(realm_id=REALM)
        for _ in range(200):  # warm-up: connections, caches, JIT-free but allocator-warm
            await stub.GetAccessToken(request)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                await stub.GetAccessToken(request)
                latencies.append(time.perf_counter() - began)

        cpu_before = server_cpu_seconds(server)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu = server_cpu_seconds(server) - cpu_before
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(
        concurrency,
        len(latencies) / elapsed,
        quantiles[49] * 1e3,
        quantiles[98] * 1e3,
        cpu / len(latencies) * 1e6,
    )


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


# -- the servers --------------------------------------------------------------------------


class BareServicer(pb_grpc.TokenBrokerServiceServicer):
    def __init__(self, answer: bytes) -> None:
        self._answer = pb.GetAccessTokenResponse.FromString(answer)

    async def GetAccessToken(
        self, request: pb.GetAccessTokenRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetAccessTokenResponse:
        return self._answer


async def run_bare_server(port: int, answer_hex: str, tls_folder: str | None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_TokenBrokerServiceServicer_to_server(
        BareServicer(bytes.fromhex(answer_hex)), server
    )
    if tls_folder is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        folder = Path(tls_folder)
        credentials = grpc.ssl_server_credentials(
            [((folder / "server.key").read_bytes(), (folder / "server.crt").read_bytes())],
            root_certificates=(folder / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


@asynccontextmanager
async def process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[int]:
    """Run a Python child; yields its pid."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield child.pid
    finally:
        child.send_signal(signal.SIGTERM)
        await asyncio.wait_for(child.wait(), 20)


def with_mutual_tls(folder: Path, env: dict[str, str]) -> ChannelFactory:
    """Certificates for both servers and the client; a policy that lets the client in."""
    authority = Authority("bench CA")
    authority.server("localhost", "127.0.0.1").write(folder, "server")
    (folder / "ca.pem").write_bytes(authority.pem)
    client = authority.client("bench", uris=("spiffe://bench/client",))
    policy = {
        "name": "bench",
        "allow_rules": [
            {
                "name": "the bench client",
                "source": {"principals": ["spiffe://bench/*"]},
                "request": {
                    "paths": [
                        "/qbo.broker.v1.TokenBrokerService/*",
                        "/qbo.broker.v1.ConnectionAdminService/*",
                    ]
                },
                "realms": ["9130*"],
            }
        ],
    }
    (folder / "policy.json").write_text(json.dumps(policy))
    env.update(
        BROKER_TLS_CERT_FILE=str(folder / "server.crt"),
        BROKER_TLS_KEY_FILE=str(folder / "server.key"),
        BROKER_TLS_CLIENT_CA_FILE=str(folder / "ca.pem"),
        BROKER_AUTHZ_POLICY_FILE=str(folder / "policy.json"),
    )
    return mutual_tls(authority.pem, client)


async def import_warm_connection(channel: grpc.aio.Channel) -> None:
    """``REALM`` with an access token valid for 55 minutes: every call is served from memory."""
    admin = pb_grpc.ConnectionAdminServiceStub(channel)
    now = datetime.now(UTC)
    request = pb.ImportConnectionRequest(
        realm_id=REALM,
        user_id="bench",
        refresh_token="RT-" + "r" * 80,
        access_token="eyJ" + "a" * 900,  # Intuit's access tokens are ~900 chars
    )
    request.access_token_expires_at.CopyFrom(timestamp(now + timedelta(minutes=55)))
    request.refresh_token_created_at.CopyFrom(timestamp(now - timedelta(days=1)))
    await admin.ImportConnection(request)


def timestamp(moment: datetime) -> Timestamp:
    proto = Timestamp()
    proto.FromDatetime(moment)
    return proto


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="per cell; the median is shown")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--tls", action="store_true", help="mutual TLS for both; the broker with a policy"
    )
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "ANSWER_HEX"), help="internal")
    parser.add_argument("--bare-tls", metavar="FOLDER", help="internal")
    options = parser.parse_args()
    if options.bare_server:
        await run_bare_server(int(options.bare_server[0]), options.bare_server[1], options.bare_tls)
        return

    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-bench-"))
    postgres = EmbeddedPostgres(folder)
    try:
        admin_dsn = await asyncio.to_thread(postgres.start)
        await ensure_database(admin_dsn, "bench")
        broker_addr = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "BROKER_DATABASE_URL": postgres.dsn("bench"),
            "BROKER_ENCRYPTION_KEYS": KeyRing.generate_spec(),
            "BROKER_GRPC_ADDR": broker_addr,
            "BROKER_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "BROKER_LOG_LEVEL": "WARNING",
            "QB_CLIENT_ID": "bench",
            "QB_CLIENT_SECRET": "bench-secret",
            "QB_TOKEN_URL": f"http://127.0.0.1:{free_port()}/never-called",
        }
        connect: ChannelFactory = plaintext
        bare_tls: list[str] = []
        if options.tls:
            connect = with_mutual_tls(folder, env)
            bare_tls = ["--bare-tls", str(folder)]
        results: dict[str, list[Result]] = {}
        async with process("-m", "broker", "serve", env=env) as broker_pid:
            await wait_serving(broker_addr, connect)
            async with connect(broker_addr) as channel:
                await import_warm_connection(channel)
                tokens = pb_grpc.TokenBrokerServiceStub(channel)
                answer = await tokens.GetAccessToken(pb.GetAccessTokenRequest(realm_id=REALM))
            bare_addr = f"127.0.0.1:{free_port()}"
            module = "tests.benchmarks.get_access_token"
            port = bare_addr.rpartition(":")[2]
            answer_hex = answer.SerializeToString().hex()
            async with process(
                "-m", module, "--bare-server", port, answer_hex, *bare_tls
            ) as bare_pid:
                await wait_serving(bare_addr, connect)
                # Interleaved, so that drift of the machine hits both sides alike; each
                # cell is the median of the rounds (by throughput).
                for concurrency in options.concurrency:
                    rounds: dict[str, list[Result]] = {}
                    for _ in range(options.rounds):
                        for name, address, pid in (
                            ("bare", bare_addr, bare_pid),
                            ("broker", broker_addr, broker_pid),
                        ):
                            result = await measure(
                                address, concurrency, options.seconds, connect, pid
                            )
                            rounds.setdefault(name, []).append(result)
                    for name, measured in rounds.items():
                        measured.sort(key=lambda r: r.requests_per_second)
                        results.setdefault(name, []).append(measured[len(measured) // 2])
    finally:
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(folder, ignore_errors=True)

    transport = "mutual TLS, policy and audit on" if options.tls else "plaintext, audit on"
    print(
        f"GetAccessToken, warm token, {transport}, median of {options.rounds} rounds of "
        f"{options.seconds:g} s per cell, answer {answer.ByteSize()} B"
    )
    print(
        "| concurrency | bare rps | broker rps | broker/bare | bare p50 ms | broker p50 ms "
        "| bare p99 ms | broker p99 ms | p99 ratio | bare CPU µs/call | broker CPU µs/call |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bare, broker in zip(results["bare"], results["broker"], strict=True):
        print(
            f"| {bare.concurrency} | {bare.requests_per_second:,.0f} "
            f"| {broker.requests_per_second:,.0f} "
            f"| {broker.requests_per_second / bare.requests_per_second:.2f} "
            f"| {bare.p50_ms:.2f} | {broker.p50_ms:.2f} | {bare.p99_ms:.2f} | {broker.p99_ms:.2f} "
            f"| {broker.p99_ms / bare.p99_ms:.2f} | {bare.cpu_us:.0f} | {broker.cpu_us:.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
