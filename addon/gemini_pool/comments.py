"""What mitmweb and the access log say about a request: its comment, metadata and mark.

Pure: built from a RequestRecord, no mitmproxy. The mitmproxy layer (`mitm/console.py`) puts
them on the flow; the access log (`access_log.py`) reuses the comment of a noteworthy request.
"""

from __future__ import annotations

from typing import Any

from .records import RequestRecord


def comment(rec: RequestRecord) -> str:
    """The outcome and the serving key first, then every attempt and why it was retried, what a
    stream carried; the proxy's own message and Google's error of each failed attempt below."""
    if rec.proxy_reason:
        head = f"proxy answered {rec.status} ({rec.proxy_reason})"
    elif rec.key:
        head = f"served by {rec.key}: {rec.status}"
    else:
        head = f"{rec.status or 'no answer'}"
    parts = [head]
    if rec.retried or (rec.proxy_reason and rec.attempts):
        parts.append(" → ".join(a.describe() for a in rec.attempts))
    if rec.relay_ticket and not rec.refused:
        parts.append(stream_summary(rec))
    if rec.waited:
        parts.append(f"waited {rec.waited:.1f}s for a key")
    if rec.spend is not None and rec.spend.limited and rec.key is not None:
        parts.append(f"budget {rec.spend.note}")
    lines = [" · ".join(parts)]
    if rec.proxy_message:
        lines.append(rec.proxy_message)
    lines.extend(rec.upstream_errors())
    return "\n".join(lines)


def stream_summary(rec: RequestRecord) -> str:
    tap = rec.tap
    tokens = (
        f", tokens {tap.tokens_in} in / {tap.tokens_out} out" if tap.tokens_out is not None else ""
    )
    if rec.stream_error or tap.stream_error:
        end = f"cut: {rec.stream_error or 'error event in the stream'}"
    elif rec.ended:
        end = "complete"
    else:
        end = "streaming"
    events = f", {tap.events} events" if tap.events else ""
    return f"streamed {size(tap.bytes)}{events}{tokens}, {end}"


def metadata(rec: RequestRecord) -> dict[str, Any]:
    """flow.metadata["gemini"]: filterable with ~meta in mitmdump and the console."""
    return {
        "request_id": rec.request_id,
        "client": rec.client,
        "api": rec.api,
        "model": rec.model,
        "key": rec.key,
        "outcome": rec.outcome,
        "retried": rec.retried,
        "attempts": rec.attempts_json(),
        "proxy_reason": rec.proxy_reason,
    }


def mark(rec: RequestRecord) -> str | None:
    """mitmweb's marker: a warning for anything failed, a repeat sign for a retried success."""
    if rec.proxy_reason or rec.stream_error or rec.status >= 400:
        return ":warning:"
    if rec.retried:
        return ":repeat:"
    return None


def size(n: int) -> str:
    if n < 10_000:
        return f"{n} B"
    if n < 10_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"
