"""What outlives a flow: the runtime state, the side servers, housekeeping and the shutdown drain.

State that must outlive a script reload (the pool, the admin server, the relay, the database)
lives in the module-level Runtime: mitmproxy re-imports only the entry script on reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError
from .records import RequestRecord
from .relay import StreamRelay
from .service import ProxyService
from .watcher import FileWatcher

log = logging.getLogger("gemini_proxy")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HOUSEKEEPING_TICK = 0.25
PIN_PRUNE_EVERY = 60.0


@dataclass
class Runtime:
    service: ProxyService = field(default_factory=ProxyService)
    relay: StreamRelay = field(default_factory=StreamRelay)
    records: dict[str, RequestRecord] = field(default_factory=dict)
    flows_of: dict[str, set[str]] = field(default_factory=dict)  # client connection -> flow ids
    watcher: FileWatcher = field(default_factory=FileWatcher)
    admin: Any = None  # AdminServer, started in `running`
    admin_bind: tuple[str, int, str] | None = None
    db_path: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started: asyncio.Event | None = None
    public_url: str = ""  # gemini_public_url
    trusted_proxies: tuple[IPNetwork, ...] = ()  # gemini_trusted_proxies
    sharing: tuple[str, str, str] = ("", "", "")  # gemini_redis, its prefix, this worker's name

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
                        await asyncio.wait_for(self.service.shared.grant_probes(time.time()), 1.0)
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
        if self.records and drain_timeout:
            log.info(
                "gemini-proxy: draining %d requests in flight (up to %.0fs)",
                len(self.records),
                drain_timeout,
            )
            hurry = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, hurry.set)
            deadline = loop.time() + drain_timeout
            while self.records and loop.time() < deadline and not hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hurry.wait(), 0.05)
            if self.records:
                log.warning("gemini-proxy: %d requests still in flight at exit", len(self.records))
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


def raise_fd_limit() -> None:
    """Each stream holds a few sockets (caller, relay, upstream): lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
