"""The admin page's rendering (escaping, no secrets, what a key's state reads as) and its sessions."""

from __future__ import annotations

import re
import time
from typing import Any

from gemini_pool import page
from gemini_pool.config import ClientSpec, Config, KeySpec, ModelLimits, ProjectSpec
from gemini_pool.pool_views import budget_line
from gemini_pool.service import ProxyService
from gemini_pool.websession import (
    Sessions,
    SignInThrottle,
    cookie_header,
    csrf_ok,
    same_origin,
)

SECRETS = {"alpha": "AIzaSyAlphaSecretValue0123456789abcdefg", "beta": "AIzaSyBetaSecret98765"}
HOSTILE = '<script>alert("x")</script>'


def service() -> ProxyService:
    s = ProxyService()
    keys = tuple(KeySpec(n, secret, f"proj-{n}") for n, secret in SECRETS.items())
    s.apply_config(Config(keys, (ClientSpec("web-app", "client-token-xyz"),), "test"))
    return s


def data_of(s: ProxyService, **kw: Any) -> page.PageData:
    return page.PageData(
        now=time.time(),
        keys=s.describe_keys({"alpha": {"requests": 7, "tokens_in": 70, "tokens_out": 9}}),
        health=s.health(),
        clients=[c.name for c in s.config.clients],
        csrf="csrf-token-1",
        **kw,
    )


def test_the_page_shows_names_and_masks_never_a_secret() -> None:
    s = service()
    s.operator("beta", "disable")
    html = page.render_page(data_of(s, failures=[]))
    for name, secret in SECRETS.items():
        assert f'data-key="{name}"' in html and secret not in html
        assert s.pool.keys[name].spec.mask in html
    assert "client-token-xyz" not in html and "web-app" in html
    assert "7 req" in html and "70 in · 9 out" in html
    assert 'action="/page/keys/beta/enable"' in html and "disabled by an operator" in html
    assert 'action="/page/keys/alpha/disable"' in html
    assert html.count('name="csrf" value="csrf-token-1"') == 6  # 2 per key, reload, sign out
    assert '<script src="/page/page.js"' in html and "<script>" not in html  # nothing inline
    assert "style=" not in html  # CSP style-src 'self': no inline style either


def test_every_value_from_the_key_file_or_google_is_escaped() -> None:
    key = {
        "name": HOSTILE,
        "key": HOSTILE,
        "project": '"><img src=x onerror=alert(1)>',
        "status": "dead",
        "disabled_reason": HOSTILE,
        "breaker": {"state": HOSTILE},
        "health": 0.5,
        "last_error": "</td></tr><b>bold</b>",
        "usage_today": {},
        "enabled": True,
    }
    failure = {
        "t": 0,
        "status": "<i>500</i>",
        "outcome": HOSTILE,
        "key": HOSTILE,
        "model": "</table><h1>owned",
        "client": HOSTILE,
        "attempts": [{"key": HOSTILE, "reason": "<u>x</u>"}],
        "request_id": '"onclick="x',
    }
    data = page.PageData(
        now=0.0,
        keys=[key],
        health={"keys": 1, "dead": 1},
        failures=[failure],
        clients=[HOSTILE],
        worker=HOSTILE,
        csrf='"><x',
    )
    html = page.render_page(data, notice=HOSTILE)
    for raw in (HOSTILE, "<img", "<b>bold", "</td></tr><b>", "<i>500", "<h1>owned", "<u>", '"><x'):
        assert raw not in html, raw
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    # the key name in a URL is percent-encoded, then escaped
    assert 'action="/page/keys/%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E/disable"' in html
    assert page.render_login(HOSTILE).count("<script") == 1  # the page's own script tag only


def test_a_key_state_says_what_and_why() -> None:
    now = 1_000_000.0

    def words(**k: Any) -> str:
        return page.key_state({"status": "active", **k}, now)[1]

    assert words() == "active"
    assert words(status="disabled", enabled_override=False) == "disabled by an operator"
    assert words(status="disabled", enabled_override=None) == "disabled by the key file"
    dead = words(status="dead", disabled_reason="400 API key invalid", next_check_in=90)
    assert dead == "dead: 400 API key invalid (checked again in 90 s)"
    cooling = words(
        status="cooling", cooldowns={"*": {"reason": "429 per-day quota", "seconds_left": 3600}}
    )
    assert cooling.startswith("cooling: all models until ") and "in 60 min" in cooling
    assert "429 per-day quota" in cooling
    one_model = words(cooldowns={"gemini-2.5-pro": {"reason": "429", "seconds_left": 30}})
    assert one_model.startswith("active: gemini-2.5-pro until ")
    assert "breaker open until" in words(status="open", breaker={"seconds_left": 12})
    month = words(status="cooling", cooldowns={"*": {"reason": "cap", "seconds_left": 20 * 86400}})
    assert re.search(r"until [A-Z][a-z]{2} \d\d \d\d:\d\d UTC, in 20 days", month), month


