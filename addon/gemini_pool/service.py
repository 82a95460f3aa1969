"""The proxy's state and the operations on it, shared by the mitmproxy hooks, commands and admin API.

No mitmproxy import: the addon translates flows into calls here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import accounting, metrics
from .access_log import log_request
from .breaker import BreakerState
from .budgets import KINDS, Budgets, Learned
from .classify import pacific_day
from .config import EMPTY, Config, ConfigError, load_config
from .dispatch import Dispatcher, DispatchPolicy
from .gate import Gate, digest
from .keycheck import KeyChecker
from .pins import Pin, ResourcePins
from .records import RequestRecord
from .selector import KeyPool, PoolPolicy
from .shared import SharedState
from .store import Store, read_state_document, state_document
from .uploads import IPNetwork
from .upstream import UpstreamClient

log = logging.getLogger("gemini_proxy")

BREAKER_CODE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True)
class Settings:
    keys_path: str = "keys.yaml"
    max_body: int = 128 * 1024 * 1024
    dispatch: DispatchPolicy = field(default_factory=DispatchPolicy)
    pool: PoolPolicy = field(default_factory=PoolPolicy)
    log_json: bool = False
    public_url: str = ""  # gemini_public_url: upload URLs handed back point there
    trusted_proxies: tuple[IPNetwork, ...] = ()  # gemini_trusted_proxies


@dataclass
class ProxyService:
    settings: Settings = field(default_factory=Settings)
    pool: KeyPool = field(default_factory=KeyPool)
    config: Config = EMPTY
    upstream: UpstreamClient = field(default_factory=UpstreamClient)
    pins: ResourcePins = field(default_factory=ResourcePins)
    store: Store | None = None
    state_dirty: bool = False
    inflight: int = 0
    gate: Gate = field(default_factory=Gate)
    models: metrics.ModelLabels = field(default_factory=metrics.ModelLabels)
    budgets: Budgets = field(default_factory=Budgets)
    _db_errors_seen: int = 0
    _projects: dict[str, str] = field(default_factory=dict)  # key name -> project

    def __post_init__(self) -> None:
        self.dispatcher = Dispatcher(
            self.pool, self.upstream, self.settings.dispatch, on_wait=self._on_wait
        )
        self.checker = KeyChecker(self.pool, self.upstream, on_change=self._mark_dirty)
        self.gate.upload_lookup = self._upload_key
        self.shared: SharedState | None = None
        self.pins.on_pin = self._on_pin
        metrics.set_state_source(self.gauge_rows)
        self.pool.budgets = self.dispatcher.budgets = self.budgets
        self.dispatcher.on_learn = self._said_learned
        self.budgets.on_learn = self._on_learn
        metrics.set_budget_source(self.budget_rows)

    # --- budgets (budgets.py): learned limits are persisted and shared

    @staticmethod
    def _said_learned(said: list[str]) -> None:
        for line in said:
            log.info("gemini-proxy: %s", line)

    def _on_learn(self, project: str, model: str, kind: str, learned: Learned) -> None:
        if self.store is not None:
            self.store.save_learned(project, model, kind, learned.value, learned.at)
        if self.shared is not None:
            self.shared.limit_learned(project, model, kind, learned.value, learned.at)

    def describe_budgets(self) -> list[dict[str, Any]]:
        return self.budgets.describe(time.time(), [p.name for p in self.config.projects])

    def budget_rows(self) -> list[tuple[str, str, str, float]]:
        """Budget left per project x model x kind, for the gauges: bounded labels only (the
        projects of configured keys, models that answered 2xx or are named in `projects:`)."""
        now = time.time()
        projects = sorted({k.project for k in self.config.keys})
        models = set(self.models.known) | {
            m.pattern
            for p in self.config.projects
            for m in p.limits
            if "*" not in m.pattern and "?" not in m.pattern
        }
        rows = []
        for project in projects:
            for model in sorted(models):
                for kind in KINDS:
                    left = self.budgets.left(project, model, kind, now)
                    if left is not None:
                        rows.append((project, model, kind, left))
        return rows

    def _on_pin(self, pin: Pin) -> None:
        if self.store is not None:
            self.store.save_pin(pin)
        if self.shared is not None:
            self.shared.pin_added(pin)

    # --- several workers, one pool (gemini_redis)

    def share(self, url: str, prefix: str, worker: str) -> None:
        """Share key state with the other workers on `url` ("" stops sharing). Needs a loop."""
        current = self.shared
        if current is not None and (current.url, current.prefix, current.worker) == (
            url,
            prefix,
            worker,
        ):
            return
        if current is not None:
            asyncio.get_running_loop().create_task(current.stop())
            self.shared = None
            self.pool.on_change = None
            self.checker.claim = None
            self.budgets.on_spend = None
        if url:
            shared = SharedState(self.pool, self.pins, url, prefix, worker, self._mark_dirty)
            self.shared = shared
            self.pool.on_change = shared.key_changed
            shared.budgets = self.budgets
            self.budgets.on_spend = shared.spent
            self.checker.claim = shared.claim_check
            shared.start()

    def _mark_dirty(self) -> None:
        self.state_dirty = True

    def _upload_key(self, upload_id: str, method: str, path: str, now: float) -> str | None:
        pin = self.pins.upload_session(upload_id, method, path, now)
        return pin.key if pin is not None else None

    @staticmethod
    def _on_wait(delta: int) -> None:
        metrics.WAITING.inc(delta)

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings
        self.gate.max_body = settings.max_body
        self.dispatcher.policy = settings.dispatch
        self.pool.policy = settings.pool
        for state in self.pool.keys.values():
            state.breaker.policy = settings.pool.breaker

    # --- configuration

    def reload(self, path: str | None = None) -> Config:
        """Load the key file. Raises ConfigError and keeps the old config on any problem."""
        try:
            config = load_config(path or self.settings.keys_path)
        except ConfigError:
            metrics.RELOADS.labels("error").inc()
            raise
        self.apply_config(config)
        metrics.RELOADS.labels("ok").inc()
        return config

    def apply_config(self, config: Config) -> None:
        before = set(self.pool.keys)
        self.pool.apply_config(config)
        self.budgets.configure(config.projects)
        self.config = config
        self.gate.clients = {digest(c.token): c.name for c in config.clients}
        self._projects = {k.name: k.project for k in config.keys}
        after = set(self.pool.keys)
        log.info(
            "gemini-proxy: %d keys from %s (added: %s; removed: %s); %d client tokens",
            len(config.keys),
            config.source,
            ", ".join(sorted(after - before)) or "-",
            ", ".join(sorted(before - after)) or "-",
            len(config.clients),
        )
        if not any(k.enabled for k in config.keys):
            log.warning(
                "gemini-proxy: %s has no %skeys: every request is answered 503 until keys are"
                " added (keys: - {name: ..., key: ...})",
                config.source,
                "enabled " if config.keys else "",
            )
        self.state_dirty = True
        if self.store is not None:
            self.save_state()
            self.store.write_pending()  # now: a reload is rare and its state worth having

    # --- persistence

    def attach_store(self, store: Store) -> None:
        self.store = store
        self._db_errors_seen = 0
        now = time.time()
        keys, cooldowns = store.load_state()
        self.pool.restore(keys, cooldowns, now)
        self.pins.restore(store.load_pins(now), now)
        self.budgets.restore_learned(store.load_learned())
        for project, model, requests, tokens in store.usage_by_model(pacific_day(now)):
            if model not in ("*", "other"):  # metric labels of unknown models: not a model
                self.budgets.seed_day(project, model, requests, tokens, now)
        store.start()
        fingerprints = {s.spec.fingerprint for s in self.pool.keys.values()}
        restored = [n for n, s in keys.items() if s.get("fingerprint") in fingerprints]
        if restored:
            log.info("gemini-proxy: restored state of %d keys from %s", len(restored), store.path)

    def close_store(self) -> None:
        if self.store is None:
            return
        self.save_state()
        self.store.close()
        self.store = None

    def save_state(self) -> None:
        if self.store is None:
            return
        self.state_dirty = False
        keys = {name: self.pool.snapshot_key(s) for name, s in self.pool.keys.items()}
        self.store.save_state(keys, self.pool.snapshot_cooldowns())

    def save_state_if_dirty(self) -> None:
        """Every housekeeping tick: snapshot key state if it changed, commit what is queued."""
        if self.state_dirty:
            self.save_state()
        if self.store is None:
            return
        self.store.write_pending()
        if self.store.write_errors > self._db_errors_seen:
            # the store only ever increments its count; we report the difference
            metrics.DB_WRITE_ERRORS.inc(self.store.write_errors - self._db_errors_seen)
            self._db_errors_seen = self.store.write_errors

    # --- outcomes

    def finish(self, rec: RequestRecord) -> None:
        """Count, log and store one finished client request (once). Its tap is finished: the
        mitmproxy layer read it when the flow ended, for the flow's comment."""
        if rec.finished:
            return
        rec.finished = True
        if rec.spend is not None and rec.key is not None:
            self.budgets.correct(rec.spend, rec.tap.tokens_in, time.time())
        model = self.models.label(rec.model, 200 <= rec.status < 300 and rec.key is not None)
        accounting.count(rec, model)
        if rec.attempts:
            self.state_dirty = True
        log_request(rec, self.settings.log_json)
        if self.store is not None:
            self.store.record(
                accounting.outcome_row(rec), accounting.usage_deltas(rec, self._projects, model)
            )

    # --- views

    def gauge_rows(self) -> tuple[list[metrics.KeyGaugeRow], int]:
        now = time.time()
        rows = []
        for s in self.pool.keys.values():
            cool = self.pool.cooldowns_of(s.spec.project, now)
            rows.append(
                metrics.KeyGaugeRow(
                    key=s.name,
                    breaker=BREAKER_CODE[s.breaker.state],
                    cooldown_seconds=max(
                        [c.until - now for c in cool] + [s.breaker.seconds_left(now)]
                    ),
                    health=s.health.ratio,
                    enabled=s.usable_ever,
                    usable=self.pool.status(s, now) == "active",
                )
            )
        return rows, self.store.queue_depth if self.store else 0

    def usage_today(self) -> dict[str, dict[str, int]]:
        if self.store is None:
            return {}
        try:
            return self.store.usage(pacific_day(time.time()))
        except Exception as e:  # the admin view must not fail because of the database
            log.warning("gemini-proxy: cannot read usage: %s", e)
            return {}

    def describe_keys(self, usage: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
        now = time.time()
        usage = usage or {}
        out = []
        for s in self.pool.keys.values():
            d = self.pool.describe(s, now)
            d["usage_today"] = usage.get(s.name, {})
            d["overrides_yaml"] = {
                k: v
                for k, v in (("enabled", s.operator_enabled), ("weight", s.operator_weight))
                if v is not None
            }
            out.append(d)
        return out

    def health(self) -> dict[str, Any]:
        now = time.time()
        counts = {"active": 0, "cooling": 0, "open": 0, "suspect": 0, "dead": 0, "disabled": 0}
        errors = {}
        for s in self.pool.keys.values():
            status = self.pool.status(s, now)
            counts[status] += 1
            if s.last_error:
                errors[s.name] = s.last_error
        return {
            "keys": len(self.pool.keys),
            **counts,
            "last_errors": errors,
            "inflight": self.inflight,
        }

    def rotation(self) -> dict[str, list[str]]:
        now = time.time()
        models = sorted({m for (_p, m) in self.pool.cooldowns if m != "*"} | {"*"})
        # one weighted round of the keys that can serve at all
        cycle = min(100, max(1, sum(s.weight for s in self.pool.keys.values() if s.usable_ever)))
        return {m: self.pool.rotation(m, now, count=cycle) for m in models}

    # --- operator actions (persisted, shown as overriding the YAML)

    def operator(self, name: str, action: str, weight: int | None = None) -> dict[str, Any]:
        if name not in self.pool.keys:
            raise KeyError(name)
        if action == "enable":
            self.pool.set_enabled(name, True)
        elif action == "disable":
            self.pool.set_enabled(name, False)
        elif action == "reset":
            self.pool.reset(name)
        elif action == "weight":
            self.pool.set_weight(name, weight)
        else:
            raise ValueError(action)
        log.info(
            "gemini-proxy: operator %s key %s%s", action, name, f" = {weight}" if weight else ""
        )
        self.save_state()
        return self.pool.describe(self.pool.keys[name], time.time())

    def export_state(self) -> dict[str, Any]:
        keys = {n: self.pool.snapshot_key(s) for n, s in self.pool.keys.items()}
        return state_document(keys, self.pool.snapshot_cooldowns())

    def import_state(self, doc: Any) -> int:
        keys, cooldowns = read_state_document(doc)
        matched = [
            n
            for n, s in keys.items()
            if n in self.pool.keys
            and isinstance(s, dict)
            and s.get("fingerprint") == self.pool.keys[n].spec.fingerprint
        ]
        self.pool.restore({n: keys[n] for n in matched}, cooldowns, time.time())
        self.save_state()
        return len(matched)
