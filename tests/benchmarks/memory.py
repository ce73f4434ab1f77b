"""Memory of one replica: at idle, and with N connections warm in its token cache.

    python -m tests.benchmarks.memory [--connections 100000]

Runs `qbo-broker serve` in its own process on an embedded PostgreSQL loaded
with N connections (access tokens of Intuit's size, about 900 characters),
measures its resident memory once ready, then after one GetAccessToken for
every connection (each is then cached), and prints the difference per
cached connection: the figure the Helm chart's memory sizing rests on.
"""

from __future__ import annotations

import os

# Before gRPC loads: its fork handlers can crash pg_ctl children (see broker/entry.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.crypto import KeyRing
from broker.storage import schema
from broker.storage.embedded import EmbeddedPostgres, ensure_database
from broker.storage.keys import seal
from tests.benchmarks.get_access_token import free_port, wait_serving
from tests.benchmarks.sweep_and_metrics import COLUMNS


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def load(dsn: str, keys: KeyRing, count: int) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        await schema.migrate(connection)
        now = datetime.now(UTC)
        realms = [f"91{n:014d}" for n in range(count)]
        rows = []
        for realm in realms:
            access, key_id = seal(keys, realm, "access_token", "eyJ" + "a" * 900)
            refresh, _ = seal(keys, realm, "refresh_token", "AB11" + "r" * 46)
            rows.append(
                (
                    realm,
                    f"user-{realm}",
                    "active",
                    access,
                    now + timedelta(minutes=55),
                    refresh,
                    key_id,
                    now - timedelta(days=3),
                    now + timedelta(days=98),
                )
            )
        await connection.copy_records_to_table(
            "quickbooks_connections", records=rows, columns=COLUMNS
        )
        await connection.execute("VACUUM ANALYZE quickbooks_connections")
        return realms
    finally:
        await connection.close()


async def warm(address: str, realms: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        queue = iter(realms)

        async def worker() -> None:
            for realm in queue:
                await stub.GetAccessToken(pb.GetAccessTokenRequest(realm_id=realm), timeout=30)

        await asyncio.gather(*(worker() for _ in range(32)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100_000)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-memory-"))
    postgres = EmbeddedPostgres(folder)
    try:
        await ensure_database(await asyncio.to_thread(postgres.start), "bench")
        dsn = postgres.dsn("bench")
        spec = KeyRing.generate_spec()
        began = time.perf_counter()
        realms = await load(dsn, KeyRing.parse(spec), options.connections)
        print(f"loaded {len(realms):,} connections in {time.perf_counter() - began:.1f} s")
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "BROKER_DATABASE_URL": dsn,
            "BROKER_ENCRYPTION_KEYS": spec,
            "BROKER_GRPC_ADDR": address,
            "BROKER_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "BROKER_LOG_LEVEL": "WARNING",
            "BROKER_TOKEN_CACHE_SIZE": str(max(100, len(realms))),
            "QB_CLIENT_ID": "bench",
            "QB_CLIENT_SECRET": "bench-secret",
            "QB_TOKEN_URL": f"http://127.0.0.1:{free_port()}/never-called",
            "QB_DISABLE_BACKGROUND_REFRESH": "true",
        }
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            await wait_serving(address, lambda target: grpc.aio.insecure_channel(target))
            idle = resident_kib(child.pid)
            began = time.perf_counter()
            await warm(address, realms)
            warmed = resident_kib(child.pid)
            seconds = time.perf_counter() - began
        finally:
            child.send_signal(signal.SIGTERM)
            await asyncio.wait_for(child.wait(), 30)
    finally:
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(folder, ignore_errors=True)
    per = (warmed - idle) / len(realms)
    print(f"resident memory at idle (ready, nothing cached): {idle / 1024:.1f} MiB")
    print(
        f"after warming {len(realms):,} connections ({seconds:.1f} s): {warmed / 1024:.1f} MiB "
        f"= {per:.2f} KiB per cached connection"
    )


if __name__ == "__main__":
    asyncio.run(main())
