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
from .answer_cache import AnswerCache, CacheSpec, Entry
from .breaker import BreakerState
from .budgets import KINDS, Budgets, Learned
from .classify import pacific_day
from .clients_view import describe_clients
from .config import EMPTY, NO_LIMITS, ClientLimits, ClientSpec, Config, ConfigError, load_config
from .dispatch import Dispatcher, DispatchPolicy
from .gate import Gate, digest
from .incidents import Incident
from .keycheck import KeyChecker
from .limits import ClientLimitCheck, Limiter
from .owners import Owners
from .ownership import Ownership
from .pins import Pin, ResourcePins
from .records import RequestRecord
from .selector import KeyPool, PoolPolicy
from .shared import SharedState
from .shared_answers import SharedAnswers
from .shared_limits import SharedLimits
from .store import Store, read_state_document, state_document
from .upload_tokens import is_token
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
    answers: AnswerCache | None = None  # the answer cache (`cache:` in the key file); None: off
    _clients: dict[str, ClientSpec] = field(default_factory=dict)  # by name

    def __post_init__(self) -> None:
        self.dispatcher = Dispatcher(
            self.pool, self.upstream, self.settings.dispatch, on_wait=self._on_wait
        )
        self.checker = KeyChecker(self.pool, self.upstream, on_change=self._mark_dirty)
        self.gate.upload_lookup = self._upload_key
        self.shared: SharedState | None = None
        self.pins.on_pin = self._on_pin
        self.owners = Owners(self.pins)  # with clients configured: which group owns what
        self.ownership = Ownership(self)
        self.groups: dict[str, str] = {}  # client name -> its group
        self.limiter = Limiter()
        self.limit_check = ClientLimitCheck(self.limiter, self._limits_of)
        self.shared_limits: SharedLimits | None = None
        self.shared_answers: SharedAnswers | None = None  # the answer cache across workers
        metrics.set_state_source(self.gauge_rows)
        self.pool.budgets = self.dispatcher.budgets = self.budgets
        self.dispatcher.on_learn = self._said_learned
        self.budgets.on_learn = self._on_learn
        metrics.set_budget_source(self.budget_rows)
        self.dispatcher.incidents.on_change = self._on_incident
        metrics.set_incident_source(lambda: self.dispatcher.incidents.count(time.time()))

    @staticmethod
    def _on_incident(what: str, incident: Incident, why: str) -> None:
        """Whole-pool incidents (incidents.py): said once as they start and end."""
        if what == "started":
            metrics.INCIDENTS.inc()
            log.warning("gemini-proxy: incident on %s: %s", incident.model, why)
        else:
            seconds = time.time() - incident.started
            log.info(
                "gemini-proxy: incident on %s over after %.0fs: %s", incident.model, seconds, why
            )

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
            self.shared_answers = None
        self.limiter.worker = worker
        self.shared_limits = SharedLimits(self.limiter, prefix) if url else None
        if not url:
            self.limiter.apply_view({}, 1, {})  # one worker: no shares
        if url:
            shared = SharedState(self.pool, self.pins, url, prefix, worker, self._mark_dirty)
            self.shared = shared
            self.pool.on_change = shared.key_changed
            shared.budgets = self.budgets
            self.budgets.on_spend = shared.spent
            self.checker.claim = shared.claim_check
            self.shared_answers = SharedAnswers(prefix, shared.client)
            shared.start()

    def _limits_of(self, client: str) -> ClientLimits | None:
        """The current config's limits of a client (after reloads too); None: a caller that is
        no configured client (nor the loopback mode's `local`), not counted."""
        spec = self._clients.get(client)
        if spec is not None:
            return spec.limits
        return NO_LIMITS if client == "local" and not self._clients else None

    async def share_limits(self) -> None:
        """Housekeeping: publish this worker's client counts, take the other workers'."""
        if self.shared_limits is None:
            return
        shared = self.shared
        redis = shared.client() if shared is not None else None
        limits = {c.name: c.limits for c in self.config.clients}
        await self.shared_limits.tick(redis, limits)
        if redis is None:  # budgets: this worker keeps to its share until Redis is back
            self.budgets.isolate(self.limiter.workers, time.time())
        else:
            self.budgets.rejoin()

    def _mark_dirty(self) -> None:
        self.state_dirty = True

    def _upload_key(self, upload_id: str, method: str, path: str, now: float) -> str | None:
        """The key of the upload session a follow-up names by the token we handed out; never
        for anything else (a raw Google upload_id, a session kept before tokens)."""
        if not is_token(upload_id):
            return None
        pin = self.pins.upload_session(upload_id, method, path, now)
        return pin.key if pin is not None and pin.sealed else None

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
        self.groups = {c.name: c.group_name for c in config.clients}
        self._clients = {c.name: c for c in config.clients}
        self._projects = {k.name: k.project for k in config.keys}
        self._apply_egress(config)
        self._apply_cache(config.cache)
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

    def _apply_egress(self, config: Config) -> None:
        """Keys' egress proxies: sessions of those no key names any more are retired."""
        wanted = {k.egress for k in config.keys if k.egress is not None}
        for url in self.upstream.keep_egresses(wanted):
            log.info("gemini-proxy: egress proxy %s no longer used: its connections close", url)
        if wanted:
            log.info("gemini-proxy: egress proxies: %s", ", ".join(sorted({e.url for e in wanted})))

    def _apply_cache(self, spec: CacheSpec | None) -> None:
        """Turn the answer cache on (entries read back from SQLite), resize it, or off (forgot)."""
        if spec is None:
            if self.answers is not None and self.store is not None:
                self.store.save_answer(None)
            self.answers = None
        elif self.answers is None:
            self.answers = AnswerCache(spec, self._answer_kept, self._answer_dropped)
            if self.store is not None:
                self._restore_answers(self.store)
        else:
            self.answers.configure(spec)

    def _restore_answers(self, store: Store) -> None:
        if self.answers is None:
            return
        try:
            n = self.answers.restore(store.load_answers(time.time()), time.time())
        except Exception as e:  # a broken table must not stop the proxy: start empty
            log.warning("gemini-proxy: cannot read the answer cache back: %s", e)
            return
        if n:
            log.info("gemini-proxy: answer cache: %d entries read back from %s", n, store.path)

    def _answer_kept(self, entry: Entry) -> None:
        if self.store is not None:
            self.store.save_answer(entry)

    def _answer_dropped(self, key: str) -> None:
        if self.store is not None:
            self.store.save_answer(key)

    # --- persistence

    def attach_store(self, store: Store) -> None:
        self.store = store
        self._db_errors_seen = 0
        now = time.time()
        keys, cooldowns = store.load_state()
        self.pool.restore(keys, cooldowns, now)
        self.pins.restore(store.load_pins(now), now)
        self._restore_answers(store)
        day = pacific_day(now)
        for client, u in store.load_client_usage(day).items():
            # this worker's own count of today: what it admitted (refused ones held no slot)
            tokens = u["tokens_in"] + u["tokens_out"]
            self.limiter.seed(client, day, u["requests"] - u["limited"], tokens)
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
        self.limiter.release(rec.request_id, (rec.tap.tokens_in or 0) + (rec.tap.tokens_out or 0))
        if rec.spend is not None and rec.key is not None:
            self.budgets.correct(rec.spend, rec.tap.tokens_in, time.time())
        model = self.models.label(rec.model, 200 <= rec.status < 300 and rec.key is not None)
        client = accounting.client_label(rec.client, self._clients)
        accounting.count(rec, model, client)
        if rec.attempts:
            self.state_dirty = True
        log_request(rec, self.settings.log_json)
        if self.store is not None:
            self.store.record(
                accounting.outcome_row(rec),
                accounting.usage_deltas(rec, self._projects, model),
                accounting.client_delta(rec, client, model),
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

    def clients_today(self) -> dict[str, Any]:
        """This worker's accounting per client today, from SQLite (call from a worker thread)."""
        if self.store is None:
            return {}
        try:
            return self.store.client_usage(pacific_day(time.time()))
        except Exception as e:  # the admin view must not fail because of the database
            log.warning("gemini-proxy: cannot read usage per client: %s", e)
            return {}

    def describe_clients(self, accounting: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return describe_clients(self.config, self.limiter, accounting or {})

    def describe_keys(self, usage: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
        now = time.time()
        usage = usage or {}
        out = []
        for s in self.pool.keys.values():
            d = self.pool.describe(s, now)
            d["usage_today"] = usage.get(s.name, {})
            d["egress"] = s.spec.egress.url if s.spec.egress else None  # never its credentials
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

    def hand_over(
        self, name: str, client: str | None = None, group: str | None = None, project: str = ""
    ) -> dict[str, str]:
        """An operator gives a resource the proxy never saw created (or another group's) to a
        client's group: from then on that group sees and uses it. Raises ValueError."""
        groups = set(self.groups.values())
        if (client is None) == (group is None):
            raise ValueError("name exactly one of client or group")
        if client is not None:
            if client not in self.groups:
                raise ValueError(f"no client named {client!r}")
            group = self.groups[client]
        assert group is not None
        if group not in groups:
            raise ValueError(f"no client has the group {group!r}")
        if project and project not in {k.project for k in self.config.keys}:
            raise ValueError(f"no key of project {project!r} is configured")
        canonical = self.ownership.hand_over(name, group, project or None)
        log.info("gemini-proxy: operator handed %s to group %s", canonical, group)
        self.state_dirty = True
        return {"name": canonical, "group": group, "project": project}

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
