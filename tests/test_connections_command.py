"""``qbo-broker connections``: the operator's view of the connections, against real rows.

Rows are written straight into ``quickbooks_connections`` (as a hand-written
runbook query would), with ages measured from the test's own clock plus a few
hours, so a whole-day figure cannot flip while the command runs. The command
runs in-process (``run_connections_command``, the CLI's runner) on a thread of
its own, since it calls ``asyncio.run``; stdout is captured with ``capsys``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import sys
import unicodedata
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.connections_command import (
    EXIT_DATABASE,
    EXIT_OK,
    METHOD,
    PAGE,
    parse,
    run_connections_command,
)
from broker.errors import ConfigurationError
from broker.settings import Settings
from broker.storage import database as database_module
from broker.storage.embedded import EmbeddedPostgres
from tests.conftest import throwaway_database
from tests.support import RunningBroker

DAYS = timedelta(days=1)
SLACK = timedelta(hours=3)
"""Added to every seeded age and expiry: whole days stay whole while the command runs."""
CONNECTION_KEYS = {
    "realm_id",
    "user_id",
    "status",
    "refresh_token_age_days",
    "refresh_token_created_at",
    "refresh_token_expires_at",
    "refresh_token_expires_in_days",
    "reconnect_deadline",
    "access_token_expires_at",
    "last_refreshed_at",
    "last_used_at",
    "lost_cause",
    "last_error",
}
HISTOGRAM_LABELS = [
    "0-1 days",
    "1-7 days",
    "7-14 days",
    "14-30 days",
    "30-45 days",
    "45-60 days",
    "60-75 days",
    "75-90 days",
    "90-101 days",
    "over 101 days",
    "unknown",
]


# -- helpers --------------------------------------------------------------------------


async def seed(
    db: asyncpg.Connection,
    realm_id: str,
    *,
    user_id: str | None = None,
    status: str = "active",
    age_days: float | None = 10,
    expires_in_days: float | None = 91,
    deadline_in_days: float | None = 1500,
    last_refreshed_days_ago: float | None = 1,
    last_used_days_ago: float | None = 0,
    last_error: str | None = None,
    lost_cause: str | None = None,
    tokens: tuple[bytes, bytes] | None = None,
) -> None:
    now = datetime.now(UTC)

    def ago(days: float | None) -> datetime | None:
        return None if days is None else now - days * DAYS - SLACK

    def ahead(days: float | None) -> datetime | None:
        return None if days is None else now + days * DAYS + (SLACK if days >= 0 else -SLACK)

    await db.execute(
        """INSERT INTO quickbooks_connections (
               realm_id, user_id, status, access_token, refresh_token, encryption_key_id,
               access_token_expires_at, refresh_token_created_at, refresh_token_expires_at,
               reconnect_deadline, last_refreshed_at, last_used_at, last_error, lost_cause)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)""",
        realm_id,
        user_id or f"user-{realm_id}",
        status,
        tokens[0] if tokens else None,
        tokens[1] if tokens else None,
        "test1" if tokens else None,
        now + timedelta(minutes=30) if tokens else None,
        ago(age_days),
        ahead(expires_in_days),
        ahead(deadline_in_days),
        ago(last_refreshed_days_ago),
        ago(last_used_days_ago),
        last_error,
        lost_cause,
    )


async def run(settings: Settings, *argv: str) -> int:
    """The command as ``qbo-broker connections ARGV`` runs it (its own event loop)."""
    return await asyncio.to_thread(run_connections_command, settings, parse(argv))


async def listing(
    settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> dict[str, Any]:
    """The JSON document of ``connections --json ARGV``."""
    assert await run(settings, "--json", *argv) == EXIT_OK
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


async def realms(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    document = await listing(settings, capsys, *argv)
    return [connection["realm_id"] for connection in document["connections"]]


async def text(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert await run(settings, *argv) == EXIT_OK
    return capsys.readouterr().out


def histogram(output: str) -> dict[str, tuple[int, int]]:
    """label -> (count, bar length), read back from the text output."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Refresh-token age"))
    found: dict[str, tuple[int, int]] = {}
    for line in lines[start + 1 : start + 1 + len(HISTOGRAM_LABELS)]:
        match = re.fullmatch(r"  (\S.*?)\s+([\d,]+)(?: (#+))?", line)
        assert match, line
        found[match.group(1)] = (int(match.group(2).replace(",", "")), len(match.group(3) or ""))
    return found


