"""The key pool: per-key state and the breaker-, cooldown- and health-aware weighted selector.

Pure logic: no mitmproxy, no I/O. Time is passed in as unix seconds.

Selection: smooth weighted round robin (nginx's algorithm) over the keys usable for the model
right now, preferring healthy keys; unhealthy ones serve only when no healthy key is left.
Quota cooldowns are per project x model (keys of one project share Google's quota bucket);
breakers and dead-key disables are per key.

This module stays whole (about 750 lines) on purpose: every rule of which key may serve, and in
which order, reads and changes the same per-key state, and splitting it would scatter the one
decision the proxy makes most often across files. Budgets (budgets.py), breakers (breaker.py)
and health (health.py) are their own rooms; the selector only asks them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .breaker import BreakerPolicy, BreakerState, CircuitBreaker
from .classify import Outcome, Verdict
from .config import Config, KeySpec
from .health import HealthWindow, hurts_health

HALF_OPEN_RETRY = 1.0  # seconds to wait when the only keys left are probing
RETIRED_TTL = 7 * 86400  # a removed key's state is kept this long, by fingerprint
INCONCLUSIVE_RETRY = 30.0  # a key check that got no verdict is tried again after this
BACKOFF_BASE = 2.0  # first backoff after a 429 without quota details; doubles, reset by a success
BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class PoolPolicy:
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    health_window: int = 20
    health_threshold: float = 0.5
    recheck_base: float = 60.0  # first re-check of a dead key; doubles per failed check
    recheck_max: float = 4 * 3600.0


@dataclass
class Cooldown:
    until: float
    reason: str


@dataclass
class KeyState:
    spec: KeySpec
    breaker: CircuitBreaker
    health: HealthWindow
    disabled_reason: str | None = None  # set when a key check confirmed a dead-key verdict
    suspect: str | None = None  # a dead-key answer, not confirmed yet: out of rotation meanwhile
    next_check: float | None = None  # when to check the key (suspect: at once; dead: backoff)
    check_backoff: float = 0.0
    checking: bool = False  # a check is in flight
    marks_at: float = 0.0  # when dead/suspect marks or operator overrides last changed (sharing)
    dead_at: float = 0.0  # when the key was last found (suspected) dead
    revived_at: float = 0.0  # when an operator or a check last put it back
    breaker_at: float = 0.0  # when the breaker last opened or closed (sharing)
    operator_enabled: bool | None = None  # operator override of the YAML `enabled`
    operator_weight: int | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    current: float = 0.0  # smooth weighted round robin

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weight(self) -> int:
        return self.operator_weight or self.spec.weight

    @property
    def enabled(self) -> bool:
        if self.operator_enabled is not None:
            return self.operator_enabled
        return self.spec.enabled

    @property
    def usable_ever(self) -> bool:
        """Enabled, not dead and not suspected dead: could serve once cooldowns pass."""
        return self.enabled and self.disabled_reason is None and self.suspect is None


@dataclass(frozen=True)
class Pick:
    key: KeySpec


@dataclass(frozen=True)
class NoKey:
    all_disabled: bool  # True: nothing will come back by itself
    retry_at: float  # when the earliest key may be usable (unix time); meaningless if all_disabled
    reason: str
    quota: bool = False  # True: quota cooldowns or budgets (429); False: breakers / failures (503)
    too_large: bool = False  # the request's input tokens exceed every project's minute budget


class BudgetView(Protocol):
    """What the selector asks of the budgets (budgets.Budgets) about one project x model."""

    def ready_at(self, project: str, model: str, tokens: int, now: float) -> float: ...

    def headroom(self, project: str, model: str, now: float) -> float: ...

    def why(self, project: str, model: str, tokens: int, now: float) -> str | None: ...


@dataclass
class KeyPool:
    policy: PoolPolicy = field(default_factory=PoolPolicy)
    keys: dict[str, KeyState] = field(default_factory=dict)
    # (project, model) -> cooldown; model "*" means every model of the project
    cooldowns: dict[tuple[str, str], Cooldown] = field(default_factory=dict)
    backoff_level: dict[str, int] = field(default_factory=dict)  # project -> consecutive bare 429s
    # state of keys no longer configured, by fingerprint: (snapshot, removed at); a key that comes
    # back (a half-written key file, a key moved between files) returns as it left
    retired: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)
    # told of every change other workers must learn: ("marks" | "breaker", KeyState) or
    # ("cooldown", (project, model, Cooldown | None)); None: a reset cleared it
    on_change: Callable[[str, Any], None] | None = None
    # budgets per project x model (consulted only for requests that spend quota: tokens given)
    budgets: BudgetView | None = None

    def _changed(self, kind: str, what: Any) -> None:
        if self.on_change is not None:
            self.on_change(kind, what)

    def _marks_changed(self, state: KeyState) -> None:
        state.marks_at = time.time()
        self._changed("marks", state)

    # --- configuration

    def apply_config(self, config: Config, now: float | None = None) -> None:
        """Swap in a new key set. Keys that stay (same secret) keep their state; keys that come
        back within RETIRED_TTL get theirs back; cooldowns stay (they expire by themselves)."""
        now = time.time() if now is None else now
        self.retired = {fp: r for fp, r in self.retired.items() if now - r[1] < RETIRED_TTL}
        by_secret = {s.spec.secret: s for s in self.keys.values()}
        new: dict[str, KeyState] = {}
        for spec in config.keys:
            old = by_secret.pop(spec.secret, None)
            if old is not None:
                old.spec = spec
                new[spec.name] = old
                continue
            state = self._fresh(spec)
            saved = self.retired.pop(spec.fingerprint, None)
            if saved is not None:
                self._restore_key(state, saved[0])
            new[spec.name] = state
        for gone in by_secret.values():
            self.retired[gone.spec.fingerprint] = (self.snapshot_key(gone), now)
        self.keys = new

    def _fresh(self, spec: KeySpec) -> KeyState:
        return KeyState(
            spec,
            CircuitBreaker(self.policy.breaker),
            HealthWindow(self.policy.health_window),
        )

    # --- availability

    def _blocked_until(
        self, state: KeyState, model: str, now: float, tokens: int | None = None
    ) -> float:
        """0 if usable now, else the earliest time it may be usable (inf if never by itself)."""
        if not state.usable_ever:
            return float("inf")
        until = 0.0
        if tokens is not None and self.budgets is not None:
            ready = self.budgets.ready_at(state.spec.project, model, tokens, now)
            if ready > now:
                until = ready
        if self.cooldowns:
            for pm in ((state.spec.project, model), (state.spec.project, "*")):
                c = self.cooldowns.get(pm)
                if c is not None and c.until > now:
                    until = max(until, c.until)
        if not state.breaker.available(now):
            if state.breaker.state is BreakerState.OPEN:
                until = max(until, state.breaker.open_until)
            else:
                until = max(until, now + HALF_OPEN_RETRY)
        return until

    def cooldowns_of(self, project: str, now: float) -> list[Cooldown]:
        return [c for (p, _m), c in self.cooldowns.items() if p == project and c.until > now]

    def cooldown_for(self, project: str, model: str, now: float) -> Cooldown | None:
        best: Cooldown | None = None
        for pm in ((project, model), (project, "*")):
            c = self.cooldowns.get(pm)
            if c is not None and c.until > now and (best is None or c.until > best.until):
                best = c
        return best

    def _candidates(
        self,
        model: str,
        now: float,
        exclude: Collection[str],
        project: str | None = None,
        tokens: int | None = None,
    ) -> list[KeyState]:
        usable = [
            s
            for s in self.keys.values()
            if s.name not in exclude
            and (project is None or s.spec.project == project)
            and self._blocked_until(s, model, now, tokens) == 0.0
        ]
        healthy = [s for s in usable if s.health.healthy(self.policy.health_threshold)]
        chosen = healthy or usable
        if tokens is not None and self.budgets is not None and len(chosen) > 1:
            chosen = self._most_headroom(chosen, model, now)
        return chosen

    def _most_headroom(self, states: list[KeyState], model: str, now: float) -> list[KeyState]:
        """The keys of the projects with the most budget left for `model` (the day's budget
        lasts, instead of round robin draining the first projects)."""
        assert self.budgets is not None
        share: dict[str, float] = {}
        for s in states:
            p = s.spec.project
            if p not in share:
                share[p] = self.budgets.headroom(p, model, now)
        best = max(share.values())
        return [s for s in states if share[s.spec.project] >= best - 1e-9]

    @staticmethod
    def _swrr(candidates: list[KeyState]) -> KeyState:
        total = 0
        best: KeyState | None = None
        for s in candidates:
            s.current += s.weight
            total += s.weight
            if best is None or s.current > best.current:
                best = s
        assert best is not None
        best.current -= total
        return best

    def select(
        self,
        model: str,
        now: float,
        exclude: Collection[str] = (),
        project: str | None = None,
        tokens: int | None = None,
    ) -> Pick | NoKey:
        """Pick a key for `model`, skipping `exclude`; `project` pins the choice to one project;
        `tokens` (a request that spends quota, its estimated input tokens) consults the budgets."""
        candidates = self._candidates(model, now, exclude, project, tokens)
        while candidates:
            chosen = self._swrr(candidates)
            if chosen.breaker.acquire(now):
                return Pick(chosen.spec)
            candidates.remove(chosen)
        return self._no_key(model, now, project, tokens)

    def keys_of_project(self, project: str) -> set[str]:
        return {n for n, s in self.keys.items() if s.spec.project == project}

    def peek(
        self, model: str, now: float, project: str | None = None, tokens: int | None = None
    ) -> NoKey | None:
        """Without picking anything: None if some key could serve `model` now, else why not."""
        if self._candidates(model, now, (), project, tokens):
            return None
        return self._no_key(model, now, project, tokens)

    def _no_key(
        self, model: str, now: float, project: str | None, tokens: int | None = None
    ) -> NoKey:
        states = [s for s in self.keys.values() if project is None or s.spec.project == project]
        if not states:
            if project is not None:
                return NoKey(
                    True,
                    now,
                    f"no API key of project {project!r} (which owns this resource) is configured",
                )
            return NoKey(True, now, "no API keys are configured")
        if not any(s.usable_ever for s in states):
            reasons = sorted({_why_unusable(s) for s in states})
            return NoKey(True, now, "every API key is disabled: " + "; ".join(reasons))
        times = [self._blocked_until(s, model, now, tokens) for s in states if s.usable_ever]
        retry_at = min(times)
        budget = self._budget_reasons(states, model, now, tokens)
        if retry_at == float("inf"):  # usable keys, but no project's minute budget fits it
            why = "; ".join(budget)
            return NoKey(
                True,
                now,
                f"the request's ~{tokens} input tokens exceed the per-minute token budget of"
                f" every project for {model} ({why})",
                True,
                True,
            )
        if retry_at <= now:  # usable keys exist but were all tried by this request
            retry_at = now + HALF_OPEN_RETRY
        reasons = sorted(
            {
                c.reason
                for (p, m), c in self.cooldowns.items()
                if m in (model, "*") and c.until > now
            }
        )
        if budget and not reasons:
            why = "; ".join(budget)
            return NoKey(
                False, retry_at, f"every project is out of budget for {model} ({why})", True
            )
        if reasons:
            why = "; ".join(reasons + budget)
            return NoKey(
                False, retry_at, f"every API key for {model} is cooling down ({why})", True
            )
        errors = sorted({s.last_error for s in states if s.usable_ever and s.last_error})
        why = f" (last errors: {'; '.join(errors)})" if errors else ""
        return NoKey(
            False,
            retry_at,
            f"every API key for {model} is unavailable after upstream failures{why}",
        )

    def _budget_reasons(
        self, states: list[KeyState], model: str, now: float, tokens: int | None
    ) -> list[str]:
        if tokens is None or self.budgets is None:
            return []
        projects = sorted({s.spec.project for s in states if s.usable_ever})
        reasons = (self.budgets.why(p, model, tokens, now) for p in projects)
        return [r for r in reasons if r]

    # --- outcomes

    def record(self, name: str, model: str, verdict: Verdict, now: float) -> None:
        state = self.keys.get(name)
        if state is None:  # removed by a reload while the request was in flight
            return
        o = verdict.outcome
        project = state.spec.project
        if o is Outcome.OK:
            was = state.breaker.state
            state.breaker.record_success()
            state.health.add(True)
            self.backoff_level.pop(project, None)
            if was is not BreakerState.CLOSED:
                self._breaker_changed(state, now)
            return
        if hurts_health(o):
            state.health.add(False)
        if o is not Outcome.CALLER_ERROR:
            state.last_error = verdict.reason
            state.last_error_at = now
        if o is Outcome.QUOTA_UNKNOWN and verdict.cooldown_until is None:
            level = self.backoff_level.get(project, 0)
            self.backoff_level[project] = level + 1
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2**level)
            verdict = replace(
                verdict,
                cooldown_until=now + delay,
                reason=f"{verdict.reason} (backoff {delay:.0f}s)",
            )
        if o is Outcome.DEAD_KEY:
            if state.disabled_reason is None and state.suspect is None:
                state.suspect = verdict.reason  # out of rotation until a check confirms it
                state.next_check = now
                state.dead_at = time.time()
                self._marks_changed(state)
            state.breaker.record_neutral()
        elif o is Outcome.PROJECT_CAPPED or o is Outcome.QUOTA_UNKNOWN:
            self._cool(project, "*", verdict, now)
            state.breaker.record_neutral()
        elif o in (Outcome.QUOTA_MINUTE, Outcome.QUOTA_DAY, Outcome.MODEL_UNAVAILABLE):
            self._cool(project, model, verdict, now)
            state.breaker.record_neutral()
        elif o is Outcome.NETWORK:
            before = (state.breaker.state, state.breaker.open_until)
            state.breaker.record_failure(now)
            if (state.breaker.state, state.breaker.open_until) != before:
                self._breaker_changed(state, now)
        else:  # transient, caller error, wrong project: nothing about the key
            state.breaker.record_neutral()

    def release(self, name: str) -> None:
        """A pick that ended without an outcome (the request was cancelled, a bug raised): a
        half-open probe it held is free again at once, not after the probe timeout."""
        state = self.keys.get(name)
        if state is not None:
            state.breaker.record_neutral()

    def _cool(self, project: str, model: str, verdict: Verdict, now: float) -> None:
        until = verdict.cooldown_until or now
        old = self.cooldowns.get((project, model))
        if old is None or old.until < until or old.until <= now:
            self.cooldowns[(project, model)] = cool = Cooldown(until, verdict.reason)
            self._changed("cooldown", (project, model, cool))

    def _breaker_changed(self, state: KeyState, now: float) -> None:
        state.breaker_at = time.time()
        self._changed("breaker", state)

    # --- operator actions

    def set_enabled(self, name: str, enabled: bool) -> None:
        state = self.keys[name]
        state.operator_enabled = enabled
        if enabled:
            self._revive(state)
        self._marks_changed(state)

    def reset(self, name: str) -> None:
        state = self.keys[name]
        self._revive(state)
        state.operator_enabled = None
        state.operator_weight = None
        was = state.breaker.state
        state.breaker.record_success()
        state.health.clear()
        state.last_error = None
        self._marks_changed(state)
        if was is not BreakerState.CLOSED:
            self._breaker_changed(state, time.time())
        if not any(
            s.spec.project == state.spec.project for s in self.keys.values() if s is not state
        ):
            for pm in [pm for pm in self.cooldowns if pm[0] == state.spec.project]:
                del self.cooldowns[pm]
                self._changed("cooldown", (pm[0], pm[1], None))

    @staticmethod
    def _revive(state: KeyState) -> None:
        if state.disabled_reason or state.suspect:
            state.revived_at = time.time()
        state.disabled_reason = state.suspect = state.next_check = None
        state.check_backoff = 0.0

    # --- key checks: confirm a dead-key answer, and find out when a dead key works again

    def due_checks(self, now: float) -> list[KeyState]:
        return [
            s
            for s in self.keys.values()
            if s.next_check is not None
            and s.next_check <= now
            and not s.checking
            and s.enabled
            and (s.suspect is not None or s.disabled_reason is not None)
        ]

    def check_result(self, name: str, verdict: Verdict | None, now: float) -> str | None:
        """Apply a key check's result: the key's new condition, or None if nothing changed.

        `verdict`: OK (Google accepts the key), DEAD_KEY (confirmed), None (no verdict).
        """
        state = self.keys.get(name)
        if state is None:
            return None
        state.checking = False
        if state.suspect is None and state.disabled_reason is None:
            return None  # an operator revived it meanwhile
        if verdict is None:
            state.next_check = now + INCONCLUSIVE_RETRY
            return None
        if verdict.outcome is not Outcome.DEAD_KEY:
            was_dead = state.disabled_reason is not None
            self._revive(state)
            state.health.clear()
            self._marks_changed(state)
            return "recovered" if was_dead else "cleared"
        confirmed = state.suspect is not None
        if confirmed:
            state.disabled_reason, state.suspect = state.suspect, None
        p = self.policy
        state.check_backoff = (
            p.recheck_base
            if confirmed
            else min(p.recheck_max, state.check_backoff * 2 or p.recheck_base)
        )
        state.next_check = now + state.check_backoff
        self._marks_changed(state)
        return "dead" if confirmed else None

    # --- state other workers learned (gemini_redis): applied without telling anyone again

    def shared_marks(self, state: KeyState) -> dict[str, Any]:
        return {
            "t": state.marks_at,
            "dead": state.disabled_reason,
            "suspect": state.suspect,
            "enabled": state.operator_enabled,
            "weight": state.operator_weight,
            "next_check": state.next_check,
            "backoff": state.check_backoff,
            "dead_at": state.dead_at,
            "revived_at": state.revived_at,
        }

    def shared_breaker(self, state: KeyState) -> dict[str, Any]:
        b = state.breaker
        return {
            "t": state.breaker_at,
            "state": str(b.state),
            "open_until": b.open_until,
            "trips": b.trips,
        }

    def by_fingerprint(self, fingerprint: str) -> KeyState | None:
        return next((s for s in self.keys.values() if s.spec.fingerprint == fingerprint), None)

    def apply_marks(self, fingerprint: str, data: dict[str, Any]) -> bool:
        """Another worker's marks and overrides for a key: the newer change wins."""
        state = self.by_fingerprint(fingerprint)
        if state is None:
            return False
        mine = self.shared_marks(state)
        merged = merge_marks(mine, data)
        if merged == mine:
            return False
        state.marks_at = float(merged["t"] or 0.0)
        state.disabled_reason, state.suspect = merged["dead"], merged["suspect"]
        state.operator_enabled = merged["enabled"]
        weight = merged["weight"]
        state.operator_weight = int(weight) if weight else None
        nc = merged["next_check"]
        state.next_check = float(nc) if nc is not None else None
        state.check_backoff = float(merged["backoff"] or 0.0)
        state.dead_at = float(merged["dead_at"] or 0.0)
        state.revived_at = float(merged["revived_at"] or 0.0)
        return True

    def apply_breaker(self, fingerprint: str, data: dict[str, Any]) -> bool:
        state = self.by_fingerprint(fingerprint)
        t = float(data.get("t") or 0.0)
        if state is None or t <= state.breaker_at:
            return False
        state.breaker_at = t
        b = state.breaker
        if data.get("state") == str(BreakerState.CLOSED):
            b.failures, b.trips, b.state, b.probe_started = 0, 0, BreakerState.CLOSED, None
        else:
            b.state, b.open_until = BreakerState.OPEN, float(data.get("open_until") or 0.0)
            b.trips, b.probe_started, b.failures = int(data.get("trips") or 0), None, 0
        b.probe_granted = False
        return True

    def apply_cooldown(self, project: str, model: str, until: float | None, reason: str) -> bool:
        """Another worker's cooldown: the later expiry wins; None: an operator reset cleared it."""
        key = (project, model)
        if until is None:
            return self.cooldowns.pop(key, None) is not None
        old = self.cooldowns.get(key)
        if old is not None and old.until >= until:
            return False
        self.cooldowns[key] = Cooldown(until, reason)
        return True

    def set_weight(self, name: str, weight: int | None) -> None:
        self.keys[name].operator_weight = weight
        self._marks_changed(self.keys[name])

    # --- views

    def rotation(self, model: str, now: float, count: int | None = None) -> list[str]:
        """The order the selector would pick keys for `model` next (no state changes)."""
        saved = {n: s.current for n, s in self.keys.items()}
        try:
            candidates = self._candidates(model, now, ())
            n = count or len(candidates)
            return [self._swrr(candidates).name for _ in range(n)] if candidates else []
        finally:
            for name, cur in saved.items():
                self.keys[name].current = cur

    def status(self, state: KeyState, now: float) -> str:
        if not state.enabled:
            return "disabled"
        if state.disabled_reason:
            return "dead"
        if state.suspect:
            return "suspect"
        if state.breaker.state is BreakerState.OPEN and not state.breaker.available(now):
            return "open"
        if self.cooldowns_of(state.spec.project, now):
            return "cooling"
        return "active"

    def describe(self, state: KeyState, now: float) -> dict[str, Any]:
        project = state.spec.project
        return {
            "name": state.name,
            "key": state.spec.mask,
            "fingerprint": state.spec.fingerprint,
            "project": project,
            "weight": state.weight,
            "weight_override": state.operator_weight,
            "enabled": state.enabled,
            "enabled_override": state.operator_enabled,
            "status": self.status(state, now),
            "disabled_reason": state.disabled_reason,
            "suspect": state.suspect,
            "next_check_in": None
            if state.next_check is None
            else round(max(0.0, state.next_check - now), 1),
            "breaker": {
                "state": str(state.breaker.state),
                "failures": state.breaker.failures,
                "trips": state.breaker.trips,
                "seconds_left": round(state.breaker.seconds_left(now), 1),
            },
            "cooldowns": {
                m: {"reason": c.reason, "seconds_left": round(c.until - now, 1)}
                for (p, m), c in self.cooldowns.items()
                if p == project and c.until > now
            },
            "health": round(state.health.ratio, 3),
            "last_error": state.last_error,
        }

    def usable_count(self, now: float) -> int:
        return sum(
            1
            for s in self.keys.values()
            if s.usable_ever
            and s.breaker.available(now)
            and self.cooldown_for(s.spec.project, "*", now) is None
        )

    # --- persistence (names and fingerprints only; never secrets)

    def snapshot_key(self, state: KeyState) -> dict[str, Any]:
        return {
            "fingerprint": state.spec.fingerprint,
            "project": state.spec.project,
            "breaker": state.breaker.snapshot(),
            "health": state.health.snapshot(),
            "disabled_reason": state.disabled_reason,
            "suspect": state.suspect,
            "next_check": state.next_check,
            "check_backoff": state.check_backoff,
            "marks_at": state.marks_at,
            "breaker_at": state.breaker_at,
            "dead_at": state.dead_at,
            "revived_at": state.revived_at,
            "operator_enabled": state.operator_enabled,
            "operator_weight": state.operator_weight,
            "last_error": state.last_error,
            "last_error_at": state.last_error_at,
        }

    def snapshot_cooldowns(self) -> list[dict[str, Any]]:
        return [
            {"project": p, "model": m, "until": c.until, "reason": c.reason}
            for (p, m), c in self.cooldowns.items()
        ]

    def restore(
        self, keys: dict[str, dict[str, Any]], cooldowns: Iterable[dict[str, Any]], now: float
    ) -> None:
        """Restore saved state by fingerprint (a renamed key keeps its state); saved state of
        keys not configured now is kept aside in case they come back."""
        by_fp: dict[Any, dict[str, Any]] = {}
        for name, data in keys.items():
            if not isinstance(data, dict):
                continue
            fp = data.get("fingerprint")
            state = self.keys.get(name)
            if fp not in by_fp or (state is not None and state.spec.fingerprint == fp):
                by_fp[fp] = data  # a key saved under its own name wins over a rename
        for state in self.keys.values():
            saved = by_fp.pop(state.spec.fingerprint, None)
            if saved is not None:
                self._restore_key(state, saved)
        for fp, data in by_fp.items():
            if isinstance(fp, str) and fp not in self.retired:
                self.retired[fp] = (data, now)
        for c in cooldowns:
            if float(c["until"]) > now:
                self.cooldowns[(c["project"], c["model"])] = Cooldown(
                    float(c["until"]), c["reason"]
                )

    @staticmethod
    def _restore_key(state: KeyState, data: dict[str, Any]) -> None:
        state.breaker.restore(data.get("breaker") or {})
        state.health.restore(data.get("health") or [])
        state.disabled_reason = data.get("disabled_reason")
        state.suspect = data.get("suspect")
        next_check = data.get("next_check")
        state.next_check = float(next_check) if next_check is not None else None
        if (state.suspect or state.disabled_reason) and state.next_check is None:
            state.next_check = 0.0  # saved before checks existed: check soon
        state.check_backoff = float(data.get("check_backoff") or 0.0)
        state.marks_at = float(data.get("marks_at") or 0.0)
        state.breaker_at = float(data.get("breaker_at") or 0.0)
        state.dead_at = float(data.get("dead_at") or 0.0)
        state.revived_at = float(data.get("revived_at") or 0.0)
        state.operator_enabled = data.get("operator_enabled")
        weight = data.get("operator_weight")
        state.operator_weight = int(weight) if weight else None
        state.last_error = data.get("last_error")
        state.last_error_at = data.get("last_error_at")


