"""What outlives a flow and a script reload: the service, the side servers, housekeeping, the drain.

mitmproxy re-imports only the entry script on reload, so the state the addons share (the service
with its pool and database, the pipeline, the relay, the admin server, the requests in flight)
lives in one module-level Runtime here (`current()`). No mitmproxy import: the addons in `mitm/`
hand in what they need (the master at shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .bodybudget import BodyBudget
from .config import ConfigError
from .pipeline import Pipeline
from .records import RequestRecord
from .relay import StreamRelay
from .service import ProxyService
from .shared import await_ready
from .watcher import FileWatcher

log = logging.getLogger("gemini_proxy")
HOUSEKEEPING_TICK = 0.25
PIN_PRUNE_EVERY = 60.0
STARTUP_WAIT = 10.0  # longest a request waits for the side servers at start


class InFlight:
    """The requests in flight: their records by flow id, and the flows of each client connection
    (a connection that closes settles the flows no hook will end). Counts them for the service's
    health and the inflight gauge."""

    def __init__(self, service: ProxyService) -> None:
        self.service = service
        self.records: dict[str, RequestRecord] = {}
        self.of_connection: dict[str, set[str]] = {}
        self.budget = BodyBudget()  # request bodies held in memory (gemini_max_inflight_bytes)

    def __len__(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        return bool(self.records)

    def open(self, flow_id: str, connection_id: str | None = None) -> RequestRecord:
        rec = RequestRecord()
        self.records[flow_id] = rec
        if connection_id is not None:
            self.of_connection.setdefault(connection_id, set()).add(flow_id)
        self.service.inflight += 1
        metrics.INFLIGHT.inc()
        return rec

    def get(self, flow_id: str) -> RequestRecord | None:
        return self.records.get(flow_id)

    def close(self, flow_id: str, connection_id: str) -> RequestRecord | None:
        """The flow ended (answered or failed): its record, no longer in flight."""
        rec = self.records.pop(flow_id, None)
        if rec is None:
            return None
        flows = self.of_connection.get(connection_id)
        if flows is not None:
            flows.discard(flow_id)
        self._ended()
        return rec

    def close_connection(self, connection_id: str) -> list[RequestRecord]:
        """The connection closed: the records of its flows that no hook ended."""
        out = []
        for flow_id in self.of_connection.pop(connection_id, ()):
            rec = self.records.pop(flow_id, None)
            if rec is not None:
                self._ended()
                out.append(rec)
        return out

    def _ended(self) -> None:
        self.service.inflight -= 1
        metrics.INFLIGHT.dec()


@dataclass
class Runtime:
    service: ProxyService = field(default_factory=ProxyService)
    relay: StreamRelay = field(default_factory=StreamRelay)
    watcher: FileWatcher = field(default_factory=FileWatcher)
    admin: Any = None  # AdminServer, started in `running`
    admin_bind: tuple[str, int, str] | None = None
    db_path: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started: asyncio.Event | None = None
    sharing: tuple[str, str, str] = ("", "", "")  # gemini_redis, its prefix, this worker's name

    def __post_init__(self) -> None:
        self.pipeline = Pipeline(self.service, [self.service.limit_check])
        self.flows = InFlight(self.service)

    async def ready(self, timeout: float = STARTUP_WAIT) -> None:
        """Wait (bounded) until `running` started the relay and the side servers, and a joining
        worker's first sync with the pool's shared state is done: it serves nothing before it
        knows the pool (dead keys, cooling projects, operators' disables)."""
        if self.started is not None and not self.started.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.started.wait(), timeout)
        if self.sharing[0]:
            await await_ready(lambda: self.service.shared)

    async def start(self, admin: tuple[str, int, str] | None, watch_ms: Callable[[], int]) -> None:
        assert self.started is not None
        await self.relay.start()
        await self.restart_admin(admin)
        self.service.share(*self.sharing)
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._housekeeping(watch_ms)))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self.reload_keys("SIGHUP"))
        self.started.set()

    async def restart_admin(self, bind: tuple[str, int, str] | None) -> None:
        from .admin import AdminServer

        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        self.admin_bind = bind
        if bind is None:
            return
        self.admin = AdminServer(self.service, bind[2])
        try:
            await self.admin.start(bind[0], bind[1])
        except OSError as e:
            log.error(
                "gemini-proxy: admin server cannot listen on %s:%s: %s",
                bind[0],
                bind[1],
                e.strerror,
            )
            self.admin = None
            return
        log.info(
            "gemini-proxy: admin and metrics on http://%s:%s/ (/metrics, /healthz, /admin/)",
            *self.admin.address,
        )

    def reload_keys(self, why: str) -> bool:
        try:
            self.service.reload()
        except ConfigError as e:
            log.error("gemini-proxy: %s: reload failed, keeping the old config: %s", why, e)
            return False
        self.watcher.reset(self.service.settings.keys_path)
        log.info("gemini-proxy: reloaded key file (%s)", why)
        return True

    async def _housekeeping(self, watch_ms: Callable[[], int]) -> None:
        """Persist key state (≤ 0.25 s behind), run due key checks, watch the key file."""
        last_watch = last_prune = 0.0
        while True:
            await asyncio.sleep(HOUSEKEEPING_TICK)
            try:
                now = time.monotonic()
                if self.service.shared is not None:  # a slow Redis must not hold the rest up
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.service.shared.locks.grant_probes(time.time()), 1.0
                        )
                with contextlib.suppress(TimeoutError):  # client limits across workers
                    await asyncio.wait_for(self.service.share_limits(), 1.0)
                self.service.checker.run_due(time.time())
                self.service.save_state_if_dirty()
                watch = watch_ms() / 1000
                if watch and now - last_watch >= watch:
                    last_watch = now
                    self.watcher.path = self.service.settings.keys_path
                    if self.watcher.poll(now):
                        self.reload_keys("key file changed")
                if now - last_prune >= PIN_PRUNE_EVERY:
                    last_prune = now
                    self.service.pins.prune(time.time())
            except Exception:  # housekeeping must go on
                log.exception("gemini-proxy: housekeeping failed")

    async def shutdown(self, master: Any, drain_timeout: float) -> None:
        """Stop listening at once, let requests in flight finish (a second signal hurries),
        then close everything and flush SQLite."""
        loop = asyncio.get_running_loop()
        ps = master.addons.get("proxyserver")
        if ps is not None:
            with contextlib.suppress(Exception):
                await ps.servers.update([])
        if self.flows and drain_timeout:
            log.info(
                "gemini-proxy: draining %d requests in flight (up to %.0fs)",
                len(self.flows),
                drain_timeout,
            )
            hurry = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, hurry.set)
            deadline = loop.time() + drain_timeout
            while self.flows and loop.time() < deadline and not hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hurry.wait(), 0.05)
            if self.flows:
                log.warning("gemini-proxy: %d requests still in flight at exit", len(self.flows))
        for task in self.tasks:
            task.cancel()
        await self.service.checker.close()
        if self.service.shared is not None:
            await self.service.shared.stop()
        await self.relay.stop()
        if self.admin is not None:
            await self.admin.stop()
        await self.service.upstream.close()
        self.service.close_store()


_CURRENT: Runtime | None = None


def current() -> Runtime:
    """The one Runtime of this process (made on first use; a script reload keeps it)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Runtime()
    return _CURRENT


def forget() -> None:
    """After the shutdown drain (and between tests): the next `current()` starts afresh."""
    global _CURRENT
    _CURRENT = None


def raise_fd_limit() -> None:
    """Each stream holds a few sockets (caller, relay, upstream): lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