def section(output: str, title: str) -> dict[str, int]:
    """The 'name  count' lines under ``title``."""
    lines = output.splitlines()
    start = lines.index(title)
    found: dict[str, int] = {}
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        name, count = line.strip().rsplit(None, 1)
        found[name.strip()] = int(count.replace(",", ""))
    return found


def columns(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in line)


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column terminal (shutil.get_terminal_size reads COLUMNS first)."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")


# -- the table ------------------------------------------------------------------------


@pytest.mark.usefixtures("narrow")
async def test_the_table_shows_each_connection_by_realm_in_80_columns(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(db, "3003", user_id="carol", age_days=35, expires_in_days=66)
    await seed(db, "1001", user_id="alice", age_days=None, expires_in_days=None)
    await seed(
        db,
        "2002",
        user_id="bob",
        status="reauthorization_required",
        age_days=120,
        expires_in_days=-19,
        deadline_in_days=None,
        last_used_days_ago=None,
        last_error="invalid_grant: Token invalid",
        lost_cause="expired",
    )

    output = await text(settings, capsys)

    lines = output.splitlines()
    assert " ".join(lines[0].split()) == "REALM USER STATUS AGE (d) EXPIRES IN DEADLINE"
    first = [line.split()[0] for line in lines if re.match(r"\d{4} ", line)]
    assert first == ["1001", "2002", "3003"]
    alice = next(line for line in lines if line.startswith("1001 "))
    assert alice.split()[1:5] == ["alice", "active", "unknown", "unknown"]
    bob = lines.index(next(line for line in lines if line.startswith("2002 ")))
    assert " ".join(lines[bob].split()) == "2002 bob reauth 120 expired 19 days ago unknown"
    assert lines[bob + 1].split() == [
        "refreshed",
        (datetime.now(UTC) - DAYS - SLACK).date().isoformat(),
        "used",
        "never",
        "lost",
        "expired",
    ]
    assert lines[bob + 2] == "  error invalid_grant: Token invalid"
    carol = next(line for line in lines if line.startswith("3003 "))
    deadline = (datetime.now(UTC) + 1500 * DAYS + SLACK).date().isoformat()
    assert carol.split()[1:] == ["carol", "active", "35", "66", "days", deadline]
    assert "3 connections. Dates UTC." in lines
    assert all(columns(line) <= 80 for line in lines), output
    assert "\033[" not in output  # no colour when stdout is not a terminal


async def test_a_wide_terminal_shows_a_connection_on_one_line(
    db: asyncpg.Connection,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    await seed(db, "1001", last_error="x" * 300, lost_cause="lost_in_flight")
    await seed(db, "1002")

    lines = (await text(settings, capsys)).splitlines()

    rows = [line for line in lines if line.startswith("100")]
    assert len(rows) == 2
    assert "LAST ERROR" in lines[0]
    assert "lost_in_flight" in rows[0]
    assert rows[0].endswith("x…")
    assert all(columns(line) <= 160 for line in lines)


@pytest.mark.usefixtures("narrow")
async def test_anything_a_row_may_hold_still_fits_80_columns(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(
        db,
        "R" * 64,
        user_id="an-exceedingly-long-user-identifier@some-very-long-domain.example.com",
        status="revoked",
        age_days=1000,
        expires_in_days=-9999,
        last_error="line one\nline two\x1b[31m red \t" + "e" * 400,
        lost_cause="revoked_at_intuit",
    )
    await seed(db, "wide", user_id="顧客顧客顧客顧客顧客顧客", age_days=0.2, expires_in_days=0.2)
    for n in range(30):
        await seed(db, f"realm-{n:03}", age_days=n * 4, expires_in_days=101 - n * 4)

    output = await text(settings, capsys, "--limit", "0")

    assert all(columns(line) <= 80 for line in output.splitlines()), output
    assert "\x1b" not in output  # a control character in a row never reaches the terminal
    assert "expired 9999 days ago" in output
    assert "R" * 18 + "…" in output
    wide = next(line for line in output.splitlines() if line.startswith("wide "))
    assert "<1 day" in wide
    assert " 0 " in wide


# -- filters, sorting, limit ----------------------------------------------------------


async def test_the_filters_narrow_the_list(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(db, "a-young", user_id="ann", age_days=5, expires_in_days=96)
    await seed(db, "b-old", user_id="ann", age_days=95, expires_in_days=6)
    await seed(db, "c-unknown", user_id="ben", age_days=None, expires_in_days=None)
    await seed(db, "d-expired", user_id="ben", age_days=110, expires_in_days=-9)
    lost = "reauthorization_required"
    await seed(db, "e-lost", user_id="cy", status=lost, age_days=60, expires_in_days=41)
    await seed(db, "f-gone", user_id="cy", status="revoked", age_days=None, expires_in_days=None)

    assert await realms(settings, capsys) == [
        "a-young",
        "b-old",
        "c-unknown",
        "d-expired",
        "e-lost",
        "f-gone",
    ]
    assert await realms(settings, capsys, "--status", "active") == [
        "a-young",
        "b-old",
        "c-unknown",
        "d-expired",
    ]
    assert await realms(settings, capsys, "--status", "revoked") == ["f-gone"]
    assert await realms(settings, capsys, "--status", "reauthorization_required") == ["e-lost"]
    assert await realms(settings, capsys, "--user", "ben") == ["c-unknown", "d-expired"]
    assert await realms(settings, capsys, "--user", "be") == []  # exact, not a prefix
    assert await realms(settings, capsys, "--realm", "b-old") == ["b-old"]
    assert await realms(settings, capsys, "--realm", "b-ol") == []
    # At least this old; unknown ages count as the oldest.
    assert await realms(settings, capsys, "--older-than", "60") == [
        "b-old",
        "c-unknown",
        "d-expired",
        "e-lost",
        "f-gone",
    ]
    assert await realms(settings, capsys, "--older-than", "61") == [
        "b-old",
        "c-unknown",
        "d-expired",
        "f-gone",
    ]
    # Expiring within N days, the expired included, unknown expiries not.
    assert await realms(settings, capsys, "--expiring-within", "7") == ["b-old", "d-expired"]
    assert await realms(settings, capsys, "--expiring-within", "0") == ["d-expired"]
    assert await realms(
        settings, capsys, "--status", "active", "--user", "ann", "--older-than", "30"
    ) == ["b-old"]


async def test_no_match_says_so(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await text(settings, capsys)).startswith("no connections\n")
    await seed(db, "1001")
    output = await text(settings, capsys, "--user", "nobody")
    assert output.startswith("no connection matches\n")
    assert "Connections by status:" in output  # the fleet is still shown


async def test_sorting_by_age_expiry_and_deadline(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(db, "r1", age_days=10, expires_in_days=30, deadline_in_days=None)
    await seed(db, "r2", age_days=None, expires_in_days=None, deadline_in_days=20)
    await seed(db, "r3", age_days=80, expires_in_days=5, deadline_in_days=400)
    await seed(db, "r4", age_days=40, expires_in_days=-3, deadline_in_days=10)
    await seed(db, "r5", age_days=None, expires_in_days=60, deadline_in_days=None)

    assert await realms(settings, capsys) == ["r1", "r2", "r3", "r4", "r5"]
    assert await realms(settings, capsys, "--sort", "realm") == ["r1", "r2", "r3", "r4", "r5"]
    # Oldest first, unknown ages first of all (ties by realm).
    assert await realms(settings, capsys, "--sort", "age") == ["r2", "r5", "r3", "r4", "r1"]
    # Soonest expiry first, unknown first.
    assert await realms(settings, capsys, "--sort", "expiry") == ["r2", "r4", "r3", "r1", "r5"]
    # Soonest deadline first, unknown last.
    assert await realms(settings, capsys, "--sort", "deadline") == ["r4", "r2", "r3", "r1", "r5"]
    assert await realms(settings, capsys, "--sort", "age", "--limit", "2") == ["r2", "r5"]


async def test_the_limit_and_pages_beyond_it(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    total = PAGE * 2 + 7  # more than one page of the cursor
    await db.execute(
        """INSERT INTO quickbooks_connections (realm_id, user_id, refresh_token_created_at)
           SELECT 'realm-' || lpad(n::text, 5, '0'), 'user-' || n, now() - n * interval '1 hour'
           FROM generate_series(1, $1) AS n""",
        total,
    )
    everything = [f"realm-{n:05}" for n in range(1, total + 1)]

    default = await listing(settings, capsys)
    assert [c["realm_id"] for c in default["connections"]] == everything[:50]
    assert default["truncated"] is True
    assert await realms(settings, capsys, "--limit", "3") == everything[:3]
    whole = await listing(settings, capsys, "--limit", "0")
    assert [c["realm_id"] for c in whole["connections"]] == everything
    assert whole["truncated"] is False
    exact = await listing(settings, capsys, "--limit", str(total))
    assert len(exact["connections"]) == total
    assert exact["truncated"] is False
    oldest = await realms(settings, capsys, "--limit", "0", "--sort", "age")
    assert oldest == everything[::-1]

    shown = await text(settings, capsys, "--limit", "4")
    assert [line.split()[0] for line in shown.splitlines() if line.startswith("realm-")] == (
        everything[:4]
    )
    assert "first 4 shown; more match (--limit 0 shows all). Dates UTC." in shown


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--limit", "-1"], "must be 0 or more"),
        (["--older-than", "x"], "not a whole number"),
        (["--status", "lost"], "invalid choice"),
        (["--sort", "user"], "invalid choice"),
    ],
)
def test_bad_options_are_exit_2(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_help_says_what_it_shows_and_how_it_ends(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        parse(["--help"])
    shown = capsys.readouterr().out
    for option in (
        "--status",
        "--user",
        "--realm",
        "--older-than",
        "--expiring-within",
        "--limit",
        "--sort",
        "--json",
    ):
        assert option in shown
    for words in (
        "histogram",
        "reconnect",
        "BROKER_DATABASE_URL",
        "BROKER_DATABASE_WAIT_SECONDS",
        "exit codes:",
        "run qbo-broker migrate",
        "audit event",
    ):
        assert words in shown


# -- the fleet ------------------------------------------------------------------------


AGES = {
    # age in days -> the histogram line it belongs to
    0.2: "0-1 days",
    3: "1-7 days",
    4: "1-7 days",
    6.5: "1-7 days",
    10: "7-14 days",
    20: "14-30 days",
    29: "14-30 days",
    35: "30-45 days",
    50: "45-60 days",
    65: "60-75 days",
    80: "75-90 days",
    95: "90-101 days",
    120: "over 101 days",
    400: "over 101 days",
}


@pytest.mark.usefixtures("narrow")
async def test_the_histogram_counts_the_seeded_ages(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    for n, age in enumerate(AGES):
        await seed(db, f"a{n}", age_days=age)
    for n in range(20):  # the biggest bucket
        await seed(db, f"b{n}", age_days=2)
    for n in range(2):
        await seed(db, f"u{n}", age_days=None)
    # Not active: in the status counts, never in the histogram.
    await seed(db, "lost", status="reauthorization_required", age_days=3)
    await seed(db, "gone", status="revoked", age_days=None)
    expected = dict.fromkeys(HISTOGRAM_LABELS, 0)
    for label in AGES.values():
        expected[label] += 1
    expected["1-7 days"] += 20
    expected["unknown"] = 2

    output = await text(settings, capsys)

    found = histogram(output)
    assert {label: count for label, (count, _) in found.items()} == expected
    assert list(found) == HISTOGRAM_LABELS
    bars = {label: bar for label, (_, bar) in found.items()}
    assert bars["1-7 days"] == max(bars.values())
    assert bars["1-7 days"] > bars["over 101 days"] > bars["0-1 days"] >= 1
    assert all(bar == 0 for label, bar in bars.items() if expected[label] == 0)
    line = next(line for line in output.splitlines() if line.startswith("  1-7 days"))
    assert len(line) >= 70  # the biggest bar spans the terminal
    assert all(columns(line) <= 80 for line in output.splitlines())
    assert "Refresh-token age, 36 active connections (not filtered):" in output

    assert section(output, "Connections by status:") == {
        "active": 36,
        "reauthorization_required": 1,
        "revoked": 1,
        "all": 38,
    }

    document = await listing(settings, capsys, "--limit", "1")
    distribution = document["distribution"]
    assert distribution["active"] == 36
    assert distribution["unknown"] == 2
    assert [
        (bucket["from_days"], bucket["to_days"], bucket["count"])
        for bucket in distribution["buckets"]
    ] == [
        (0, 1, 1),
        (1, 7, 23),
        (7, 14, 1),
        (14, 30, 2),
        (30, 45, 1),
        (45, 60, 1),
        (60, 75, 1),
        (75, 90, 1),
        (90, 101, 1),
        (101, None, 2),
    ]


async def test_the_histogram_scales_to_the_terminal(
    db: asyncpg.Connection,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for n in range(3):
        await seed(db, f"r{n}", age_days=20)
    monkeypatch.setenv("COLUMNS", "80")
    narrow = histogram(await text(settings, capsys))["14-30 days"]
    monkeypatch.setenv("COLUMNS", "200")
    wide = histogram(await text(settings, capsys))["14-30 days"]
    assert narrow[0] == wide[0] == 3
    assert wide[1] - narrow[1] == 120


async def test_the_warnings_count_what_is_coming_due(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(db, "soon", expires_in_days=5, deadline_in_days=10)
    await seed(db, "expired", expires_in_days=-2, deadline_in_days=60)
    await seed(db, "fine", expires_in_days=80, deadline_in_days=200)
    await seed(db, "unknown", expires_in_days=None, deadline_in_days=None)
    # Not active: not counted.
    await seed(db, "lost", status="reauthorization_required", expires_in_days=1, deadline_in_days=1)

    output = await text(settings, capsys)
    assert section(output, "Active connections coming due:") == {
        "refresh token expires within 14 days": 2,
        "reconnect deadline within 30 days": 1,
        "reconnect deadline within 90 days": 2,
    }
    document = await listing(settings, capsys)
    assert document["expiring_within_14_days"] == 2
    assert document["reconnect_deadlines_within"] == {"30": 1, "90": 2}


# -- JSON -----------------------------------------------------------------------------


async def test_the_json_document(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(
        db,
        "1001",
        user_id="alice",
        age_days=35,
        expires_in_days=66,
        deadline_in_days=400,
        last_refreshed_days_ago=35,
        last_used_days_ago=2,
    )
    await seed(
        db,
        "1002",
        user_id="bob",
        status="reauthorization_required",
        age_days=None,
        expires_in_days=-4,
        deadline_in_days=None,
        last_refreshed_days_ago=None,
        last_used_days_ago=None,
        last_error='invalid_grant: "Token invalid"\nsecond line',
        lost_cause="revoked_at_intuit",
    )
    stored = {
        row["realm_id"]: row
        for row in await db.fetch(
            "SELECT realm_id, refresh_token_created_at, refresh_token_expires_at, "
            "reconnect_deadline, last_refreshed_at, last_used_at FROM quickbooks_connections"
        )
    }

    assert await run(settings, "--json") == EXIT_OK
    out = capsys.readouterr().out
    document = json.loads(out)

    assert out.endswith("}\n")
    assert "\033[" not in out
    assert not any(line.startswith(("REALM", "Connections by")) for line in out.splitlines())
    assert set(document) == {
        "generated_at",
        "connections",
        "truncated",
        "distribution",
        "by_status",
        "expiring_within_14_days",
        "reconnect_deadlines_within",
    }
    generated = datetime.fromisoformat(document["generated_at"])
    assert abs(generated - datetime.now(UTC)) < timedelta(minutes=1)
    alice, bob = document["connections"]
    assert set(alice) == set(bob) == CONNECTION_KEYS
    row = stored["1001"]
    assert alice == {
        "realm_id": "1001",
        "user_id": "alice",
        "status": "active",
        "refresh_token_age_days": 35,
        "refresh_token_created_at": row["refresh_token_created_at"].isoformat(),
        "refresh_token_expires_at": row["refresh_token_expires_at"].isoformat(),
        "refresh_token_expires_in_days": 66,
        "reconnect_deadline": row["reconnect_deadline"].isoformat(),
        "access_token_expires_at": None,
        "last_refreshed_at": row["last_refreshed_at"].isoformat(),
        "last_used_at": row["last_used_at"].isoformat(),
        "lost_cause": None,
        "last_error": None,
    }
    assert datetime.fromisoformat(alice["reconnect_deadline"]) == row["reconnect_deadline"]
    assert alice["refresh_token_created_at"].endswith("+00:00")
    assert bob == {
        "realm_id": "1002",
        "user_id": "bob",
        "status": "reauthorization_required",
        "refresh_token_age_days": None,
        "refresh_token_created_at": None,
        "refresh_token_expires_at": stored["1002"]["refresh_token_expires_at"].isoformat(),
        "refresh_token_expires_in_days": -4,
        "reconnect_deadline": None,
        "access_token_expires_at": None,
        "last_refreshed_at": None,
        "last_used_at": None,
        "lost_cause": "revoked_at_intuit",
        "last_error": 'invalid_grant: "Token invalid"\nsecond line',  # whole, as stored
    }
    assert document["truncated"] is False
    assert document["by_status"] == {"active": 1, "reauthorization_required": 1, "revoked": 0}
    assert document["distribution"]["active"] == 1
    assert document["distribution"]["unknown"] == 0
    assert document["expiring_within_14_days"] == 0
    assert document["reconnect_deadlines_within"] == {"30": 0, "90": 0}


async def test_an_empty_database_is_a_valid_document(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    document = await listing(settings, capsys)
    assert document["connections"] == []
    assert document["by_status"] == {"active": 0, "reauthorization_required": 0, "revoked": 0}
    assert [bucket["count"] for bucket in document["distribution"]["buckets"]] == [0] * 10


# -- secrets, audit, and nothing else -------------------------------------------------


async def test_never_a_token_and_no_key_ring(
    broker: RunningBroker,
    db: asyncpg.Connection,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Younger than the proactive age (30 days): GetAccessToken does not refresh it.
    await broker.seed("4620816365212858780", "alice", refresh_token_age=timedelta(days=20))
    issued = await broker.get_token("4620816365212858780")
    refresh = broker.intuit.model.current_refresh_token("4620816365212858780")
    assert refresh is not None
    plain = (b"PLAINTEXT-ACCESS-TOKEN-eyJhbGciOi", b"PLAINTEXT-REFRESH-AB11ZZ0099")
    await seed(db, "1001", tokens=plain)
    sealed = await db.fetch(
        "SELECT access_token, refresh_token FROM quickbooks_connections "
        "WHERE access_token IS NOT NULL"
    )
    secrets = {issued.access_token, refresh, *(value.decode() for value in plain)}
    for row in sealed:
        for value in (row["access_token"], row["refresh_token"]):
            secrets |= {value.hex(), base64.b64encode(value).decode(), value.hex()[:24]}

    def no_keys(settings: Settings) -> None:
        raise AssertionError("the connections command must not need the key ring")

    monkeypatch.setattr(database_module, "key_ring_for", no_keys)
    keyless = replace(settings, encryption_keys=None)

    for argv in ([], ["--json"], ["--realm", "4620816365212858780"], ["--json", "--limit", "0"]):
        assert await run(keyless, *argv) == EXIT_OK
        captured = capsys.readouterr()
        assert "4620816365212858780" in captured.out
        for secret in secrets:
            assert secret not in captured.out
            assert secret not in captured.err
    document = await listing(keyless, capsys)
    for connection in document["connections"]:
        assert set(connection) == CONNECTION_KEYS
    lines = (await text(keyless, capsys, "--realm", "4620816365212858780")).splitlines()
    alice = next(line for line in lines if line.startswith("4620816365212858780"))
    assert alice.split()[1:4] == ["alice", "active", "20"]


async def test_one_audit_event_and_nothing_else_is_written(
    db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(db, "1001")
    await seed(db, "1002", status="revoked")
    before = await db.fetch("SELECT * FROM quickbooks_connections ORDER BY realm_id")

    assert await run(settings) == EXIT_OK
    capsys.readouterr()

    audited = await db.fetch(
        "SELECT principal, method, realm_id, outcome, replica FROM broker_audit_events"
    )
    assert [(row["method"], row["realm_id"], row["outcome"]) for row in audited] == [
        (METHOD, None, "OK")
    ]
    assert audited[0]["principal"].startswith("cli:")
    assert audited[0]["replica"].endswith("/cli")
    assert await db.fetch("SELECT * FROM quickbooks_connections ORDER BY realm_id") == before
    assert await db.fetchval("SELECT count(*) FROM broker_fleet_stats") == 0

    assert await run(settings, "--json") == EXIT_OK
    capsys.readouterr()
    assert await db.fetchval("SELECT count(*) FROM broker_audit_events") == 2


# -- failures -------------------------------------------------------------------------


async def test_an_unreachable_database_is_exit_3(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = replace(
        settings,
        database_url="postgresql://broker:Pa55word@127.0.0.1:1/qbo_broker",
        database_wait=timedelta(0),
    )
    for argv in ([], ["--json"]):
        assert await run(unreachable, *argv) == EXIT_DATABASE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("qbo-broker connections: database error: ")
        assert "127.0.0.1:1" in captured.err
        assert "Pa55word" not in captured.err


async def test_a_database_never_migrated_is_exit_3_and_stays_untouched(
    postgres: EmbeddedPostgres, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with throwaway_database(postgres) as dsn:
        assert await run(replace(settings, database_url=dsn)) == EXIT_DATABASE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "run qbo-broker migrate" in captured.err
        empty = await asyncpg.connect(dsn)
        try:
            tables = await empty.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
        finally:
            await empty.close()
        assert tables == 0


def test_no_url_and_no_embedded_database_is_a_configuration_error(
    settings: Settings, tmp_path: Path
) -> None:
    nowhere = tmp_path / "nothing-here"
    with pytest.raises(ConfigurationError, match="BROKER_DATABASE_URL is not set"):
        run_connections_command(replace(settings, database_url=None, data_dir=nowhere), parse([]))
    assert not nowhere.exists()  # no database was created to be listed


class _ClosedPipe(io.StringIO):
    """stdout after `| head` has gone."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


async def test_a_reader_going_away_ends_the_listing_quietly(
    db: asyncpg.Connection,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed(db, "1001")
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert await run(settings, "--limit", "0") == EXIT_OK  # not a database error (exit 3)
    assert "database error" not in capsys.readouterr().err
