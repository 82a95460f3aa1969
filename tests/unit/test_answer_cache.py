"""The answer cache: what is cacheable, keying, groups, TTL (injected clock), bounds, config."""

from __future__ import annotations

import json

import pytest

from gemini_pool.answer_cache import AnswerCache, CacheSpec, cache_key, cacheable
from gemini_pool.config import ConfigError, parse_config
from gemini_pool.routing import route


def r(path: str, body: object, bearer: bool = False):
    raw = json.dumps(body).encode()
    return route("POST", path, "", bearer, raw), raw


EMBED = "/v1beta/models/text-embedding-004:embedContent"
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"


@pytest.mark.parametrize(
    ("path", "body", "bearer", "expected"),
    [
        (EMBED, {"content": {"parts": [{"text": "a"}]}}, False, True),
        ("/v1beta/models/m:batchEmbedContents", {"requests": []}, False, True),
        ("/v1beta/models/m:countTokens", {"contents": []}, False, True),
        (GEN, {"contents": [], "generationConfig": {"temperature": 0}}, False, True),
        (GEN, {"contents": [], "generationConfig": {"temperature": 0.0}}, False, True),
        (GEN, {"contents": [], "generationConfig": {"temperature": 0.2}}, False, False),
        (GEN, {"contents": [], "generationConfig": {"temperature": False}}, False, False),
        (GEN, {"contents": []}, False, False),  # Google's default temperature is not 0
        (
            "/v1beta/models/m:streamGenerateContent",
            {"generationConfig": {"temperature": 0}},
            False,
            False,
        ),
        (
            GEN,
            {"cachedContent": "cachedContents/x", "generationConfig": {"temperature": 0}},
            False,
            False,
        ),
        (EMBED, {"content": {"parts": [{"fileData": {"fileUri": "files/abc"}}]}}, False, False),
        ("/v1/embeddings", {"model": "text-embedding-004", "input": "a"}, True, True),
        ("/v1/chat/completions", {"model": "m", "messages": [], "temperature": 0}, True, True),
        ("/v1/chat/completions", {"model": "m", "messages": [], "temperature": 1}, True, False),
        ("/v1/chat/completions", {"model": "m", "temperature": 0, "stream": True}, True, False),
        (
            "/v1beta/models/m:batchGenerateContent",
            {"generationConfig": {"temperature": 0}},
            False,
            False,
        ),
    ],
)
def test_what_is_cacheable(path: str, body: object, bearer: bool, expected: bool) -> None:
    rt, raw = r(path, body, bearer)
    assert cacheable("POST", rt, raw, None) is expected


def test_never_cacheable_when_pinned_or_not_a_post() -> None:
    rt, raw = r(EMBED, {"content": {}})
    assert not cacheable("POST", rt, raw, "proj-a")  # the request names a project's resource
    assert not cacheable("GET", rt, raw, None)


def test_keys_differ_by_group_body_path_and_query() -> None:
    rt, raw = r(EMBED, {"content": {"parts": [{"text": "a"}]}})
    base = cache_key("web", "POST", rt, raw)
    assert base == cache_key("web", "POST", rt, raw)
    assert base != cache_key("batch", "POST", rt, raw)
    assert base != cache_key("web", "POST", rt, raw + b" ")
    other, _ = r("/v1beta/models/text-embedding-005:embedContent", {})
    assert base != cache_key("web", "POST", other, raw)
    with_query = route("POST", EMBED, "alt=json", False, raw)
    assert base != cache_key("web", "POST", with_query, raw)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0


def test_ttl_expires_entries_and_drops_them_from_persistence() -> None:
    dropped: list[str] = []
    kept: list[str] = []
    cache = AnswerCache(CacheSpec(ttl_s=60), lambda e: kept.append(e.key), dropped.append)
    cache.put("k", "web", 200, "application/json", b"{}", now=1000.0)
    assert kept == ["k"]
    hit = cache.get("k", now=1059.0)
    assert hit is not None and hit.body == b"{}" and cache.hits == 1
    assert cache.get("k", now=1060.0) is None  # expired at exactly ttl
    assert dropped == ["k"] and len(cache) == 0 and cache.bytes == 0 and cache.misses == 1


def test_bounded_in_entries_least_recently_used_first() -> None:
    dropped: list[str] = []
    cache = AnswerCache(CacheSpec(max_entries=2), on_drop=dropped.append)
    cache.put("a", "g", 200, "t", b"1", 0)
    cache.put("b", "g", 200, "t", b"2", 0)
    assert cache.get("a", 1) is not None  # a is now the most recent
    cache.put("c", "g", 200, "t", b"3", 0)
    assert dropped == ["b"] and cache.get("b", 1) is None
    assert cache.get("a", 1) is not None and cache.get("c", 1) is not None


def test_bounded_in_bytes() -> None:
    cache = AnswerCache(CacheSpec(max_bytes=2000))
    assert cache.put("huge", "g", 200, "t", b"x" * 5000, 0) is None  # alone over the bound
    for i in range(5):
        cache.put(f"k{i}", "g", 200, "t", b"x" * 500, 0)
    assert cache.bytes <= 2000 and len(cache) < 5
    assert cache.get("k4", 1) is not None and cache.get("k0", 1) is None
    cache.configure(CacheSpec(max_bytes=1024))  # a reload shrinks it at once
    assert cache.bytes <= 1024 and len(cache) == 1


def test_restore_skips_expired_and_keeps_bounds() -> None:
    src = AnswerCache(CacheSpec(ttl_s=10))
    old = src.put("old", "g", 200, "t", b"o", 0)
    new = src.put("new", "g", 200, "t", b"n", 5)
    assert old is not None and new is not None
    kept: list[str] = []
    cache = AnswerCache(CacheSpec(), on_put=lambda e: kept.append(e.key))
    assert cache.restore([old, new], now=12) == 1
    assert cache.get("new", 12) is not None and kept == []  # read back, not written again


def parse(text: str):
    return parse_config(text.encode(), "keys.yaml", {})


def test_cache_config_off_by_default_and_validated() -> None:
    assert parse("keys: []\n").cache is None
    assert parse("cache: {}\n").cache == CacheSpec()
    spec = parse("cache: {ttl_s: 60, max_entries: 5, max_bytes: 4096}\n").cache
    assert spec == CacheSpec(60, 5, 4096)
    for bad, fld in [
        ("cache: {ttl_s: 0}", "ttl_s"),
        ("cache: {max_entries: -1}", "max_entries"),
        ("cache: {max_bytes: '1 GB'}", "max_bytes"),
        ("cache: {size: 1}", r"unknown field\(s\) size"),
        ("cache: 5", "must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=fld) as e:
            parse(bad + "\n")
        assert str(e.value).startswith("keys.yaml:1: cache")
