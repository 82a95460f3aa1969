"""The answer cache across workers (shared_answers.py) against a real redis-server: TTLs through
Redis key expiry, the size cap, group isolation, malformed values, Redis away."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis import asyncio as aioredis

from gemini_pool.answer_cache import AnswerCache, CacheSpec, Entry
from gemini_pool.shared_answers import MAX_ENTRY, SharedAnswers, decode, encode

from .test_shared_redis import redis_url, run

__all__ = ["redis_url"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(60)


def entry(
    key: str = "k" * 64, group: str = "team-a", body: bytes = b'{"a":1}', ttl: float = 60
) -> Entry:
    now = time.time()
    return Entry(key, group, 200, "application/json", body, now, now + ttl)


def test_encode_decode_round_trip_and_refusals() -> None:
    e = entry(body=b"\x00\xff binary too")
    now = time.time()
    back = decode(e.key, encode(e), "team-a", now)
    assert back is not None and back.body == e.body and back.expires == e.expires
    assert decode(e.key, encode(e), "team-b", now) is None  # another group's: never
    assert decode(e.key, encode(e), "team-a", e.expires + 1) is None  # expired
    for raw in (
        "",
        "[]",
        "{",
        '{"s": 200}',
        json.dumps({**json.loads(encode(e)), "b": "not base64!"}),
        json.dumps({**json.loads(encode(e)), "s": 500}),
        json.dumps({**json.loads(encode(e)), "s": True}),
        json.dumps({**json.loads(encode(e)), "t": 5}),
        json.dumps({**json.loads(encode(e)), "e": "soon"}),
        "[" * 100_000,
        "x" * (MAX_ENTRY + 1),
        None,
        12,
    ):
        assert decode(e.key, raw, "team-a", now) is None


def test_adopt_holds_until_its_own_expiry_and_counts_a_hit() -> None:
    cache = AnswerCache(CacheSpec(ttl_s=3600, max_entries=2, max_bytes=10_000))
    e = entry(ttl=5)
    now = e.stored
    assert cache.get(e.key, now) is None
    assert cache.adopt(e, now)
    assert (cache.hits, cache.misses) == (1, 0)
    got = cache.get(e.key, now + 4)
    assert got is not None and got.expires == e.expires
    assert cache.get(e.key, now + 6) is None  # its own expiry, not a fresh ttl_s
    assert not cache.adopt(e, now + 6)


def test_two_workers_share_entries_with_redis_expiry(redis_url: str) -> None:
    run(lambda: _share(redis_url))


async def _share(redis_url: str) -> None:
    redis = aioredis.from_url(redis_url, decode_responses=True)
    try:
        w1 = SharedAnswers("p", lambda: redis)
        w2 = SharedAnswers("p", lambda: redis)
        e = entry(ttl=30)
        assert await w1.put(e, time.time())
        assert 0 < await redis.pttl(f"p:answer:{e.key}") <= 30_000
        got = await w2.get(e.key, "team-a", time.time())
        assert got is not None and got.body == e.body
        assert await w2.get(e.key, "team-b", time.time()) is None
        assert await w2.get("0" * 64, "team-a", time.time()) is None
        # too large: stays local, Redis holds nothing of it
        big = entry(key="b" * 64, body=b"x" * MAX_ENTRY)
        assert not await w1.put(big, time.time())
        assert await redis.exists(f"p:answer:{big.key}") == 0
        assert w1.refused == 1
        # an entry about to expire is not written; Redis forgets an entry at its expiry
        assert not await w1.put(entry(key="c" * 64, ttl=0.001), time.time())
        short = entry(key="d" * 64, ttl=0.3)
        assert await w1.put(short, time.time())
        deadline = time.monotonic() + 10
        while await redis.exists(f"p:answer:{short.key}"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # a malformed value is a miss, never an error
        await redis.set(f"p:answer:{'e' * 64}", "garbage")
        assert await w2.get("e" * 64, "team-a", time.time()) is None
    finally:
        await redis.aclose()


def test_redis_away_is_a_miss_and_no_write() -> None:
    run(_away)


async def _away() -> None:
    away = SharedAnswers("p", lambda: None)
    assert await away.get("k" * 64, "team-a", time.time()) is None
    assert not await away.put(entry(), time.time())
    # a connection to nothing: bounded, no error
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        broken = SharedAnswers("p", lambda: dead)
        assert await broken.get("k" * 64, "team-a", time.time(), wait=1.0) is None
        assert not await broken.put(entry(), time.time(), wait=1.0)
    finally:
        await dead.aclose()
