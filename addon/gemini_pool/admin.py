"""The admin HTTP server (aiohttp): /healthz, /readyz, /metrics, the /admin/ API and the page (/).

Everything under /admin/ needs `Authorization: Bearer <admin token>` (constant-time
compare); ten wrong tokens from one peer address within a minute (bearer or the page's form,
one throttle) make that address wait: 429 with Retry-After. Bad input answers 4xx JSON and
changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import metrics
from .config import MAX_WEIGHT, NAME_RE, ConfigError
from .page_routes import PageRoutes
from .service import ProxyService
from .websession import constant_time_equal

log = logging.getLogger("gemini_proxy")
# aiohttp logs a malformed request's whole header line (a bearer token with a stray byte would
# land in the log): the admin API answers those with 400 and says nothing more
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

MAX_ADMIN_BODY = 1 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


class AdminServer:
    def __init__(self, service: ProxyService, token: str) -> None:
        self.service = service
        self.token = token
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None
        self.page = PageRoutes(service, lambda: self.token, self.requests)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_ADMIN_BODY, middlewares=[self._guard])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/admin/keys", self.keys)
        r.add_get("/admin/keys/{name}", self.key)
        r.add_post("/admin/keys/{name}/{action:enable|disable|reset}", self.key_action)
        r.add_patch("/admin/keys/{name}", self.key_patch)
        r.add_post("/admin/reload", self.reload)
        r.add_get("/admin/health", self.health)
        r.add_get("/admin/rotation", self.rotation)
        r.add_get("/admin/clients", self.clients)
        r.add_get("/admin/budgets", self.budgets)
        r.add_get("/admin/requests", self.requests)
        r.add_post("/admin/resources", self.hand_over)
        r.add_get("/admin/state", self.state_export)
        r.add_post("/admin/state", self.state_import)
        self.page.add_to(r)  # GET / and /page/: the pool's page (page_routes.py)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        self.address = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(("/admin", "/page/")) or request.path == "/":
            wait = self.page.bearer_wait(request)  # wrong bearer tokens count, per peer address
            if wait > 0 and request.path.startswith("/admin"):
                resp = _error(429, "too many wrong admin tokens from this address: try later")
                resp.headers["Retry-After"] = str(int(wait) + 1)
                return resp
            if wait > 0:
                return self.page.held(wait)
        if request.path.startswith("/admin/") or request.path == "/admin":
            if not self.token:
                return _error(
                    403,
                    "the admin API is off: give it a token in the environment "
                    "(GEMINI_ADMIN_TOKEN=...) or in a file (--set gemini_admin_token_file=PATH)",
                )
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not constant_time_equal(given, self.token):
                return _error(401, "missing or wrong admin token (Authorization: Bearer <token>)")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return _error(e.status, e.reason)
            raise

    # --- open endpoints
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        usable = self.service.pool.usable_count(time.time())
        shared = self.service.shared
        # a joining worker is not ready before its first sync with the pool (or READY_WAIT)
        synced = shared is None or shared.ready.is_set()
        doc: dict[str, Any] = {"ready": usable > 0 and synced, "usable_keys": usable}
        incidents = self.service.dispatcher.incidents.current(time.time())
        if incidents:  # said, not acted on: Google's trouble is no reason to pull this worker
            doc["incidents"] = sorted(i.model for i in incidents)[:10]
        if shared is not None:  # a worker serves on its own state while Redis is away
            doc["shared_state"] = {
                "up": shared.up,
                "synced": synced,
                "worker": shared.worker,
                **({"error": shared.last_error} if shared.last_error else {}),
            }
        return web.json_response(doc, status=200 if doc["ready"] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    # --- keys
    def _name(self, request: web.Request) -> str:
        name = request.match_info["name"]
        if not NAME_RE.match(name):
            raise web.HTTPBadRequest(reason=f"invalid key name {name[:80]!r}")
        if name not in self.service.pool.keys:
            raise web.HTTPNotFound(reason=f"no key named {name!r}")
        return name

    async def keys(self, request: web.Request) -> web.Response:
        usage = await asyncio.to_thread(self.service.usage_today)
        return web.json_response({"keys": self.service.describe_keys(usage)})

    async def key(self, request: web.Request) -> web.Response:
        name = self._name(request)
        usage = await asyncio.to_thread(self.service.usage_today)
        return web.json_response(
            next(k for k in self.service.describe_keys(usage) if k["name"] == name)
        )

    async def key_action(self, request: web.Request) -> web.Response:
        name = self._name(request)
        return web.json_response(self.service.operator(name, request.match_info["action"]))

    async def key_patch(self, request: web.Request) -> web.Response:
        name = self._name(request)
        doc = await self._json(request)
        if not isinstance(doc, dict) or set(doc) - {"weight"} or "weight" not in doc:
            raise web.HTTPBadRequest(
                reason='body must be {"weight": <int>} (null clears the override)'
            )
        weight = doc["weight"]
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT
        ):
            raise web.HTTPBadRequest(
                reason=f"weight must be an integer from 1 to {MAX_WEIGHT} or null"
            )
        return web.json_response(self.service.operator(name, "weight", weight))

    async def reload(self, request: web.Request) -> web.Response:
        try:
            config = self.service.reload()
        except ConfigError as e:
            log.error("gemini-proxy: reload failed, keeping the old config: %s", e)
            return web.json_response(
                {"reloaded": False, "error": str(e), "keys": len(self.service.config.keys)},
                status=422,
            )
        return web.json_response({"reloaded": True, "keys": [k.name for k in config.keys]})

    async def health(self, request: web.Request) -> web.Response:
        incidents = self.service.dispatcher.incidents.describe(time.time())
        return web.json_response({**self.service.health(), "incidents": incidents})

    async def rotation(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.rotation())

    async def clients(self, request: web.Request) -> web.Response:
        """Today's usage per client (every worker's, live; per model from this worker's
        database) with its limits."""
        if self.service.store is not None:
            self.service.store.write_pending()  # what finished a moment ago (never waits)
        accounting = await asyncio.to_thread(self.service.clients_today)
        limiter = self.service.limiter
        return web.json_response(
            {
                "clients": self.service.describe_clients(accounting),
                "workers": limiter.workers,  # sharing the limits (Redis), this one included
                "shared": limiter.shared,  # False: Redis away or one worker: local shares
            }
        )

    async def budgets(self, request: web.Request) -> web.Response:
        return web.json_response({"budgets": self.service.describe_budgets()})

    async def requests(self, request: web.Request) -> web.Response:
        store = self.service.store
        if store is None:
            raise web.HTTPNotFound(reason="persistence is off (gemini_db is empty)")
        q = request.query
        try:
            limit = int(q.get("limit", "50"))
            status = int(q["status"]) if q.get("status") else None
        except ValueError:
            raise web.HTTPBadRequest(reason="limit and status must be integers") from None
        if not 1 <= limit <= 1000:
            raise web.HTTPBadRequest(reason="limit must be from 1 to 1000")
        key, tried = q.get("key") or None, q.get("tried") or None
        for name in (key, tried):
            if name is not None and not NAME_RE.match(name):
                raise web.HTTPBadRequest(reason="invalid key name")
        store.write_pending()  # include what finished a moment ago (never waits for a lock)
        rows = await asyncio.to_thread(store.recent, limit, key, status, tried)
        return web.json_response({"requests": rows})

    async def hand_over(self, request: web.Request) -> web.Response:
        """POST {"name": "files/abc", "client": "alice" | "group": "team-a", "project": "p"}."""
        doc = await self._json(request)
        fields = {"name", "client", "group", "project"}
        if not isinstance(doc, dict) or set(doc) - fields or not isinstance(doc.get("name"), str):
            raise web.HTTPBadRequest(
                reason='body must be {"name": "files/ID", "client": NAME or "group": NAME,'
                ' "project": PROJECT (optional)}'
            )
        if not all(isinstance(doc.get(f), str | None) for f in fields):
            raise web.HTTPBadRequest(reason="every field is a string")
        try:
            done = self.service.hand_over(
                doc["name"], doc.get("client"), doc.get("group"), doc.get("project") or ""
            )
        except ValueError as e:
            raise web.HTTPBadRequest(reason=str(e)[:300]) from None
        return web.json_response(done)

    async def state_export(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.export_state())

    async def state_import(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        try:
            matched = self.service.import_state(doc)
        except (ValueError, TypeError, KeyError) as e:
            raise web.HTTPBadRequest(reason=str(e)) from None
        return web.json_response({"imported": matched})

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_ADMIN_BODY, actual_size=request.content_length or 0
            ) from None
        except (ValueError, UnicodeDecodeError, RecursionError):  # incl. 5000-digit integers
            raise web.HTTPBadRequest(reason="body is not valid JSON") from None
