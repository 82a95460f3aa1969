"""Key verdicts a caller cannot fake, checks that confirm them, and what is never sent twice.

Each test drives a real mitmdump against the fake Gemini, which answers like Google: gzip,
caller-caused 401/403, 404 for models it does not serve, project-bound resources.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import aiohttp
import httpx2 as httpx

from ..conftest import Fake, Proxy, key_entry, new_secret, wait_for
from .test_operations import sample
from .test_proxy import FLASH, gen, post


def statuses(proxy: Proxy, n: int, concurrency: int, model: str = FLASH) -> list[int]:
    async def run() -> list[int]:
        sem = asyncio.Semaphore(concurrency)
        url = f"{proxy.url}/v1beta/models/{model}:generateContent"
        body = {"contents": [{"parts": [{"text": "hi"}]}]}

        async def one(s: aiohttp.ClientSession) -> int:
            async with sem, s.post(url, json=body, headers={"x-goog-api-key": "u"}) as r:
                await r.read()
                return r.status

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            return list(await asyncio.gather(*(one(s) for _ in range(n))))

    return asyncio.run(run())


# ---------------------------------------------------------------- who is to blame


def test_callers_cannot_bench_keys_with_answers_about_their_own_request(
    fake: Fake, make_proxy: Any
) -> None:
    keys = [new_secret() for _ in range(3)]
    fake.configure(dict.fromkeys(keys, "ok"))
    proxy = make_proxy([key_entry(f"k{i}", s) for i, s in enumerate(keys)])
    for _ in range(2):
        r = proxy.http.post(
            "/v1beta/tunedModels", json={"displayName": "x"}, headers={"x-goog-api-key": "u"}
        )
        assert r.status_code == 401 and "CREDENTIALS_MISSING" in r.text  # Google's own answer
        r = post(proxy, "/v1beta/tunedModels/mine:generateContent")
        assert r.status_code == 403 and "tuned model" in r.json()["error"]["message"]
        assert gen(proxy, model="gemini-made-up").status_code == 404
    assert len(fake.log()) == 6  # one upstream call each: no retry on another key
    assert {k["status"] for k in proxy.keys_state().values()} == {"active"}
    assert fake.checks() == []  # nothing even looked suspicious
    proxy.restart()
    assert {k["status"] for k in proxy.keys_state().values()} == {"active"}
    assert gen(proxy).status_code == 200


def test_a_dead_key_answer_is_confirmed_before_the_key_is_disabled(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    # `a` answers "leaked" for flash only: the no-quota check (listing models) accepts it
    fake.configure({a: "ok", b: "ok"}, models={a: {FLASH: "leaked"}})
    proxy = make_proxy([key_entry("a", a, weight=5), key_entry("b", b)])
    r = gen(proxy)
    assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == "b"  # no wait for the check
    wait_for(lambda: "a check says Google accepts it: not disabled" in proxy.logs())
    assert proxy.keys_state()["a"]["status"] == "active"
    assert [e["key"] for e in fake.checks()] == [a]
    assert sample(proxy.metrics(), "gemini_proxy_key_checks_total", key="a", result="alive") == 1


def test_dead_keys_are_rechecked_with_backoff_and_come_back_by_themselves(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "suspended", b: "ok"})
    proxy = make_proxy(
        [key_entry("a", a, weight=5), key_entry("b", b)],
        options={"gemini_recheck_ms": 300, "gemini_recheck_max_ms": 600},
    )
    assert gen(proxy).status_code == 200
    state = proxy.wait_key("a", "dead")
    assert state["disabled_reason"] == "403 CONSUMER_SUSPENDED"
    assert "confirmed by a check" in proxy.logs()
    wait_for(lambda: len(fake.checks()) >= 3, timeout=10)  # re-checked, no generation quota
    assert all(e["key"] == a for e in fake.checks())
    assert a not in fake.keys_seen()[1:]  # only the first request ever tried it
    fake.configure({a: "ok", b: "ok"})  # someone fixed the project
    proxy.wait_key("a", "active")
    assert "accepted by Google again: back in rotation" in proxy.logs()
    m = proxy.metrics()
    assert sample(m, "gemini_proxy_key_checks_total", key="a", result="dead") >= 2
    assert sample(m, "gemini_proxy_key_checks_total", key="a", result="alive") == 1
    assert {gen(proxy).headers["x-gemini-proxy-key"] for _ in range(6)} == {"a", "b"}


# ---------------------------------------------------------------- no 503 while a key is healthy


def test_half_the_pool_dead_and_listed_first_no_caller_sees_a_failure(
    fake: Fake, make_proxy: Any
) -> None:
    dead = [new_secret() for _ in range(10)]
    good = [new_secret() for _ in range(10)]
    fake.configure({**dict.fromkeys(dead, "dead"), **dict.fromkeys(good, "ok")})
    keys = [key_entry(f"dead{i}", s) for i, s in enumerate(dead)]
    keys += [key_entry(f"good{i}", s) for i, s in enumerate(good)]
    proxy = make_proxy(keys)
    assert statuses(proxy, 30, 1) == [200] * 30
    proxy.stop()
    cold = make_proxy(keys)  # a fresh database: cold again, now under concurrency
    assert statuses(cold, 64, 16) == [200] * 64
    assert {cold.wait_key(f"dead{i}", "dead")["status"] for i in range(10)} == {"dead"}


def test_half_the_pool_out_of_minute_quota_no_caller_sees_a_failure(
    fake: Fake, make_proxy: Any
) -> None:
    tired = [new_secret() for _ in range(6)]
    fresh = [new_secret() for _ in range(6)]
    fake.configure({**dict.fromkeys(tired, "minute:300"), **dict.fromkeys(fresh, "ok")})
    keys = [key_entry(f"t{i}", s) for i, s in enumerate(tired)]
    keys += [key_entry(f"f{i}", s) for i, s in enumerate(fresh)]
    proxy = make_proxy(keys)
    assert statuses(proxy, 20, 1) == [200] * 20
    assert statuses(proxy, 48, 16) == [200] * 48
    assert sum(1 for e in fake.log() if e["key"] in tired) == 6  # each project once


def test_an_all_dead_pool_answers_503_after_a_bounded_number_of_calls(
    fake: Fake, make_proxy: Any
) -> None:
    secrets = [new_secret() for _ in range(12)]
    fake.configure(dict.fromkeys(secrets, "dead"))
    proxy = make_proxy(
        [key_entry(f"d{i}", s) for i, s in enumerate(secrets)],
        options={"gemini_attempt_ceiling": 5},
    )
    r = gen(proxy)
    assert (
        r.status_code == 503 and r.json()["error"]["details"][0]["reason"] == "attempts_exhausted"
    )
    assert len(fake.log()) == 5
    r = gen(proxy)  # the next request tries the other seven
    assert r.status_code == 503
    assert len(fake.log()) == 10


# ---------------------------------------------------------------- never sent twice


def test_a_create_is_not_sent_again_after_it_may_have_reached_google(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "drop", b: "ok"})
    proxy = make_proxy([key_entry("a", a, weight=100), key_entry("b", b)])
    body = {"model": f"models/{FLASH}", "contents": [{"parts": [{"text": "x"}]}]}
    h = {"x-goog-api-key": "u"}
    r = proxy.http.post("/v1beta/cachedContents", json=body, headers=h)
    assert (
        r.status_code == 502 and r.json()["error"]["details"][0]["reason"] == "upstream_unreachable"
    )
    assert fake.counts()["create:cachedContents"] == 1  # not re-sent on b
    # an answer that says it was not processed (quota) may be retried elsewhere
    fake.configure({a: "minute:300", b: "ok"})
    r = proxy.http.post("/v1beta/cachedContents", json=body, headers=h)
    assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == "b"
    assert fake.counts()["create:cachedContents"] == 2
    # generate is safe to repeat: a dropped connection is retried
    fake.configure({a: "drop", b: "ok"})
    assert gen(proxy).status_code == 200


# ---------------------------------------------------------------- project-bound resources


def test_pins_survive_a_restart_and_an_unknown_owner_is_found(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    proxy = make_proxy([key_entry("a", a, project="p1"), key_entry("b", b, project="p2")])
    h = {"x-goog-api-key": "u"}
    body = {"model": f"models/{FLASH}", "contents": [{"parts": [{"text": "x"}]}]}
    created = proxy.http.post("/v1beta/cachedContents", json=body, headers=h)
    assert created.status_code == 200
    name = created.json()["name"]
    owner = created.headers["x-gemini-proxy-key"]
    proxy.restart()
    for _ in range(4):  # round robin would send half of these to the other project: 403
        r = proxy.http.get(f"/v1beta/{name}", headers=h)
        assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == owner
        r = post(proxy, f"/v1beta/models/{FLASH}:generateContent", {**body, "cachedContent": name})
        assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == owner
    with sqlite3.connect(proxy.db) as db:
        assert db.execute("SELECT COUNT(*) FROM pins WHERE kind = 'resource'").fetchone()[0] >= 1

    # made behind the proxy's back (another deployment): the owner is found by trying
    direct = httpx.post(
        f"{fake.url}/v1beta/cachedContents", json=body, headers={"x-goog-api-key": a}
    ).json()["name"]
    fake.http.post("/_fake/reset")
    for _ in range(3):
        r = proxy.http.get(f"/v1beta/{direct}", headers=h)
        assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == "a"
    assert len(fake.log()) <= 4  # at most one wrong project once; then the answer pins it


# ---------------------------------------------------------------- compressed answers


def test_gzipped_answers_are_read_tokens_stream_errors_and_resources(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    proxy = make_proxy([key_entry("a", a, project="p1"), key_entry("b", b, project="p2")])
    h = {"x-goog-api-key": "u", "accept-encoding": "gzip"}
    r = proxy.http.post(
        f"/v1beta/models/{FLASH}:generateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers=h,
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.json()["candidates"]  # the caller still reads it
    with proxy.http.stream(
        "POST",
        f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={**h, "x-fake-events": "4"},
    ) as s:
        assert s.headers["content-encoding"] == "gzip" and s.read().count(b"data: ") == 4
    rows = wait_for(
        lambda: (
            (x := proxy.admin.get("/admin/requests?limit=5").json()["requests"])
            and len(x) == 2
            and x
        )
    )
    assert [(x["tokens_in"], x["tokens_out"]) for x in rows] == [(5, 4), (5, 4)]
    # an in-band error in a gzipped stream is seen
    fake.configure({a: "error_event", b: "error_event"}, projects={a: "p1", b: "p2"})
    with proxy.http.stream(
        "POST",
        f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers=h,
    ) as s:
        s.read()
    wait_for(
        lambda: (
            proxy.admin.get("/admin/requests?limit=1").json()["requests"][0]["outcome"]
            == "stream_error"
        )
    )
    # a resource named in a gzipped answer is pinned to its project
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    body = {"model": f"models/{FLASH}", "contents": [{"parts": [{"text": "x"}]}]}
    created = proxy.http.post("/v1beta/cachedContents", json=body, headers=h)
    owner = created.headers["x-gemini-proxy-key"]
    name = created.json()["name"]
    for _ in range(4):
        r = proxy.http.get(f"/v1beta/{name}", headers=h)
        assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == owner
    tokens = sample(proxy.metrics(), "gemini_proxy_tokens_total", direction="out")
    assert tokens >= 8


# ---------------------------------------------------------------- reloads keep operator state


def test_a_half_written_key_file_does_not_lose_operator_state(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"})
    keys = [key_entry("a", a), key_entry("b", b)]
    proxy = make_proxy(keys, options={"gemini_watch_ms": 100})
    proxy.admin.post("/admin/keys/a/disable").raise_for_status()
    proxy.admin.patch("/admin/keys/b", json={"weight": 7}).raise_for_status()
    # a deploy tool writes the file in two steps: the first one parses, with one key
    proxy.write_keys([key_entry("b", b)])
    time.sleep(0.35)  # longer than a poll (0.25 s), shorter than the settling time (0.5 s)
    proxy.write_keys(keys)
    wait_for(lambda: "reloaded key file (key file changed)" in proxy.logs(), timeout=5)
    time.sleep(1.0)  # whatever else the watcher would reload, it has by now
    # settled first: the half-written file was never loaded (no key went missing for a moment)
    assert proxy.logs().count("reloaded key file (key file changed)") == 1
    assert "removed: a" not in proxy.logs()
    state = proxy.keys_state()
    assert state["a"]["enabled"] is False and state["b"]["weight"] == 7
    # a key really removed, then added back (even after a restart), returns as it left
    proxy.write_keys([key_entry("b", b)])
    wait_for(lambda: set(proxy.keys_state()) == {"b"}, timeout=5)
    proxy.restart()
    proxy.write_keys(keys)
    wait_for(lambda: set(proxy.keys_state()) == {"a", "b"}, timeout=5)
    assert proxy.keys_state()["a"]["enabled"] is False
    assert {gen(proxy).headers["x-gemini-proxy-key"] for _ in range(4)} == {"b"}


# ---------------------------------------------------------------- bounded labels


def test_made_up_model_names_do_not_become_metric_series(fake: Fake, make_proxy: Any) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    for i in range(40):
        assert gen(proxy, model=f"gemini-made-up-{i}").status_code == 404
    assert gen(proxy, model="x" * 200).status_code == 400
    assert gen(proxy).status_code == 200
    models = {
        line.split('model="')[1].split('"')[0]
        for line in proxy.metrics().splitlines()
        if 'model="' in line
    }
    assert models <= {FLASH, "other", "*"}, models
    rows = proxy.admin.get("/admin/requests?limit=50").json()["requests"]
    assert any(r["model"] == "gemini-made-up-3" for r in rows)  # the log keeps the name
    with sqlite3.connect(proxy.db) as db:
        used = {m for (m,) in db.execute("SELECT DISTINCT model FROM usage_daily")}
    assert used <= {FLASH, "other", "*"}, used
    assert json.dumps(rows).count("x" * 200) == 0
