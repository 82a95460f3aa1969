"""The answer cache across workers: two real mitmdump workers, one real redis-server, the fake."""

from __future__ import annotations

import json
import secrets
from typing import Any

import yaml

from ..conftest import Fake, Proxy, key_entry, new_secret, wait_for
from .test_answer_cache import EMBED, post, upstream_calls
from .test_workers import RedisServer, redis_server, shared_up

__all__ = ["redis_server"]  # the fixture, used by name

GROUP = "team-a"


def cached_workers(
    make_proxy: Any, fake: Fake, server: RedisServer, tokens: dict[str, str]
) -> list[Proxy]:
    secret = new_secret()
    fake.configure({secret: "ok"})
    prefix = "c-" + secrets.token_hex(4)
    doc = {
        "keys": [key_entry("alpha", secret)],
        "clients": [
            {"name": "alice", "token": tokens["alice"], "group": GROUP},
            {"name": "amy", "token": tokens["amy"], "group": GROUP},
            {"name": "bob", "token": tokens["bob"]},
        ],
        "cache": {"ttl_s": 3600, "max_entries": 100, "max_bytes": 1_000_000},
    }
    procs = []
    for i in (1, 2):
        p: Proxy = make_proxy(
            [key_entry("alpha", secret)],
            start=False,
            options={
                "gemini_redis": server.url,
                "gemini_redis_prefix": prefix,
                "gemini_worker": f"w{i}",
            },
        )
        p.keys_file.write_text(yaml.safe_dump(doc))
        procs.append(p.start())
    wait_for(lambda: all(shared_up(p) for p in procs))
    return procs


def test_an_answer_stored_by_one_worker_is_a_hit_on_the_other_and_groups_stay_apart(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    tokens = {n: f"sk-{n}-" + secrets.token_hex(8) for n in ("alice", "amy", "bob")}
    w1, w2 = cached_workers(make_proxy, fake, redis_server, tokens)
    body = {"content": {"parts": [{"text": "shared across workers"}]}}
    first = post(w1, tokens["alice"], EMBED, body)
    assert first.headers["x-gemini-proxy-cache"] == "stored"
    assert upstream_calls(fake, EMBED) == 1
    # worker 2 never saw it: it reads Redis once, serves the hit, and the fake sees nothing
    again = post(w2, tokens["alice"], EMBED, body)
    assert again.headers["x-gemini-proxy-cache"] == "hit"
    assert "x-gemini-proxy-key" not in again.headers
    assert again.json() == first.json()
    assert upstream_calls(fake, EMBED) == 1
    # a client of the same group shares it
    assert post(w2, tokens["amy"], EMBED, body).headers["x-gemini-proxy-cache"] == "hit"
    assert upstream_calls(fake, EMBED) == 1
    # another group misses on either worker, and goes upstream
    assert post(w2, tokens["bob"], EMBED, body).headers["x-gemini-proxy-cache"] == "stored"
    assert upstream_calls(fake, EMBED) == 2
    # Redis holds one key per entry, each with a TTL, no secret or token in keys or values
    client = redis_server.client()
    answers = [k for k in client.scan_iter(match="c-*:answer:*")]
    assert len(answers) == 2
    for k in answers:
        assert 0 < client.pttl(k) <= 3600 * 1000
        value = client.get(k)
        assert value is not None
        for secret in tokens.values():
            assert secret not in k and secret not in value
        assert json.loads(value)["g"] in (GROUP, "client:bob")  # a group, bob one of his own
    hits = w2.metrics()
    assert 'gemini_proxy_answer_cache_total{result="hit"} 2.0' in hits


def test_redis_away_each_worker_caches_alone(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    tokens = {n: f"sk-{n}-" + secrets.token_hex(8) for n in ("alice", "amy", "bob")}
    w1, w2 = cached_workers(make_proxy, fake, redis_server, tokens)
    redis_server.stop()
    wait_for(lambda: not shared_up(w1) and not shared_up(w2), timeout=20)
    body = {"content": {"parts": [{"text": "no redis"}]}}
    assert post(w1, tokens["alice"], EMBED, body).headers["x-gemini-proxy-cache"] == "stored"
    assert post(w1, tokens["alice"], EMBED, body).headers["x-gemini-proxy-cache"] == "hit"
    # worker 2 cannot know it: its own miss, its own upstream call, then its own hit
    assert post(w2, tokens["alice"], EMBED, body).headers["x-gemini-proxy-cache"] == "stored"
    assert post(w2, tokens["alice"], EMBED, body).headers["x-gemini-proxy-cache"] == "hit"
    assert upstream_calls(fake, EMBED) == 2
