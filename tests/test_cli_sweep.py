"""`qbo-broker sweep` as an operator runs it: a process of its own against the database."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from tests.conftest import StartBroker

DAYS = timedelta(days=1)


async def run_sweep(env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "sweep",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_sweep_command_renews_what_is_due_and_reports_it(
    start_broker: StartBroker, database: str, key_spec: str
) -> None:
    broker = await start_broker(disable_background_refresh=True)
    for n in range(4):
        await broker.seed(f"94000000000000{n:02d}", refresh_token_age=(65 + n) * DAYS)
    await broker.seed("9400000000000099", refresh_token_age=10 * DAYS)
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": database,
        "BROKER_ENCRYPTION_KEYS": key_spec,
        "QB_CLIENT_ID": broker.intuit.model.config.client_id,
        "QB_CLIENT_SECRET": broker.intuit.model.config.client_secret,
        "QB_TOKEN_URL": broker.intuit.token_url,
        "QB_REVOKE_URL": broker.intuit.revoke_url,
        "QB_REFRESH_JOB_RATE_LIMIT_MS": "0",
    }

    code, out, err = await run_sweep(env)

    assert code == 0, err
    assert "sweep completed: examined 4, refreshed 4, failed 0" in out
    assert "\r" not in err  # no progress bar when stderr is not a terminal
    assert [broker.refreshes(f"94000000000000{n:02d}") for n in range(4)] == [1, 1, 1, 1]
    assert broker.refreshes("9400000000000099") == 0

    code, out, _ = await run_sweep(env)
    assert code == 0
    assert "examined 0" in out
