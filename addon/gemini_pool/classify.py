"""Gemini upstream answer -> verdict for the key pool (DESIGN.md §2 table).

Decided by Gemini's reason and quota id, not by the HTTP status alone. Pure logic.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

PACIFIC = ZoneInfo("America/Los_Angeles")
DEFAULT_MINUTE_COOLDOWN = 60.0


class Outcome(StrEnum):
    OK = "ok"
    DEAD_KEY = "dead_key"  # disable the key, retry elsewhere
    PROJECT_CAPPED = "project_capped"  # spending cap: project unusable until next month
    QUOTA_MINUTE = "quota_minute"  # project x model cools for retryDelay
    QUOTA_DAY = "quota_day"  # project x model cools until midnight Pacific
    MODEL_UNAVAILABLE = "model_unavailable"  # "limit: 0": project x model unusable
    QUOTA_UNKNOWN = "quota_unknown"  # 429 without details: short project backoff
    TRANSIENT = "transient"  # 5xx: retry elsewhere, no blame
    NETWORK = "network"  # connect error, timeout, dropped connection: breaker failure
    WRONG_PROJECT = "wrong_project"  # resource of another project: routing, not the key
    CALLER_ERROR = "caller_error"  # the caller's mistake (or a method that needs OAuth): no blame


RETRYABLE = {
    Outcome.DEAD_KEY,
    Outcome.WRONG_PROJECT,
    Outcome.PROJECT_CAPPED,
    Outcome.QUOTA_MINUTE,
    Outcome.QUOTA_DAY,
    Outcome.MODEL_UNAVAILABLE,
    Outcome.QUOTA_UNKNOWN,
    Outcome.TRANSIENT,
    Outcome.NETWORK,
}

# Outcomes that count against the key in its health window (quota, dead, network).
KEY_FAULTS = RETRYABLE - {Outcome.TRANSIENT, Outcome.WRONG_PROJECT}

# Answers that say "not this key" and cost nothing at Google: they do not use up the caller's
# attempts (gemini_max_attempts), only the hard ceiling (gemini_attempt_ceiling).
NOT_THIS_KEY = {
    Outcome.DEAD_KEY,
    Outcome.PROJECT_CAPPED,
    Outcome.QUOTA_MINUTE,
    Outcome.QUOTA_DAY,
    Outcome.MODEL_UNAVAILABLE,
    Outcome.QUOTA_UNKNOWN,
    Outcome.WRONG_PROJECT,
}

# ErrorInfo reasons that prove the key (or its project) is unusable, whatever the caller sent.
# Only these, or Google's leaked/suspended/expired messages, ever make a key dead: a status code
# alone never does, since callers can provoke 401, 403 and 404 at will.
KEY_REASONS = frozenset(
    {
        "API_KEY_INVALID",
        "API_KEY_EXPIRED",
        "CONSUMER_SUSPENDED",
        "CONSUMER_INVALID",
        "API_KEY_SERVICE_BLOCKED",
        "SERVICE_DISABLED",
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "API_KEY_IP_ADDRESS_BLOCKED",
        "API_KEY_ANDROID_APP_BLOCKED",
        "API_KEY_IOS_APP_BLOCKED",
        "BILLING_DISABLED",
    }
)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str  # short, human: "429 per-minute quota gemini-2.5-flash"
    cooldown_until: float | None = None  # for quota outcomes: when the bucket is usable again
    message: str = ""  # upstream message (scrubbed by the caller)
    reached: bool = True  # False: the request provably never reached Google (connect error)

    @property
    def retry(self) -> bool:
        return self.outcome in RETRYABLE

    @property
    def key_fault(self) -> bool:
        return self.outcome in KEY_FAULTS

    @property
    def not_this_key(self) -> bool:
        """Says only that this key cannot serve now (nothing was processed at Google)."""
        return self.outcome in NOT_THIS_KEY

    @property
    def processed(self) -> bool:
        """Could Google have acted on the request? (Decides whether a create may be re-sent.)"""
        if self.outcome is Outcome.NETWORK:
            return self.reached
        return self.outcome not in NOT_THIS_KEY


def next_pacific_midnight(now: float) -> float:
    """Unix time of the next midnight in America/Los_Angeles (when Gemini daily quotas reset)."""
    today = datetime.fromtimestamp(now, PACIFIC).date()
    return datetime.combine(today + timedelta(days=1), time(0), PACIFIC).timestamp()


def next_pacific_month(now: float) -> float:
    d = datetime.fromtimestamp(now, PACIFIC).date().replace(day=1)
    first = (d + timedelta(days=32)).replace(day=1)
    return datetime.combine(first, time(0), PACIFIC).timestamp()


def pacific_day(now: float) -> str:
    return datetime.fromtimestamp(now, PACIFIC).date().isoformat()


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
# Google's own wording for a dead key, at the start of the message: Google echoes parts of the
# request in other messages (`Unknown name "..."`), so a caller could put these words there
_DEAD_MESSAGE_RE = re.compile(
    r"\s*(API key (not valid|expired)|API Key not found|Your API key was reported as leaked|"
    r"Permission denied: Consumer '[^']*' has been suspended)",
    re.I,
)
_WRONG_PROJECT_RE = re.compile(
    r"permission to access the File|CachedContent not found|permission to access cached", re.I
)


def parse_duration(value: Any) -> float | None:
    """google.protobuf.Duration JSON form: "37s", "0.5s"."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1))
    return None


