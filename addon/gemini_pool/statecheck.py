"""A key-state document checked field by field before any of it is applied.

A state import (`POST /admin/state`, `scripts/state import`) that failed half-way through
restoring would leave some keys restored and others not, or a breaker with a string for a count.
Every field of every key and cooldown is checked first; the first bad one is refused with a
message naming it, and nothing is applied. Fields this version does not know are ignored (an
export from a newer version). Pure logic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .breaker import BreakerState

MAX_TEXT = 2000  # a reason or last error is a short sentence
MAX_HEALTH = 1000


def _text(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    return "is too long" if len(v) > MAX_TEXT else None


def _number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return "must be a finite number"
    return "must not be negative" if v < 0 else None


def _count(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return "must be a non-negative integer"
    return None


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _health(v: Any) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_HEALTH:
        return f"must be a list of at most {MAX_HEALTH} results"
    if not all(x in (0, 1) and not isinstance(x, float) for x in v):
        return "must hold only 0 and 1 (or false and true)"
    return None


def _breaker(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "must be an object"
    for name, check in (
        ("state", _breaker_state),
        ("failures", _count),
        ("trips", _count),
        ("open_until", _number),
    ):
        if v.get(name) is not None and (problem := check(v[name])):
            return f"{name} {problem}"
    return None


def _breaker_state(v: Any) -> str | None:
    states = [str(s) for s in BreakerState]
    return None if v in states else "must be one of " + ", ".join(states)


# field -> its check; every field may also be null (absent) except the fingerprint
KEY_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "project": _text,
    "breaker": _breaker,
    "health": _health,
    "disabled_reason": _text,
    "suspect": _text,
    "next_check": _number,
    "check_backoff": _number,
    "marks_at": _number,
    "breaker_at": _number,
    "dead_at": _number,
    "revived_at": _number,
    "operator_enabled": _flag,
    "operator_weight": _count,
    "last_error": _text,
    "last_error_at": _number,
}
COOLDOWN_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "project": _text,
    "model": _text,
    "until": _number,
    "reason": _text,
}


def check_state(keys: dict[str, Any], cooldowns: list[Any]) -> None:
    """Raise ValueError naming the first bad field; return only if every field is valid."""
    for name, data in keys.items():
        where = f"key {name[:100]!r}"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must be an object")
        if not isinstance(data.get("fingerprint"), str) or not data["fingerprint"]:
            raise ValueError(f"{where}: fingerprint must be a non-empty string")
        for field, check in KEY_FIELDS.items():
            value = data.get(field)
            if value is not None and (problem := check(value)):
                raise ValueError(f"{where}: {field} {problem}")
    for i, c in enumerate(cooldowns):
        if not isinstance(c, dict):
            raise ValueError(f"cooldown {i}: must be an object")
        for field, check in COOLDOWN_FIELDS.items():
            if field not in c or (problem := check(c[field])):
                problem = "is missing" if field not in c else problem
                raise ValueError(f"cooldown {i}: {field} {problem}")
