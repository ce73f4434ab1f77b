"""The command line explains itself, and ``serve`` never loads the development tools."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from broker.settings import VARIABLES, variables_for


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own entry point
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
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
