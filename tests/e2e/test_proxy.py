"""End to end: real mitmdump + the addon + the fake Gemini, driven by the real SDKs and raw HTTP."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any

import httpx2 as httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from mitmproxy import io

from ..conftest import Fake, Proxy, gen_body, key_entry, new_secret, sse_events, wait_for

FLASH = "gemini-2.5-flash"


def genai_client(proxy: Proxy, token: str = "unused", version: str = "v1beta") -> genai.Client:
    return genai.Client(
        api_key=token,
        http_options=types.HttpOptions(base_url=proxy.url, api_version=version, timeout=30_000),
    )


def openai_client(proxy: Proxy, token: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=token, max_retries=0, timeout=30)


def post(
    proxy: Proxy, path: str, body: Any = None, headers: dict[str, str] | None = None, **kw: Any
) -> Any:
    h = {"x-goog-api-key": "unused", **(headers or {})}
    r = proxy.http.post(path, json=body if body is not None else gen_body(), headers=h, **kw)
    proxy.remember(r.content)
    return r


def gen(proxy: Proxy, model: str = FLASH, **kw: Any) -> Any:
    return post(proxy, f"/v1beta/models/{model}:generateContent", **kw)


@pytest.fixture
def trio(fake: Fake) -> dict[str, str]:
    """A good key, a dead key and a key whose project is out of per-minute quota."""
    keys = {"good": new_secret(), "dead": new_secret(), "quota": new_secret()}
    fake.configure({keys["good"]: "ok", keys["dead"]: "dead", keys["quota"]: "minute:60"})
    return keys


def trio_proxy(make_proxy: Any, keys: dict[str, str], **kw: Any) -> Proxy:
    return make_proxy([key_entry(name, secret) for name, secret in keys.items()], **kw)


def test_both_sdks_unary_and_streaming_succeed_past_a_dead_and_an_exhausted_key(
    fake: Fake, make_proxy: Any, trio: dict[str, str]
) -> None:
    proxy = trio_proxy(make_proxy, trio)
    oa = openai_client(proxy)
    chat = oa.chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Hello from fake Gemini."
    chunks = list(
        oa.chat.completions.create(
            model=FLASH, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "chunk 0 chunk 1 chunk 2 "

    for version in ("v1beta", "v1"):
        g = genai_client(proxy, version=version)
        assert (
            g.models.generate_content(model=FLASH, contents="hi").text == "Hello from fake Gemini."
        )
        text = "".join(
            c.text or "" for c in g.models.generate_content_stream(model=FLASH, contents="hi")
        )
        assert text == "chunk 0 chunk 1 chunk 2 "

    seen = fake.keys_seen()
    assert seen.count(trio["dead"]) <= 1, "the dead key was used again after it was found dead"
    assert seen.count(trio["quota"]) <= 1, "the exhausted project was retried before its cooldown"
    assert seen.count(trio["good"]) == 6
    assert proxy.wait_key("dead", "dead")["disabled_reason"] == "400 API key invalid"
    state = proxy.keys_state()
    assert state["quota"]["status"] == "cooling"
    assert 55 < state["quota"]["cooldowns"][FLASH]["seconds_left"] <= 60
    assert state["good"]["status"] == "active"


def test_retry_is_visible_in_headers_and_the_upstream_saw_exactly_one_credential(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "503", b: "ok"})
    proxy = make_proxy(
        [key_entry("a", a), key_entry("b", b)], clients=[{"name": "app", "token": "tok-app"}]
    )
    r = post(
        proxy,
        f"/v1beta/models/{FLASH}:generateContent?key=tok-app",
        headers={"x-goog-api-key": "tok-app"},
    )
    assert r.status_code == 200
    assert r.headers["x-gemini-proxy-key"] == "b"
    assert r.headers["x-gemini-proxy-attempts"] == "2"
    log = fake.log()
    assert [e["key"] for e in log] == [a, b]
    assert all("key=" not in e["query"] for e in log)  # client ?key= stripped, only ours went up
    assert proxy.keys_state()["a"]["health"] == 1.0  # 503 is the model's fault, not the key's


def test_callers_own_400_and_404_pass_through_unchanged_and_blame_no_key(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b)])
    r = proxy.http.post(
        f"/v1beta/models/{FLASH}:generateContent",
        content=b"{not json",
        headers={"x-goog-api-key": "x", "content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Invalid JSON payload received. Unexpected token."
    r = gen(proxy, model="no-such-model")
    assert r.status_code == 404 and "is not found" in r.json()["error"]["message"]
    g = genai_client(proxy)
    with pytest.raises(genai_errors.ClientError) as e:
        g.models.generate_content(model="no-such-model", contents="hi")
    assert e.value.code == 404
    assert len(fake.log()) == 3  # no retries
    for k in proxy.keys_state().values():
        assert k["status"] == "active" and k["health"] == 1.0 and k["last_error"] is None


def test_body_over_the_limit_gets_413_json_and_never_goes_upstream(
    fake: Fake, make_proxy: Any
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)], options={"gemini_max_body": 1000})
    big = {"contents": [{"parts": [{"text": "x" * 2000}]}]}
    r = post(proxy, f"/v1beta/models/{FLASH}:generateContent", big)
    assert r.status_code == 413 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "at most 1000" in r.json()["error"]["message"]

    def chunks() -> Any:
        yield b'{"contents": [{"parts": [{"text": "'
        yield b"y" * 1500
        yield b'"}]}]}'

    r = proxy.http.post(
        f"/v1beta/models/{FLASH}:generateContent", content=chunks(), headers={"x-goog-api-key": "u"}
    )
    assert r.status_code == 413  # chunked, no Content-Length
    with pytest.raises(openai.APIStatusError) as e:
        openai_client(proxy).chat.completions.create(
            model=FLASH, messages=[{"role": "user", "content": "z" * 2000}]
        )
    assert e.value.status_code == 413 and "at most 1000" in e.value.message
    exact = gen_body("q" * 900)
    assert len(json.dumps(exact)) < 1000
    assert post(proxy, f"/v1beta/models/{FLASH}:generateContent", exact).status_code == 200
    assert len(fake.log()) == 1


def test_client_tokens_401_in_each_sdks_shape_and_nothing_goes_upstream(
    fake: Fake, make_proxy: Any
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)], clients=[{"name": "web", "token": "sk-web-123"}])
    r = proxy.http.post(f"/v1beta/models/{FLASH}:generateContent", json=gen_body())
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    wrong = genai_client(proxy, token="wrong")
    with pytest.raises(genai_errors.ClientError) as ge:
        wrong.models.generate_content(model=FLASH, contents="hi")
    assert ge.value.code == 401 and "not recognised" in (ge.value.message or "")
    with pytest.raises(openai.AuthenticationError) as oe:
        openai_client(proxy, token="wrong").chat.completions.create(
            model=FLASH, messages=[{"role": "user", "content": "hi"}]
        )
    assert "not recognised" in oe.value.message
    assert fake.log() == []
    right = genai_client(proxy, token="sk-web-123")
    assert right.models.generate_content(model=FLASH, contents="hi").text
    assert (
        openai_client(proxy, token="sk-web-123")
        .chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "hi"}])
        .choices
    )
    assert [e["key"] for e in fake.log()] == [a, a]  # the client token never reached upstream
    assert "sk-web-123" not in proxy.logs() and b"sk-web-123" not in proxy.dump.read_bytes()
    # a token in a header the proxy does not read (other SDKs' x-api-key, api-key): refused
    # without it, and kept nowhere; beside a real token, not forwarded
    for header in ("x-api-key", "api-key"):
        alone = proxy.http.post(
            f"/v1beta/models/{FLASH}:generateContent",
            json=gen_body(),
            headers={header: "sk-web-123"},
        )
        assert alone.status_code == 401
        both = proxy.http.post(
            f"/v1beta/models/{FLASH}:generateContent",
            json=gen_body(),
            headers={"x-goog-api-key": "sk-web-123", header: "sk-web-123"},
        )
        assert both.status_code == 200 and header not in fake.log()[-1]["headers"]
    proxy.stop()  # the dump is complete
    assert "sk-web-123" not in proxy.logs() and b"sk-web-123" not in proxy.dump.read_bytes()


def test_all_cooling_gives_429_with_retry_after_and_all_dead_gives_503(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "minute:120", b: "day"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b)], options={"gemini_max_wait_ms": 500})
    t0 = time.monotonic()
    r = gen(proxy)
    assert time.monotonic() - t0 < 5  # no wait: the earliest key is minutes away
    assert r.status_code == 429
    assert 60 <= int(r.headers["retry-after"]) <= 120
    err = r.json()["error"]
    assert err["status"] == "RESOURCE_EXHAUSTED" and "cooling down" in err["message"]
    assert "per-minute quota" in err["message"] and "per-day quota" in err["message"]
    with pytest.raises(openai.RateLimitError) as e:
        openai_client(proxy).chat.completions.create(
            model=FLASH, messages=[{"role": "user", "content": "hi"}]
        )
    assert "cooling down" in e.value.message
    assert len(fake.log()) == 2  # the second request never went upstream

    c, d = new_secret(), new_secret()
    fake.configure({c: "dead", d: "leaked"})
    proxy2 = make_proxy([key_entry("c", c), key_entry("d", d)])
    first = gen(proxy2)  # discovers both keys dead, one attempt each
    assert (
        first.status_code == 503
        and first.json()["error"]["details"][0]["reason"] == "no_usable_key"
    )
    r = gen(proxy2)
    assert r.status_code == 503 and "disabled" in r.json()["error"]["message"]
    assert "400 API key invalid" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers  # nothing comes back by itself
    assert len(fake.log()) == 2


def test_a_request_waits_for_a_key_that_comes_back_soon(fake: Fake, make_proxy: Any) -> None:
    a = new_secret()
    fake.configure({a: "ok"}, script=["minute:1"])
    proxy = make_proxy([key_entry("a", a)])
    t0 = time.monotonic()
    r = gen(proxy)
    waited = time.monotonic() - t0
    assert r.status_code == 200
    assert 0.9 <= waited < 5
    assert [e["behaviour"] for e in fake.log()] == ["minute:1", "ok"]


def test_streams_are_not_buffered(fake: Fake, make_proxy: Any) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    arrivals: list[float] = []
    t0 = time.monotonic()
    with proxy.http.stream(
        "POST",
        f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
        json=gen_body(),
        headers={"x-goog-api-key": "u", "x-fake-events": "4", "x-fake-delay-ms": "400"},
    ) as r:
        assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == "a"
        raw = b""
        for chunk in r.iter_bytes():
            arrivals.append(time.monotonic() - t0)
            raw += chunk
    assert len(sse_events(raw)) == 4
    assert arrivals[0] < 0.35, f"first byte after {arrivals[0]:.2f}s: the stream was buffered"
    assert arrivals[-1] > 1.1


def test_streams_and_unary_calls_share_one_connection_and_dumps_show_what_went_to_google(
    fake: Fake, make_proxy: Any
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    sse = f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"
    bodies = [gen_body(f"question {i}") for i in range(5)]
    for i, body in enumerate(bodies):  # one keep-alive connection: stream, unary, stream, ...
        path = sse if i % 2 == 0 else f"/v1beta/models/{FLASH}:generateContent"
        r = post(proxy, path, body, headers={"x-fake-events": "3"})
        assert r.status_code == 200
        if i % 2 == 0:
            assert len(sse_events(r.content)) == 3
    assert [json.loads(e["body"]) for e in fake.log()] == bodies
    assert proxy.stop() == 0
    with proxy.dump.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert len(flows) == 5
    for flow, body in zip(flows, bodies, strict=True):
        req = flow.request  # type: ignore[attr-defined]
        assert (req.host, req.port) == ("127.0.0.1", fake.port)  # Google, not the relay
        assert json.loads(req.content) == body
        assert req.headers["content-length"] == str(len(req.content))
        assert not any(k.startswith("x-gemini-proxy") for k in req.headers)
        assert flow.comment.startswith("served by a: 200") and flow.metadata["gemini"]["key"] == "a"
        streamed = "streamGenerateContent" in req.path
        assert ("· streamed " in flow.comment) == streamed, flow.comment


def test_http2_callers_over_tls_get_unary_answers_retried_streams_and_no_hop_headers(
    fake: Fake, make_proxy: Any
) -> None:
    """mitmproxy's listener speaks TLS (its own certificate) and HTTP/2 to callers that ask."""
    a, b = new_secret(), new_secret()
    fake.configure({a: "cut:0", b: "ok"})  # a's streams break before their first byte
    proxy = make_proxy([key_entry("a", a, weight=5), key_entry("b", b)])
    with httpx.Client(
        base_url=f"https://127.0.0.1:{proxy.port}", http2=True, verify=False, timeout=30
    ) as h2:
        r = h2.post(
            f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
            json=gen_body(),
            headers={"x-goog-api-key": "u", "x-fake-events": "4"},
        )
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert len(sse_events(r.content)) == 4 and r.headers["x-gemini-proxy-key"] == "b"
        assert "transfer-encoding" not in r.headers  # the relay's HTTP/1 framing stays behind
        r = h2.post(
            f"/v1beta/models/{FLASH}:generateContent",
            json=gen_body(),
            headers={"x-goog-api-key": "u"},
        )
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert r.json()["candidates"][0]["content"]["parts"][0]["text"]
        proxy.remember(r.content)


