"""The access log: one line per request (key=value text, or one JSON object with gemini_log_json).

Its own handler on mitmdump's stdout, not mitmproxy's logging: every record on mitmproxy's loggers
is also formatted and re-dispatched to all addons as an `add_log` event from the event loop, which
measurably slowed each request.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .comments import comment
from .records import RequestRecord

access_log = logging.getLogger("gemini_proxy.access")
access_log.propagate = False


def install_access_log(stream: Any, level: int) -> None:
    """Send request lines to `stream` (mitmdump's stdout), formatted like mitmproxy's own lines."""
    if not access_log.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_AccessFormatter("[%(asctime)s.%(msecs)03d] %(message)s", "%H:%M:%S"))
        access_log.addHandler(handler)
    access_log.setLevel(level)


def log_request(rec: RequestRecord, as_json: bool) -> None:
    level = logging.WARNING if rec.status >= 500 or rec.stream_error else logging.INFO
    # formatted lazily: costs nothing when the terminal log level hides it
    if access_log.isEnabledFor(level):
        access_log.log(level, "%s", RequestLine(rec, as_json))


class _AccessFormatter(logging.Formatter):
    """mitmproxy's `[time] message` for text lines; a JSON line (gemini_log_json) goes bare."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.getMessage()
        return line if line.startswith("{") else super().format(record)


class RequestLine:
    """One request's log line, built only when emitted."""

    __slots__ = ("as_json", "latency_ms", "rec")

    def __init__(self, rec: RequestRecord, as_json: bool) -> None:
        self.rec, self.as_json = rec, as_json
        self.latency_ms = round(rec.latency * 1000, 1)

    def __str__(self) -> str:
        rec = self.rec
        fields: dict[str, Any] = {
            "request_id": rec.request_id,
            "client": rec.client,
            "key": rec.key,
            "model": rec.model,
            "api": rec.api,
            "status": rec.status,
            "attempts": len(rec.attempts),
            "latency_ms": self.latency_ms,
            "outcome": rec.outcome,
        }
        if rec.asked_model:  # a fallback model served it
            fields["asked_model"] = rec.asked_model
        noteworthy = rec.retried or rec.proxy_reason or rec.stream_error or rec.asked_model
        if self.as_json:  # one JSON object per line, nothing before it
            extra: dict[str, Any] = {"detail": comment(rec, messages=False)} if noteworthy else {}
            if rec.proxy_message:
                extra["message"] = rec.proxy_message
            if errors := rec.upstream_errors():
                extra["upstream_errors"] = errors
            return json.dumps(
                {"time": round(rec.started_wall, 3), "event": "request", **fields, **extra}
            )
        text = "gemini " + " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
        if not noteworthy:
            return text
        # one line per request: the comment is one line, Google's messages shortened in it
        return f"{text} | {rec.final_comment or comment(rec)}"
