"""A real Prometheus (Debian's 2.42, from ``tools/promtool.sh --prometheus``) scraping a real
broker, with the Helm chart's rule file loaded: the series, ``le`` spellings and labels the
rules rely on are the ones the broker exports, the rules load and evaluate without error, and
alerts that this data should raise do.

Everything is observed through Prometheus's HTTP API, polled with ``eventually`` (Prometheus
scrapes and evaluates every second here; the bounds only limit a failure).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from broker.domain.sweep import SweepKind, SweepOutcome
from tests.conftest import StartBroker
from tests.support import SWEEP_BY_HAND, RunningBroker, eventually

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "qbo-token-broker" / "files" / "prometheus-rules.yaml"
PROMTOOL_SH = ROOT / "tools" / "promtool.sh"
JOB = "qbo-token-broker"
DAYS = timedelta(days=1)
BOUND = 90.0
"""Seconds any one wait may take before the test fails (only a failure waits this long)."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Refresh-token ages (days) of the connections that stay active, and one more connection that
# the test makes lose its grant (its age must not be counted once it is no longer active).
ACTIVE_AGES = {
    "9400000000000001": 0.5,
    "9400000000000002": 3.0,
    "9400000000000003": 20.0,
    "9400000000000004": 50.0,
    "9400000000000005": 95.0,  # expires (101 days) within 14 days
}
LOST_REALM = "9400000000000009"
LOST_AGE = 10.0

# Cumulative counts by `le` exactly as Prometheus 2.42 stores them from the broker's
# OpenMetrics exposition: the broker's integer spelling, unchanged ("86400", not "86400.0").
EXPECTED_BUCKETS = {
    "86400": 1,  # 1 day: 0.5
    "604800": 2,  # 7 days: + 3
    "1209600": 2,  # 14 days (the lost connection's 10 days no longer counts)
    "2592000": 3,  # 30 days: + 20
    "3888000": 3,  # 45 days
    "5184000": 4,  # 60 days: + 50
    "6480000": 4,  # 75 days
    "7776000": 4,  # 90 days
    "8726400": 5,  # 101 days: + 95
    "+Inf": 5,
}

T = TypeVar("T")


# -- the Prometheus server --------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    bash = shutil.which("bash") or "/bin/bash"
    result = subprocess.run(  # noqa: S603 - a fixed script of this repository
        [bash, str(PROMTOOL_SH), "--prometheus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"tools/promtool.sh --prometheus failed (exit {result.returncode}), so there is no "
            f"Prometheus server to run:\n{result.stderr.strip()[-2000:]}"
        )
    path = Path(result.stdout.strip())
    assert path.is_file(), f"tools/promtool.sh --prometheus printed {result.stdout!r}, not a file"
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrometheusExited(AssertionError):
    pass


class Prometheus:
    """One Prometheus server process and a client of its HTTP API."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        port: int,
        log: Path,
        session: aiohttp.ClientSession,
    ) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.session = session
        self.started = time.monotonic()
        self.first_answer: float | None = None
        """Seconds from the start of the process to the first query it answered."""

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no stderr: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    async def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful answer; None while Prometheus is not (yet) serving."""
        if self.process.returncode is not None:
            raise PrometheusExited(
                f"prometheus exited with status {self.process.returncode}; its stderr:\n"
                f"{self.log_tail()}"
            )
        try:
            async with self.session.get(
                self.url + path, params=params, timeout=aiohttp.ClientTimeout(total=15)
            ) as response:
                if response.status == 503:  # the TSDB is not open yet
                    return None
                body = await response.json(content_type=None)
        except (aiohttp.ClientConnectionError, TimeoutError):
            return None
        assert body.get("status") == "success", f"GET {path} {params}: {body}"
        if self.first_answer is None and path == "/api/v1/query":
            self.first_answer = time.monotonic() - self.started
        return body["data"]

    async def query(self, expr: str) -> list[tuple[dict[str, str], float]] | None:
        """An instant query's samples (labels, value); None while Prometheus is not serving."""
        data = await self.api("/api/v1/query", query=expr)
        if data is None:
            return None
        assert data["resultType"] == "vector", f"{expr}: {data}"
        return [(sample["metric"], float(sample["value"][1])) for sample in data["result"]]

    async def by_label(self, expr: str, label: str) -> dict[str, float] | None:
        samples = await self.query(expr)
        if samples is None:
            return None
        return {labels.get(label, ""): value for labels, value in samples}

    async def wait_for(
        self,
        what: str,
        fetch: Callable[[], Awaitable[T | None]],
        ok: Callable[[T], bool],
        within: float = BOUND,
    ) -> T:
        """Poll ``fetch`` until ``ok`` holds; fail with the last value and Prometheus's stderr."""
        seen: list[T | None] = [None]

        async def check() -> bool:
            value = await fetch()
            seen[0] = value
            return value is not None and ok(value)

        try:
            await eventually(check, within=within, what=what)
        except PrometheusExited:
            raise
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nlast seen: {seen[0]!r}\nprometheus stderr (tail):\n{self.log_tail()}"
            ) from None
        value = seen[0]
        assert value is not None
        return value


