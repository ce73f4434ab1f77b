"""The command line explains itself, and ``serve`` never loads the development tools."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import asyncpg
import pytest

from broker.crypto import KeyRing
from broker.settings import VARIABLES, variables_for
from broker.storage.embedded import EmbeddedPostgres


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own entry point
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_version_comes_from_the_package_metadata() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"qbo-broker {version('qbo-token-broker')}"


def test_the_top_level_help_lists_every_command() -> None:
    done = run("--help")
    assert done.returncode == 0
    for command in ("serve", "dev", "migrate", "sweep", "simulate", "keygen"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["serve", "migrate", "sweep", "dev"])
def test_each_command_says_what_it_does_and_what_it_reads(command: str) -> None:
    done = run(command, "--help")

    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "environment:" in text
    for variable in variables_for(command):
        assert variable.name in text
        if variable.default_text:
            assert f"(default {variable.default_text})" in text
    assert "exit 0" in text


def test_every_variable_is_read_by_some_command() -> None:
    for variable in VARIABLES:
        assert variable.commands, variable.name


def test_simulate_has_its_own_help() -> None:
    done = run("simulate", "--help")
    assert done.returncode == 0
    assert "--active-share" in done.stdout
    assert "QB_REFRESH_JOB_SCHEDULE" in done.stdout


def test_serve_never_imports_the_development_tools() -> None:
    """The serving path (CLI, process, wiring) is free of the fake Intuit and the simulation."""
    probe = """
import json, sys
import broker.cli, broker.server, broker.wiring
from broker.cli import _parser
_parser()
print(json.dumps(sorted(sys.modules)))
"""
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(done.stdout)

    assert [name for name in loaded if name.startswith("broker.devtools")] == []
    assert "pgserver" not in loaded  # the embedded database loads only when it is used
    assert "tqdm" not in loaded  # progress bars load with the commands that draw them
    assert "broker.server" in loaded  # the probe is real
    assert "broker.wiring" in loaded


# -- the database, as a command meets it ----------------------------------------------------


def env_with(**variables: str) -> dict[str, str]:
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(("BROKER_", "QB_"))
    }
    env.update(variables)
    return env


def test_a_malformed_database_url_stops_at_once_naming_the_variable() -> None:
    env = env_with(
        BROKER_DATABASE_URL="not-a-url",
        BROKER_ENCRYPTION_KEYS=KeyRing.generate_spec(),
        QB_CLIENT_ID="id",
        QB_CLIENT_SECRET="secret",
    )
    started = time.monotonic()
    done = run("serve", env=env)

    assert done.returncode == 2
    assert "BROKER_DATABASE_URL" in done.stderr
    assert time.monotonic() - started < 20  # no waiting for a database that cannot exist


def test_an_unreachable_database_logs_every_attempt_and_gives_up_in_one_line() -> None:
    env = env_with(
        BROKER_DATABASE_URL="postgresql://broker:Pa55-word@127.0.0.1:9/broker",
        BROKER_DATABASE_WAIT_SECONDS="2",
        BROKER_ENCRYPTION_KEYS=KeyRing.generate_spec(),
    )
    done = run("migrate", env=env)

    assert done.returncode == 3
    attempts = [
        json.loads(line)
        for line in done.stderr.splitlines()
        if line.startswith("{") and "waiting for the database" in line
    ]
    assert len(attempts) >= 2
    assert all(attempt["database"] == "127.0.0.1:9" and attempt["error"] for attempt in attempts)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qbo-broker: database error: BROKER_DATABASE_URL: 127.0.0.1:9")
    assert "Pa55-word" not in done.stderr


@pytest.fixture
def running_dev_database() -> Iterator[tuple[Path, EmbeddedPostgres]]:
    """An embedded PostgreSQL started by someone else (as `qbo-broker dev` would)."""
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-dev-"))
    server = EmbeddedPostgres(folder)
    server.start()
    try:
        yield folder, server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def answers(server: EmbeddedPostgres) -> bool:
    connection = await asyncpg.connect(server.dsn("postgres"), timeout=5)
    await connection.close()
    return True


async def test_a_command_never_stops_a_database_it_did_not_start(
    running_dev_database: tuple[Path, EmbeddedPostgres],
) -> None:
    folder, server = running_dev_database

    done = await asyncio.to_thread(run, "migrate", env=env_with(BROKER_DATA_DIR=str(folder)))

    assert done.returncode == 0, done.stderr
    assert await answers(server)  # still running for whoever started it


async def test_serve_on_the_embedded_database_says_so_and_leaves_it_running(
    running_dev_database: tuple[Path, EmbeddedPostgres],
) -> None:
    folder, server = running_dev_database
    env = env_with(
        BROKER_DATA_DIR=str(folder),
        BROKER_GRPC_ADDR="127.0.0.1:0",
        BROKER_HTTP_ADDR="127.0.0.1:0",
        QB_CLIENT_ID="id",
        QB_CLIENT_SECRET="secret",
        QB_DISABLE_BACKGROUND_REFRESH="true",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    lines: list[str] = []
    async for raw in process.stderr:
        lines.append(raw.decode())
        if "broker ready" in lines[-1]:
            break
    process.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(process.stderr.read(), 20)
    code = await asyncio.wait_for(process.wait(), 20)

    log = "".join(lines) + rest.decode()
    assert code == 0, log
    warning = next(json.loads(line) for line in lines if "embedded" in line)
    assert warning["level"] == "warning"
    assert warning["data_dir"] == str(folder.resolve())
    assert await answers(server)
