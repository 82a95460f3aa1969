"""Every row of DESIGN.md's error table, with Gemini's real error bodies (from the fake)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fake_gemini import _status, error_for
from gemini_pool.classify import (
    PACIFIC,
    Outcome,
    classify,
    next_pacific_midnight,
    parse_duration,
)

NOW = datetime(2026, 11, 29, 15, 30, tzinfo=PACIFIC).timestamp()
MODEL = "gemini-2.5-flash"


def verdict(behaviour: str, openai: bool = False):
    status, body = error_for(behaviour, "AIzaSyKEY", MODEL)
    raw = json.dumps([body] if openai else body).encode()
    return classify(status, raw, MODEL, NOW)


@pytest.mark.parametrize("openai", [False, True])
@pytest.mark.parametrize(
    ("behaviour", "outcome", "retry", "key_fault"),
    [
        ("dead", Outcome.DEAD_KEY, True, True),
        ("expired", Outcome.DEAD_KEY, True, True),
        ("unauth", Outcome.CALLER_ERROR, False, False),
        ("leaked", Outcome.DEAD_KEY, True, True),
        ("suspended", Outcome.DEAD_KEY, True, True),
        ("blocked", Outcome.DEAD_KEY, True, True),
        ("service_disabled", Outcome.DEAD_KEY, True, True),
        ("referrer", Outcome.DEAD_KEY, True, True),
        ("minute", Outcome.QUOTA_MINUTE, True, True),
        ("day", Outcome.QUOTA_DAY, True, True),
        ("limit0", Outcome.MODEL_UNAVAILABLE, True, True),
        ("cap", Outcome.PROJECT_CAPPED, True, True),
        ("429bare", Outcome.QUOTA_UNKNOWN, True, True),
        ("500", Outcome.TRANSIENT, True, False),
        ("503", Outcome.TRANSIENT, True, False),
        ("504", Outcome.TRANSIENT, True, False),
    ],
)
def test_table(
    behaviour: str, outcome: Outcome, retry: bool, key_fault: bool, openai: bool
) -> None:
    v = verdict(behaviour, openai)
    assert v.outcome is outcome
    assert v.retry is retry
    assert v.key_fault is key_fault


def test_minute_quota_cools_for_retry_delay() -> None:
    assert verdict("minute").cooldown_until == NOW + 37
    assert MODEL in verdict("minute").reason


def test_day_quota_cools_until_midnight_pacific_despite_retry_delay() -> None:
    v = verdict("day")
    assert v.cooldown_until == datetime(2026, 11, 30, 0, 0, tzinfo=PACIFIC).timestamp()


def test_midnight_pacific_across_dst() -> None:
    before_dst_end = datetime(2026, 10, 31, 23, 0, tzinfo=PACIFIC).timestamp()
    assert next_pacific_midnight(before_dst_end) - before_dst_end == 3600
    spring = datetime(2027, 3, 13, 12, 0, tzinfo=PACIFIC).timestamp()
    assert next_pacific_midnight(spring) == datetime(2027, 3, 14, 0, 0, tzinfo=PACIFIC).timestamp()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            400,
            _status(400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "foo".'),
        ),
        (404, _status(404, "NOT_FOUND", "models/nope is not found for API version v1beta")),
        (
            400,
            _status(400, "FAILED_PRECONDITION", "User location is not supported for the API use."),
        ),
    ],
)
def test_callers_own_mistakes_are_not_retried(status: int, body: dict) -> None:
    v = classify(status, json.dumps(body).encode(), MODEL, NOW)
    assert v.outcome is Outcome.CALLER_ERROR and not v.retry and not v.key_fault


def test_resource_of_another_project_is_a_routing_error() -> None:
    body = _status(
        403,
        "PERMISSION_DENIED",
        "You do not have permission to access the File abc or it may not exist.",
    )
    v = classify(403, json.dumps(body).encode(), MODEL, NOW)
    # retried on a key of another project when the owner is unknown; never the key's fault
    assert v.outcome is Outcome.WRONG_PROJECT and v.retry and not v.key_fault
    assert v.not_this_key and not v.processed


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            401,
            _status(
                401,
                "UNAUTHENTICATED",
                "API keys are not supported by this API. Expected OAuth2 access token or other "
                "authentication credentials that assert a principal.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "CREDENTIALS_MISSING",
                    }
                ],
            ),
        ),
        (
            403,
            _status(
                403,
                "PERMISSION_DENIED",
                "You do not have permission to access tuned model tunedModels/x.",
            ),
        ),
        (403, _status(403, "PERMISSION_DENIED", "Permission denied.")),
        (401, b"<html>Unauthorized</html>"),
        (403, b""),
        (404, _status(404, "NOT_FOUND", "models/made-up is not found for API version v1beta")),
    ],
)
def test_answers_a_caller_can_provoke_never_make_a_key_dead(status: int, body: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    v = classify(status, raw, MODEL, NOW)
    assert v.outcome is Outcome.CALLER_ERROR and not v.retry and not v.key_fault


def test_hostile_error_bodies_give_a_verdict() -> None:
    for raw in (
        b"[" * 100_000,
        b'{"error": {"details": 5}}',
        b'{"error": {"details": [{"violations": 7}], "message": 3}}',
        b'{"error": []}',
        b"\xff\xfe",
    ):
        assert classify(429, raw, MODEL, NOW).outcome is Outcome.QUOTA_UNKNOWN
        assert classify(403, raw, MODEL, NOW).outcome is Outcome.CALLER_ERROR


def test_garbage_bodies_do_not_crash() -> None:
    assert classify(429, b"<html>", MODEL, NOW).outcome is Outcome.QUOTA_UNKNOWN
    assert classify(502, b"", MODEL, NOW).outcome is Outcome.TRANSIENT
    assert classify(200, b"", MODEL, NOW).outcome is Outcome.OK


def test_durations() -> None:
    assert parse_duration("37s") == 37 and parse_duration("0.5s") == 0.5
    assert parse_duration("soon") is None and parse_duration(5) is None
