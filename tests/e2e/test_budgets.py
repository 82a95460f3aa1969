"""Budgets end to end: a real mitmdump, the fake Gemini counting each project's quota.

Configured budgets are spent, then answered by the proxy with no upstream call; a limit learned
from Google's 429 paces its project; selection prefers the project with the most headroom; a
prompt larger than every project's minute budget never reaches Google.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from mitmproxy import io

from ..conftest import Fake, Proxy, gen_body, key_entry, new_secret, wait_for
from .test_workers import RedisServer, redis_server, shared_up

__all__ = ["redis_server"]  # the fixture, used by name

FLASH = "gemini-2.5-flash"
PRO = "gemini-2.5-pro"
PACIFIC = ZoneInfo("America/Los_Angeles")


def budget_proxy(
    make_proxy: Any, keys: dict[str, tuple[str, str]], projects: list[dict[str, Any]] | None
) -> Proxy:
    """keys: name -> (secret, project)."""
    proxy: Proxy = make_proxy(
        [key_entry(n, s, project=p) for n, (s, p) in keys.items()], start=False
    )
    if projects:
        doc = yaml.safe_load(proxy.keys_file.read_text())
        doc["projects"] = projects
        proxy.keys_file.write_text(yaml.safe_dump(doc))
    return proxy.start()


def gen(proxy: Proxy, model: str = FLASH, body: Any = None) -> Any:
    r = proxy.http.post(
        f"/v1beta/models/{model}:generateContent",
        json=body if body is not None else gen_body(),
        headers={"x-goog-api-key": "unused"},
    )
    proxy.remember(r.content)
    return r


def served(fake: Fake, model: str = FLASH) -> list[tuple[str | None, int]]:
    return [(e["key"], e["status"]) for e in fake.log() if e["model"] == model]


def budgets(proxy: Proxy) -> dict[tuple[str, str], dict[str, Any]]:
    rows = proxy.admin.get("/admin/budgets").json()["budgets"]
    return {(b["project"], b["model"]): b for b in rows}


def seconds_to_pacific_midnight() -> float:
    now = datetime.now(PACIFIC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), PACIFIC)
    return midnight.timestamp() - time.time()


def test_configured_budgets_are_spent_then_answered_by_the_proxy(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "proj-a", b: "proj-b"})
    proxy = budget_proxy(
        make_proxy,
        {"a1": (a, "proj-a"), "b1": (b, "proj-b")},
        [
            {"name": "proj-a", "limits": {FLASH: {"rpd": 2}}},
            {"name": "proj-b", "limits": {"gemini-2.5-fl*": {"rpd": 1, "rpm": 50}}},
        ],
    )
    for _ in range(3):
        assert gen(proxy).status_code == 200
    assert sorted(k for k, _ in served(fake)) == sorted([a, a, b])
    # every project is out for the model: the proxy answers, Google sees nothing more
    r = gen(proxy)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["status"] == "RESOURCE_EXHAUSTED" and "out of budget" in err["message"]
    assert "proj-a spent 2/2 requests today (configured)" in err["message"]
    retry_after = int(r.headers["retry-after"])
    assert abs(retry_after - seconds_to_pacific_midnight()) < 5  # the next Pacific midnight
    oa = proxy.http.post(
        "/v1/chat/completions",
        json={"model": FLASH, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer unused"},
    )
    proxy.remember(oa.content)
    assert oa.status_code == 429 and "retry-after" in oa.headers
    assert "error" in json.dumps(oa.json())  # OpenAI's shape, from errors.py
    assert len(served(fake)) == 3
    # what spends no generation quota, and other models, still go through
    count = proxy.http.post(
        f"/v1beta/models/{FLASH}:countTokens",
        json=gen_body(),
        headers={"x-goog-api-key": "unused"},
    )
    assert count.status_code == 200
    assert gen(proxy, PRO).status_code == 200
    assert all(status == 200 for _, status in served(fake) + served(fake, PRO))
    # visible: the admin API, the gauges, the comment of each flow
    seen = budgets(proxy)
    rpd = seen[("proj-a", FLASH)]["limits"]["rpd"]
    assert (rpd["limit"], rpd["source"], rpd["used"], rpd["left"]) == (2, "configured", 2, 0)
    assert abs(rpd["resets_at"] - time.time() - seconds_to_pacific_midnight()) < 5
    assert seen[("proj-b", FLASH)]["limits"]["rpm"]["left"] == 49
    metrics = proxy.metrics()
    assert f'gemini_proxy_budget_left{{kind="rpd",model="{FLASH}",project="proj-a"}} 0.0' in metrics
    assert (
        f'gemini_proxy_budget_limit{{kind="rpd",model="{FLASH}",project="proj-a"}} 2.0' in metrics
    )
    # a restart keeps the day's counts (from SQLite): still spent, still nothing upstream
    upstream = len(fake.log())
    proxy.restart()
    assert gen(proxy).status_code == 429
    assert len(fake.log()) == upstream
    assert proxy.stop() == 0
    with proxy.dump.open("rb") as f:
        comments = [flow.comment for flow in io.FlowReader(f).stream()]
    assert any(f"budget proj-a {FLASH} 2/2 today" in c for c in comments), comments
    assert any("proxy answered 429 (all_keys_cooling)" in c for c in comments), comments


def test_a_learned_budget_paces_its_project(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure(
        {a: "ok", b: "ok"},
        projects={a: "proj-a", b: "proj-b"},
        quota={"proj-a": {FLASH: {"rpm": 2}}},
        quota_delay="1s",  # Google's retryDelay may end long before its window does
    )
    proxy = budget_proxy(make_proxy, {"a1": (a, "proj-a"), "b1": (b, "proj-b")}, None)
    for _ in range(5):  # a, b, a, b, a: the third to proj-a is Google's 429, retried on b
        assert gen(proxy).status_code == 200
    assert fake.http.get("/_fake/spent").json()["proj-a"][FLASH]["refused"] == {"rpm": 1}
    line = f"learned: proj-a × {FLASH}, 2 requests a minute, from Google's 429"
    wait_for(lambda: line in proxy.logs())
    rpm = budgets(proxy)[("proj-a", FLASH)]["limits"]["rpm"]
    assert (rpm["limit"], rpm["source"]) == (2, "learned")
    # the 1 s cooldown passes; the learned limit still keeps proj-a out for the rest of its minute
    wait_for(lambda: proxy.keys_state()["a1"]["status"] == "active")
    for _ in range(6):
        assert gen(proxy).status_code == 200
    spent = fake.http.get("/_fake/spent").json()
    assert spent["proj-a"][FLASH]["refused"] == {"rpm": 1}  # no second 429 from Google
    assert spent["proj-a"][FLASH]["requests_minute"] == 2
    assert [k for k, _ in served(fake)][-6:] == [b] * 6
    assert proxy.logs().count(line) == 1  # said once
    # persisted: a restart still knows it
    proxy.restart()
    rpm = budgets(proxy)[("proj-a", FLASH)]["limits"]["rpm"]
    assert (rpm["limit"], rpm["source"]) == (2, "learned")


def test_headroom_first_the_small_project_lasts(fake: Fake, make_proxy: Any) -> None:
    a, b, c = new_secret(), new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok", c: "ok"}, projects={a: "proj-a", b: "proj-b", c: "proj-c"})
    proxy = budget_proxy(
        make_proxy,
        {"a1": (a, "proj-a"), "b1": (b, "proj-b"), "c1": (c, "proj-c")},
        [
            {"name": "proj-a", "limits": {FLASH: {"rpd": 8}}},
            {"name": "proj-b", "limits": {FLASH: {"rpd": 8}}},
            {"name": "proj-c", "limits": {FLASH: {"rpd": 2}}},
        ],
    )
    for _ in range(18):
        assert gen(proxy).status_code == 200
    keys = [k for k, _ in served(fake)]
    assert keys.count(a) == keys.count(b) == 8 and keys.count(c) == 2
    # round robin would have drained proj-c in the first six; headroom keeps it for later
    assert keys[:6].count(c) == 1 and c in keys[6:]
    assert gen(proxy).status_code == 429
    assert len(served(fake)) == 18 and all(s == 200 for _, s in served(fake))


def test_a_prompt_too_large_for_a_project_goes_elsewhere_and_never_cools_the_pool(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure(
        {a: "ok", b: "ok"},
        projects={a: "proj-a", b: "proj-b"},
        quota={"proj-b": {FLASH: {"tpm": 100}}},
    )
    proxy: Proxy = make_proxy(
        [key_entry("a1", a, project="proj-a"), key_entry("b1", b, project="proj-b", weight=5)],
        start=False,
    )
    doc = yaml.safe_load(proxy.keys_file.read_text())
    doc["projects"] = [{"name": "proj-a", "limits": {FLASH: {"tpm": 1000}}}]
    proxy.keys_file.write_text(yaml.safe_dump(doc))
    proxy.start()
    # proj-b first (weight): Google's 429 names its 100-token minute limit, below this prompt;
    # it cools nothing and the prompt goes to proj-a, whose budget fits it
    r = proxy.http.post(
        f"/v1beta/models/{FLASH}:generateContent",
        json=gen_body("x" * 600),
        headers={"x-goog-api-key": "unused", "x-fake-prompt-tokens": "150"},
    )
    proxy.remember(r.content)
    assert r.status_code == 200, r.text
    assert served(fake) == [(b, 429), (a, 200)]
    assert fake.http.get("/_fake/spent").json()["proj-b"][FLASH]["refused"] == {"tpm": 1}
    wait_for(lambda: f"learned: proj-b × {FLASH}, 100 input tokens a minute" in proxy.logs())
    assert all(s["status"] == "active" for s in proxy.keys_state().values())
    # a prompt over every project's minute budget: refused here, Google never sees it
    r = gen(proxy, body=gen_body("x" * 8000))
    assert r.status_code == 413, r.text
    assert "exceed the per-minute token budget of every project" in r.json()["error"]["message"]
    assert len(served(fake)) == 2
    # small requests still go everywhere: the big ones cooled nothing
    for _ in range(2):
        assert gen(proxy).status_code == 200
    assert {k for k, _ in served(fake)[2:]} == {b}  # proj-b: the most headroom


def budget_workers(fake: Fake, make_proxy: Any, redis_url: str, rpd: int) -> list[Proxy]:
    """Two workers on one Redis, one key of proj-a, whose flash budget is `rpd` a day."""
    a = new_secret()
    fake.configure({a: "ok"}, projects={a: "proj-a"})
    prefix = "t-" + secrets.token_hex(4)
    made = []
    for i in (1, 2):
        w: Proxy = make_proxy(
            [key_entry("a1", a, project="proj-a")],
            start=False,
            options={
                "gemini_redis": redis_url,
                "gemini_redis_prefix": prefix,
                "gemini_worker": f"w{i}",
            },
        )
        doc = yaml.safe_load(w.keys_file.read_text())
        doc["projects"] = [{"name": "proj-a", "limits": {FLASH: {"rpd": rpd}}}]
        w.keys_file.write_text(yaml.safe_dump(doc))
        made.append(w.start())
    return made


def test_two_workers_spend_one_budget_through_redis(
    fake: Fake, make_proxy: Any, redis_server: Any
) -> None:
    made = budget_workers(fake, make_proxy, redis_server.url, rpd=3)
    w1, w2 = made
    wait_for(lambda: all(shared_up(w) for w in made))
    for _ in range(2):
        assert gen(w1).status_code == 200

    def used(w: Proxy) -> int:
        return int(budgets(w)[("proj-a", FLASH)]["limits"]["rpd"]["used"])

    wait_for(lambda: used(w2) == 2)
    assert gen(w2).status_code == 200
    wait_for(lambda: used(w1) == 3)
    for w in made:  # the budget is spent on both workers: Google sees no fourth request
        r = gen(w)
        assert r.status_code == 429 and "3/3 requests today" in r.json()["error"]["message"]
    assert len(served(fake)) == 3


def test_two_workers_share_a_budget_with_redis_killed_mid_run(
    fake: Fake, make_proxy: Any, tmp_path: Any
) -> None:
    server = RedisServer(tmp_path)
    try:
        made = budget_workers(fake, make_proxy, server.url, rpd=9)
        w1, w2 = made
        wait_for(lambda: all(shared_up(w) for w in made))
        wait_for(lambda: all(w.admin.get("/admin/clients").json()["workers"] == 2 for w in made))

        def rpd(w: Proxy) -> dict[str, Any]:
            return dict(budgets(w)[("proj-a", FLASH)]["limits"]["rpd"])

        for w in (w1, w2, w1, w2):
            assert gen(w).status_code == 200
        wait_for(lambda: all(rpd(w)["used"] == 4 for w in made))
        # Redis dies: a request at once is served (selection never waits on Redis) ...
        server.stop()
        assert gen(w1).status_code == 200
        wait_for(lambda: not any(shared_up(w) for w in made))
        wait_for(lambda: all("share" in rpd(w) for w in made))
        # ... and each worker keeps to its share of the 5 left: 3 each (rounded up), so the two
        # spend 10 of a budget of 9: one over, never more
        statuses = [gen(w).status_code for w in (w1, w2) * 6]
        assert statuses.count(200) == 5 and set(statuses) <= {200, 429}, statuses
        assert len(served(fake)) == 10
        for w in made:
            r = gen(w)
            assert r.status_code == 429, r.text
            assert "this worker's share while Redis is away" in r.json()["error"]["message"]
        assert len(served(fake)) == 10  # the proxy's own 429s: nothing went upstream
        # Redis back: each worker hears what the other spent meanwhile; one budget, spent
        server.start()
        wait_for(lambda: all(shared_up(w) for w in made), timeout=30)
        wait_for(lambda: all("share" not in rpd(w) and rpd(w)["used"] >= 9 for w in made))
        assert [gen(w).status_code for w in made] == [429, 429]
        assert len(served(fake)) == 10
    finally:
        server.stop()
