"""Structured logs: one JSON object a line (or plain text for a terminal).

Fields passed with ``extra=`` (``realm_id``, ``intuit_tid``, ``trigger``…)
become keys of the line. Tokens are never passed to a logger; the static
secrets the process knows (the Intuit client secret) are also scrubbed from
every line as a second line of defence.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class _Formatter(logging.Formatter):
    def __init__(self, *, as_json: bool, secrets: Iterable[str]) -> None:
        super().__init__()
        self._json = as_json
        self._secrets = [secret for secret in secrets if len(secret) >= 6]

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_") and value is not None
        )
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self._json:
            line = json.dumps(fields, default=str)
        else:
            extras = " ".join(
                f"{k}={v}"
                for k, v in fields.items()
                if k not in ("ts", "level", "logger", "message")
            )
            line = f"{fields['ts']} {fields['level']:<7} {fields['message']}" + (
                f"  {extras}" if extras else ""
            )
        for secret in self._secrets:
            line = line.replace(secret, "***")
        return line


def configure(level: str, fmt: str, *, secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json=fmt == "json", secrets=secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print every /metrics scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # pgserver narrates every initdb and pg_ctl call at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
