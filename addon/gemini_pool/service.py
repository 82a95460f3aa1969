"""The proxy's state and the operations on it, shared by the mitmproxy hooks, commands and admin API.

No mitmproxy import: the addon translates flows into calls here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from . import accounting, metrics, operator_actions, pool_views
from .access_log import log_request
from .answer_cache import AnswerCache, CacheSpec, Entry
from .budgets import Budgets, Learned
from .classify import pacific_day
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
from .store import Store
from .upload_tokens import is_token
from .uploads import IPNetwork
from .upstream import UpstreamClient

log = logging.getLogger("gemini_proxy")


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
            self.checker.claim = shared.locks.claim_check
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

    # --- read-only views (pool_views.py) and operator actions (operator_actions.py)

    gauge_rows = pool_views.gauge_rows
    usage_today = pool_views.usage_today
    clients_today = pool_views.clients_today
    describe_clients = pool_views.describe_clients
    describe_keys = pool_views.describe_keys
    health = pool_views.health
    rotation = pool_views.rotation
    describe_budgets = pool_views.describe_budgets
    budget_rows = pool_views.budget_rows
    operator = operator_actions.operator
    hand_over = operator_actions.hand_over
    export_state = operator_actions.export_state
    import_state = operator_actions.import_state
