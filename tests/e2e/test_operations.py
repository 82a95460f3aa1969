"""State across restarts, the admin API, Prometheus metrics, mitmweb and structured logs."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from io import BytesIO
from typing import Any

import httpx2 as httpx
import pytest
from mitmproxy import flowfilter, io
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import ROOT, Fake, Proxy, free_port, gen_body, key_entry, new_secret, wait_for
from .test_proxy import FLASH, gen, post


def sample(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found, f"no sample {name}{labels}"
    return total


def test_dead_key_stays_disabled_across_a_restart(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "dead", b: "ok"})
    proxy = make_proxy([key_entry("a", a, weight=10), key_entry("b", b)])
    assert gen(proxy).status_code == 200
    proxy.wait_key("a", "dead")
    proxy.restart()
    fake.configure({a: "dead", b: "ok"})
    for _ in range(5):
        assert gen(proxy).status_code == 200
    assert a not in fake.keys_seen()
    assert proxy.keys_state()["a"]["disabled_reason"] == "400 API key invalid"
    assert "restored state of 2 keys" in proxy.logs()


def test_kill9_under_load_keeps_the_database_intact_and_state_restored(
    fake: Fake, make_proxy: Any
) -> None:
    a, b, c = new_secret(), new_secret(), new_secret()
    fake.configure({a: "ok", b: "dead", c: "minute:300"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b), key_entry("c", c)])
    for _ in range(3):
        gen(proxy)
    proxy.wait_key("b", "dead")
    time.sleep(1.2)  # key state older than a second is never lost: this is the second
    for _round in range(3):
        stop = threading.Event()
        done: list[int] = []

        def load(stop: threading.Event = stop, done: list[int] = done) -> None:
            client = httpx.Client(base_url=proxy.url, timeout=5)
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    done.append(
                        client.post(
                            f"/v1beta/models/{FLASH}:generateContent",
                            json=gen_body(),
                            headers={"x-goog-api-key": "u"},
                        ).status_code
                    )

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda done=done: len(done) > 40, timeout=20)
        proxy.kill9()
        stop.set()
        for t in threads:
            t.join(10)
        with sqlite3.connect(proxy.db) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
        assert rows > 0
        proxy.start()
        state = proxy.keys_state()
        assert state["b"]["status"] == "dead"
        assert state["c"]["status"] == "cooling"
        assert gen(proxy).headers["x-gemini-proxy-key"] == "a"


def test_outcome_rows_and_daily_usage(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "minute:30", b: "ok"})
    proxy = make_proxy(
        [key_entry("a", a, project="p1", weight=10), key_entry("b", b, project="p2")],
        clients=[{"name": "app", "token": "tok-1"}],
    )
    r = post(proxy, f"/v1beta/models/{FLASH}:generateContent", headers={"x-goog-api-key": "tok-1"})
    assert r.status_code == 200
    with proxy.http.stream(
        "POST",
        f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
        json=gen_body(),
        headers={"x-goog-api-key": "tok-1", "x-fake-events": "4"},
    ) as s:
        s.read()
    rows = wait_for(
        lambda: (
            (x := proxy.admin.get("/admin/requests?limit=10").json()["requests"])
            and len(x) == 2
            and x
        )
    )
    stream_row, unary_row = rows
    assert unary_row["client"] == "app" and unary_row["key"] == "b" and unary_row["status"] == 200
    assert [(t["key"], t["outcome"]) for t in unary_row["attempts"]] == [
        ("a", "quota_minute"),
        ("b", "ok"),
    ]
    assert (unary_row["tokens_in"], unary_row["tokens_out"], unary_row["stream"]) == (5, 4, False)
    assert (
        stream_row["stream"] is True and stream_row["tokens_out"] == 4 and stream_row["ttfb_ms"] > 0
    )
    assert stream_row["bytes"] > 250  # on the wire: the fake gzips, as Google does
    filtered = proxy.admin.get("/admin/requests?key=a").json()["requests"]
    assert filtered == []  # a never served a request in the end
    usage = proxy.keys_state()
    assert usage["a"]["usage_today"] == {
        "requests": 1,
        "errors": 1,
        "tokens_in": 0,
        "tokens_out": 0,
    }
    assert (
        usage["b"]["usage_today"]["requests"] == 2 and usage["b"]["usage_today"]["tokens_out"] == 8
    )


def test_admin_api_auth_endpoints_and_bad_input(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b, weight=3)])
    anon = httpx.Client(base_url=proxy.admin_url, timeout=5)
    assert anon.get("/healthz").json() == {"status": "ok"}
    assert anon.get("/readyz").json() == {"ready": True, "usable_keys": 2}
    assert anon.get("/admin/keys").status_code == 401
    assert anon.get("/admin/keys", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert "admin token" in anon.get("/admin/keys").json()["error"]["message"]

    keys = proxy.admin.get("/admin/keys").json()["keys"]
    assert [k["name"] for k in keys] == ["a", "b"]
    assert keys[0]["key"] == f"AIza…{a[-4:]}" and keys[1]["key"] != keys[0]["key"]
    assert proxy.admin.get("/admin/keys/b").json()["weight"] == 3
    assert proxy.admin.get("/admin/rotation").json()["*"] == ["b", "a", "b", "b"]

    assert proxy.admin.post("/admin/keys/a/disable").json()["enabled"] is False
    for _ in range(3):
        assert gen(proxy).headers["x-gemini-proxy-key"] == "b"
    health = proxy.admin.get("/admin/health").json()
    assert (health["active"], health["disabled"]) == (1, 1)
    assert anon.get("/readyz").json()["usable_keys"] == 1
    assert proxy.admin.patch("/admin/keys/b", json={"weight": 7}).json()["weight"] == 7

    proxy.restart()  # operator overrides survive and are shown as overriding the YAML
    ka = proxy.admin.get("/admin/keys/a").json()
    kb = proxy.admin.get("/admin/keys/b").json()
    assert ka["enabled"] is False and ka["overrides_yaml"] == {"enabled": False}
    assert kb["weight"] == 7 and kb["overrides_yaml"] == {"weight": 7}
    assert proxy.admin.post("/admin/keys/a/enable").json()["enabled"] is True
    assert proxy.admin.post("/admin/keys/b/reset").json()["weight"] == 3

    exported = proxy.admin.get("/admin/state").json()
    assert exported["version"] == 1 and set(exported["keys"]) == {"a", "b"}
    assert a not in json.dumps(exported)
    assert proxy.admin.post("/admin/state", json=exported).json() == {"imported": 2}

    bad = [
        proxy.admin.get("/admin/keys/nope"),
        proxy.admin.post("/admin/keys/nope/disable"),
        proxy.admin.post("/admin/keys/a/explode"),
        proxy.admin.patch("/admin/keys/a", json={"weight": 0}),
        proxy.admin.patch("/admin/keys/a", json={"weight": 1001}),
        proxy.admin.patch("/admin/keys/a", json={"weight": "3"}),
        proxy.admin.patch("/admin/keys/a", json={"enabled": False}),
        proxy.admin.patch(
            "/admin/keys/a", content=b"{nope", headers={"content-type": "application/json"}
        ),
        proxy.admin.post("/admin/state", json={"keys": []}),
        proxy.admin.post("/admin/state", content=b"x" * (2 << 20)),
        proxy.admin.get("/admin/keys/..%2F..%2Fetc%2Fpasswd"),
        proxy.admin.get("/admin/requests?limit=abc"),
        proxy.admin.get("/admin/requests?limit=100000"),
        proxy.admin.get("/admin/requests?key=a'%20OR%201=1--"),
    ]
    for r in bad:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code)
        assert "error" in r.json()
    assert [k["weight"] for k in proxy.admin.get("/admin/keys").json()["keys"]] == [1, 3]


def test_admin_without_a_token_is_off_and_says_how(fake: Fake, make_proxy: Any) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)], admin_token="")
    r = httpx.get(f"{proxy.admin_url}/admin/keys", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "GEMINI_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_metrics_after_known_traffic(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "dead", b: "ok"})
    proxy = make_proxy(
        [key_entry("a", a, weight=10), key_entry("b", b)],
        clients=[{"name": "web", "token": "t-web"}],
        options={"gemini_max_body": 5000},
    )
    for _ in range(3):
        assert (
            post(
                proxy,
                f"/v1beta/models/{FLASH}:generateContent",
                headers={"x-goog-api-key": "t-web"},
            ).status_code
            == 200
        )
    assert (
        post(
            proxy, f"/v1beta/models/{FLASH}:generateContent", headers={"x-goog-api-key": "bad"}
        ).status_code
        == 401
    )
    big = {"contents": [{"parts": [{"text": "x" * 6000}]}]}
    assert (
        post(
            proxy,
            f"/v1beta/models/{FLASH}:generateContent",
            big,
            headers={"x-goog-api-key": "t-web"},
        ).status_code
        == 413
    )
    m = proxy.metrics()
    assert sample(m, "gemini_proxy_requests_total", client="web", api="native", status="200") == 3
    assert (
        sample(
            m,
            "gemini_proxy_upstream_requests_total",
            key="a",
            model=FLASH,
            outcome="dead_key",
            status="400",
        )
        == 1
    )
    assert (
        sample(
            m,
            "gemini_proxy_upstream_requests_total",
            key="b",
            model=FLASH,
            outcome="ok",
            status="200",
        )
        == 3
    )
    assert sample(m, "gemini_proxy_retries_total", reason="dead_key") == 1
    assert sample(m, "gemini_proxy_proxy_answers_total", status="401", reason="invalid_token") == 1
    assert (
        sample(m, "gemini_proxy_proxy_answers_total", status="413", reason="request_too_large") == 1
    )
    assert sample(m, "gemini_proxy_tokens_total", key="b", model=FLASH, direction="out") == 12
    assert sample(m, "gemini_proxy_upstream_latency_seconds_count", key="b", model=FLASH) == 3
    assert sample(m, "gemini_proxy_key_enabled", key="a") == 0
    assert sample(m, "gemini_proxy_key_enabled", key="b") == 1
    assert sample(m, "gemini_proxy_key_health_ratio", key="b") == 1.0
    assert sample(m, "gemini_proxy_requests_in_flight") == 0
    assert sample(m, "gemini_proxy_config_reloads_total", result="ok") >= 1
    assert a not in m and b not in m and "t-web" not in m


def test_json_logs_carry_the_request_fields(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "503", b: "ok"})
    proxy = make_proxy(
        [key_entry("a", a, weight=10), key_entry("b", b)], options={"gemini_log_json": True}
    )
    rid = gen(proxy).headers["x-request-id"]
    line = wait_for(lambda: next((ln for ln in proxy.logs().splitlines() if rid in ln), None))
    doc = json.loads(line)  # the whole line is one JSON object
    assert (
        doc["request_id"] == rid
        and doc["key"] == "b"
        and doc["status"] == 200
        and doc["attempts"] == 2
    )
    assert doc["client"] == "local" and doc["model"] == FLASH and doc["outcome"] == "ok"
    assert (
        doc["detail"] == "served by b: 200 · first a: 503 UNAVAILABLE #google-error · then b: 200"
    )
    assert doc["upstream_errors"] == [
        "a: Google said 503: The model is overloaded. Please try again later."
    ]
    assert doc["latency_ms"] > 0


def test_newer_database_is_refused_untouched(make_proxy: Any) -> None:
    proxy = make_proxy([key_entry("a", new_secret())], start=False)
    with sqlite3.connect(proxy.db) as db:
        db.execute("PRAGMA user_version=99")
    proxy.start(wait=False)
    assert proxy.proc is not None and proxy.proc.wait(30) != 0
    assert "schema version 99 is newer" in proxy.logs()
    with sqlite3.connect(proxy.db) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 99
        assert db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0


def test_mitmweb_shows_comments_and_never_a_key(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "minute:60", b: "ok"})
    web_port = free_port()
    password = "web-pass-123"
    proxy: Proxy = make_proxy(
        [key_entry("alpha", a, weight=10), key_entry("beta", b)],
        tool="mitmweb",
        clients=[{"name": "app", "token": "client-tok-1"}],
        options={"web_port": web_port, "web_password": password, "web_open_browser": False},
    )
    assert (
        post(
            proxy,
            f"/v1beta/models/{FLASH}:generateContent",
            headers={"x-goog-api-key": "client-tok-1"},
        ).status_code
        == 200
    )
    with proxy.http.stream(
        "POST",
        f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
        json=gen_body(),
        headers={"x-goog-api-key": "client-tok-1"},
    ) as s:
        s.read()
    r = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": "Bearer client-tok-1"},
        json={"model": FLASH, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    web = httpx.Client(
        base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": f"Bearer {password}"}
    )
    flows = wait_for(lambda: (f := web.get("/flows").json()) and len(f) == 3 and f)
    everything = json.dumps(flows)
    for f in flows:
        everything += web.get(f"/flows/{f['id']}/request/content.data").text
        everything += web.get(f"/flows/{f['id']}/response/content.data").text
    everything += web.get("/flows/dump").content.decode("latin-1")
    for secret in (a, b, "client-tok-1"):
        assert secret not in everything
    comments = [f["comment"] for f in flows]
    # one line (mitmweb drops line breaks): the outcome and the serving key first (a cut-off
    # cell still names the right key), one clause per attempt with its #tag and Google's own
    # message shortened at a word, then what a stream carried
    assert "\n" not in "".join(comments)
    assert comments[0].startswith(
        f"served by beta: 200 · first alpha: 429 per-minute quota {FLASH} #quota, "
        "Google said: You exceeded your current quota"
    )
    # last, the client's day so far (as each request was admitted)
    notes = [c.rsplit(" · ", 1)[1] for c in comments]
    assert [n.split(",")[0] for n in notes] == [
        f"app: {n} request{'s' * (n > 1)}" for n in (1, 2, 3)
    ]
    assert all(n.endswith(" tokens today") for n in notes)
    bare = [c.rsplit(" · ", 1)[0] for c in comments]
    assert bare[0].endswith("… · then beta: 200")
    assert bare[1].startswith("served by beta: 200 · streamed ")
    assert bare[1].endswith(" B, 3 events, tokens 5 in / 3 out, complete")
    assert bare[2] == "served by beta: 200"
    assert flows[0]["marked"] == "🔁"  # mitmweb renders the :repeat: mark as its emoji
    assert flows[2]["request"]["path"] == "/v1beta/openai/chat/completions"
    assert flows[1]["request"]["host"] == "127.0.0.1" and flows[1]["request"]["port"] == fake.port

    # the README's mitmweb filters, on the flows mitmweb exports (mitmproxy's filter grammar;
    # mitmweb's search box has the same, without ~meta)
    dumped = list(io.FlowReader(BytesIO(web.get("/flows/dump").content)).stream())

    def matching(expr: str) -> list[int]:
        f = flowfilter.parse(expr)
        return [i for i, flow in enumerate(dumped) if f(flow)]

    assert matching('~comment "served by beta:"') == [0, 1, 2]
    assert matching('~comment "served by alpha:"') == []  # alpha only failed
    assert matching('~hs "x-gemini-proxy-key: beta"') == [0, 1, 2]
    assert matching("~comment #quota") == [0] and matching("~marked") == [0]
    assert matching("~comment #dead-key") == []

    # the flow list shows the comment column, unless the user chose columns
    options = web.get("/options").json()
    assert "comment" in options["web_columns"]["value"]
    assert proxy.admin_token not in json.dumps(options)  # the admin token is no option
    # the command bar: one line per key; every action says what changed
    web.cookies.set("_mitmproxy_xsrf", "t0k")  # tornado's XSRF check: cookie == header
    xsrf = {"X-XSRFToken": "t0k"}

    def command(cmd: str, *args: str) -> Any:
        r = web.post(f"/commands/{cmd}", json={"arguments": list(args)}, headers=xsrf)
        return r.json()

    keys = command("gemini.keys")["value"]
    assert isinstance(keys, list) and len(keys) == 2
    assert keys[0].startswith("alpha (") and " cooling " in keys[0] and "cooling=[gemini" in keys[0]
    said = command("gemini.disable", "beta")["value"]
    assert said == "disable: beta was active, weight 1, now disabled, weight 1"
    said = command("gemini.enable", "beta")["value"]
    assert said.startswith("enable: beta was disabled") and said.endswith("now active, weight 1")
    assert command("gemini.enable", "nope")["error"].startswith("error: no key named 'nope'")
    assert command("gemini.reload")["value"].startswith("reloaded ")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_finishes_a_slow_stream_and_refuses_new_connections(
    fake: Fake, make_proxy: Any, sig: int
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    got = bytearray()
    first = threading.Event()
    status: list[int] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{proxy.url}/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
            json=gen_body(),
            timeout=30,
            headers={"x-goog-api-key": "u", "x-fake-events": "8", "x-fake-delay-ms": "250"},
        ) as r:
            status.append(r.status_code)
            for chunk in r.iter_bytes():
                got.extend(chunk)
                first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(10)
    proxy.send_signal(sig)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{proxy.url}/v1beta/models/{FLASH}:generateContent", json=gen_body(), timeout=2)
    t.join(20)
    assert status == [200]
    assert got.count(b"data: ") == 8, "the stream was cut by the shutdown"
    assert proxy.stop() == 0
    assert "draining 1 requests in flight" in proxy.logs()


def test_state_script_moves_a_deployment(fake: Fake, make_proxy: Any, tmp_path: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "dead", b: "minute:300"})
    old = make_proxy([key_entry("a", a), key_entry("b", b)])
    gen(old)
    old.wait_key("a", "dead")
    old.stop()
    script = str(ROOT / "scripts" / "state.py")
    exported = subprocess.run(
        [sys.executable, script, "export", str(old.db)], capture_output=True, text=True, check=True
    )
    doc = json.loads(exported.stdout)
    assert doc["keys"]["a"]["disabled_reason"] == "400 API key invalid" and a not in exported.stdout
    new = make_proxy([key_entry("a", a), key_entry("b", b)], start=False)
    subprocess.run(
        [sys.executable, script, "import", str(new.db), "-"],
        input=exported.stdout,
        text=True,
        check=True,
    )
    new.start()
    state = new.keys_state()
    assert state["a"]["status"] == "dead" and state["b"]["status"] == "cooling"
    bad = subprocess.run(
        [sys.executable, script, "import", str(new.db), "-"],
        input="[]",
        text=True,
        capture_output=True,
    )
    assert bad.returncode == 1 and "not a gemini-proxy state export" in bad.stderr


def test_a_second_signal_ends_the_drain(fake: Fake, make_proxy: Any) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    first = threading.Event()

    def stream() -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream(
                "POST",
                f"{proxy.url}/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
                json=gen_body(),
                timeout=30,
                headers={"x-goog-api-key": "u", "x-fake-events": "20", "x-fake-delay-ms": "1000"},
            ) as r,
        ):
            for _ in r.iter_bytes():
                first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(10)
    proxy.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining 1 requests" in proxy.logs(), timeout=5)
    t0 = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert proxy.proc is not None
    proxy.proc.wait(10)
    assert time.monotonic() - t0 < 5  # not the 20 s the stream still had to go
    t.join(10)
    assert "still in flight at exit" in proxy.logs()


def test_troubleshooting_a_failing_key_as_the_readme_walks_it(fake: Fake, make_proxy: Any) -> None:
    """README, "Troubleshooting a failing key", step by step, under a real mitmweb."""
    a, b = new_secret(), new_secret()
    fake.configure({a: "suspended", b: "ok"})
    web_port, password = free_port(), "web-pass-456"
    proxy: Proxy = make_proxy(
        [key_entry("alpha", a, weight=10), key_entry("beta", b)],
        tool="mitmweb",
        options={
            "web_port": web_port,
            "web_password": password,
            "web_open_browser": False,
            "gemini_recheck_ms": 300,
        },
    )
    assert gen(proxy).status_code == 200
    # 1. /admin/health: counts by state and each key's last error; /admin/keys/NAME
    health = wait_for(lambda: (h := proxy.admin.get("/admin/health").json())["dead"] == 1 and h)
    assert health["active"] == 1 and health["last_errors"]["alpha"] == "403 CONSUMER_SUSPENDED"
    alpha = proxy.admin.get("/admin/keys/alpha").json()
    assert alpha["status"] == "dead" and alpha["disabled_reason"] == "403 CONSUMER_SUSPENDED"
    assert alpha["breaker"]["state"] == "closed" and alpha["next_check_in"] is not None
    assert alpha["usage_today"]["errors"] == 1
    # 2. mitmweb: the comment column, the filter, Google's own (scrubbed) error
    web = httpx.Client(
        base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": f"Bearer {password}"}
    )
    flows = wait_for(lambda: (f := web.get("/flows").json()) and f)
    said = flows[0]["comment"]
    assert said.startswith("served by beta: 200 · first alpha: 403 CONSUMER_SUSPENDED #dead-key, ")
    assert ", Google said: Permission denied: Consumer 'api_key:" in said
    assert said.endswith(" · then beta: 200") and "\n" not in said
    assert "[redacted key]" in said and a not in json.dumps(flows)
    dumped = list(io.FlowReader(BytesIO(web.get("/flows/dump").content)).stream())
    assert [f.comment for f in dumped if flowfilter.parse("~comment #dead-key")(f)] == [said]
    assert not [f for f in dumped if flowfilter.parse('~comment "served by alpha:"')(f)]
    # 4. the requests alpha took part in, with every attempt and Google's message
    rows = proxy.admin.get("/admin/requests?tried=alpha&limit=20").json()["requests"]
    assert len(rows) == 1 and [t["key"] for t in rows[0]["attempts"]] == ["alpha", "beta"]
    assert "has been suspended" in rows[0]["attempts"][0]["message"]
    assert proxy.admin.get("/admin/requests?key=alpha").json()["requests"] == []
    # 3. fixed in Google Cloud: it comes back by itself, without spending generation quota
    fake.configure({a: "ok", b: "ok"})
    proxy.wait_key("alpha", "active")
    assert "key alpha is accepted by Google again" in proxy.logs()
    assert fake.log() == [] and {e["key"] for e in fake.checks()} == {a}  # checks only
    # replaying the flow from mitmweb sends it through the pool again (loopback-only mode)
    mark = len(fake.log())
    web.cookies.set("_mitmproxy_xsrf", "t0k")
    xsrf = {"X-XSRFToken": "t0k"}
    assert web.post(f"/flows/{flows[0]['id']}/replay", headers=xsrf).status_code == 200
    wait_for(lambda: len(fake.log()) > mark)
    replayed = wait_for(lambda: (f := web.get("/flows").json()) and f[0].get("response") and f[0])
    assert replayed["response"]["status_code"] == 200 and a not in json.dumps(replayed)
    # ... or the operator puts it back at once
    fake.configure({a: "suspended", b: "ok"})
    gen(proxy)
    proxy.wait_key("alpha", "dead")
    said = web.post("/commands/gemini.enable", json={"arguments": ["alpha"]}, headers=xsrf).json()[
        "value"
    ]
    assert said.startswith("enable: alpha was dead (403 CONSUMER_SUSPENDED)")
    assert said.endswith("now active, weight 10")