def test_the_signed_out_page_shows_a_form_and_nothing_of_the_pool() -> None:
    html = page.render_login()
    assert 'action="/page/login"' in html and 'type="password"' in html
    assert "data-key" not in html and "keys:" not in html
    off = page.render_login(off=True)
    assert "GEMINI_ADMIN_TOKEN" in off and "<form" not in off


def test_a_new_section_is_one_entry_in_the_list() -> None:
    extra = page.Section("budgets", "Budgets", lambda d: f"<p>{len(d.keys)} keys budgeted</p>")
    data = data_of(service())
    html = page.render_live(data, [*page.SECTIONS, extra])
    ids = re.findall(r'<section id="([^"]+)"', html)
    assert ids == [s.id for s in page.SECTIONS] + ["budgets"]
    assert "2 keys budgeted" in html
    assert "Persistence is off" in page.render_live(data)  # failures None: no database


def test_sessions_are_random_expire_and_are_bounded() -> None:
    sessions = Sessions(lifetime=100, limit=3)
    a = sessions.create(0)
    assert sessions.get(a.sid, 50) is a and len(a.sid) >= 40 and a.csrf != a.sid
    assert sessions.get(a.sid, 100) is None  # expired, and gone
    made = [sessions.create(200 + i) for i in range(4)]
    assert len(sessions) == 3 and sessions.get(made[0].sid, 210) is None
    sessions.drop(made[3].sid)
    assert sessions.get(made[3].sid, 210) is None and sessions.get("x" * 500, 210) is None
    assert sessions.get(None, 210) is None
    assert csrf_ok(made[1], made[1].csrf)
    assert not csrf_ok(made[1], made[2].csrf) and not csrf_ok(made[1], None)
    assert not csrf_ok(made[1], "") and not csrf_ok(made[1], "\udcff")


def test_only_the_page_own_origin_may_post() -> None:
    host = "127.0.0.1:8090"
    assert same_origin("http://127.0.0.1:8090", "same-origin", "http", host)
    assert same_origin(None, None, "http", host)  # curl: the CSRF token still decides
    assert not same_origin("http://evil.example", None, "http", host)
    assert not same_origin("http://127.0.0.1:8091", None, "http", host)
    assert not same_origin("https://127.0.0.1:8090", None, "http", host)
    assert not same_origin("null", None, "http", host)
    assert not same_origin(None, "cross-site", "http", host)
    assert not same_origin("http://127.0.0.1:8090", "same-site", "http", host)


def test_the_cookie_is_httponly_strict_and_only_for_the_page() -> None:
    c = cookie_header("sid123", secure=False, max_age=60)
    assert c.startswith("gemini_proxy_session=sid123;")
    assert "; HttpOnly" in c and "; SameSite=Strict" in c and "; Path=/page/" in c
    assert "Secure" not in c and "; Secure" in cookie_header("s", secure=True, max_age=60)


def test_wrong_sign_ins_are_throttled_per_address() -> None:
    t = SignInThrottle(limit=3, window=60, addresses=2)
    for i in range(3):
        assert t.retry_after("a", i) == 0
        t.failed("a", i)
    assert t.retry_after("a", 10) == 50  # the oldest failure leaves the window at 60
    assert t.retry_after("b", 10) == 0  # another address is not affected
    assert t.retry_after("a", 61) == 0
    t.failed("b", 70)
    t.failed("c", 70)  # past the address bound the oldest address is forgotten
    assert t.retry_after("a", 70) == 0 and len(t._failures) == 2


def test_budgets_show_per_project_and_model_once_they_exist() -> None:
    s = service()
    html = page.render_page(data_of(s, failures=[]))
    assert "Budgets per project and model" in html and "No budgets" in html
    s.budgets.configure([ProjectSpec("proj-alpha", (ModelLimits("gemini-2.5-flash", rpd=20),))])
    s.budgets.charge("proj-alpha", "gemini-2.5-flash", 10, time.time())
    lines = [budget_line(b) for b in s.describe_budgets()]
    html = page.render_page(data_of(s, failures=[], budget_lines=lines))
    assert "No budgets" not in html
    assert "proj-alpha gemini-2.5-flash: 1 requests today; rpd 1/20 (configured), 19 left" in html
    hostile = page.render_page(data_of(s, failures=[], budget_lines=[HOSTILE]))
    assert HOSTILE not in hostile  # escaped like every other value
