"""The client's token cache: calls per second with it (warm) and without it (every call an RPC).

    python -m tests.benchmarks.client_cache
    python -m tests.benchmarks.client_cache --seconds 4 --rounds 5 --concurrency 1 16 64

The broker runs as `qbo-broker serve` in a process of its own on an embedded
PostgreSQL, started with the helpers of tests/benchmarks/get_access_token.py,
with one connection whose access token is valid for the next 55 minutes (so the
broker answers from its own memory too). This process is the caller: for each
concurrency (asyncio tasks for ``BrokerClient``, threads for
``SyncBrokerClient``) it measures the client with its cache warm and with
``cache=False``, in turns, and prints the median of the rounds.

With a warm cache an async call never suspends, so concurrent tasks take turns
rather than overlap: the figure is what one event loop can serve from memory.
The "RPCs" column counts the calls that went to the broker while measuring
(zero with a warm cache).
"""

from __future__ import annotations

import os

# Before gRPC loads: its fork handlers can crash pg_ctl children (see broker/entry.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from broker.client import BrokerClient, SyncBrokerClient
from broker.crypto import KeyRing
from broker.storage.embedded import EmbeddedPostgres, ensure_database
from tests.benchmarks.get_access_token import (
    REALM,
    free_port,
    import_warm_connection,
    plaintext,
    process,
    wait_serving,
)

WARM_UP = 200


@dataclass
class Cell:
    client: str
    cache: bool
    concurrency: int
    calls_per_second: float
    rpcs: int


async def measure_async(address: str, *, cache: bool, concurrency: int, seconds: float) -> Cell:
    async with BrokerClient(address, cache=cache) as client:
        for _ in range(WARM_UP):
            await client.get_access_token(realm_id=REALM)
        rpcs_before = client.cache_misses
        counts = [0] * concurrency
        stop_at = time.perf_counter() + seconds

        async def worker(index: int) -> None:
            done = 0
            while time.perf_counter() < stop_at:
                await client.get_access_token(realm_id=REALM)
                done += 1
            counts[index] = done

        began = time.perf_counter()
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
        elapsed = time.perf_counter() - began
        rpcs = client.cache_misses - rpcs_before
    return Cell("async", cache, concurrency, sum(counts) / elapsed, rpcs)


def measure_sync(address: str, *, cache: bool, concurrency: int, seconds: float) -> Cell:
    with SyncBrokerClient(address, cache=cache) as client:
        for _ in range(WARM_UP):
            client.get_access_token(realm_id=REALM)
        rpcs_before = client.cache_misses
        counts = [0] * concurrency
        start = threading.Barrier(concurrency + 1)
        stop_at = 0.0

        def worker(index: int) -> None:
            start.wait()
            done = 0
            while time.perf_counter() < stop_at:
                client.get_access_token(realm_id=REALM)
                done += 1
            counts[index] = done

        threads = [threading.Thread(target=worker, args=(index,)) for index in range(concurrency)]
        for thread in threads:
            thread.start()
        began = time.perf_counter()
        stop_at = began + seconds
        start.wait()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        rpcs = client.cache_misses - rpcs_before
    return Cell("sync", cache, concurrency, sum(counts) / elapsed, rpcs)


async def import_connection(address: str) -> None:
    async with plaintext(address) as channel:
        await import_warm_connection(channel)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="per cell; the median is shown")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    options = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-bench-"))
    postgres = EmbeddedPostgres(folder)
    cells: list[Cell] = []
    try:
        admin_dsn = await asyncio.to_thread(postgres.start)
        await ensure_database(admin_dsn, "bench")
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "BROKER_DATABASE_URL": postgres.dsn("bench"),
            "BROKER_ENCRYPTION_KEYS": KeyRing.generate_spec(),
            "BROKER_GRPC_ADDR": address,
            "BROKER_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "BROKER_LOG_LEVEL": "WARNING",
            "QB_CLIENT_ID": "bench",
            "QB_CLIENT_SECRET": "bench-secret",
            "QB_TOKEN_URL": f"http://127.0.0.1:{free_port()}/never-called",
        }
        async with process("-m", "broker", "serve", env=env):
            await wait_serving(address, plaintext)
            await import_connection(address)
            for client in ("async", "sync"):
                for concurrency in options.concurrency:
                    rounds: dict[bool, list[Cell]] = {True: [], False: []}
                    for _ in range(options.rounds):
                        for cache in (True, False):  # in turns: drift hits both alike
                            if client == "async":
                                cell = await measure_async(
                                    address,
                                    cache=cache,
                                    concurrency=concurrency,
                                    seconds=options.seconds,
                                )
                            else:
                                cell = await asyncio.to_thread(
                                    measure_sync,
                                    address,
                                    cache=cache,
                                    concurrency=concurrency,
                                    seconds=options.seconds,
                                )
                            rounds[cache].append(cell)
                    for cache in (True, False):
                        measured = sorted(rounds[cache], key=lambda c: c.calls_per_second)
                        cells.append(measured[len(measured) // 2])
    finally:
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(folder, ignore_errors=True)

    print(
        f"get_access_token, one realm, token valid 55 min, plaintext loopback, "
        f"median of {options.rounds} rounds of {options.seconds:g} s, {os.cpu_count()} CPUs"
    )
    print("| client | concurrency | cache | calls/s | RPCs while measuring | cache / no cache |")
    print("|---|---:|---|---:|---:|---:|")
    for cell in cells:
        uncached = next(
            other
            for other in cells
            if (other.client, other.concurrency, other.cache)
            == (cell.client, cell.concurrency, False)
        )
        speedup = cell.calls_per_second / uncached.calls_per_second
        print(
            f"| {cell.client} | {cell.concurrency} | {'warm' if cell.cache else 'off'} "
            f"| {cell.calls_per_second:,.0f} | {cell.rpcs:,} | {speedup:,.0f}x |"
        )


if __name__ == "__main__":
    asyncio.run(main())
