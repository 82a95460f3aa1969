"""Trust holes a code review found, each as an attack on a real mitmdump in front of the fake.

- credential- and billing-bearing system parameters, in every spelling, never reach Google (the
  fake logs the query and headers it saw) nor stay in the flow (the fixture checks the dump);
- methods the Gemini API does not have get 405 from the proxy and nothing goes upstream (the fake
  answers HEAD with a body, which would spoil a pooled connection);
- a pooled connection the upstream spoilt is retried on a new one before any key is blamed.
"""

from __future__ import annotations

import json
from typing import Any

from ..conftest import Fake, key_entry, new_secret
from .test_attacks import (
    CHAT,
    GEN,
    Table,
    exchange,
    refused,
    req,
    served,
    since,
    still_serving,
)


def test_every_spelling_of_a_credential_or_billing_parameter_stays_home(
    fake: Fake, make_proxy: Any
) -> None:
    pool_key = new_secret()
    fake.configure({pool_key: "ok"})
    proxy = make_proxy([key_entry("a", pool_key)])  # loopback mode
    pool = {pool_key}
    table = Table()
    for name in [
        "$key",
        "%24key",
        "%24KEY",
        "$Key",
        "%2524key",
        "access_token",
        "$access_token",
        "ACCESS_TOKEN",
        "accessToken",
        "oauth_token",
        "%24oauth_token",
        "bearer_token",
        "quotaUser",
        "$quotaUser",
        "quota_user",
        "%71uotaUser",
        "userProject",
        "$userProject",
        "%24userproject",
        "user_project",
    ]:
        with table.row(name):
            secret = new_secret()  # checked in the flow dump and the log by the fixture
            target = GEN + f"?alt=json&{name}={secret}&x=1".encode()
            call = served(proxy, fake, pool, req(target, b"x-goog-api-key: u"))
            assert call["query"] == "alt=json&x=1", call
            assert secret not in json.dumps(call), call
    with table.row("billing headers"):
        secret = new_secret()
        call = served(
            proxy,
            fake,
            pool,
            req(
                GEN,
                b"x-goog-api-key: u",
                b"X-Goog-User-Project: " + secret.encode(),
                b"x-goog-user-project: other-" + secret.encode(),
                b"X-Goog-Quota-User: " + secret.encode(),
            ),
        )
        assert not {"x-goog-user-project", "x-goog-quota-user"} & set(call["headers"]), call
        assert secret not in json.dumps(call), call
    with table.row("on the OpenAI API too"):
        secret = new_secret()
        target = b"/v1beta/openai/chat/completions?%24key=" + secret.encode()
        call = served(proxy, fake, pool, req(target, b"authorization: Bearer u", body=CHAT))
        assert call["query"] == "" and call["key"] == pool_key, call
    table.verify()
    still_serving(proxy, fake, pool, b"x-goog-api-key: u")


