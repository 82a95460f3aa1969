"""Egress per key, end to end: a real mitmdump, the fake Gemini and a local forward proxy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import Fake, Proxy, free_port, gen_body, key_entry, new_secret, wait_for
from .forward_proxy import ForwardProxy

FLASH = "gemini-2.5-flash"
PASSWORD = "egress-pw-" + "x7Qk2"  # must never appear in a log, flow, database or answer


@pytest.fixture
def forward() -> Iterator[list[ForwardProxy]]:
    made: list[ForwardProxy] = []
    yield made
    for p in made:
        p.stop()


def gen(proxy: Proxy) -> Any:
    r = proxy.http.post(
        f"/v1beta/models/{FLASH}:generateContent",
        json=gen_body(),
        headers={"x-goog-api-key": "unused"},
    )
    proxy.remember(r.content)
    return r


def assert_password_nowhere(proxy: Proxy) -> None:
    places = [proxy.log_file, proxy.dump, proxy.db, proxy.db.with_name(proxy.db.name + "-wal")]
    for p in places:
        if p.exists():
            assert PASSWORD.encode() not in p.read_bytes(), f"egress password in {p.name}"
    assert PASSWORD not in proxy.admin.get("/admin/keys").text
    assert PASSWORD not in proxy.metrics()


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_a_key_leaves_through_its_own_egress_proxy(
    kind: str,
    fake: Fake,
    make_proxy: Any,
    forward: list[ForwardProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    via = ForwardProxy(kind, auth=("egress-user", PASSWORD)).start()
    forward.append(via)
    monkeypatch.setenv("EGRESS_AUTH", f"egress-user:{PASSWORD}")
    proxied, direct = new_secret(), new_secret()
    fake.configure({proxied: "ok", direct: "ok"})
    proxy = make_proxy(
        [
            key_entry("proxied", proxied, proxy=via.url, proxy_auth_env="EGRESS_AUTH"),
            key_entry("direct", direct),
        ]
    )
    served = [gen(proxy) for _ in range(6)]
    assert [r.status_code for r in served] == [200] * 6
    by_key = [r.headers["x-gemini-proxy-key"] for r in served]
    assert by_key.count("proxied") == 3 and by_key.count("direct") == 3
    # what the proxied key sent went through the forward proxy, and nothing else did
    seen = fake.log()
    assert sum(1 for e in seen if e["key"] == proxied) == 3
    if kind == "http":
        assert len(via.requests) == 3
        assert all(r.startswith(f"POST {fake.url}/v1beta/models/") for r in via.requests)
    else:
        assert via.requests and all(r == f"127.0.0.1:{fake.port}" for r in via.requests)
    assert set(via.credentials) == {f"egress-user:{PASSWORD}"} and via.refused == 0
    assert proxy.keys_state()["proxied"]["egress"] == via.url  # shown without credentials
    assert proxy.keys_state()["direct"]["egress"] is None
    assert_password_nowhere(proxy)


def test_a_dead_egress_is_retried_on_another_key_and_blames_no_key(
    fake: Fake, make_proxy: Any
) -> None:
    closed = free_port()  # nothing listens there
    cut_off, direct = new_secret(), new_secret()
    fake.configure({cut_off: "ok", direct: "ok"})
    proxy = make_proxy(
        [
            key_entry("cut-off", cut_off, proxy=f"http://127.0.0.1:{closed}"),
            key_entry("direct", direct),
        ]
    )
    answers = [gen(proxy) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert {r.headers["x-gemini-proxy-key"] for r in answers} == {"direct"}
    retried = [r for r in answers if r.headers["x-gemini-proxy-attempts"] == "2"]
    assert retried, "the key behind the dead egress was tried and its request retried"
    assert all(e["key"] == direct for e in fake.log(checks=True))  # no check of cut-off either
    state = proxy.keys_state()["cut-off"]
    assert state["status"] != "dead" and not state["suspect"] and not state["disabled_reason"]
    assert "egress proxy unreachable" in (state["last_error"] or "")
    rows = proxy.admin.get("/admin/requests", params={"tried": "cut-off"}).json()["requests"]
    assert rows and all(
        a["outcome"] == "network" and "egress proxy unreachable" in a["reason"]
        for row in rows
        for a in row["attempts"]
        if a["key"] == "cut-off"
    )
    wait_for(lambda: "egress proxy unreachable" in proxy.logs())


def test_key_checks_and_upload_bytes_leave_through_the_keys_egress(
    fake: Fake, make_proxy: Any, forward: list[ForwardProxy]
) -> None:
    via = ForwardProxy("http").start()
    forward.append(via)
    up, other = new_secret(), new_secret()
    fake.configure({up: "ok", other: "ok"})
    keys = [key_entry("up", up, project="p", proxy=via.url)]
    proxy = make_proxy(keys)
    start = proxy.http.post(
        "/upload/v1beta/files",
        headers={
            "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start",
            "x-goog-api-key": "u",
        },
        json={"file": {"display_name": "x"}},
    )
    assert start.status_code == 200, start.text
    url = start.headers["x-goog-upload-url"]
    assert len(via.requests) == 1 and "/upload/v1beta/files" in via.requests[0]
    # the key that started the upload is disabled; another key of its project sends the bytes,
    # but they leave the way the upload started: through the first key's egress
    proxy.write_keys([{**keys[0], "enabled": False}, key_entry("other", other, project="p")])
    wait_for(lambda: set(proxy.keys_state()) == {"up", "other"})
    done = proxy.http.post(
        url,
        headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
        content=b"hello",
    )
    assert done.status_code == 200, done.text
    assert done.headers["x-gemini-proxy-key"] == "other"
    assert len(via.requests) == 2 and "upload_id=" in via.requests[1]
    # a key answering dead is checked (no quota spent) through its own egress as well
    fake.configure({up: "ok", other: "dead"})
    proxy.write_keys([keys[0], key_entry("other", other, project="p", proxy=via.url)])
    wait_for(lambda: proxy.keys_state()["other"]["egress"] == via.url)
    before = len(via.requests)
    for _ in range(2):
        r = proxy.http.post(
            "/v1beta/models/gemini-2.5-flash:generateContent",
            json=gen_body(),
            headers={"x-goog-api-key": "u"},
        )
        assert r.status_code == 200
    proxy.wait_key("other", "dead")
    checks = [r for r in via.requests[before:] if "models?pageSize=1" in r]
    assert checks, via.requests[before:]