def _why_unusable(state: KeyState) -> str:
    if state.disabled_reason:
        return state.disabled_reason
    if state.suspect:
        return f"{state.suspect} (being checked)"
    if state.operator_enabled is False:
        return "disabled by an operator"
    return "disabled in the key file"


_MARK_FIELDS = ("dead", "suspect", "next_check", "backoff")


def merge_marks(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Two workers' marks of one key, merged the same way whichever side merges.

    The newer change (`t`) wins, except that a dead (or suspect) mark stays until an operator or a
    check revived the key after it was found dead: a change elsewhere that never saw the mark
    (say, a weight set while Redis was away) does not undo it. The same rule is the Redis-side
    merge script in shared.py.
    """
    new, old = (
        (theirs, mine)
        if float(theirs.get("t") or 0) > float(mine.get("t") or 0)
        else (mine, theirs)
    )
    out = {**old, **new}
    dead_at = max(float(new.get("dead_at") or 0), float(old.get("dead_at") or 0))
    revived_at = max(float(new.get("revived_at") or 0), float(old.get("revived_at") or 0))
    out["dead_at"], out["revived_at"] = dead_at, revived_at
    old_marked = old.get("dead") or old.get("suspect")
    new_marked = new.get("dead") or new.get("suspect")
    if old_marked and not new_marked and float(old.get("dead_at") or 0) > revived_at:
        for f in _MARK_FIELDS:  # the older side's mark was never revived: it stays
            out[f] = old.get(f)
    return out
