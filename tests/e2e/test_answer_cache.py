"""The answer cache end to end: a real mitmdump, the fake Gemini, two client groups."""

from __future__ import annotations

import secrets
from typing import Any

import yaml
from mitmproxy import io

from ..conftest import Fake, Proxy, key_entry, new_secret, wait_for

EMBED = "/v1beta/models/text-embedding-004:embedContent"
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"


def cached_proxy(make_proxy: Any, fake: Fake, ttl_s: int) -> tuple[Proxy, dict[str, str]]:
    secret = new_secret()
    fake.configure({secret: "ok"})
    tokens = {"web": "sk-web-" + secrets.token_hex(8), "batch": "sk-batch-" + secrets.token_hex(8)}
    proxy = make_proxy([key_entry("alpha", secret)], start=False)
    doc = {
        "keys": [key_entry("alpha", secret)],
        "clients": [{"name": n, "token": t} for n, t in tokens.items()],
        "cache": {"ttl_s": ttl_s, "max_entries": 100, "max_bytes": 1_000_000},
    }
    proxy.keys_file.write_text(yaml.safe_dump(doc))
    return proxy.start(), tokens


def post(proxy: Proxy, token: str, path: str, body: dict[str, Any]) -> Any:
    r = proxy.http.post(path, json=body, headers={"x-goog-api-key": token})
    proxy.remember(r.content)
    assert r.status_code == 200, r.text
    return r


def upstream_calls(fake: Fake, path: str) -> int:
    return sum(1 for e in fake.log() if e["path"].endswith(path.rsplit("/", 1)[-1]))


def test_a_hit_makes_no_upstream_call_and_groups_never_share(fake: Fake, make_proxy: Any) -> None:
    proxy, tokens = cached_proxy(make_proxy, fake, ttl_s=3600)
    body = {"content": {"parts": [{"text": "cache me"}]}}
    first = post(proxy, tokens["web"], EMBED, body)
    assert first.headers["x-gemini-proxy-cache"] == "stored"
    second = post(proxy, tokens["web"], EMBED, body)
    assert second.headers["x-gemini-proxy-cache"] == "hit"
    assert second.json() == first.json()
    assert "x-gemini-proxy-key" not in second.headers  # no key served it
    assert upstream_calls(fake, EMBED) == 1
    # another client group asks the same: a miss, its own upstream call
    other = post(proxy, tokens["batch"], EMBED, body)
    assert other.headers["x-gemini-proxy-cache"] == "stored"
    assert upstream_calls(fake, EMBED) == 2
    # temperature 0 generations are cacheable, others are not
    zero = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 0}}
    warm = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 1}}
    assert post(proxy, tokens["web"], GEN, zero).headers["x-gemini-proxy-cache"] == "stored"
    assert post(proxy, tokens["web"], GEN, zero).headers["x-gemini-proxy-cache"] == "hit"
    assert "x-gemini-proxy-cache" not in post(proxy, tokens["web"], GEN, warm).headers
    assert upstream_calls(fake, GEN) == 2
    metrics = proxy.metrics()
    assert 'gemini_proxy_answer_cache_total{result="hit"} 2.0' in metrics
    assert 'gemini_proxy_answer_cache_total{result="stored"} 3.0' in metrics
    # a restart reads the entries back from SQLite: still a hit, no upstream call
    proxy.restart()
    assert post(proxy, tokens["web"], EMBED, body).headers["x-gemini-proxy-cache"] == "hit"
    assert upstream_calls(fake, EMBED) == 2
    rows = proxy.admin.get("/admin/requests", params={"limit": 50}).json()["requests"]
    assert sum(1 for row in rows if row["outcome"] == "cache_hit") == 3
    proxy.stop()
    with open(proxy.dump, "rb") as f:
        comments = [fl.comment for fl in io.FlowReader(f).stream()]
    assert sum("cache hit: 200 (no upstream call, no quota spent)" in c for c in comments) == 3


def test_entries_expire(fake: Fake, make_proxy: Any) -> None:
    proxy, tokens = cached_proxy(make_proxy, fake, ttl_s=1)
    body = {"contents": [{"parts": [{"text": "count me"}]}]}
    path = "/v1beta/models/gemini-2.5-flash:countTokens"
    assert post(proxy, tokens["web"], path, body).headers["x-gemini-proxy-cache"] == "stored"
    assert post(proxy, tokens["web"], path, body).headers["x-gemini-proxy-cache"] == "hit"
    assert upstream_calls(fake, path) == 1
    # once the TTL has passed, the next request goes upstream again and is stored anew
    wait_for(
        lambda: post(proxy, tokens["web"], path, body).headers["x-gemini-proxy-cache"] == "stored",
        timeout=10,
        interval=0.2,
    )
    assert upstream_calls(fake, path) == 2