def decode_body(body: bytes, content_encoding: str = "") -> bytes:
    enc = content_encoding.lower().strip()
    try:
        if enc == "gzip":
            return gzip.decompress(body)
        if enc == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError):
        return body
    return body


def error_object(body: bytes) -> dict[str, Any] | None:
    """The google.rpc.Status object of an error body; /openai/ paths wrap it in a list."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(doc, list) and doc:
        doc = doc[0]
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def classify(status: int, body: bytes, model: str | None, now: float) -> Verdict:
    if 200 <= status < 400:
        return Verdict(Outcome.OK, str(status))
    err = error_object(body) or {}
    message = str(err.get("message", ""))
    details = [d for d in _list(err.get("details")) if isinstance(d, dict)]
    reasons = {str(d.get("reason", "")) for d in details}
    quota_ids = [
        str(v.get("quotaId", ""))
        for d in details
        for v in _list(d.get("violations"))
        if isinstance(v, dict)
    ]
    retry_delay = next(
        (
            parse_duration(d.get("retryDelay"))
            for d in details
            if str(d.get("@type", "")).endswith("RetryInfo")
        ),
        None,
    )
    m = model or "?"

    key_reason = next((r for r in sorted(reasons) if r in KEY_REASONS), None)
    if status in (400, 401, 403) and (key_reason or _DEAD_MESSAGE_RE.match(message)):
        why = (
            _dead_message_reason(message)
            if key_reason in (None, "API_KEY_INVALID", "API_KEY_EXPIRED")
            else key_reason
        )
        return Verdict(Outcome.DEAD_KEY, f"{status} {why}", message=message)
    if status == 403 and _WRONG_PROJECT_RE.search(message):
        return Verdict(Outcome.WRONG_PROJECT, "403 resource of another project", message=message)
    if status in (400, 401, 403, 404):
        # the caller's request (a bad argument, a method that needs OAuth, a tuned model or a
        # resource it may not touch, an unknown model): passed through, no key is blamed
        what = (
            next((r for r in sorted(reasons) if r), None) or str(err.get("status", "")) or "error"
        )
        return Verdict(Outcome.CALLER_ERROR, f"{status} {what[:64]}", message=message)
    if status == 429:
        if "spending cap" in message.lower():
            return Verdict(
                Outcome.PROJECT_CAPPED, "429 monthly spending cap", next_pacific_month(now), message
            )
        if re.search(r"\blimit: 0\b", message):
            return Verdict(
                Outcome.MODEL_UNAVAILABLE,
                f"429 {m} not available to this project (limit: 0)",
                next_pacific_midnight(now),
                message,
            )
        if any("PerDay" in q for q in quota_ids):
            return Verdict(
                Outcome.QUOTA_DAY, f"429 per-day quota {m}", next_pacific_midnight(now), message
            )
        if any("PerMinute" in q for q in quota_ids):
            delay = retry_delay if retry_delay is not None else DEFAULT_MINUTE_COOLDOWN
            return Verdict(Outcome.QUOTA_MINUTE, f"429 per-minute quota {m}", now + delay, message)
        # No quota id: often Google throttling the egress IP. The pool backs off exponentially
        # unless Google said how long to wait.
        until = now + retry_delay if retry_delay is not None else None
        return Verdict(Outcome.QUOTA_UNKNOWN, "429 rate limited", until, message)
    if status >= 500:
        return Verdict(
            Outcome.TRANSIENT, f"{status} {err.get('status', 'server error')}", message=message
        )
    return Verdict(
        Outcome.CALLER_ERROR, f"{status} {err.get('status', '')}".strip(), message=message
    )


def _dead_message_reason(message: str) -> str:
    low = message.lower()
    if "leaked" in low:
        return "key reported as leaked"
    if "suspended" in low:
        return "CONSUMER_SUSPENDED"
    if "expired" in low:
        return "API key expired"
    return "API key invalid"


def network_verdict(what: str, reached: bool = True) -> Verdict:
    return Verdict(Outcome.NETWORK, what, reached=reached)