def test_json_array_stream_and_a_retried_stream_arrive_whole_and_once(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "dead", b: "ok"})
    proxy = make_proxy([key_entry("a", a, weight=5), key_entry("b", b)])
    r = post(proxy, f"/v1beta/models/{FLASH}:streamGenerateContent", headers={"x-fake-events": "5"})
    assert r.status_code == 200
    docs = json.loads(r.content)
    assert [d["candidates"][0]["content"]["parts"][0]["text"] for d in docs] == [
        f"chunk {i} " for i in range(5)
    ]
    assert [e["key"] for e in fake.log()] == [a, b]


def test_a_stream_that_breaks_before_its_first_byte_is_retried_on_another_key(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "cut:0", b: "ok"})  # a: 200 and headers, then a reset before any event
    proxy = make_proxy([key_entry("a", a, weight=5), key_entry("b", b)])
    r = post(proxy, f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse")
    assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == "b"
    assert len(sse_events(r.content)) == 3
    assert [e["key"] for e in fake.log()] == [a, b]
    row = wait_for(lambda: proxy.admin.get("/admin/requests?limit=1").json()["requests"])[0]
    assert row["outcome"] == "ok"
    assert (
        row["attempts"][0]["key"] == "a" and "before the first byte" in row["attempts"][0]["reason"]
    )


def test_a_stream_that_breaks_after_the_first_byte_is_never_retried(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "cut:2", b: "cut:2"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b)])
    got = b""
    with (
        pytest.raises(httpx.TransportError),  # the connection is cut mid-body
        proxy.http.stream(
            "POST",
            f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
            json=gen_body(),
            headers={"x-goog-api-key": "u", "x-fake-events": "5"},
        ) as r,
    ):
        for chunk in r.iter_bytes():
            got += chunk
    assert len(sse_events(got)) == 2  # the two events before the cut, no duplicates
    assert len(fake.log()) == 1
    row = wait_for(lambda: proxy.admin.get("/admin/requests?limit=1").json()["requests"])[0]
    assert row["outcome"] == "stream_error"


