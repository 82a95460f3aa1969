"""The top-level field scan of large OpenAI bodies, against json.loads on generated documents."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool.jsonscan import ScanError, top_level
from gemini_pool.routing import SCAN_OVER, RouteError, openai_body_fields

NAMES = frozenset({"model", "stream"})
# keys that look like the ones asked for, so that nested and escaped ones get generated
KEYS = st.sampled_from(["model", "stream", "Model", "models", "messages", "x", ""]) | st.text(
    max_size=8
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(['"model": "evil"', '{"model": "x"}', "\\", '"', "}", "]"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


def dumps(doc: Any, style: int) -> bytes:
    """The same document written the ways clients write it."""
    if style == 0:
        return json.dumps(doc).encode()
    if style == 1:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(doc, indent=2, ensure_ascii=True).encode()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6), st.integers(0, 2))
def test_the_scan_finds_what_json_loads_finds(doc: dict[str, Any], style: int) -> None:
    body = dumps(doc, style)
    found = top_level(body, NAMES)
    assert {k: json.loads(v) for k, v in found.items()} == {k: doc[k] for k in NAMES if k in doc}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEYS, VALUES), max_size=6))
def test_a_repeated_name_counts_last_as_with_json_loads(members: list[tuple[str, Any]]) -> None:
    body = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in members) + "}").encode()
    expected = json.loads(body)
    found = top_level(body, NAMES)
    assert {k: json.loads(v) for k, v in found.items()} == {
        k: expected[k] for k in NAMES if k in expected
    }


@settings(max_examples=200, deadline=None)
@given(VALUES.filter(lambda v: not isinstance(v, dict)))
def test_anything_but_an_object_is_refused(doc: Any) -> None:
    with pytest.raises(ScanError):
        top_level(json.dumps(doc).encode(), NAMES)


@pytest.mark.parametrize(
    ("body", "model", "stream"),
    [
        (
            b'{"messages": [{"model": "nested", "content": "\\"model\\": \\"x\\""}], "model": "m"}',
            "m",
            False,
        ),
        (b'{"messages": [{"role": "user", "content": "{\\"model\\": \\"evil\\"}"}]}', None, False),
        (b'{"mod\\u0065l": "escaped", "stream": true}', "escaped", True),
        (b'{"model": "a", "model": "b", "stream": true, "stream": false}', "b", False),
        (
            b' \n{ "stream" : true , "model" : "models/gemini-2.5-flash" } \n',
            "gemini-2.5-flash",
            True,
        ),
        (b'{"stream": "true", "model": null}', None, False),
        (b'{"x": [[[{"stream": true}]]], "y": "]}[{"}', None, False),
    ],
)
def test_only_top_level_names_count(body: bytes, model: str | None, stream: bool) -> None:
    padded = (
        body.rstrip()[:-1].rstrip() + b', "pad": "' + b"p" * SCAN_OVER + b'"}'
    )  # scanned, not parsed
    for b in (body, padded):
        assert openai_body_fields(b) == (model, stream), b[:80]


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'{"model": "m"',
        b'{"model": "m"} trailing',
        b'{"model" "m"}',
        b'{"a": [1, 2}',
        b'{"a": "unterminated}',
        b'{model: "m"}',
        b'{"a": 1,}',
        b"\xff\xfe{\x00}\x00",
    ],
)
def test_a_large_broken_body_is_refused_as_invalid_json(body: bytes) -> None:
    padded = b" " * (SCAN_OVER + 1) + body
    with pytest.raises(RouteError) as e:
        openai_body_fields(padded)
    assert e.value.reason == "invalid_json"


def test_a_large_body_with_a_model_that_is_no_string_is_refused() -> None:
    body = b'{"model": {"name": "m"}, "pad": "' + b"p" * SCAN_OVER + b'"}'
    with pytest.raises(RouteError) as e:
        openai_body_fields(body)
    assert e.value.reason == "invalid_model"


def test_forty_megabytes_of_messages_are_scanned_not_parsed() -> None:
    big = {"messages": [{"role": "user", "content": "x" * 1000}] * 40_000}
    body = json.dumps({**big, "model": "gemini-2.5-flash", "stream": True}).encode()
    assert len(body) > 40_000_000
    assert openai_body_fields(body) == ("gemini-2.5-flash", True)
