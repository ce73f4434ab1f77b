"""The Node/TypeScript client (``clients/node``) against a running broker.

The session builds the client once (``npm ci`` only when ``node_modules`` is missing
or older than ``package-lock.json``; ``npm run build`` always, it takes about a
second). Then ``clients/node/test/unit.mjs`` (error mapping, retries and TLS options
against an in-process fake service) and ``clients/node/test/integration.mjs`` (against
a broker seeded here) run as subprocesses and must exit 0. Skipped when ``node`` or
``npm`` is not on PATH.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from broker.devtools.fake_intuit import Fault, FaultKind
from tests.conftest import StartBroker
from tests.support import SWEEP_BY_HAND

CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
BUILD_TIMEOUT = 300.0
SCRIPT_TIMEOUT = 90.0

ACTIVE = "9130350000000001"
REAUTHORIZATION = "9130350000000002"
INTUIT_DOWN = "9130350000000003"
UNKNOWN = "9130350000000404"


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(  # noqa: S603  (fixed commands, no shell)
            command,
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what} took more than {BUILD_TIMEOUT:.0f} s:\n{_text(exc.output)}")
    if done.returncode != 0:
        pytest.fail(f"{what} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _node_modules_stale() -> bool:
    # npm writes node_modules/.package-lock.json on every install: its age is the install's.
    installed = CLIENT_DIR / "node_modules" / ".package-lock.json"
    lock = CLIENT_DIR / "package-lock.json"
    return not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The built client package; skips the tests when Node is not installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node client test (not on PATH)")
    # One build at a time, also across concurrent pytest runs in the same checkout.
    lock_path = Path(tempfile.gettempdir()) / "qbo-token-broker-node-client.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _node_modules_stale():
                _run([npm, "ci", "--no-audit", "--no-fund"], "npm ci in clients/node")
            _run([npm, "run", "build"], "npm run build in clients/node")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return CLIENT_DIR


@pytest.mark.timeout(BUILD_TIMEOUT + SCRIPT_TIMEOUT + 60)
def test_the_node_client_maps_errors_and_retries(node_client: Path) -> None:
    node = shutil.which("node")
    assert node is not None
    try:
        done = subprocess.run(  # noqa: S603  (fixed command, no shell)
            [node, str(node_client / "test" / "unit.mjs")],
            cwd=node_client,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"unit.mjs did not finish in {SCRIPT_TIMEOUT:.0f} s:\n{_text(exc.output)}")
    print(done.stdout)
    assert done.returncode == 0, f"unit.mjs exited {done.returncode}:\n{done.stdout}{done.stderr}"
    assert "passed, 0 failed" in done.stdout, done.stdout


@pytest.mark.timeout(BUILD_TIMEOUT + SCRIPT_TIMEOUT + 60)
async def test_the_node_client_against_a_running_broker(
    node_client: Path, start_broker: StartBroker
) -> None:
    # No background sweep: only the script's own calls may reach the simulator.
    broker = await start_broker(**SWEEP_BY_HAND)
    await broker.seed(ACTIVE, "alice@example.com", access_token_left=timedelta(minutes=50))

    # A grant Intuit has revoked; a first call lets the broker learn it, so the script's
    # calls do not reach Intuit (its fault below would answer them instead).
    await broker.seed(REAUTHORIZATION, "bob@example.com", access_token_left=None)
    model = broker.intuit.model
    model.revoke(model.current_refresh_token(REAUTHORIZATION) or "")
    code = await broker.get_token_expecting_error(REAUTHORIZATION)
    assert code is grpc.StatusCode.FAILED_PRECONDITION

    # An expired access token and Intuit answering its refresh with a 503. One fault: the
    # broker then backs off from Intuit for that realm, and the script's last check
    # (a refresh of ACTIVE) must reach a healthy Intuit.
    await broker.seed(INTUIT_DOWN, "carol@example.com", access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503), times=1)

    realms = {
        "active": {"realmId": ACTIVE, "userId": "alice@example.com"},
        "reauthorization": {"realmId": REAUTHORIZATION, "userId": "bob@example.com"},
        "intuitDown": {"realmId": INTUIT_DOWN},
        "unknownRealmId": UNKNOWN,
    }
    address = f"127.0.0.1:{broker.broker.grpc_port}"
    env = {**os.environ, "BROKER_ADDR": address, "BROKER_REALMS": json.dumps(realms)}
    node = shutil.which("node")
    assert node is not None

    # The broker serves on this event loop: the script must run without blocking it.
    process = await asyncio.create_subprocess_exec(
        node,
        str(node_client / "test" / "integration.mjs"),
        address,
        cwd=node_client,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=SCRIPT_TIMEOUT)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        pytest.fail(
            f"integration.mjs did not finish in {SCRIPT_TIMEOUT:.0f} s:\n"
            + output.decode(errors="replace")
        )
    text = output.decode(errors="replace")
    print(text)  # one line per check; pytest shows it with -s
    assert process.returncode == 0, f"integration.mjs exited {process.returncode}:\n{text}"
    assert "passed, 0 failed" in text, text
    assert broker.intuit.faults.served == 1, "the Intuit-down check never reached Intuit"
