"""The pool's page on the admin port, over HTTP against a real proxy: sign-in, CSP, CSRF, actions."""

from __future__ import annotations

import re
from typing import Any

import httpx2 as httpx

from ..conftest import Fake, Proxy, key_entry, new_secret
from .test_proxy import gen

NAMES = ("alpha-key", "beta-key")
PROJECT = "proj-zeta"


def page_proxy(fake: Fake, make_proxy: Any) -> tuple[Proxy, dict[str, str]]:
    secrets = {n: new_secret() for n in NAMES}
    fake.configure({secrets["alpha-key"]: "ok", secrets["beta-key"]: "ok"})
    proxy = make_proxy([key_entry(n, s, project=PROJECT) for n, s in secrets.items()])
    return proxy, secrets


class Browser:
    """Requests without a bearer header and without a cookie jar: each test says which cookie
    and which Origin a request carries."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy  # every body seen is checked for key strings after the test

    def get(self, path: str, **kw: Any) -> httpx.Response:
        r = httpx.get(self.proxy.admin_url + path, timeout=10, follow_redirects=False, **kw)
        self.proxy.remember(r.content)
        return r

    def post(self, path: str, **kw: Any) -> httpx.Response:
        r = httpx.post(self.proxy.admin_url + path, timeout=10, follow_redirects=False, **kw)
        self.proxy.remember(r.content)
        return r


def browser(proxy: Proxy) -> Browser:
    return Browser(proxy)


def sign_in(proxy: Proxy, client: Browser) -> tuple[str, str]:
    """The form's sign-in; returns (cookie header value, the page's CSRF token)."""
    r = client.post(
        "/page/login", data={"token": proxy.admin_token}, headers={"Origin": proxy.admin_url}
    )
    assert r.status_code == 303 and r.headers["location"] == "/page/"
    set_cookie = r.headers["set-cookie"]
    flags = {f.strip().lower() for f in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/page/"} <= flags, set_cookie
    cookie = set_cookie.split(";")[0]
    assert proxy.admin_token not in set_cookie and len(cookie.split("=", 1)[1]) >= 40
    page = client.get("/page/", headers={"Cookie": cookie})
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return cookie, csrf.group(1)


def assert_no_pool(body: str, secrets: dict[str, str]) -> None:
    for name in NAMES:
        assert name not in body
    assert PROJECT not in body
    for s in secrets.values():
        assert s not in body and s[:8] not in body


def test_signed_out_page_names_no_key_and_a_bearer_or_a_wrong_token_gets_what_it_should(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, secrets = page_proxy(fake, make_proxy)
    client = browser(proxy)
    origin = proxy.admin_url
    root = client.get("/")
    assert root.status_code == 303 and root.headers["location"] == "/page/"
    signed_out = client.get("/page/")
    assert signed_out.status_code == 200 and 'action="/page/login"' in signed_out.text
    assert_no_pool(signed_out.text, secrets)
    csp = signed_out.headers["content-security-policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in csp
    live = client.get("/page/live")
    assert live.status_code == 401
    assert_no_pool(live.text, secrets)
    assert client.get("/page/requests").status_code == 401
    # a wrong bearer header and a wrong token in the form: refused, no cookie, nothing shown
    wrong = client.get("/", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 303
    wrong = client.get("/page/", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Wrong admin token" in wrong.text
    assert_no_pool(wrong.text, secrets)
    form = client.post(
        "/page/login", data={"token": proxy.admin_token + "x"}, headers={"Origin": proxy.admin_url}
    )
    assert form.status_code == 401 and "set-cookie" not in form.headers
    assert_no_pool(form.text, secrets)
    # the right bearer header: the page itself at /, every key by name and mask, no secret
    page = client.get("/", headers={"Authorization": f"Bearer {proxy.admin_token}"})
    assert page.status_code == 200 and page.headers["content-security-policy"] == csp
    for name in NAMES:
        assert f'data-key="{name}"' in page.text
    assert PROJECT in page.text
    for s in secrets.values():
        assert s not in page.text
    assert proxy.admin_token not in page.text
    # the script and the stylesheet come from the admin port itself
    assert "fetch(" in client.get("/page/page.js").text
    assert client.get("/page/page.css").headers["content-type"].startswith("text/css")
    # ten wrong tokens from one address within a minute (two bearer headers and one form so
    # far): that address waits, the right token too
    for _ in range(7):
        wrong_form = client.post("/page/login", data={"token": "guess"}, headers={"Origin": origin})
        assert wrong_form.status_code == 401
    held = client.post("/page/login", data={"token": proxy.admin_token}, headers={"Origin": origin})
    assert held.status_code == 429 and int(held.headers["retry-after"]) > 0
    assert "set-cookie" not in held.headers


def test_wrong_bearer_tokens_count_against_the_sign_in_throttle_of_their_address(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, secrets = page_proxy(fake, make_proxy)
    client = browser(proxy)

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    for i in range(5):
        assert client.get("/admin/keys", headers=bearer(f"wrong{i}")).status_code == 401
        assert client.get("/page/", headers=bearer(f"wrong-page{i}")).status_code == 401
    # ten wrong tokens from this address: every further token from it waits, the right one too
    # (a 401/200 difference would keep the guessing going)
    for path in ("/admin/keys", "/page/", "/"):
        for token in ("wrong10", proxy.admin_token):
            held = client.get(path, headers=bearer(token))
            assert held.status_code == 429 and int(held.headers["retry-after"]) > 0, path
            assert_no_pool(held.text, secrets)
            assert proxy.admin_token not in held.text
    assert client.get("/admin/keys", headers=bearer("wrong11")).json()["error"]["code"] == 429
    form = client.post(
        "/page/login", data={"token": proxy.admin_token}, headers={"Origin": proxy.admin_url}
    )
    assert form.status_code == 429 and "set-cookie" not in form.headers
    # an address that never failed is not locked out: the operator keeps the admin API
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=proxy.admin_url, transport=transport, timeout=10) as other:
        keys = other.get("/admin/keys", headers=bearer(proxy.admin_token))
        assert keys.status_code == 200 and {k["name"] for k in keys.json()["keys"]} == set(NAMES)
        assert other.get("/page/", headers=bearer(proxy.admin_token)).status_code == 200
        assert other.get("/admin/keys", headers=bearer("wrong")).status_code == 401


def test_form_sign_in_gives_a_session_cookie_and_sign_out_ends_it(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, secrets = page_proxy(fake, make_proxy)
    client = browser(proxy)
    cookie, csrf = sign_in(proxy, client)
    page = client.get("/page/", headers={"Cookie": cookie})
    for name in NAMES:
        assert f'data-key="{name}"' in page.text
    assert proxy.admin_token not in page.text
    live = client.get("/page/live", headers={"Cookie": cookie})
    assert live.status_code == 200 and 'data-key="alpha-key"' in live.text
    assert "<html" not in live.text  # a fragment for the script to swap in
    # the cookie is no admin token: the API does not take it
    assert client.get("/admin/keys", headers={"Cookie": cookie}).status_code == 401
    out = client.post(
        "/page/logout", data={"csrf": csrf}, headers={"Cookie": cookie, "Origin": proxy.admin_url}
    )
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    after = client.get("/page/", headers={"Cookie": cookie})
    assert after.status_code == 200 and 'action="/page/login"' in after.text
    assert_no_pool(after.text, secrets)
    assert client.get("/page/live", headers={"Cookie": cookie}).status_code == 401


def test_actions_need_the_session_csrf_token_and_the_page_origin(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, _secrets = page_proxy(fake, make_proxy)
    client = browser(proxy)
    cookie, csrf = sign_in(proxy, client)
    own = {"Cookie": cookie, "Origin": proxy.admin_url}
    refusals: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, own),  # no token
        ({"csrf": "x" * len(csrf)}, own),  # a wrong one
        ({"csrf": csrf}, {"Cookie": cookie, "Origin": "http://evil.example"}),
        ({"csrf": csrf}, {"Cookie": cookie, "Origin": "null"}),
        ({"csrf": csrf}, {"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}),
        ({"csrf": csrf}, {"Origin": proxy.admin_url}),  # no session at all
    ]
    for data, headers in refusals:
        for path in ("/page/keys/alpha-key/disable", "/page/reload", "/page/logout"):
            r = client.post(path, data=data, headers=headers)
            assert r.status_code in (401, 403), (path, data, headers, r.status_code)
    assert proxy.keys_state()["alpha-key"]["enabled"] is True
    assert client.get("/page/", headers={"Cookie": cookie}).status_code == 200  # still signed in

    r = client.post("/page/keys/alpha-key/disable", data={"csrf": csrf}, headers=own)
    assert r.status_code == 303 and r.headers["location"] == "/page/"
    state = proxy.keys_state()["alpha-key"]
    assert state["enabled"] is False and state["status"] == "disabled"
    assert state["enabled_override"] is False
    page = client.get("/page/", headers={"Cookie": cookie}).text
    assert "disabled by an operator" in page
    assert 'action="/page/keys/alpha-key/enable"' in page
    for _ in range(3):  # the pool goes on with the other key
        assert gen(proxy).status_code == 200
    assert fake.keys_seen()[-3:] == [_secrets["beta-key"]] * 3

    r = client.post("/page/keys/alpha-key/enable", data={"csrf": csrf}, headers=own)
    assert r.status_code == 303 and proxy.keys_state()["alpha-key"]["status"] == "active"
    r = client.post("/page/keys/no-such-key/reset", data={"csrf": csrf}, headers=own)
    assert r.status_code == 404
    r = client.post("/page/reload", data={"csrf": csrf}, headers=own)
    assert r.status_code == 303
    proxy.keys_file.write_text("keys: [{name: broken}]\n")  # no key: the old config stays
    r = client.post("/page/reload", data={"csrf": csrf}, headers=own)
    assert r.status_code == 422 and "Reload failed, the old config stays" in r.text
    assert "keys.yaml:1" in r.text and 'data-key="alpha-key"' in r.text
    # a bearer caller (curl) needs no CSRF token: a browser cannot forge the header
    bearer = {"Authorization": f"Bearer {proxy.admin_token}"}
    r = client.post("/page/keys/beta-key/reset", headers=bearer)
    assert r.status_code == 303


def test_recent_failures_are_listed_and_linked_to_the_request_history(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, secrets = page_proxy(fake, make_proxy)
    assert gen(proxy, model="no-such-model").status_code == 404
    client = browser(proxy)
    cookie, _csrf = sign_in(proxy, client)

    def failures() -> str:
        proxy.admin.get("/admin/requests")  # commits what is queued
        return client.get("/page/live", headers={"Cookie": cookie}).text

    text = failures()
    assert "no-such-model" in text, text
    link = re.search(r'href="(/page/requests\?status=404)"', text)
    assert link is not None
    rows = client.get(link.group(1), headers={"Cookie": cookie})
    assert rows.status_code == 200
    assert [r["model"] for r in rows.json()["requests"]] == ["no-such-model"]
    for s in secrets.values():
        assert s not in text and s not in rows.text


def test_without_an_admin_token_the_page_says_how_to_set_one(fake: Fake, make_proxy: Any) -> None:
    secret = new_secret()
    fake.configure({secret: "ok"})
    proxy = make_proxy([key_entry("alpha-key", secret)], admin_token="")
    client = browser(proxy)
    r = client.get("/page/")
    assert r.status_code == 403 and "GEMINI_ADMIN_TOKEN" in r.text and "alpha-key" not in r.text
    r = client.post("/page/login", data={"token": ""}, headers={"Origin": proxy.admin_url})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert client.get("/", headers={"Authorization": "Bearer x"}).status_code == 303
    assert client.get("/page/live", headers={"Authorization": "Bearer x"}).status_code == 401
