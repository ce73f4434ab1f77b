"""Structured logs: one JSON object a line (or plain text for a terminal).

Fields passed with ``extra=`` (``realm_id``, ``intuit_tid``, ``trigger``…)
become keys of the line. Tokens are never passed to a logger; the static
secrets the process knows (the Intuit client secret) are also scrubbed from
every line as a second line of defence.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class _Formatter(logging.Formatter):
    def __init__(self, *, as_json: bool, secrets: Iterable[str]) -> None:
        super().__init__()
        self._json = as_json
        self._secrets = [secret for secret in secrets if len(secret) >= 6]

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record.created),
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
        return self.line(fields)

    def line(self, fields: dict[str, Any]) -> str:
        """One line of ``fields`` (``ts``, ``level``, ``logger``, ``message`` first)."""
        if self._json:
            line = _ENCODER.encode(fields)
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


AUDIT_LOGGER = "broker.audit"
_TS_MARK = "@ts@"
_MAX_TEMPLATES = 4096
_templates: dict[tuple[Any, ...], str] = {}
"""Formatted lines of ``write_events`` with ``_TS_MARK`` for their time (reset by
``configure``, whose formatter made them)."""
_configured: logging.StreamHandler[TextIO] | None = None
"""The handler ``configure`` installed: events written in bulk go straight to it."""


def configure(level: str, fmt: str, *, secrets: Iterable[str] = ()) -> None:
    global _configured
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json=fmt == "json", secrets=secrets))
    _configured = handler
    _templates.clear()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The audit trail is not a diagnostic: BROKER_LOG_LEVEL=WARNING must not silence it.
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
    # aiohttp's access log would print every /metrics scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # pgserver narrates every initdb and pg_ctl call at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def write_events(logger_name: str, events: Iterable[tuple[float, dict[str, Any]]]) -> None:
    """Many INFO events (time, fields with a ``message``) in one write: the audit trail.

    Formatted exactly as the handler ``configure`` installed formats a log call,
    without building a LogRecord for each. Anywhere else (a test capturing logs)
    each event goes through ``logging`` as usual.
    """
    logger = logging.getLogger(logger_name)
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _configured
    root = logging.getLogger()
    if handler is None or root.handlers != [handler] or not logger.propagate:
        for _, fields in events:
            extra = {key: value for key, value in fields.items() if key != "message"}
            logger.info(fields["message"], extra=extra)
        return
    formatter = handler.formatter
    assert isinstance(formatter, _Formatter)
    lines = []
    for at, fields in events:
        # The same caller asks for the same realm all day: its line is formatted once (a
        # marker where the time goes, which comes first) and only the time is new.
        key = (logger_name, *fields.items())  # the values are strings or None
        template = _templates.get(key)
        if template is None:
            if len(_templates) >= _MAX_TEMPLATES:
                _templates.clear()
            template = _templates[key] = formatter.line(
                {"ts": _TS_MARK, "level": "info", "logger": logger_name, **fields}
            )
        lines.append(template.replace(_TS_MARK, _timestamp(at), 1))
    text = "\n".join(lines) + "\n" if lines else ""
    if text:
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        finally:
            handler.release()


def _timestamp(moment: float) -> str:
    """``2026-12-01T09:12:44.021+00:00`` (the second's text is reused: thousands a second)."""
    global _second, _second_text
    fraction, whole = math.modf(moment)  # rounded as datetime.fromtimestamp rounds
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if second != _second:
        _second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = second
    return f"{_second_text}.{micros // 1000:03d}+00:00"


_second = -1
_second_text = ""
_ENCODER = json.JSONEncoder(default=str)
