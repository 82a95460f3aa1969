"""Whole-pool incidents end to end: a real mitmdump, every key of the fake answering 503 (a model
overloaded) or 429 without a quota id (the egress address throttled) at once.

The proxy treats it as one incident: new requests are held and one probe at a time goes
upstream, no key is blamed (breakers closed, health whole, no escalating backoff), the admin API,
/readyz and the metrics say so, and it clears by itself once Google answers again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2 as httpx

from ..conftest import Fake, Proxy, gen_body, key_entry, new_secret, wait_for
from .test_budgets import FLASH, gen


def pool(fake: Fake, make_proxy: Any, behaviour: str) -> tuple[Proxy, list[str]]:
    keys = [new_secret() for _ in range(3)]
    fake.configure(dict.fromkeys(keys, behaviour))
    proxy: Proxy = make_proxy(
        [key_entry(f"k{i}", s) for i, s in enumerate(keys)],
        options={"gemini_max_wait_ms": 3000},
    )
    return proxy, keys


def incidents(proxy: Proxy) -> list[dict[str, Any]]:
    return list(proxy.admin.get("/admin/health").json()["incidents"])


def readyz(proxy: Proxy) -> Any:
    return httpx.get(f"{proxy.admin_url}/readyz", timeout=5)


def post(proxy: Proxy) -> httpx.Response:
    """One request on its own connection (several at once from threads)."""
    r = httpx.post(
        f"{proxy.url}/v1beta/models/{FLASH}:generateContent",
        json=gen_body(),
        headers={"x-goog-api-key": "unused"},
        timeout=30,
    )
    proxy.remember(r.content)
    return r


def ok_again(fake: Fake, keys: list[str]) -> None:
    """Google answers again (the log is kept)."""
    fake.http.post("/_fake/config", json={"keys": dict.fromkeys(keys, "ok")}).raise_for_status()


def assert_no_key_blamed(proxy: Proxy) -> None:
    for name, k in proxy.keys_state().items():
        assert k["breaker"]["state"] == "closed", (name, k)
        assert k["health"] == 1.0 and k["status"] in ("active", "cooling"), (name, k)


def test_an_overloaded_model_is_one_incident_held_probed_and_cleared(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, keys = pool(fake, make_proxy, "503")
    r = gen(proxy)  # walks the three keys (gemini_max_attempts), Google's 503 goes back
    assert r.status_code == 503 and "x-gemini-proxy-reason" not in r.headers
    assert len(fake.log()) == 3
    [incident] = incidents(proxy)
    assert (incident["model"], incident["of"]) == (FLASH, 3) and incident["projects"] >= 2
    ready = readyz(proxy)  # said, but the worker stays ready: Google's trouble is not its own
    assert ready.status_code == 200 and ready.json()["incidents"] == [FLASH]
    assert ready.json()["usable_keys"] == 3
    assert "gemini_proxy_incident 1.0" in proxy.metrics()
    assert "gemini_proxy_incidents_total 1.0" in proxy.metrics()
    # three at once: held, then one probe walks the pool; its 503 holds the rest longer than they
    # may wait (gemini_max_wait_ms 3 s), so the proxy answers them without an upstream call
    with ThreadPoolExecutor(3) as ex:
        answers = list(ex.map(lambda _: post(proxy), range(3)))
    assert [a.status_code for a in answers] == [503, 503, 503]
    reasons = sorted(a.headers.get("x-gemini-proxy-reason", "google") for a in answers)
    assert reasons == ["google", "pool_incident", "pool_incident"], [a.text for a in answers]
    for a in answers:
        if a.headers.get("x-gemini-proxy-reason") == "pool_incident":
            assert int(a.headers["retry-after"]) >= 1
            assert "across the pool" in a.json()["error"]["message"]
    assert len(fake.log()) == 6  # the probe's three attempts, nothing more
    [incident] = incidents(proxy)
    assert incident["failed_probes"] == 1 and incident["held"] == 3
    assert_no_key_blamed(proxy)
    # Google is back: the next probe is served, the incident is over, everything goes again
    ok_again(fake, keys)
    wait_for(lambda: gen(proxy).status_code == 200, timeout=20, interval=0.5)
    assert len(fake.log()) == 7  # the held requests never reached Google: one probe did
    assert incidents(proxy) == []
    assert "incidents" not in readyz(proxy).json()
    assert "gemini_proxy_incident 0.0" in proxy.metrics()
    assert all(gen(proxy).status_code == 200 for _ in range(3))
    logs = proxy.logs()
    assert f"incident on {FLASH}: 2 of 3 projects answered" in logs
    assert f"incident on {FLASH} over after" in logs


def test_a_throttled_egress_is_one_incident_without_escalating_backoff(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, keys = pool(fake, make_proxy, "429bare")
    r = gen(proxy)  # every key 429 without a quota id, twice round (it waits for the cooldowns)
    assert r.status_code == 429 and r.headers["x-gemini-proxy-reason"] == "all_keys_cooling"
    [incident] = incidents(proxy)
    assert incident["model"] == FLASH
    # in the incident a project cools briefly, never the doubling backoff of a project alone
    cooldowns = [c for k in proxy.keys_state().values() for c in k["cooldowns"].values()]
    reasons = " ".join(c["reason"] for c in cooldowns)
    assert "pool incident" in reasons and "backoff 4s" not in reasons, reasons
    assert_no_key_blamed(proxy)
    upstream = len(fake.log())
    ok_again(fake, keys)
    wait_for(lambda: gen(proxy).status_code == 200, timeout=20, interval=0.5)
    assert incidents(proxy) == []
    assert len(fake.log()) == upstream + 1  # one probe, served
    wait_for(lambda: all(k["status"] == "active" for k in proxy.keys_state().values()))
