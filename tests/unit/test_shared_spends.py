"""Spends made while Redis was away (shared_spends.py) against a real redis-server: whichever
worker comes back first, each counts the other's once, never twice; the list stays bounded."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis import asyncio as aioredis

from gemini_pool import shared_spends
from gemini_pool.shared_spends import AwaySpends

from .test_shared_redis import redis_url, run

__all__ = ["redis_url"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(60)


def spend(at: float) -> tuple[str, str, dict[str, Any] | None]:
    return ("spends", "proj-a\x1fgemini-2.5-flash", {"at": at, "n": 10, "b": None})


def test_each_worker_counts_the_others_spends_once(redis_url: str) -> None:
    async def scenario() -> None:
        redis = aioredis.from_url(redis_url, decode_responses=True)
        try:
            w1, w2 = AwaySpends("p", "w1"), AwaySpends("p", "w2")
            got1: list[Any] = []
            got2: list[Any] = []
            # w1 comes back first: nothing of w2's yet; its own stored and to be published
            told = await w1.exchange(redis, [spend(1.0), spend(2.0)], lambda *a: got1.append(a))
            assert told is not None and got1 == []
            # w2 comes back later: reads w1's from the list, stores its own
            told2 = await w2.exchange(redis, [spend(3.0)], lambda *a: got2.append(a))
            assert [a[2]["at"] for a in got2] == [1.0, 2.0]
            assert told2 is not None
            # w1 hears w2's event (first time: counted), then a later sync reads the list again
            assert w1.first_time(told2["id"])
            assert not w2.first_time(told["id"])  # read from the list: the event is not counted
            await w1.exchange(redis, [], lambda *a: got1.append(a))
            await w2.exchange(redis, [], lambda *a: got2.append(a))
            assert got1 == [] and len(got2) == 2  # nothing counted twice
            assert 0 < await redis.pttl("p:away") <= shared_spends.AWAY_TTL_MS
            # a malformed entry is skipped; the list stays bounded
            await redis.rpush("p:away", "garbage", json.dumps({"w": "w3"}))
            for _ in range(shared_spends.MAX_ENTRIES + 5):
                await w1.exchange(redis, [spend(4.0)], lambda *a: None)
            assert await redis.llen("p:away") == shared_spends.MAX_ENTRIES
        finally:
            await redis.aclose()

    run(scenario)
