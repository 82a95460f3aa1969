"""The mitmproxy addon: wires mitmproxy's hooks, options and commands to the proxy service.

Every upstream attempt (first or retry) is made by the addon's own pooled client in the async
`request` hook, so a failed attempt is retried on another key before any byte reaches the caller,
and the key never enters a flow (mitmweb, `-w` dumps) at all. Unary answers become
`flow.response`; a 2xx stream is handed to mitmproxy through the loopback relay and streamed.

State that must outlive a script reload (the pool, the admin server, the relay, the database)
lives in the module-level Runtime: only the entry script is re-imported on reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from .breaker import BreakerPolicy
from .classify import network_verdict
from .config import ConfigError
from .dispatch import DispatchPolicy, ProxyRequest
from .errors import error_body
from .metrics import INFLIGHT
from .pins import UPLOAD_URL_HEADERS, rewrite_upload_urls
from .records import Detour, RequestRecord
from .relay import TICKET_FIELD, Held, StreamRelay
from .routing import (
    Api,
    RouteError,
    api_for_path,
    client_credential,
    is_bearer_only,
    route,
    split_query,
)
from .selector import PoolPolicy
from .service import AuthError, ProxyService, Settings, install_access_log
from .store import Store, StoreError
from .upstream import UpstreamAnswer

log = logging.getLogger("gemini_proxy")

# request headers the addon reads before the body arrives (raw, lower-case)
_CREDENTIALS = frozenset({b"x-goog-api-key", b"authorization"})
_PEEKED = _CREDENTIALS | {b"content-length"}
# request headers that frame a body (the relay hop carries none)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_TICKET_ONLY = frozenset({TICKET_FIELD})
_RELAY_ONLY = _FRAMING | _TICKET_ONLY
# answers that can name a project-bound resource (files, cached contents, batches, operations)
RESOURCE_PATHS = re.compile(r"/(upload/|files|cachedContents|batches|operations)|:batch|:async")


@dataclass
class Runtime:
    service: ProxyService = field(default_factory=ProxyService)
    relay: StreamRelay = field(default_factory=StreamRelay)
    records: dict[str, RequestRecord] = field(default_factory=dict)
    admin: Any = None  # AdminServer, started in `running`
    admin_bind: tuple[str, int, str] | None = None
    db_path: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started: asyncio.Event | None = None
    file_sig: tuple[float, int, int] | None = None


_RUNTIME: Runtime | None = None


def runtime() -> Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime()
    return _RUNTIME


def _positive(name: str, value: int, low: int = 1, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise exceptions.OptionsError(f"{name} must be {bound}, got {value}")


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise exceptions.OptionsError(
            f"gemini_admin must be host:port (e.g. 127.0.0.1:8090), got {value!r}"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


OPTIONS: list[tuple[str, type, Any, str]] = [
    ("gemini_keys", str, "keys.yaml", "Path of the YAML key file (keys and client tokens)."),
    (
        "gemini_db",
        str,
        "gemini-proxy.db",
        'SQLite file for key state and outcomes; "" turns persistence off.',
    ),
    (
        "gemini_admin",
        str,
        "127.0.0.1:8090",
        'Admin/metrics listen address host:port; "" turns it off.',
    ),
    (
        "gemini_admin_token",
        str,
        os.environ.get("GEMINI_ADMIN_TOKEN", ""),
        "Bearer token for /admin/ (default: $GEMINI_ADMIN_TOKEN). Empty: /admin/ is off.",
    ),
    ("gemini_max_body", int, 10 * 1024 * 1024, "Largest request body in bytes (413 above)."),
    ("gemini_max_attempts", int, 3, "Upstream attempts per request, first one included."),
    ("gemini_deadline_ms", int, 300_000, "Time for all attempts and waits of one request."),
    ("gemini_max_wait_ms", int, 10_000, "Longest wait for a cooling key before answering 429."),
    ("gemini_breaker_failures", int, 3, "Consecutive failures that open a key's breaker."),
    ("gemini_breaker_cooldown_ms", int, 5_000, "First breaker cooldown; doubles per trip."),
    ("gemini_breaker_max_cooldown_ms", int, 300_000, "Longest breaker cooldown."),
    (
        "gemini_health_threshold",
        int,
        50,
        "Keys under this success percentage serve only when nothing better is left.",
    ),
    ("gemini_log_json", bool, False, "One JSON object per request log line."),
    ("gemini_retention_days", int, 30, "Keep request outcome rows this many days."),
    ("gemini_retention_rows", int, 1_000_000, "Keep at most this many outcome rows."),
    ("gemini_watch_ms", int, 1_000, "How often to check the key file for changes; 0: never."),
    ("gemini_drain_timeout_ms", int, 30_000, "On shutdown, wait this long for requests in flight."),
]


class GeminiProxy:
    def __init__(self) -> None:
        self.rt = runtime()

    @property
    def service(self) -> ProxyService:
        return self.rt.service

    # ------------------------------------------------------------------ options

    def load(self, loader: Loader) -> None:
        for name, typ, default, help_text in OPTIONS:
            loader.add_option(name, typ, default, help_text)

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "termlog_verbosity" in updated:
            level = logging.getLevelName(o.termlog_verbosity.upper())
            install_access_log(sys.stdout, level if isinstance(level, int) else logging.INFO)
        if not any(opt.startswith("gemini_") for opt in updated):
            return
        _positive("gemini_max_body", o.gemini_max_body)
        _positive("gemini_max_attempts", o.gemini_max_attempts, 1, 10)
        _positive("gemini_deadline_ms", o.gemini_deadline_ms, 100)
        _positive("gemini_max_wait_ms", o.gemini_max_wait_ms, 0)
        _positive("gemini_breaker_failures", o.gemini_breaker_failures, 1)
        _positive("gemini_breaker_cooldown_ms", o.gemini_breaker_cooldown_ms, 1)
        _positive(
            "gemini_breaker_max_cooldown_ms",
            o.gemini_breaker_max_cooldown_ms,
            o.gemini_breaker_cooldown_ms,
        )
        _positive("gemini_health_threshold", o.gemini_health_threshold, 0, 100)
        _positive("gemini_retention_days", o.gemini_retention_days, 1)
        _positive("gemini_retention_rows", o.gemini_retention_rows, 1)
        _positive("gemini_watch_ms", o.gemini_watch_ms, 0)
        _positive("gemini_drain_timeout_ms", o.gemini_drain_timeout_ms, 0)
        admin = parse_hostport(o.gemini_admin) if o.gemini_admin else None

        settings = Settings(
            keys_path=o.gemini_keys,
            max_body=o.gemini_max_body,
            dispatch=DispatchPolicy(
                max_attempts=o.gemini_max_attempts,
                deadline=o.gemini_deadline_ms / 1000,
                max_wait=o.gemini_max_wait_ms / 1000,
            ),
            pool=PoolPolicy(
                breaker=BreakerPolicy(
                    failure_threshold=o.gemini_breaker_failures,
                    base_cooldown=o.gemini_breaker_cooldown_ms / 1000,
                    max_cooldown=o.gemini_breaker_max_cooldown_ms / 1000,
                ),
                health_threshold=o.gemini_health_threshold / 100,
            ),
            log_json=o.gemini_log_json,
        )
        if "gemini_keys" in updated or not self.service.config.keys:
            try:
                self.service.reload(o.gemini_keys)  # raises before anything is swapped
            except ConfigError as e:
                raise exceptions.OptionsError(f"gemini_keys: {e}") from None
            self.rt.file_sig = _file_sig(o.gemini_keys)
        self.service.apply_settings(settings)
        if self.rt.db_path != o.gemini_db:
            self._open_db(o.gemini_db)
        if self.service.store is not None:
            self.service.store.retention_days = o.gemini_retention_days
            self.service.store.retention_rows = o.gemini_retention_rows
        bind = (admin[0], admin[1], o.gemini_admin_token) if admin else None
        if self.rt.started is not None and bind != self.rt.admin_bind:
            asyncio.get_running_loop().create_task(self._restart_admin(bind))

    def _open_db(self, path: str) -> None:
        old = self.service.store
        store = None
        if path:
            try:
                store = Store(path)
            except StoreError as e:
                raise exceptions.OptionsError(f"gemini_db: {e}") from None
        if old is not None:
            self.service.save_state()
            old.close()
        self.service.store = None
        if store is not None:
            self.service.attach_store(store)
        self.rt.db_path = path

    # ------------------------------------------------------------------ lifecycle

    def running(self) -> None:
        _raise_fd_limit()
        if ctx.options.connection_strategy != "lazy":
            # eager would open a pointless connection to Google per client connection
            ctx.options.update(connection_strategy="lazy")
        if self.rt.started is None:
            self.rt.started = asyncio.Event()
            asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        rt = self.rt
        assert rt.started is not None
        await rt.relay.start()
        o = ctx.options
        bind = (*parse_hostport(o.gemini_admin), o.gemini_admin_token) if o.gemini_admin else None
        await self._restart_admin(bind)
        rt.tasks.append(asyncio.get_running_loop().create_task(self._housekeeping()))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_from_signal)
        rt.started.set()

    async def _restart_admin(self, bind: tuple[str, int, str] | None) -> None:
        from .admin import AdminServer

        rt = self.rt
        if rt.admin is not None:
            await rt.admin.stop()
            rt.admin = None
        rt.admin_bind = bind
        if bind is None:
            return
        rt.admin = AdminServer(self.service, bind[2])
        try:
            await rt.admin.start(bind[0], bind[1])
        except OSError as e:
            log.error(
                "gemini-proxy: admin server cannot listen on %s:%s: %s",
                bind[0],
                bind[1],
                e.strerror,
            )
            rt.admin = None
            return
        log.info(
            "gemini-proxy: admin and metrics on http://%s:%s/ (/metrics, /healthz, /admin/)",
            *rt.admin.address,
        )

    async def _housekeeping(self) -> None:
        """Persist key state (≤ 0.25 s behind) and watch the key file for changes."""
        last_watch = 0.0
        while True:
            await asyncio.sleep(0.25)
            try:
                self.service.save_state_if_dirty()
                watch = ctx.options.gemini_watch_ms / 1000
                if watch and time.monotonic() - last_watch >= watch:
                    last_watch = time.monotonic()
                    sig = _file_sig(self.service.settings.keys_path)
                    if sig != self.rt.file_sig:
                        self.rt.file_sig = sig
                        self.reload_keys("key file changed")
            except Exception:  # housekeeping must go on
                log.exception("gemini-proxy: housekeeping failed")

    def _reload_from_signal(self) -> None:
        self.reload_keys("SIGHUP")

    def reload_keys(self, why: str) -> bool:
        try:
            self.service.reload()
        except ConfigError as e:
            log.error("gemini-proxy: %s: reload failed, keeping the old config: %s", why, e)
            return False
        log.info("gemini-proxy: reloaded key file (%s)", why)
        return True

    def done(self) -> Any:
        master = getattr(ctx, "master", None)
        if master is not None and master.should_exit.is_set():
            return self._shutdown()  # real shutdown: mitmproxy awaits this
        return None  # script reload: the Runtime lives on for the reloaded script

    async def _shutdown(self) -> None:
        global _RUNTIME
        rt = self.rt
        loop = asyncio.get_running_loop()
        timeout = ctx.options.gemini_drain_timeout_ms / 1000
        ps = ctx.master.addons.get("proxyserver")
        if ps is not None:
            with contextlib.suppress(Exception):
                await ps.servers.update([])  # stop accepting new connections at once
        if rt.records and timeout:
            log.info(
                "gemini-proxy: draining %d requests in flight (up to %.0fs)",
                len(rt.records),
                timeout,
            )
            hurry = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, hurry.set)
            deadline = loop.time() + timeout
            while rt.records and loop.time() < deadline and not hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hurry.wait(), 0.05)
            if rt.records:
                log.warning("gemini-proxy: %d requests still in flight at exit", len(rt.records))
        for task in rt.tasks:
            task.cancel()
        await rt.relay.stop()
        if rt.admin is not None:
            await rt.admin.stop()
        await self.service.upstream.close()
        if self.service.store is not None:
            self.service.save_state()
            self.service.store.close()
            self.service.store = None
        _RUNTIME = None

    # ------------------------------------------------------------------ flows

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = RequestRecord()
        self.rt.records[flow.id] = rec
        self.service.inflight += 1
        INFLIGHT.inc()
        req = flow.request
        path, _, query = req.path.partition("?")
        clean_query, query_key = split_query(query)
        # one pass over the raw header fields: mitmproxy's Headers mapping API costs ~10x more
        headers: dict[str, str] = {}
        for k, v in req.headers.fields:
            name = k.lower()
            if name in _PEEKED:
                headers[_s(name)] = _s(v)
        credential = client_credential(headers, query_key)
        rec.bearer_only = is_bearer_only(headers, query_key)  # decided before credentials go
        found = api_for_path(path, rec.bearer_only)
        rec.api = str(found[0] if found else (Api.OPENAI if "/openai/" in path else Api.NATIVE))
        # the caller's credentials never go further, nor show in mitmweb or dumps
        if "x-goog-api-key" in headers or "authorization" in headers:
            req.headers.fields = tuple(
                kv for kv in req.headers.fields if kv[0].lower() not in _CREDENTIALS
            )
        if query_key is not None:
            req.path = f"{path}?{clean_query}" if clean_query else path
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        if "upload_id=" in clean_query:  # a resumable-upload follow-up
            rec.upload_id = dict(parse_qsl(clean_query)).get("upload_id")
        upload_id = rec.upload_id
        try:
            if upload_id and not credential and self.service.pins.upload_key(upload_id):
                rec.client = "upload"  # the upload_id we handed out is the credential
            else:
                rec.client = self.service.authenticate(credential, peer)
        except AuthError as e:
            self._reply(flow, rec, e.status, e.message, e.reason)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.service.settings.max_body:
            self._too_large(flow, rec, int(length))

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.records.get(flow.id)
        if rec is None or flow.response is not None:
            return
        try:
            await self._forward(flow, rec)
        except Exception:  # a bug here must not let the flow go upstream unhandled
            log.exception("gemini-proxy: internal error on request %s", rec.request_id)
            self._reply(
                flow,
                rec,
                500,
                f"internal proxy error (request id {rec.request_id}); see the proxy's log",
                "internal_error",
            )

    async def _forward(self, flow: http.HTTPFlow, rec: RequestRecord) -> None:
        req = flow.request
        body = req.raw_content or b""
        if len(body) > self.service.settings.max_body:
            self._too_large(flow, rec, len(body))
            return
        path, _, query = req.path.partition("?")
        try:
            r = route(req.method, path, query, rec.bearer_only, body)
        except RouteError as e:
            self._reply(flow, rec, e.status, e.message, e.reason)
            return
        rec.api, rec.model, rec.streaming = str(r.api), r.model, r.streaming
        if req.path != r.path_and_query:
            req.path = r.path_and_query  # mitmweb shows what went upstream (OpenAI SDK paths)
        upload_id = rec.upload_id
        pinned_key = self.service.pins.upload_key(upload_id) if upload_id else None
        project = self.service.pins.project_for(r.path, body)
        if pinned_key is not None:
            spec = self.service.config.key(pinned_key)
            project = spec.project if spec else project
        if r.streaming and self.rt.started is not None:
            await self.rt.started.wait()
        base = f"{req.scheme}://{req.host}:{req.port}"
        headers = [(_s(k), _s(v)) for k, v in req.headers.fields]
        proxy_req = ProxyRequest(req.method, base, r, headers, body, project)
        result = await self.service.dispatcher.dispatch(proxy_req)
        rec.attempts, rec.waited = result.attempts, result.waited
        if result.proxy_made:
            self._reply(flow, rec, result.status, result.message, result.reason, result.retry_after)
            return
        answer, key = result.answer, result.key
        assert answer is not None and key is not None
        rec.key, rec.status = key.name, answer.status
        extra = [
            ("x-gemini-proxy-key", key.name),
            ("x-gemini-proxy-attempts", str(len(rec.attempts))),
            ("x-request-id", rec.request_id),
        ]
        if answer.stream is not None and self.rt.relay.port:
            self._relay(flow, rec, answer, extra)
            return
        if answer.stream is not None:  # relay not up (cannot happen after `running`): buffer
            answer.body += await answer.stream.read()
            answer.stream.release()
        if any(k.lower() in UPLOAD_URL_HEADERS for k, _ in answer.headers):
            answer.headers, started = rewrite_upload_urls(
                answer.headers, req.host, _proxy_origin(flow)
            )
            for new_upload in started if upload_id is None else ():
                self.service.pins.remember_upload(new_upload, key.name)
        if 200 <= answer.status < 300 and RESOURCE_PATHS.search(r.path):
            self.service.pins.remember_resources(answer.body, key.project)
        flow.response = _make_response(answer, extra)

    def _relay(
        self,
        flow: http.HTTPFlow,
        rec: RequestRecord,
        answer: UpstreamAnswer,
        extra: list[tuple[str, str]],
    ) -> None:
        """Point the flow at the relay, which hands mitmproxy the open stream we hold."""
        assert answer.stream is not None
        key, model = rec.key, rec.model or "*"

        def on_chunk(chunk: bytes) -> None:
            if rec.first_byte is None:
                rec.first_byte = time.perf_counter()
            rec.tap.feed(chunk)

        def on_end(error: str | None) -> None:
            if error:
                rec.stream_error = error
                if error.startswith("upstream") and key:
                    self.service.pool.record(
                        key, model, network_verdict("stream broke"), time.time()
                    )

        held = Held(
            answer.status,
            answer.reason,
            answer.headers + extra,
            answer.body,
            answer.stream,
            on_chunk,
            on_end,
        )
        rec.relay_ticket = self.rt.relay.hold(held)
        req = flow.request
        data = req.data  # the target, set directly: the Host header stays the one Google gets
        fields = req.headers.fields
        framing = tuple(kv for kv in fields if kv[0].lower() in _FRAMING)
        rec.detour = Detour(data.scheme, data.host, data.port, data.content, framing)
        if data.content or framing:  # the relay needs no body: do not copy it again
            fields = tuple(kv for kv in fields if kv[0].lower() not in _FRAMING)
            fields += ((b"content-length", b"0"),)
            data.content = b""
        req.headers.fields = (*fields, (TICKET_FIELD, rec.relay_ticket.encode()))
        data.scheme, data.host, data.port = b"http", "127.0.0.1", self.rt.relay.port
        self._annotate(flow, rec)  # a stream may run for minutes: show it in mitmweb now

    def _restore_request(self, flow: http.HTTPFlow, rec: RequestRecord) -> None:
        """Show in mitmweb and dumps the request as it went to Google, not to the relay."""
        detour, rec.detour = rec.detour, None
        if detour is None:
            return
        data = flow.request.data
        data.scheme, data.host, data.port = detour.scheme, detour.host, detour.port
        drop = _RELAY_ONLY if (detour.body or detour.framing) else _TICKET_ONLY
        fields = tuple(kv for kv in data.headers.fields if kv[0].lower() not in drop)
        data.headers.fields = fields + detour.framing
        data.content = detour.body

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.records.get(flow.id)
        if rec is None or rec.detour is None:
            return
        self._restore_request(flow, rec)
        assert flow.response is not None
        flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.records.pop(flow.id, None)
        if rec is None:
            return
        assert flow.response is not None
        rec.status = flow.response.status_code
        if rec.relay_ticket is None:  # not streamed: the whole body is here
            rec.first_byte = time.perf_counter()
            rec.tap.feed(flow.response.raw_content or b"")
        self._finish(flow, rec)

    def error(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.records.pop(flow.id, None)
        if rec is None:
            return
        self._restore_request(flow, rec)
        if rec.relay_ticket and rec.first_byte is None:
            self.rt.relay.cancel(rec.relay_ticket, "flow failed before the stream started")
        msg = flow.error.msg if flow.error else "unknown error"
        if not rec.stream_error:
            rec.stream_error = msg
        if not rec.status:
            rec.status = 499  # the caller went away before an answer
        self._finish(flow, rec)

    def _finish(self, flow: http.HTTPFlow, rec: RequestRecord) -> None:
        self.service.inflight -= 1
        INFLIGHT.dec()
        self._annotate(flow, rec)  # now: mitmweb and `-w` dumps take the flow after this hook
        # mitmproxy sends the answer only after the `response` hook returns: count, log and
        # store once it is on its way (this took ~1 ms off every request's latency)
        asyncio.get_running_loop().call_soon(self.service.finish, rec)

    # ------------------------------------------------------------------ answers made here

    def _too_large(self, flow: http.HTTPFlow, rec: RequestRecord, size: int) -> None:
        limit = self.service.settings.max_body
        self._reply(
            flow,
            rec,
            413,
            f"request body is {size} bytes; this proxy accepts at most {limit} (gemini_max_body)",
            "request_too_large",
            close=True,
        )

    def _reply(
        self,
        flow: http.HTTPFlow,
        rec: RequestRecord,
        status: int,
        message: str,
        reason: str,
        retry_after: float | None = None,
        close: bool = False,
    ) -> None:
        api = Api(rec.api)
        headers = {
            "content-type": "application/json; charset=UTF-8",
            "x-request-id": rec.request_id,
            "x-gemini-proxy-reason": reason,
        }
        if retry_after is not None:
            headers["retry-after"] = str(max(1, round(retry_after)))
        if close:
            headers["connection"] = "close"
        flow.response = http.Response.make(
            status, error_body(api, status, message, reason), headers
        )
        rec.status, rec.proxy_reason, rec.proxy_message = status, reason, message

    def _annotate(self, flow: http.HTTPFlow, rec: RequestRecord) -> None:
        flow.comment = rec.comment() or (f"{rec.key}: {rec.status}" if rec.key else "")
        flow.metadata["gemini"] = rec.metadata()
        if rec.proxy_reason or rec.stream_error or rec.status >= 400:
            flow.marked = ":warning:"
        elif rec.retried:
            flow.marked = ":repeat:"

    # ------------------------------------------------------------------ commands

    @command.command("gemini.keys")
    def keys_cmd(self) -> str:
        """Show every key: status, breaker, cooldowns, health, last error."""
        lines = []
        for k in self.service.describe_keys():
            cool = ", ".join(f"{m} {c['seconds_left']:.0f}s" for m, c in k["cooldowns"].items())
            lines.append(
                f"{k['name']} ({k['key']}) project={k['project']} weight={k['weight']} "
                f"status={k['status']} breaker={k['breaker']['state']} health={k['health']}"
                + (f" cooling=[{cool}]" if cool else "")
                + (f" last_error={k['last_error']}" if k["last_error"] else "")
            )
        text = "\n".join(lines) or "no keys configured"
        log.info("gemini-proxy keys:\n%s", text)
        return text

    def _operate(self, name: str, action: str) -> None:
        try:
            self.service.operator(name, action)
        except KeyError:
            raise exceptions.CommandError(f"no key named {name!r}") from None

    @command.command("gemini.enable")
    def enable_cmd(self, name: str) -> None:
        """Enable a key (overrides the YAML and a dead-key disable)."""
        self._operate(name, "enable")

    @command.command("gemini.disable")
    def disable_cmd(self, name: str) -> None:
        """Disable a key until enabled again (survives restarts)."""
        self._operate(name, "disable")

    @command.command("gemini.reset")
    def reset_cmd(self, name: str) -> None:
        """Forget a key's failures, cooldowns and operator overrides."""
        self._operate(name, "reset")

    @command.command("gemini.reload")
    def reload_cmd(self) -> None:
        """Re-read the key file now."""
        if not self.reload_keys("gemini.reload command"):
            raise exceptions.CommandError("reload failed; the old config stays (see the log)")


def _raise_fd_limit() -> None:
    """Each stream holds a few sockets (caller, relay, upstream): lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _file_sig(path: str) -> tuple[float, int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size, st.st_ino)


def _proxy_origin(flow: http.HTTPFlow) -> str:
    fwd = flow.request.headers.get("x-forwarded-host")
    if fwd:
        proto = flow.request.headers.get("x-forwarded-proto", "http")
        return f"{proto}://{fwd}"
    host, port = flow.client_conn.sockname[:2]
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if flow.client_conn.tls else "http"
    return f"{scheme}://{host}:{port}"


def _s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as mitmproxy and aiohttp decode headers


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _make_response(answer: UpstreamAnswer, extra: list[tuple[str, str]]) -> http.Response:
    fields = [(_b(k), _b(v)) for k, v in answer.headers + extra]
    fields.append((b"content-length", str(len(answer.body)).encode()))
    now = time.time()
    return http.Response(
        b"HTTP/1.1",
        answer.status,
        (answer.reason or "").encode(),
        http.Headers(fields),
        answer.body,
        None,
        now,
        now,
    )