def prometheus_config(broker_http_port: int) -> dict[str, Any]:
    """The configuration file's content (JSON is YAML: no quoting to get wrong)."""
    return {
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "scrape_timeout": "1s",  # may not exceed the interval (the default is 10s)
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{broker_http_port}"]}],
            }
        ],
    }


LaunchPrometheus = Callable[[int], Awaitable[Prometheus]]


@pytest.fixture
async def launch_prometheus(prometheus_binary: Path) -> AsyncIterator[LaunchPrometheus]:
    """``await launch(broker_http_port)``: a Prometheus scraping that port, stopped afterwards."""
    # Not under pytest's tmp_path, which a concurrent pytest run may reset.
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-prometheus-"))
    session = aiohttp.ClientSession()
    launched: list[Prometheus] = []
    # Debian's binary looks for its web assets under /usr/share; use the unpacked copy.
    assets = prometheus_binary.parent.parent / "share" / "prometheus" / "web"

    async def launch(broker_http_port: int) -> Prometheus:
        config = folder / "prometheus.yml"
        config.write_text(json.dumps(prometheus_config(broker_http_port), indent=2))
        for attempt in range(3):  # the free port may be taken before Prometheus binds it
            port = free_port()
            log = folder / f"prometheus-{attempt}.stderr"
            args = [
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / f'data-{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                # The defaults are under /etc/prometheus: point them at nothing of the system's.
                f"--web.console.templates={folder / 'consoles'}",
                f"--web.console.libraries={folder / 'console_libraries'}",
                "--log.level=info",
            ]
            if assets.is_dir():
                args.append(f"--web.local-assets={assets}")
            with log.open("wb") as stderr:
                process = await asyncio.create_subprocess_exec(
                    str(prometheus_binary),
                    *args,
                    cwd=folder,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr,
                )
            server = Prometheus(process, port, log, session)
            launched.append(server)
            try:
                await server.wait_for(
                    "Prometheus answers queries",
                    partial(server.query, "vector(1)"),
                    lambda samples: len(samples) == 1,
                )
            except PrometheusExited:
                if "address already in use" in server.log_tail() and attempt < 2:
                    continue
                raise
            return server
        raise AssertionError("unreachable")

    yield launch

    await session.close()
    for server in launched:
        if server.process.returncode is None:
            server.process.terminate()
            try:
                await asyncio.wait_for(server.process.wait(), timeout=30)
            except TimeoutError:
                server.process.kill()
                await server.process.wait()
    shutil.rmtree(folder, ignore_errors=True)


# -- what the rules reference -----------------------------------------------------------

_SELECTOR = re.compile(r"(?<![\w:])(qbo_broker_\w+|grpc_server_\w+|up)(\{[^}]*\})?(?![\w:(])")
_GROUPING = re.compile(r"\b(?:by|on|ignoring)\s*\(([^)]*)\)")


def selectors(query: str) -> list[tuple[str, str]]:
    """(metric name, selector) of every raw series a rule's query reads."""
    return [(name, name + (matchers or "")) for name, matchers in _SELECTOR.findall(query)]


def grouping_labels(query: str) -> set[str]:
    return {
        label.strip()
        for group in _GROUPING.findall(query)
        for label in group.split(",")
        if label.strip()
    }


# -- the test -----------------------------------------------------------------------------


