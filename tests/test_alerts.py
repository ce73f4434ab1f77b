"""The monitoring shipped with the Helm chart: the Prometheus rules pass ``promtool check
rules`` and their unit tests (``promtool test rules``), every alert has a firing and a
quiet test case and a runbook section, and the committed Grafana dashboard is what
``tools/gen_dashboard.py`` generates.

promtool is Debian's, unpacked under ``.tools/prometheus`` by ``tools/promtool.sh``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "helm" / "qbo-token-broker" / "files"
RULES = FILES / "prometheus-rules.yaml"
RULE_TESTS = FILES / "prometheus-rules.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/qbo-token-broker/qbo-token-broker/blob/main/docs/runbook.md"
PROMTOOL_SH = ROOT / "tools" / "promtool.sh"


def run(*args: str | Path, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed commands from this repository
        [str(arg) for arg in args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def promtool() -> Path:
    installed = ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
    if not installed.exists() and shutil.which("apt-get") is None:
        pytest.skip("tools/promtool.sh needs Debian's apt-get to fetch promtool")
    result = run("bash", PROMTOOL_SH)
    assert result.returncode == 0, f"tools/promtool.sh failed:\n{result.stderr}"
    path = Path(result.stdout.strip())
    assert path.is_file(), f"tools/promtool.sh printed {result.stdout!r}, not a file"
    return path


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), flags=re.MULTILINE)


def test_promtool_check_rules(promtool: Path) -> None:
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules(promtool: Path) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    names = alert_names()
    assert len(names) >= 10
    assert [name for name in names if name not in firing] == []
    assert [name for name in names if name not in quiet] == []


def test_every_alert_links_its_runbook_section() -> None:
    rules = RULES.read_text()
    headings = set(re.findall(r"^## (\S+)\s*$", RUNBOOK.read_text(), flags=re.MULTILINE))
    for name in alert_names():
        assert f"runbook_url: {RUNBOOK_URL}#{name.lower()}\n" in rules, name
        assert name in headings, f"docs/runbook.md has no section '## {name}'"


def test_dashboard_is_generated_and_current() -> None:
    result = run(sys.executable, ROOT / "tools" / "gen_dashboard.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
