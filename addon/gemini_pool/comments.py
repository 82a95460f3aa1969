"""What mitmweb and the access log say about a request: its comment, metadata and mark.

Pure: built from a RequestRecord, no mitmproxy. The mitmproxy layer (`mitm/console.py`) puts
them on the flow; the access log (`access_log.py`) reuses the comment of a noteworthy request.

The comment is one line of clauses joined by " · ": mitmweb's comment tab and column drop line
breaks. The outcome and the key whose answer went back come first (a cut-off cell still names
it), then one clause per attempt with Google's own message shortened at a word, then what a
stream carried. Words people search for are tags (`#quota`, `#cut`, ...): plain text in
mitmproxy's filter grammar and its regexes, so `~comment #quota` matches them literally.
"""

from __future__ import annotations

from typing import Any

from .dispatch import Attempt
from .records import RequestRecord

SEP = " · "
MESSAGE_WORDS = 100  # characters of Google's message in the comment (the metadata keeps 300)
CUT_TAG = "#cut"


def comment(rec: RequestRecord, messages: bool = True) -> str:
    """The request in one line; `messages=False` leaves Google's and the proxy's messages out."""
    clauses = [headline(rec)]
    if rec.asked_model:
        clauses.append(f"fell back to {rec.model} ({rec.asked_model} out on every project)")
    if rec.proxy_message and messages:
        clauses.append(shorten(rec.proxy_message, 2 * MESSAGE_WORDS))
    if rec.retried or rec.proxy_reason or _failed_attempts(rec):
        clauses.extend(attempt_clauses(rec.attempts, messages))
    if rec.relay_ticket and not rec.refused:
        clauses.append(stream_summary(rec))
    elif rec.stream_error and not rec.refused:
        clauses.append(f"{shorten(rec.stream_error, MESSAGE_WORDS)} {CUT_TAG}")
    if rec.waited:
        clauses.append(f"waited {rec.waited:.1f}s for a key")
    if rec.spend is not None and rec.spend.limited and rec.key is not None:
        clauses.append(f"budget {rec.spend.note}")
    if rec.cache == "stored":
        clauses.append("answer cached")
    if rec.usage_note:  # last, the client's day so far: `alice: 17 requests, 12k tokens today`
        clauses.append(rec.usage_note)
    return SEP.join(clauses)


def headline(rec: RequestRecord) -> str:
    """Who answered, and whether it worked: "served by" only for an answer that did."""
    if rec.proxy_reason:
        return f"proxy answered {rec.status} ({rec.proxy_reason})"
    if rec.cache == "hit":
        return f"cache hit: {rec.status} (no upstream call, no quota spent)"
    cut = bool(rec.stream_error or rec.tap.stream_error)
    if rec.key and rec.status < 400 and not cut:
        return f"served by {rec.key}: {rec.status}"
    if rec.key and cut:
        return f"failed: the stream from {rec.key} was cut"
    if rec.key:
        return f"failed: {rec.status} from Google via {rec.key}"
    return f"failed: {rec.status}" if rec.status else "failed: no answer"


def attempt_clauses(attempts: list[Attempt], messages: bool = True) -> list[str]:
    """One clause per attempt: "first a: 429 ... #quota, Google said: ...", "then b: 200"."""
    out = []
    for i, a in enumerate(attempts):
        text = a.describe()
        if messages and a.verdict.message and a.status is not None and a.status >= 400:
            text += f", Google said: {shorten(a.verdict.message, MESSAGE_WORDS)}"
        if len(attempts) > 1:
            text = ("first " if i == 0 else "then ") + text
        out.append(text)
    return out


def _failed_attempts(rec: RequestRecord) -> bool:
    return any(a.status is None or a.status >= 400 for a in rec.attempts)


def stream_summary(rec: RequestRecord) -> str:
    tap = rec.tap
    events = f", {tap.events} event{'s' if tap.events != 1 else ''}" if tap.events else ""
    if not rec.ended and not rec.stream_error:
        return f"streaming: {size(tap.bytes)}{events} so far" if tap.bytes else "stream started"
    tokens = (
        f", tokens {tap.tokens_in} in / {tap.tokens_out} out" if tap.tokens_out is not None else ""
    )
    if rec.stream_error or tap.stream_error:
        why = shorten(rec.stream_error or "an error event in the stream", MESSAGE_WORDS)
        return f"streamed {size(tap.bytes)}{events}{tokens}, then cut: {why} {CUT_TAG}"
    return f"streamed {size(tap.bytes)}{events}{tokens}, complete"


def shorten(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters, cut at a word and ended with "…"."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if text[limit - 1] != " ":  # the cut is inside a word: end at the word before
        head, space, _ = cut.rpartition(" ")
        if space and len(head) >= limit // 2:  # unless that is too far back
            cut = head
    return cut.rstrip(" ,;:.-") + "…"


def metadata(rec: RequestRecord) -> dict[str, Any]:
    """flow.metadata["gemini"]: filterable with ~meta in mitmdump and the console."""
    return {
        "request_id": rec.request_id,
        "client": rec.client,
        "api": rec.api,
        "model": rec.model,
        "asked_model": rec.asked_model,
        "key": rec.key,
        "outcome": rec.outcome,
        "retried": rec.retried,
        "attempts": rec.attempts_json(),
        "proxy_reason": rec.proxy_reason,
        "cache": rec.cache,
    }


def mark(rec: RequestRecord) -> str | None:
    """mitmweb's marker: a warning for anything failed, a repeat sign for a retried success."""
    if rec.proxy_reason or rec.stream_error or rec.tap.stream_error or rec.status >= 400:
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