async def test_prometheus_scrapes_the_broker_and_the_shipped_rules_fit_its_series(
    start_broker: StartBroker, launch_prometheus: LaunchPrometheus
) -> None:
    broker: RunningBroker = await start_broker(**SWEEP_BY_HAND)
    # A completed sweep (of nothing yet), so its timestamp is exported like in production.
    report = await broker.components.sweeper.run(SweepKind.MANUAL)
    assert report.outcome is SweepOutcome.COMPLETED
    for realm, age in ACTIVE_AGES.items():
        await broker.seed(realm, refresh_token_age=age * DAYS)
    # Its access token has expired: the next GetAccessToken must refresh, and will be refused.
    await broker.seed(LOST_REALM, refresh_token_age=LOST_AGE * DAYS, access_token_left=None)
    await broker.components.fleet.refresh(force=True)

    prometheus = await launch_prometheus(broker.broker.http_port)
    print(f"\nprometheus answered its first query {prometheus.first_answer:.2f} s after its start")

    up = await prometheus.wait_for(
        "the broker is scraped",
        lambda: prometheus.by_label(f'up{{job="{JOB}"}}', "job"),
        lambda found: found == {JOB: 1.0},
    )
    print(f"up == 1 after {time.monotonic() - prometheus.started:.2f} s: {up}")

    # The lost-connection counter is scraped at 0 before the loss: increase() sees it rise.
    await prometheus.wait_for(
        "connections_lost_total{cause=revoked_at_intuit} scraped at 0",
        lambda: prometheus.by_label(
            'qbo_broker_connections_lost_total{cause="revoked_at_intuit"}', "cause"
        ),
        lambda found: found == {"revoked_at_intuit": 0.0},
    )
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(LOST_REALM) or "")
    await broker.get_token_expecting_error(LOST_REALM)
    await broker.components.fleet.refresh(force=True)

    # Scraped as OpenMetrics: only that format has a gauge-histogram type.
    metadata = await prometheus.wait_for(
        "metadata of the token-age histogram",
        lambda: prometheus.api("/api/v1/metadata", metric="qbo_broker_refresh_token_age_seconds"),
        lambda data: bool(data.get("qbo_broker_refresh_token_age_seconds")),
    )
    assert [m["type"] for m in metadata["qbo_broker_refresh_token_age_seconds"]] == [
        "gaugehistogram"
    ]

    await prometheus.wait_for(
        "the token-age buckets, by le as stored",
        lambda: prometheus.by_label(
            f'qbo_broker_refresh_token_age_seconds_bucket{{job="{JOB}"}}', "le"
        ),
        lambda found: found == EXPECTED_BUCKETS,
    )
    gcount = await prometheus.by_label("qbo_broker_refresh_token_age_seconds_gcount", "job")
    assert gcount == {JOB: len(ACTIVE_AGES)}
    gsum = await prometheus.by_label("qbo_broker_refresh_token_age_seconds_gsum", "job")
    assert gsum is not None
    assert gsum[JOB] == pytest.approx(sum(ACTIVE_AGES.values()) * 86400, rel=1e-6)

    await prometheus.wait_for(
        "connections by status",
        lambda: prometheus.by_label("qbo_broker_connections", "status"),
        lambda found: (
            found == {"active": len(ACTIVE_AGES), "reauthorization_required": 1, "revoked": 0}
        ),
    )
    expiring = await prometheus.by_label("qbo_broker_refresh_tokens_expiring", "within")
    assert expiring == {"14d": 1}

    await prometheus.wait_for(
        "the recording rule qbo_broker:refresh_token_age_seconds_bucket:max",
        lambda: prometheus.by_label("qbo_broker:refresh_token_age_seconds_bucket:max", "le"),
        lambda found: found == EXPECTED_BUCKETS,
    )

    groups = await prometheus.wait_for(
        "every rule evaluated without error",
        lambda: prometheus.api("/api/v1/rules"),
        lambda data: all(
            rule["health"] == "ok" and not rule.get("lastError")
            for group in data["groups"]
            for rule in group["rules"]
        ),
    )
    assert {group["name"] for group in groups["groups"]} == {
        "qbo-token-broker.rules",
        "qbo-token-broker.alerts",
    }
    rules = [rule for group in groups["groups"] for rule in group["rules"]]
    assert len(rules) >= 10

    # Every series a rule reads exists (a typo in a name or a label value reads nothing,
    # silently), and every label a rule groups or matches by is on the series it reads.
    missing: list[str] = []
    for rule in rules:
        query = rule["query"]
        read = selectors(query)
        labels_read: set[str] = set()
        for name, selector in read:
            series = await prometheus.api("/api/v1/series", **{"match[]": name})
            labels_read |= {label for labels in series for label in labels}
            if not await prometheus.query(selector):
                missing.append(f"{rule['name']}: {selector} selects nothing")
        for label in sorted(grouping_labels(query) - labels_read):
            missing.append(f"{rule['name']}: label {label!r} is on none of {read}")
    assert missing == [], "\n".join(missing)

    # Alerts this data raises: a connection became reauthorization_required (no `for`: firing
    # at once), and a token expires within 14 days (`for: 15m`: pending is enough). No other.
    expected_alerts = {
        "QboBrokerConnectionsNeedReauthorization": {"cause": "revoked_at_intuit"},
        "QboBrokerRefreshTokensExpiring": {"within": "14d"},
    }

    async def active_alerts() -> list[dict[str, Any]] | None:
        data = await prometheus.api("/api/v1/alerts")
        return None if data is None else list(data["alerts"])

    def raised(alerts: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
        """alertname -> the labels the test expects of it (any other alert: all its labels)."""
        found = {}
        for alert in alerts:
            labels = dict(alert["labels"])
            name = labels.pop("alertname")
            wanted = expected_alerts.get(name)
            found[name] = labels if wanted is None else {k: labels.get(k, "") for k in wanted}
        return found

    alerts = await prometheus.wait_for(
        "exactly the expected alerts pending or firing",
        active_alerts,
        lambda alerts: raised(alerts) == expected_alerts,
    )
    for alert in alerts:
        for text in alert["annotations"].values():
            assert "<no value>" not in text, f"{alert['labels']['alertname']}: {text}"
        if alert["labels"]["alertname"] == "QboBrokerConnectionsNeedReauthorization":
            assert alert["state"] == "firing"
    print(
        "alerts: "
        + ", ".join(f"{a['labels']['alertname']} {a['state']}" for a in alerts)
        + f" ({time.monotonic() - prometheus.started:.2f} s after Prometheus started)"
    )