def test_unreachable_upstream_is_a_502_json(make_proxy: Any, tmp_path: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    a = new_secret()
    proxy = Proxy(tmp_path, f"http://127.0.0.1:{dead_port}", [key_entry("a", a)])
    try:
        proxy.start()
        r = gen(proxy)
        assert r.status_code == 502
        assert (
            r.json()["error"]["status"] == "UNAVAILABLE"
            and "cannot connect" in r.json()["error"]["message"]
        )
        with pytest.raises(
            openai.InternalServerError
        ) as e:  # breaker open now: 503, not a quota 429
            openai_client(proxy).chat.completions.create(
                model=FLASH, messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.status_code == 503 and "cannot connect" in e.value.message
        r = post(proxy, f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse")
        assert r.status_code in (502, 503)
        assert proxy.keys_state()["a"]["last_error"].startswith("cannot connect")
    finally:
        proxy.stop()
        proxy.assert_no_secrets()


def test_hot_reload_adds_and_removes_keys_while_requests_flow(fake: Fake, make_proxy: Any) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    stop = threading.Event()
    statuses: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(gen(proxy).status_code)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        wait_for(lambda: len(statuses) > 5)
        proxy.write_keys([key_entry("a", a), key_entry("b", b)])
        wait_for(lambda: b in fake.keys_seen(), timeout=5)
        proxy.write_keys([key_entry("b", b)])
        wait_for(lambda: set(proxy.keys_state()) == {"b"}, timeout=5)
        mark = len(fake.log())
        wait_for(lambda: len(fake.log()) > mark + 10)
    finally:
        stop.set()
        t.join(10)
    assert set(statuses) == {200}
    assert a not in fake.keys_seen()[mark:]

    proxy.write_keys([key_entry("b", b), {"name": "broken", "weight": "heavy"}])
    wait_for(lambda: "reload failed, keeping the old config" in proxy.logs(), timeout=5)
    assert f"{proxy.keys_file}:" in proxy.logs() and "keys[1]" in proxy.logs()
    assert gen(proxy).status_code == 200
    assert set(proxy.keys_state()) == {"b"}


def test_sighup_and_admin_reload_and_key_state_survives_reload(fake: Fake, make_proxy: Any) -> None:
    a, b, c = new_secret(), new_secret(), new_secret()
    fake.configure({a: "dead", b: "ok", c: "ok"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b)], options={"gemini_watch_ms": 0})
    gen(proxy)
    gen(proxy)
    proxy.wait_key("a", "dead")
    proxy.write_keys([key_entry("a", a), key_entry("b", b), key_entry("c", c)])
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: "c" in proxy.keys_state(), timeout=5)
    proxy.wait_key("a", "dead")  # kept its state across the reload
    proxy.write_keys([key_entry("b", b)])
    assert proxy.admin.post("/admin/reload").json()["reloaded"] is True
    assert set(proxy.keys_state()) == {"b"}
    proxy.keys_file.write_text("keys:\n  - name: b\n    key: [oops\n")
    r = proxy.admin.post("/admin/reload")
    assert r.status_code == 422 and "keys.yaml:4: YAML error" in r.json()["error"]
    assert "flow sequence started at line 3" in r.json()["error"]
    assert set(proxy.keys_state()) == {"b"}


def test_a_broken_key_file_at_start_is_a_clear_error(make_proxy: Any) -> None:
    proxy = make_proxy([key_entry("a", new_secret())], start=False)
    proxy.keys_file.write_text("keys:\n  - name: a\n    weight: 0\n")
    proxy.start(wait=False)
    assert proxy.proc is not None
    code = proxy.proc.wait(30)
    assert code != 0
    assert (
        "keys[0] (a), field 'weight'" in proxy.logs() or "one of 'key' or 'key_env'" in proxy.logs()
    )


def test_v1_models_answers_each_sdk_in_its_own_format(fake: Fake, make_proxy: Any) -> None:
    a = new_secret()
    fake.configure({a: "ok"}, served_models=["gemini-2.5-flash"])
    proxy = make_proxy([key_entry("a", a)])
    listed = [m.id for m in openai_client(proxy).models.list()]
    assert listed == ["models/gemini-2.5-flash"]  # OpenAI's list format, via /v1beta/openai/models
    g = genai_client(proxy, version="v1")
    assert [m.name for m in g.models.list()] == [
        "models/gemini-2.5-flash"
    ]  # Gemini's, via /v1/models
    paths = [e["path"] for e in fake.log()]
    assert paths[0] == "/v1beta/openai/models" and paths[1] == "/v1/models"


def test_a_large_inline_pdf_goes_through_with_the_default_body_limit(
    fake: Fake, make_proxy: Any
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * (9 * 4096)  # 9 MiB: 12 MB of JSON once base64'd
    part = types.Part.from_bytes(data=pdf, mime_type="application/pdf")
    client = genai_client(proxy)
    answer = client.models.generate_content(model=FLASH, contents=[part, "summarise"])
    assert answer.text == "Hello from fake Gemini."
    assert len(fake.log()) == 1