def test_methods_the_api_lacks_get_405_and_nothing_goes_upstream(
    fake: Fake, make_proxy: Any
) -> None:
    keys = [new_secret(), new_secret()]
    fake.configure(dict.fromkeys(keys, "ok"))
    proxy = make_proxy([key_entry("k0", keys[0]), key_entry("k1", keys[1])])
    pool = set(keys)
    table = Table()
    # (mitmproxy upper-cases a method: `get` is GET)
    for method in [b"TRACE", b"PUT", b"PROPFIND", b"BREW", b"OPTIONS"]:
        for api, target, body in [
            ("native", GEN, b""),
            ("native", b"/v1beta/files/abc", b""),
            ("openai", b"/v1beta/openai/chat/completions", CHAT),
            ("openai", b"/v1/chat/completions", CHAT),
        ]:
            with table.row(f"{method.decode()} {target.decode()}"):
                a = refused(
                    proxy,
                    fake,
                    proxy.port,
                    req(target, b"x-goog-api-key: u", method=method, body=body),
                    405,
                    "method_not_allowed",
                    api,
                )
                assert a.headers.get("allow") == "GET, POST, PATCH, DELETE", a
    with table.row("CONNECT in reverse: mitmproxy's own 400, nothing upstream"):
        refused(proxy, fake, proxy.port, req(GEN, method=b"CONNECT", body=b""), {400, 405})
    for target in [GEN, b"/v1beta/models", b"/v1beta/openai/models"]:
        with table.row(f"HEAD {target.decode()}"):
            mark = len(fake.log())
            a = exchange(proxy.port, req(target, b"x-goog-api-key: u", method=b"HEAD", body=b""))
            proxy.remember(a.raw)
            assert a.status == 405 and a.headers.get("allow"), a
            head_end = a.raw.find(b"\r\n\r\n") + 4
            assert a.raw[head_end:] == b"", f"a body on a HEAD answer: {a.raw!r}"
            assert since(fake, mark) == []
    with table.row("PUT on an upload path is the resumable protocol's: not refused as a method"):
        a = exchange(proxy.port, req(b"/upload/v1beta/files", b"x-goog-api-key: u", method=b"PUT"))
        proxy.remember(a.raw)
        assert a.status != 405, a
    with table.row("a CORS preflight from another site: refused as cross-site, no CORS grant"):
        a = refused(
            proxy,
            fake,
            proxy.port,
            req(
                GEN,
                b"Origin: https://evil.example",
                b"Access-Control-Request-Method: POST",
                method=b"OPTIONS",
                body=b"",
            ),
            403,
            "cross_site_request",
        )
        assert not any(h.startswith("access-control-") for h in a.headers), a
    with table.row("a CORS preflight from a loopback page: 405, no CORS grant"):
        a = refused(
            proxy,
            fake,
            proxy.port,
            req(
                GEN,
                b"Origin: http://localhost:3000",
                b"Access-Control-Request-Method: POST",
                method=b"OPTIONS",
                body=b"",
            ),
            405,
            "method_not_allowed",
        )
        assert not any(h.startswith("access-control-") for h in a.headers), a
    table.verify()
    # nothing spoilt, no breaker opened: every caller is served, by both keys
    used = set()
    for _ in range(6):
        r = proxy.http.post(GEN.decode(), content=b"{}", headers={"x-goog-api-key": "u"})
        assert r.status_code == 200, r.text
        used.add(r.headers["x-gemini-proxy-key"])
    assert used == {"k0", "k1"}
    assert {k["status"] for k in proxy.keys_state().values()} == {"active"}
    still_serving(proxy, fake, pool, b"x-goog-api-key: u")


def test_a_spoilt_pooled_connection_is_retried_on_a_new_one_and_blames_no_key(
    fake: Fake, make_proxy: Any
) -> None:
    key = new_secret()
    fake.configure({key: "ok"})
    proxy = make_proxy([key_entry("only", key)])
    for how in ("close", "garbage", "close"):
        r = proxy.http.post(
            GEN.decode(), content=b"{}", headers={"x-goog-api-key": "u", "x-fake-poison": how}
        )
        assert r.status_code == 200, r.text
        mark = len(fake.log(checks=True))
        r = proxy.http.post(GEN.decode(), content=b"{}", headers={"x-goog-api-key": "u"})
        assert r.status_code == 200, r.text
        assert r.headers["x-gemini-proxy-attempts"] == "1", r.headers
        calls = fake.log(checks=True)[mark:]
        assert [c.get("poisoned") for c in calls if c["status"] == 0] == [how], calls
        assert calls[-1]["status"] == 200, calls
    state = proxy.keys_state()["only"]
    assert state["status"] == "active", state
    assert state["breaker"]["failures"] == 0 and state["breaker"]["trips"] == 0, state
    assert state["health"] == 1.0 and state["last_error"] is None, state
    health = proxy.admin.get("/admin/health").json()
    assert health["dead"] == 0 and health["disabled"] == 0, health
