"""Model fallback: the key file's `fallbacks:`, which requests may fall back, the rewrite."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemini_pool.config import ConfigError, parse_config
from gemini_pool.fallback import choose, eligible, rewrite, targets_of
from gemini_pool.routing import route

KEYS = "keys:\n  - {name: a, key: k1}\n"
PRO, FLASH, LITE = "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite"


def parse(text: str):
    return parse_config((KEYS + text).encode(), "keys.yaml", {})


def test_fallbacks_parse_in_order_and_are_off_without_them() -> None:
    assert parse("").fallbacks == ()
    cfg = parse(
        f"fallbacks:\n  {PRO}: [{FLASH}, models/{LITE}]\n  models/gemini-3-pro: gemini-2.5-pro\n"
    )
    assert cfg.fallbacks == ((PRO, (FLASH, LITE)), ("gemini-3-pro", (PRO,)))
    assert targets_of(cfg.fallbacks, PRO) == (FLASH, LITE)
    assert targets_of(cfg.fallbacks, FLASH) == ()  # one level: flash itself falls back nowhere
    assert targets_of(cfg.fallbacks, None) == ()


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("fallbacks: [a]\n", 3, "must be a mapping"),
        (f"fallbacks:\n  {PRO}: []\n", 4, "non-empty list"),
        (f"fallbacks:\n  {PRO}: {{a: b}}\n", 4, "non-empty list"),
        (f"fallbacks:\n  {FLASH}: [x]\n  {PRO}: [{PRO}]\n", 5, "may not fall back to itself"),
        (f"fallbacks:\n  {PRO}: [{FLASH}, models/{FLASH}]\n", 4, "listed twice"),
        (f"fallbacks:\n  {PRO}: [x]\n  models/{PRO}: [y]\n", 5, "listed twice"),
        (f"fallbacks:\n  {PRO}: ['gemini 2.5']\n", 4, "is not a model id"),
        (f"fallbacks:\n  {PRO}: [3]\n", 4, "is not a model id"),
        ("fallbacks:\n  'gemini-*': [x]\n", 4, "is not a model id"),
        (f"fallbacks:\n  {PRO}: [{', '.join(f'm{i}' for i in range(9))}]\n", 4, "at most 8"),
    ],
)
def test_fallback_errors_name_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert str(e.value).startswith(f"keys.yaml:{line}: fallbacks"), str(e.value)
    assert fragment in str(e.value)


def test_only_generations_not_bound_to_a_cached_content_may_fall_back() -> None:
    gen = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    for path in (
        f"/v1beta/models/{PRO}:generateContent",
        f"/v1/models/{PRO}:streamGenerateContent",
    ):
        assert eligible("POST", route("POST", path, "alt=sse", False, gen), gen)
    chat = json.dumps({"model": PRO, "messages": []}).encode()
    assert eligible("POST", route("POST", "/v1/chat/completions", "", True, chat), chat)
    # other methods, other calls: never rewritten
    for path in (
        f"/v1beta/models/{PRO}:countTokens",
        f"/v1beta/models/{PRO}:embedContent",
        f"/v1beta/models/{PRO}:batchGenerateContent",
        f"/v1beta/tunedModels/{PRO}:generateContent",
        "/v1beta/files",
    ):
        assert not eligible("POST", route("POST", path, "", False, gen), gen), path
    assert not eligible("GET", route("GET", f"/v1beta/models/{PRO}", "", False, b""), b"")
    emb = json.dumps({"model": PRO, "input": "x"}).encode()
    assert not eligible("POST", route("POST", "/v1/embeddings", "", True, emb), emb)
    # bound to a cached content (a model-specific resource): stays with its model
    for bound in (
        {"cachedContent": "cachedContents/abc", **json.loads(gen)},
        {"cached_content": "cachedContents/abc", **json.loads(gen)},
    ):
        body = json.dumps(bound).encode()
        r = route("POST", f"/v1beta/models/{PRO}:generateContent", "", False, body)
        assert not eligible("POST", r, body)
    extra = json.dumps(
        {"model": PRO, "messages": [], "extra_body": {"google": {"cached_content": "x"}}}
    ).encode()
    assert not eligible("POST", route("POST", "/v1/chat/completions", "", True, extra), extra)


def test_choose_takes_the_first_usable_model_the_client_may_use() -> None:
    usable = {FLASH, LITE}.__contains__
    assert choose((PRO, FLASH, LITE), (), usable) == FLASH
    assert choose((PRO, FLASH, LITE), ("*-lite",), usable) == LITE
    assert choose((PRO,), (), usable) is None
    assert choose((FLASH,), ("gemini-2.5-pro*",), usable) is None


def test_the_native_path_is_rewritten_and_the_body_kept() -> None:
    body = b'{"contents": []}'
    r = route("POST", f"/v1beta/models/{PRO}:streamGenerateContent", "alt=sse", False, body)
    new, out = rewrite(r, body, FLASH)
    assert new.path == f"/v1beta/models/{FLASH}:streamGenerateContent"
    assert new.path_and_query == f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"
    assert (new.model, new.method, new.streaming, out) == (FLASH, r.method, True, body)


def test_the_openai_body_gets_the_new_model_and_every_other_byte_stays() -> None:
    body = b'{"messages": [{"role": "user", "content": "say \\"model\\": x"}],\n "model" : "models/gemini-2.5-pro", "stream": true}'
    r = route("POST", "/v1/chat/completions", "", True, body)
    new, out = rewrite(r, body, FLASH)
    assert out == body.replace(b'"models/gemini-2.5-pro"', b'"gemini-2.5-flash"')
    assert json.loads(out)["model"] == FLASH and new.model == FLASH and new.path == r.path
    big = json.dumps({"messages": [{"content": "x" * 100_000}], "model": PRO}).encode()
    _, out = rewrite(route("POST", "/v1/chat/completions", "", True, big), big, LITE)
    assert json.loads(out)["model"] == LITE and len(out) == len(big) + len(LITE) - len(PRO)


@given(
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "model"),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists, max_leaves=8),
        max_size=5,
    ),
    st.sampled_from([FLASH, LITE, "m"]),
)
def test_the_rewrite_changes_the_model_only(doc: dict[str, object], model: str) -> None:
    body = json.dumps({**doc, "model": PRO}).encode()
    r = route("POST", "/v1/chat/completions", "", True, body)
    _, out = rewrite(r, body, model)
    assert json.loads(out) == {**doc, "model": model}


def test_the_comment_and_the_log_line_say_which_model_served() -> None:
    from gemini_pool.access_log import RequestLine
    from gemini_pool.classify import Outcome, Verdict
    from gemini_pool.comments import comment, metadata
    from gemini_pool.dispatch import Attempt
    from gemini_pool.records import RequestRecord

    rec = RequestRecord(model=FLASH, asked_model=PRO, key="b", status=200)
    rec.attempts = [Attempt("b", 200, Verdict(Outcome.OK, "200"), 0.01)]
    line = comment(rec)
    assert line.startswith("served by b: 200 · fell back to gemini-2.5-flash (gemini-2.5-pro")
    assert metadata(rec)["asked_model"] == PRO
    text = str(RequestLine(rec, False))
    assert f"model={FLASH}" in text and f"asked_model={PRO}" in text and "fell back" in text
    doc = json.loads(str(RequestLine(rec, True)))
    assert (doc["model"], doc["asked_model"]) == (FLASH, PRO)
    plain = RequestRecord(model=FLASH, key="b", status=200)
    assert "fell back" not in comment(plain) and "asked_model" not in str(RequestLine(plain, False))
