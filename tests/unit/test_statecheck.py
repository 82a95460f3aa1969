"""A state import is checked field by field: a bad field is refused by name, nothing applied."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from gemini_pool.config import Config, KeySpec
from gemini_pool.service import ProxyService
from gemini_pool.store import read_state_document


def service() -> ProxyService:
    s = ProxyService()
    s.apply_config(Config((KeySpec("a", "secret-a", "p"), KeySpec("b", "secret-b", "q")), (), "t"))
    return s


def exported() -> dict[str, Any]:
    s = service()
    s.operator("a", "weight", 7)
    s.operator("b", "disable")
    s.pool.keys["a"].health.add(True)
    doc = s.export_state()
    doc["cooldowns"] = [{"project": "p", "model": "m", "until": 9e12, "reason": "minute quota"}]
    return json.loads(json.dumps(doc))  # as it comes over the wire


def test_an_export_imports_whole() -> None:
    doc = exported()
    s = service()
    assert s.import_state(doc) == 2
    assert s.pool.keys["a"].operator_weight == 7
    assert s.pool.keys["b"].operator_enabled is False
    assert ("p", "m") in s.pool.cooldowns


BAD: list[tuple[str, Any, str]] = [
    ("fingerprint", 5, "key 'b': fingerprint must be a non-empty string"),
    ("fingerprint", "", "key 'b': fingerprint must be a non-empty string"),
    ("breaker", {"state": "ajar"}, "key 'b': breaker state must be one of closed, open"),
    ("breaker", {"failures": "3"}, "key 'b': breaker failures must be a non-negative integer"),
    ("breaker", {"open_until": math.inf}, "key 'b': breaker open_until must be a finite number"),
    ("breaker", [1], "key 'b': breaker must be an object"),
    ("health", [1, 0, 2], "key 'b': health must hold only 0 and 1"),
    ("health", "ok", "key 'b': health must be a list"),
    ("next_check", "soon", "key 'b': next_check must be a finite number"),
    ("dead_at", -1, "key 'b': dead_at must not be negative"),
    ("operator_enabled", "no", "key 'b': operator_enabled must be true or false"),
    ("operator_weight", 2.5, "key 'b': operator_weight must be a non-negative integer"),
    ("operator_weight", True, "key 'b': operator_weight must be a non-negative integer"),
    ("last_error", {"x": 1}, "key 'b': last_error must be a string"),
    ("disabled_reason", "x" * 5000, "key 'b': disabled_reason is too long"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD)
def test_a_bad_key_field_is_refused_by_name_and_nothing_is_applied(
    field: str, value: Any, message: str
) -> None:
    doc = exported()
    doc["keys"]["b"][field] = value
    s = service()
    before = {n: s.pool.snapshot_key(st) for n, st in s.pool.keys.items()}
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        s.import_state(copy.deepcopy(doc))
    # key a's fields were valid, and are not applied either
    assert {n: s.pool.snapshot_key(st) for n, st in s.pool.keys.items()} == before
    assert s.pool.cooldowns == {}


@pytest.mark.parametrize(
    ("cooldown", "message"),
    [
        ({"project": "p", "model": "m", "until": "later", "reason": "r"}, "until must be a"),
        ({"project": 1, "model": "m", "until": 1.0, "reason": "r"}, "project must be a string"),
        ({"model": "m", "until": 1.0, "reason": "r"}, "'cooldowns' must be a list"),
        ({"project": "p", "model": "m", "until": 1.0, "reason": None}, "reason must be a string"),
    ],
)
def test_a_bad_cooldown_is_refused(cooldown: dict[str, Any], message: str) -> None:
    doc = exported()
    doc["cooldowns"].append(cooldown)
    with pytest.raises(ValueError, match=message):
        read_state_document(doc)
