"""Generate the Grafana dashboard of qbo-token-broker with grafana-foundation-sdk.

    python tools/gen_dashboard.py          # write helm/qbo-token-broker/files/dashboards/...
    python tools/gen_dashboard.py --check  # exit 1 if the committed JSON is not what this makes

Two kinds of metric, queried differently (see helm/.../prometheus-rules.yaml):
fleet gauges come from the shared database and every replica exports the same
value, so they are combined with ``max`` and filtered by job only; per-replica
metrics are summed and can be narrowed to some instances.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    heatmap,
    prometheus,
    stat,
    statetimeline,
    timeseries,
)
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "helm" / "qbo-token-broker" / "files" / "dashboards" / "qbo-token-broker.json"
UID = "qbo-token-broker"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
FLEET = 'job=~"$job"'
"""Selector of the fleet gauges: the same value on every replica, so no instance filter."""
REPLICA = 'job=~"$job", instance=~"$instance"'
"""Selector of the per-replica metrics."""

DAY = 86400
AGE_BUCKET_DAYS = (1, 7, 14, 30, 45, 60, 75, 90, 101)
"""Upper bounds of the refresh-token age gauge histogram, in days (then +Inf)."""
Target = prometheus.Dataquery
PanelBuilder = timeseries.Panel | stat.Panel | heatmap.Panel | bargauge.Panel | statetimeline.Panel


def query(
    expr: str,
    legend: str = "",
    *,
    ref: str = "A",
    instant: bool = False,
    fmt: pm.PromQueryFormat = pm.PromQueryFormat.TIME_SERIES,
) -> Target:
    target = prometheus.Dataquery().expr(expr).ref_id(ref).format(fmt).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    return target.instant() if instant else target.range()


def thresholds(*steps: tuple[float | None, str]) -> dash.ThresholdsConfig:
    return (
        dash.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def legend_table(*calcs: str) -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .display_mode(cm.LegendDisplayMode.TABLE)
        .placement(cm.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def graph(
    title: str,
    description: str,
    targets: Sequence[Target],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    bars: bool = False,
    stacked: bool = False,
    line_at: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .min(0)
        .span(width)
        .height(height)
        .legend(legend_table("lastNotNull", "max"))
        .tooltip(
            common.VizTooltipOptions()
            .mode(cm.TooltipDisplayMode.MULTI)
            .sort(cm.SortOrder.DESCENDING)
        )
        .fill_opacity(10)
    )
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
    if line_at is not None:
        panel = panel.thresholds(thresholds((None, "green"), (line_at, "red"))).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    return panel


def single(
    title: str,
    description: str,
    targets: Sequence[Target],
    steps: Sequence[tuple[float | None, str]],
    *,
    unit: str = "short",
    width: int = 4,
    height: int = 8,
    sparkline: bool = True,
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .span(width)
        .height(height)
        .thresholds(thresholds(*steps))
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.AREA if sparkline else cm.BigValueGraphMode.NONE)
        .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def quantiles(metric: str, by: str, selector: str) -> list[Target]:
    return [
        query(
            f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
            ref=ref,
        )
        for q, ref in ((0.5, "A"), (0.99, "B"))
    ]


def age_bucket_names() -> list[cogbuilder.Builder[dm.DashboardFieldConfigSourceOverrides]]:
    """Name the age buckets in days; `le` is "86400" in Prometheus 2, "86400.0" in 3."""
    names = [(rf"^{days * DAY}(\.0)?$", f"≤ {days} d") for days in AGE_BUCKET_DAYS]
    names.append((r"^\+Inf$", f"> {AGE_BUCKET_DAYS[-1]} d or unknown"))
    return [
        dash.DashboardFieldConfigSourceOverrides()
        .matcher(dm.MatcherConfig(id_val="byRegexp", options=pattern))
        .properties([dm.DynamicConfigValue(id_val="displayName", value=name)])
        for pattern, name in names
    ]


def fleet_health() -> list[PanelBuilder]:
    return [
        single(
            "Connections by status",
            "Connections in the database by status, now (fleet gauge: max over replicas). "
            "reauthorization_required: the customer must reconnect; revoked: disconnected on "
            "purpose.",
            [query(f"max by (status) (qbo_broker_connections{{{FLEET}}})", "{{status}}")],
            [(None, "blue")],
            width=6,
        ),
        graph(
            "Connections by status over time",
            "Connections by status (fleet gauge). A rise of reauthorization_required means "
            "connections were lost: see the panel beside.",
            [query(f"max by (status) (qbo_broker_connections{{{FLEET}}})", "{{status}}")],
            width=9,
        ),
        graph(
            "Connections lost per hour, by cause",
            "Connections that became reauthorization_required in the preceding hour, summed "
            "over replicas. lost_in_flight is the broker's own fault (critical alert); "
            "revoked_at_intuit, expired and hard_limit come from the customer or from age.",
            [
                query(
                    "sum by (cause) "
                    f"(increase(qbo_broker_connections_lost_total{{{REPLICA}}}[1h]))",
                    "{{cause}}",
                )
            ],
            width=9,
            bars=True,
            stacked=True,
        ),
        graph(
            "Tokens held only in memory",
            "Rotated refresh tokens a replica could not write to the database yet. Above 0 for "
            "minutes is critical: if that replica stops, those connections are lost.",
            [query(f"qbo_broker_unstored_tokens{{{REPLICA}}}", "{{instance}}")],
            width=8,
            line_at=1,
        ),
        statetimeline.Panel()
        .title("Database reachable, by replica")
        .description(
            "qbo_broker_database_up per replica: whether it reaches PostgreSQL. While down a "
            "replica serves only tokens still valid in memory and stores nothing."
        )
        .datasource(DATASOURCE)
        .targets([query(f"qbo_broker_database_up{{{REPLICA}}}", "{{instance}}")])
        .mappings(
            [
                dm.ValueMap(
                    options={
                        "0": dm.ValueMappingResult(text="down", color="red", index=0),
                        "1": dm.ValueMappingResult(text="up", color="green", index=1),
                    }
                )
            ]
        )
        .thresholds(thresholds((None, "red"), (1, "green")))
        .span(8)
        .height(8),
        single(
            "Replicas up",
            "Replicas Prometheus scrapes successfully (up == 1) out of all it knows.",
            [
                query(f"sum(up{{{FLEET}}})", "up", ref="A"),
                query(f"count(up{{{FLEET}}})", "known", ref="B"),
            ],
            [(None, "red"), (1, "green")],
            height=8,
        ),
        single(
            "Fleet figures age",
            "How old the fleet gauges are (qbo_broker_fleet_stats_timestamp_seconds): they are "
            "computed from the database, cached a few seconds. A growing age means no replica "
            "can read the database.",
            [query(f"time() - max(qbo_broker_fleet_stats_timestamp_seconds{{{FLEET}}})", "age")],
            [(None, "green"), (120, "orange"), (600, "red")],
            unit="s",
            height=8,
        ),
    ]


def token_ages() -> list[PanelBuilder]:
    age_buckets = f"max by (le) (qbo_broker_refresh_token_age_seconds_bucket{{{FLEET}}})"
    return [
        heatmap.Panel()
        .title("Refresh-token age distribution")
        .description(
            "Active connections by the age of their refresh token, over time (the "
            "qbo_broker_refresh_token_age_seconds gauge histogram, max over replicas). Buckets: "
            "1, 7, 14, 30, 45, 60, 75, 90, 101 days; unknown ages count in +Inf. Intuit lets "
            "a refresh token die after ~101 days: nothing should reach the top rows."
        )
        .datasource(DATASOURCE)
        .targets([query(age_buckets, "{{le}}", fmt=pm.PromQueryFormat.HEATMAP)])
        .calculate(False)
        .interval("5m")
        .y_axis(heatmap.YAxisConfig().unit("s").decimals(0))
        .cell_values(heatmap.CellValues().unit("short"))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .mode(cm.TooltipDisplayMode.SINGLE)
        .show_y_histogram()
        .show_legend()
        .span(14)
        .height(10),
        bargauge.Panel()
        .title("Refresh-token ages now")
        .description(
            "Active connections per refresh-token age bucket at the end of the range (upper "
            "bound shown). Tokens in the 90-101 day and +Inf buckets are close to expiry or of "
            "unknown age."
        )
        .datasource(DATASOURCE)
        .targets([query(age_buckets, "{{le}}", instant=True, fmt=pm.PromQueryFormat.HEATMAP)])
        .overrides(age_bucket_names())
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(thresholds((None, "green")))
        .min(0)
        .span(10)
        .height(10),
        single(
            "Expiring within 14 days",
            "Active connections whose refresh token expires within 14 days "
            "(qbo_broker_refresh_tokens_expiring). Anything above 0 alerts: the sweep should "
            "have renewed them at 60 days.",
            [query(f'max(qbo_broker_refresh_tokens_expiring{{{FLEET}, within="14d"}})', "14d")],
            [(None, "green"), (1, "red")],
            width=4,
            height=8,
        ),
        single(
            "Older than 90 days",
            "Active connections whose refresh token is older than 90 days or of unknown age "
            "(the +Inf bucket minus the 90-day bucket).",
            [
                query(
                    f'max(qbo_broker_refresh_token_age_seconds_bucket{{{FLEET}, le="+Inf"}}) - '
                    f"max(qbo_broker_refresh_token_age_seconds_bucket"
                    f'{{{FLEET}, le=~"7776000(\\\\.0)?"}})',
                    "> 90 days",
                )
            ],
            [(None, "green"), (1, "orange")],
            width=4,
            height=8,
        ),
        graph(
            "Expiring soon and reconnect deadlines",
            "Active connections whose refresh token expires within 14 days, and whose hard "
            "five-year reconnect deadline falls within 30 or 90 days (no refresh moves it: the "
            "customer must reconnect). Fleet gauges, max over replicas.",
            [
                query(
                    f'max(qbo_broker_refresh_tokens_expiring{{{FLEET}, within="14d"}})',
                    "refresh token expires within 14d",
                    ref="A",
                ),
                query(
                    f"max by (within) (qbo_broker_reconnect_deadlines_approaching{{{FLEET}}})",
                    "reconnect deadline within {{within}}",
                    ref="B",
                ),
            ],
            width=16,
        ),
    ]


def refreshes() -> list[PanelBuilder]:
    return [
        graph(
            "Token refreshes by trigger and outcome",
            "Refreshes that reached Intuit per second, summed over the selected replicas. "
            "access_expiry: a caller needed a fresh access token; proactive: the refresh token "
            "was old; sweep: the background sweep; manual: RefreshConnection.",
            [
                query(
                    "sum by (trigger, outcome) "
                    f"(rate(qbo_broker_token_refreshes_total{{{REPLICA}}}[$__rate_interval]))",
                    "{{trigger}} {{outcome}}",
                )
            ],
            unit="ops",
            width=14,
            stacked=True,
        ),
        graph(
            "Refresh failure ratio (15m)",
            "Share of refreshes over 15 minutes that did not succeed (invalid_grant or "
            "upstream_error). The alert fires above 20% when there were at least 10 refreshes.",
            [
                query(
                    f'sum(rate(qbo_broker_token_refreshes_total{{{REPLICA}, outcome!="success"}}'
                    f"[15m])) / sum(rate(qbo_broker_token_refreshes_total{{{REPLICA}}}[15m]))",
                    "failure ratio",
                )
            ],
            unit="percentunit",
            width=10,
            line_at=0.2,
        ),
    ]


def sweep() -> list[PanelBuilder]:
    return [
        graph(
            "Sweep runs per hour, by kind and outcome",
            "Sweep runs that ended in the preceding hour, summed over replicas. skipped: not "
            "needed or a sibling was sweeping; interrupted: shutdown; aborted: five Intuit "
            "failures in a row.",
            [
                query(
                    "sum by (kind, outcome) "
                    f"(increase(qbo_broker_sweep_runs_total{{{REPLICA}}}[1h]))",
                    "{{kind}} {{outcome}}",
                )
            ],
            width=12,
            bars=True,
            stacked=True,
        ),
        bargauge.Panel()
        .title("Sweep runs in the range")
        .description("Sweep runs over the whole time range, by kind and outcome.")
        .datasource(DATASOURCE)
        .targets(
            [
                query(
                    "sum by (kind, outcome) "
                    f"(increase(qbo_broker_sweep_runs_total{{{REPLICA}}}[$__range]))",
                    "{{kind}} {{outcome}}",
                    instant=True,
                )
            ]
        )
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(thresholds((None, "blue")))
        .decimals(0)
        .min(0)
        .span(6)
        .height(8),
        single(
            "Since the last completed sweep",
            "Time since the last sweep that ran to completion, on any replica "
            "(qbo_broker_sweep_last_success_timestamp_seconds). The schedule is weekly by "
            "default; the alert fires after 8 days.",
            [
                query(
                    f"time() - max(qbo_broker_sweep_last_success_timestamp_seconds{{{FLEET}}})",
                    "since last success",
                )
            ],
            [(None, "green"), (7 * DAY + 6 * 3600, "orange"), (8 * DAY, "red")],
            unit="s",
            width=6,
            height=8,
        ),
    ]


def grpc() -> list[PanelBuilder]:
    handled = "grpc_server_handled_total"
    return [
        graph(
            "gRPC requests by method and code",
            "Requests handled per second by method and status code, summed over the selected "
            "replicas. FAILED_PRECONDITION: the connection needs reauthorization; UNAVAILABLE: "
            "Intuit or the database unavailable; INTERNAL: see the Intuit client alert.",
            [
                query(
                    "sum by (grpc_method, grpc_code) "
                    f"(rate({handled}{{{REPLICA}}}[$__rate_interval]))",
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            unit="reqps",
            width=8,
            stacked=True,
        ),
        graph(
            "gRPC errors by method and code",
            "Requests that did not end OK, per second, by method and code.",
            [
                query(
                    "sum by (grpc_method, grpc_code) "
                    f'(rate({handled}{{{REPLICA}, grpc_code!="OK"}}[$__rate_interval]))',
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            unit="reqps",
            width=8,
        ),
        graph(
            "gRPC latency p50 / p99, by method",
            "Server handling time quantiles per method from grpc_server_handling_seconds, "
            "over the selected replicas. GetAccessToken answers from memory unless it "
            "has to refresh at Intuit.",
            quantiles("grpc_server_handling_seconds", "grpc_method", REPLICA),
            unit="s",
            width=8,
        ),
    ]


def intuit() -> list[PanelBuilder]:
    requests = "qbo_broker_intuit_requests_total"
    return [
        graph(
            "Intuit requests by endpoint and outcome",
            "Requests to Intuit's OAuth endpoints per second, summed over the selected replicas.",
            [
                query(
                    f"sum by (endpoint, outcome) (rate({requests}{{{REPLICA}}}[$__rate_interval]))",
                    "{{endpoint}} {{outcome}}",
                )
            ],
            unit="reqps",
            width=8,
            stacked=True,
        ),
        graph(
            "Intuit errors",
            "Requests to Intuit that did not succeed, per second. client_rejected: Intuit "
            "refuses the broker's client id/secret (critical); throttled, server_error, "
            "timeout, network_error, bad_response: Intuit trouble, retried with backoff; "
            "invalid_grant: a connection needs reauthorization.",
            [
                query(
                    "sum by (endpoint, outcome) "
                    f'(rate({requests}{{{REPLICA}, outcome!="success"}}[$__rate_interval]))',
                    "{{endpoint}} {{outcome}}",
                )
            ],
            unit="reqps",
            width=8,
        ),
        graph(
            "Intuit latency p50 / p99, by endpoint",
            "Duration of requests to Intuit per endpoint "
            "(qbo_broker_intuit_request_duration_seconds), over the selected replicas.",
            quantiles("qbo_broker_intuit_request_duration_seconds", "endpoint", REPLICA),
            unit="s",
            width=8,
        ),
    ]


def cache() -> list[PanelBuilder]:
    lookups = "qbo_broker_token_cache_lookups_total"
    return [
        graph(
            "Token cache hit ratio",
            "Share of access-token lookups answered from the in-memory cache, over all "
            "selected replicas and per replica. A drop after a restart is expected; a "
            "lasting drop means the change feed is down or tokens are refreshed too often.",
            [
                query(
                    f'sum(rate({lookups}{{{REPLICA}, result="hit"}}[$__rate_interval])) / '
                    f"sum(rate({lookups}{{{REPLICA}}}[$__rate_interval]))",
                    "all replicas",
                    ref="A",
                ),
                query(
                    f'sum by (instance) (rate({lookups}{{{REPLICA}, result="hit"}}'
                    "[$__rate_interval])) / "
                    f"sum by (instance) (rate({lookups}{{{REPLICA}}}[$__rate_interval]))",
                    "{{instance}}",
                    ref="B",
                ),
            ],
            unit="percentunit",
            width=12,
        ),
        graph(
            "Token cache lookups by result",
            "Cache lookups per second by result (hit, miss), summed over the selected replicas.",
            [
                query(
                    f"sum by (result) (rate({lookups}{{{REPLICA}}}[$__rate_interval]))",
                    "{{result}}",
                )
            ],
            unit="ops",
            width=12,
            stacked=True,
        ),
    ]


def build() -> dm.Dashboard:
    rows = (
        ("Fleet health", fleet_health()),
        ("Token ages", token_ages()),
        ("Refreshes", refreshes()),
        ("Sweep", sweep()),
        ("gRPC", grpc()),
        ("Intuit", intuit()),
        ("Cache", cache()),
    )
    board = (
        dash.Dashboard("QBO token broker")
        .uid(UID)
        .description(
            "qbo-token-broker: QuickBooks Online OAuth connections, token ages, refreshes, "
            "the sweep, gRPC and Intuit traffic. Generated by tools/gen_dashboard.py; "
            "runbook: docs/runbook.md."
        )
        .tags(["qbo-token-broker", "quickbooks", "oauth"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-24h", "now")
        .refresh("1m")
        .timezone("utc")
        .with_variable(
            dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dash.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(qbo_broker_build_info, job)")
            .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .current(dm.VariableOption(text="qbo-token-broker", value="qbo-token-broker"))
        )
        .with_variable(
            dash.QueryVariable("instance")
            .label("Replica")
            .datasource(DATASOURCE)
            .query('label_values(qbo_broker_build_info{job=~"$job"}, instance)')
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(text="All", value="$__all"))
        )
        .annotation(
            dash.AnnotationQuery()
            .name("qbo-token-broker alerts")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr('ALERTS{alertname=~"QboBroker.*", alertstate="firing"}')
        )
    )
    panel_id = 0
    for title, panels in rows:
        panel_id += 1
        board = board.with_row(dash.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    return board.build()


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(build()) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    options = parser.parse_args(argv)
    text = render()
    if options.check:
        committed = TARGET.read_text(encoding="utf-8") if TARGET.exists() else None
        if committed != text:
            where = TARGET.relative_to(ROOT)
            state = "is missing" if committed is None else "differs from what it would generate"
            print(f"{where} {state}; run python tools/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
