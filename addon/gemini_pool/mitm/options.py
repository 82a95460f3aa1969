"""Options and configuration as a mitmproxy addon: the gemini_* options, the key file, the database.

Typed options declared in `load`, validated in `configure` (an `OptionsError` for a bad value, and
nothing swapped before everything is valid: mitmproxy then calls `configure` again with the old
values), the key file loaded on start and whenever `gemini_keys` is set. The mitmproxy options the
proxy relies on are set again if someone changes them (`force_options`, also on `running`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.utils import human

from .. import metrics
from ..access_log import install_access_log
from ..bodybudget import DEFAULT_LIMIT
from ..breaker import BreakerPolicy
from ..config import ConfigError
from ..dispatch import DispatchPolicy
from ..redis_url import redis_url_problem
from ..runtime import Runtime
from ..selector import PoolPolicy
from ..service import Settings
from ..store import Store, StoreError
from . import inbound

log = logging.getLogger("gemini_proxy")


def _positive(name: str, value: int, low: int = 1, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise exceptions.OptionsError(f"{name} must be {bound}, got {value}")


def admin_token(path: str) -> str:
    """The admin token: from `gemini_admin_token_file`, else $GEMINI_ADMIN_TOKEN."""
    if not path:
        return os.environ.get("GEMINI_ADMIN_TOKEN", "").strip()
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise exceptions.OptionsError(f"gemini_admin_token_file: cannot read {path}: {e}") from None
    if not token:
        raise exceptions.OptionsError(f"gemini_admin_token_file: {path} is empty")
    return token


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
        "gemini_admin_token_file",
        str,
        "",
        "File holding the bearer token for /admin/ (default: $GEMINI_ADMIN_TOKEN). No token: "
        "/admin/ answers 403. The token itself is never an option (mitmweb shows options).",
    ),
    (
        "gemini_max_body",
        int,
        128 * 1024 * 1024,
        "Largest request body in bytes (413 above). Google takes inline data up to 100 MB.",
    ),
    (
        "gemini_max_inflight_bytes",
        int,
        DEFAULT_LIMIT,
        "Total request body bytes held in memory for requests in flight (kept for retries); "
        "past it a request gets 503 with Retry-After. A single body over it passes only alone.",
    ),
    (
        "gemini_max_attempts",
        int,
        3,
        "Upstream attempts per request that could have been served (5xx, timeouts, dropped "
        "connections), first one included. Answers that only say 'not this key' (dead key, "
        "quota) do not count; gemini_attempt_ceiling bounds all attempts.",
    ),
    (
        "gemini_attempt_ceiling",
        int,
        32,
        "Most upstream calls one request may make, whatever their outcome.",
    ),
    (
        "gemini_recheck_ms",
        int,
        60_000,
        "First re-check of a dead key (a call that spends no quota); doubles per failed check.",
    ),
    ("gemini_recheck_max_ms", int, 4 * 3_600_000, "Longest time between re-checks of a dead key."),
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
    (
        "gemini_redis",
        str,
        "",
        "redis:// or rediss:// URL of the Redis (or Valkey) the workers of one pool share key "
        "state on (password: $GEMINI_REDIS_PASSWORD). Empty: this process alone.",
    ),
    ("gemini_redis_prefix", str, "gemini-proxy", "Namespace of this pool's keys in Redis."),
    ("gemini_worker", str, "", "This worker's name in logs and metrics (default: host:pid)."),
    (
        "gemini_public_url",
        str,
        "",
        "The URL callers reach this proxy at (e.g. https://gemini.example.com), for the upload "
        "URLs it hands back. Empty: the Host the caller used.",
    ),
    (
        "gemini_trusted_proxies",
        str,
        "",
        "Comma-separated IPs of front proxies whose X-Forwarded-Host/-Proto are believed.",
    ),
    ("gemini_retention_days", int, 30, "Keep request outcome rows this many days."),
    ("gemini_retention_rows", int, 1_000_000, "Keep at most this many outcome rows."),
    ("gemini_watch_ms", int, 1_000, "How often to check the key file for changes; 0: never."),
    ("gemini_drain_timeout_ms", int, 30_000, "On shutdown, wait this long for requests in flight."),
]


class Options:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def load(self, loader: Loader) -> None:
        for name, typ, default, help_text in OPTIONS:
            loader.add_option(name, typ, default, help_text)

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "termlog_verbosity" in updated:
            level = logging.getLevelName(o.termlog_verbosity.upper())
            install_access_log(sys.stdout, level if isinstance(level, int) else logging.INFO)
        if "mode" in updated:
            self._check_modes(o.mode)
        if self.rt.started is not None and (
            {"body_size_limit", "keep_host_header", "connection_strategy"} & updated
        ):
            self.force_options()
        if not any(opt.startswith("gemini_") for opt in updated):
            return
        _positive("gemini_max_body", o.gemini_max_body)
        _positive("gemini_max_inflight_bytes", o.gemini_max_inflight_bytes, 1 << 20)
        _positive("gemini_max_attempts", o.gemini_max_attempts, 1, 10)
        _positive("gemini_attempt_ceiling", o.gemini_attempt_ceiling, o.gemini_max_attempts, 1000)
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
        _positive("gemini_recheck_ms", o.gemini_recheck_ms, 100)
        _positive("gemini_recheck_max_ms", o.gemini_recheck_max_ms, o.gemini_recheck_ms)
        admin = parse_hostport(o.gemini_admin) if o.gemini_admin else None
        public = o.gemini_public_url.strip()
        if public and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[^?#\s]*)?", public):
            raise exceptions.OptionsError(
                f"gemini_public_url must be http(s)://host[:port][/path], got {public!r}"
            )
        trusted = []
        for entry in (p.strip() for p in o.gemini_trusted_proxies.split(",")):
            if not entry:
                continue
            try:
                trusted.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise exceptions.OptionsError(
                    f"gemini_trusted_proxies: {entry!r} is not an IP address or network"
                ) from None
        redis_url = o.gemini_redis.strip()
        if (problem := redis_url_problem(redis_url)) is not None:
            raise exceptions.OptionsError(problem)
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", o.gemini_redis_prefix):
            raise exceptions.OptionsError("gemini_redis_prefix: 1-64 of A-Z a-z 0-9 _ . : -")
        worker = o.gemini_worker.strip() or f"{socket.gethostname()}:{os.getpid()}"
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", worker):
            raise exceptions.OptionsError("gemini_worker: 1-128 of A-Z a-z 0-9 _ . : -")
        self.rt.sharing = (redis_url, o.gemini_redis_prefix, worker)
        metrics.WORKER.clear()
        metrics.WORKER.labels(worker).set(1)
        if self.rt.started is not None:
            self.rt.service.share(*self.rt.sharing)

        settings = Settings(
            keys_path=o.gemini_keys,
            max_body=o.gemini_max_body,
            dispatch=DispatchPolicy(
                max_attempts=o.gemini_max_attempts,
                ceiling=o.gemini_attempt_ceiling,
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
                recheck_base=o.gemini_recheck_ms / 1000,
                recheck_max=o.gemini_recheck_max_ms / 1000,
            ),
            log_json=o.gemini_log_json,
            public_url=public,
            trusted_proxies=tuple(trusted),
        )
        if "gemini_keys" in updated or not self.rt.service.config.keys:
            try:
                self.rt.service.reload(o.gemini_keys)  # raises before anything is swapped
            except ConfigError as e:
                raise exceptions.OptionsError(f"gemini_keys: {e}") from None
            self.rt.watcher.reset(o.gemini_keys)
        self.rt.service.apply_settings(settings)
        self.rt.flows.budget.limit = o.gemini_max_inflight_bytes
        if self.rt.db_path != o.gemini_db:
            self._open_db(o.gemini_db)
        if self.rt.service.store is not None:
            self.rt.service.store.retention_days = o.gemini_retention_days
            self.rt.service.store.retention_rows = o.gemini_retention_rows
        if "gemini_max_body" in updated and self.rt.started is not None:
            self.force_options()
        bind = (admin[0], admin[1], admin_token(o.gemini_admin_token_file)) if admin else None
        if self.rt.started is not None and bind != self.rt.admin_bind:
            asyncio.get_running_loop().create_task(self.rt.restart_admin(bind))

    def _check_modes(self, specs: Any) -> None:
        """Say at start when a listener lets callers pick the destination (its flows are refused)."""
        targets = []
        for spec in specs:
            try:
                target = inbound.reverse_target(spec)
            except ValueError:
                continue  # mitmproxy reports invalid modes itself
            if target is None:
                log.warning(
                    "gemini-proxy: listener %r lets callers choose the destination host: "
                    "gemini-proxy refuses its flows (403 destination_not_allowed) and attaches "
                    "keys only to flows of a reverse-mode listener",
                    spec,
                )
            else:
                targets.append(target)
        self.rt.service.checker.base = targets[0].base if targets else None

    def force_options(self) -> None:
        """mitmproxy options the proxy relies on, set again if someone changes them.

        connection_strategy=lazy: eager would open a pointless connection to Google per client
        connection. keep_host_header: the gate reads the Host the caller used (DNS rebinding,
        upload URLs). body_size_limit backs gemini_max_body up: mitmproxy stops reading a body
        without a Content-Length (chunked) past it instead of buffering whatever comes, and
        refuses a Content-Length over it before any hook runs (in HTML); set above
        gemini_max_body so that the gate's JSON 413 answers the ordinary case.
        """
        o = ctx.options
        max_body = self.rt.service.settings.max_body
        limit = max_body + min(max(max_body, 1 << 20), 64 << 20)
        current = human.parse_size(o.body_size_limit)
        wanted: dict[str, Any] = {}
        if o.connection_strategy != "lazy":
            wanted["connection_strategy"] = "lazy"
        if not o.keep_host_header:
            wanted["keep_host_header"] = True
        if current is None or current > limit:
            wanted["body_size_limit"] = str(limit)
        if wanted:
            o.update(**wanted)

    def _open_db(self, path: str) -> None:
        store = None
        if path:
            try:
                store = Store(path)
            except StoreError as e:
                raise exceptions.OptionsError(f"gemini_db: {e}") from None
        self.rt.service.close_store()
        if store is not None:
            self.rt.service.attach_store(store)
        self.rt.db_path = path

    def running(self) -> None:
        self.force_options()
        o = ctx.options
        if (
            "web_columns" in o
            and not o.has_changed("web_columns")
            and "comment" not in o.web_columns
        ):
            # mitmweb's flow list then says which key served each flow (the comment leads with it)
            o.update(web_columns=[*o.web_columns, "comment"])
