"""The admin page's HTTP side (aiohttp handlers under /page/; the admin server wires them in).

Signed in means either `Authorization: Bearer <admin token>` or a session cookie from the sign-in
form (websession.Sessions). A POST also needs the page's origin and, with a cookie, the session's
CSRF token. Every answer carries the page's CSP and never a secret: rendering is page.py's, from
the same views as the admin API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import page, page_assets
from .clients_view import client_line
from .config import NAME_RE, ConfigError
from .pool_views import budget_line
from .service import ProxyService
from .websession import (
    COOKIE,
    SECURITY_HEADERS,
    Session,
    Sessions,
    SignInThrottle,
    constant_time_equal,
    cookie_header,
    csrf_ok,
    same_origin,
)

log = logging.getLogger("gemini_proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
P = page.PREFIX
ACTIONS = ("enable", "disable", "reset")


def _answer(body: str, status: int = 200, content_type: str = "text/html") -> web.Response:
    resp = web.Response(text=body, status=status, content_type=content_type, charset="utf-8")
    resp.headers.update(SECURITY_HEADERS)
    return resp


def _see_other(location: str, cookie: str | None = None) -> web.Response:
    resp = web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})
    if cookie is not None:
        resp.headers["Set-Cookie"] = cookie
    return resp


def _refused(status: int, why: str) -> web.Response:
    body = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{status}</title>'
        f'<link rel="stylesheet" href="{P}/page.css"></head><body><main class="signin">'
        f'<p class="notice" role="alert">{page.esc(why)}</p><p><a href="{P}/">Back to the page</a>'
        "</p></main></body></html>"
    )
    return _answer(body, status)


class PageRoutes:
    """GET / and everything under /page/ on the admin port."""

    def __init__(
        self, service: ProxyService, token: Callable[[], str], requests_view: Handler
    ) -> None:
        self.service = service
        self.token = token
        self.requests_view = requests_view  # the admin API's /admin/requests handler
        self.sessions = Sessions()
        self.throttle = SignInThrottle()

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.root)
        router.add_get(f"{P}/", self.index)
        router.add_get(f"{P}/live", self.live)
        router.add_get(f"{P}/requests", self.requests)
        router.add_get(f"{P}/page.css", self.css)
        router.add_get(f"{P}/page.js", self.js)
        router.add_post(f"{P}/login", self.login)
        router.add_post(f"{P}/logout", self.logout)
        router.add_post(f"{P}/reload", self.reload)
        router.add_post(P + "/keys/{name}/{action:enable|disable|reset}", self.key_action)

    # --- who is asking

    def _bearer(self, request: web.Request) -> bool | None:
        """True: the right token; False: a wrong one; None: no Authorization header."""
        auth = request.headers.get("Authorization")
        if auth is None:
            return None
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        return bool(self.token()) and constant_time_equal(given, self.token())

    def bearer_wait(self, request: web.Request) -> float:
        """Seconds the caller's address must wait (0: go on). A wrong `Authorization` header counts
        against the form's throttle (per peer address), so past its limit every token from that
        address waits, as a form sign-in does: a bearer header is no way around it."""
        if request.headers.get("Authorization") is None or not self.token():
            return 0.0
        address, now = request.remote or "-", time.time()
        wait = self.throttle.retry_after(address, now)
        if wait <= 0 and not self._bearer(request):
            self.throttle.failed(address, now)
            log.warning("gemini-proxy: admin: a wrong admin token (bearer) from %s", address)
        return wait

    def held(self, wait: float) -> web.Response:
        """429 for an address past the throttle's limit (the sign-in form, Retry-After)."""
        resp = _answer(page.render_login("Too many wrong tokens: try again in a minute."), 429)
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp

    def _signed_in(self, request: web.Request) -> tuple[bool, Session | None]:
        if not self.token():
            return False, None
        bearer = self._bearer(request)
        if bearer is not None:
            return bearer, None
        session = self.sessions.get(request.cookies.get(COOKIE), time.time())
        return session is not None, session

    async def _post_guard(self, request: web.Request) -> web.Response | Session | None:
        """A refusal, or the session (None when signed in by bearer header)."""
        h = request.headers
        if not same_origin(h.get("Origin"), h.get("Sec-Fetch-Site"), request.scheme, request.host):
            return _refused(403, "Refused: this request did not come from the page itself.")
        ok, session = self._signed_in(request)
        if not ok:
            return _refused(401, "Not signed in (or the session ended): sign in again.")
        if session is not None:
            form = await request.post()
            given = form.get("csrf")
            if not csrf_ok(session, given if isinstance(given, str) else None):
                return _refused(403, "Refused: the form's CSRF token is missing or stale.")
        return session

    # --- what the page shows

    def _failures(self) -> list[dict[str, Any]] | None:
        store = self.service.store
        if store is None:
            return None
        try:
            rows = store.query(
                "SELECT t, request_id, client, key, model, status, outcome, attempts, proxy_reason"
                " FROM outcomes WHERE status >= 400 ORDER BY id DESC LIMIT ?",
                (page.FAILURES_SHOWN,),
            )
        except Exception as e:  # the page must not fail because of the database
            log.warning("gemini-proxy: page: cannot read recent failures: %s", e)
            return []
        for r in rows:
            try:
                r["attempts"] = json.loads(r["attempts"])
            except (TypeError, ValueError):
                r["attempts"] = []
        return rows

    async def _data(self, session: Session | None) -> page.PageData:
        usage = await asyncio.to_thread(self.service.usage_today)
        failures = await asyncio.to_thread(self._failures)
        shared = self.service.shared
        return page.PageData(
            now=time.time(),
            keys=self.service.describe_keys(usage),
            health=self.service.health(),
            failures=failures,
            clients=[c.name for c in self.service.config.clients],
            client_lines=[client_line(c) for c in self.service.describe_clients()],
            budget_lines=[budget_line(b) for b in self.service.describe_budgets()],
            worker=shared.worker if shared is not None else None,
            csrf=session.csrf if session is not None else "",
        )

    # --- handlers

    async def root(self, request: web.Request) -> web.StreamResponse:
        # the session cookie is only sent to /page/: a browser lands there, a bearer call is served
        if self._bearer(request):
            return await self.index(request)
        return _see_other(f"{P}/")

    async def index(self, request: web.Request) -> web.StreamResponse:
        if not self.token():
            return _answer(page.render_login(off=True), 403)
        ok, session = self._signed_in(request)
        if not ok:
            wrong = self._bearer(request) is False
            return _answer(
                page.render_login("Wrong admin token." if wrong else ""), 401 if wrong else 200
            )
        return _answer(page.render_page(await self._data(session)))

    async def live(self, request: web.Request) -> web.StreamResponse:
        ok, session = self._signed_in(request)
        if not ok:
            return _answer("not signed in", 401, "text/plain")
        return _answer(page.render_live(await self._data(session)))

    async def requests(self, request: web.Request) -> web.StreamResponse:
        ok, _session = self._signed_in(request)
        if not ok:
            return _answer("not signed in", 401, "text/plain")
        resp = await self.requests_view(request)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    async def css(self, request: web.Request) -> web.StreamResponse:
        resp = _answer(page_assets.CSS, content_type="text/css")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def js(self, request: web.Request) -> web.StreamResponse:
        resp = _answer(page_assets.JS, content_type="text/javascript")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def login(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        if not same_origin(h.get("Origin"), h.get("Sec-Fetch-Site"), request.scheme, request.host):
            return _refused(403, "Refused: this request did not come from the page itself.")
        if not self.token():
            return _answer(page.render_login(off=True), 403)
        address, now = request.remote or "-", time.time()
        wait = self.throttle.retry_after(address, now)
        if wait > 0:
            return self.held(wait)
        form = await request.post()
        given = form.get("token")
        if not isinstance(given, str) or not constant_time_equal(given, self.token()):
            self.throttle.failed(address, now)
            log.warning("gemini-proxy: page: a sign-in with a wrong admin token from %s", address)
            return _answer(page.render_login("Wrong admin token."), 401)
        session = self.sessions.create(time.time())
        cookie = cookie_header(session.sid, request.secure, int(self.sessions.lifetime))
        return _see_other(f"{P}/", cookie)

    async def logout(self, request: web.Request) -> web.StreamResponse:
        guard = await self._post_guard(request)
        if isinstance(guard, web.Response):
            return guard
        if guard is not None:
            self.sessions.drop(guard.sid)
        return _see_other(f"{P}/", cookie_header("", request.secure, 0))

    async def reload(self, request: web.Request) -> web.StreamResponse:
        guard = await self._post_guard(request)
        if isinstance(guard, web.Response):
            return guard
        try:
            self.service.reload()
        except ConfigError as e:
            log.error("gemini-proxy: reload failed, keeping the old config: %s", e)
            body = page.render_page(
                await self._data(guard), f"Reload failed, the old config stays: {e}"
            )
            return _answer(body, 422)
        log.info("gemini-proxy: page: key file reloaded")
        return _see_other(f"{P}/")

    async def key_action(self, request: web.Request) -> web.StreamResponse:
        guard = await self._post_guard(request)
        if isinstance(guard, web.Response):
            return guard
        name, action = request.match_info["name"], request.match_info["action"]
        if not NAME_RE.match(name) or name not in self.service.pool.keys or action not in ACTIONS:
            return _refused(404, "No such key.")
        self.service.operator(name, action)
        return _see_other(f"{P}/")
