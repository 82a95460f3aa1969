"""Limits per client (the key file's `clients[].limits`), enforced before anything goes upstream.

Pure logic with an injected clock, no mitmproxy. `Limiter.check` admits a request or says which
limit it is past: requests per rolling minute (`rpm`), requests in flight (`concurrent`), requests
and input + output tokens per Pacific day (Google's day), and the models a client may use (globs).
An admitted request holds a slot until `release` (called once per finished request, by
`ProxyService.finish`); releasing twice, or a request never admitted, changes nothing.

Several workers: each worker counts its own requests; `shared_limits.py` publishes them to Redis
and hands back what the other workers counted (`apply_view`). A limit then compares this worker's
count plus the others'. So that two workers that both see room do not both fill it before they
hear of each other, each worker may take only its share of the room left at each view: the room
is split by the workers' recent demand for that client (a worker with no demand keeps a sliver).
While Redis is away (`apply_view(None, ...)`), each worker keeps to a local share: the limit
divided by the number of workers it last saw, rounded up.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from .bodymodels import body_models
from .classify import next_pacific_midnight, pacific_day
from .config import ClientLimits
from .routing import RouteError, valid_model

if TYPE_CHECKING:
    from .decisions import Incoming, ProxyAnswer
    from .records import RequestRecord
    from .routing import Route

MINUTE = 60.0
DEMAND_WINDOW = 5.0  # seconds of requests (admitted or refused) that make a worker's demand
MAX_TIMES = 1_000_000  # a client's admissions remembered for its rolling minute (rpm ≤ this)
UNLIMITED_CLIENTS = ("upload",)  # an upload's bytes belong to the upload its client started
KINDS = ("rpm", "concurrent", "requests_per_day", "tokens_per_day")


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 429 past a limit, 403 a model outside `models`
    message: str
    reason: str
    retry_after: float | None = None


@dataclass(slots=True)
class Counts:
    """What one worker counted for one client (what it publishes; what others publish)."""

    minute: int = 0  # requests admitted in the last rolling minute
    inflight: int = 0
    day: str = ""
    requests: int = 0  # requests admitted this Pacific day
    tokens: int = 0  # input + output tokens of this day's finished requests
    demand: int = 0  # requests seen (admitted or refused) in the last DEMAND_WINDOW seconds
    limited: int = 0  # requests refused by a limit this day
    worker: str = ""  # who counted them
    allow: dict[str, int] = field(default_factory=dict)  # what its last view let it reach

    def value(self, kind: str, day: str) -> int:
        if kind == "rpm":
            return self.minute
        if kind == "concurrent":
            return self.inflight
        if self.day != day:
            return 0
        return self.requests if kind == "requests_per_day" else self.tokens

    def reserved(self, kind: str, day: str) -> int:
        """What this worker may have reached before its next view: its count, or its allowance
        if that is more (room it was given and may be using right now)."""
        if kind not in ("rpm", "concurrent") and self.day != day:
            return 0
        return max(self.value(kind, day), self.allow.get(kind, 0))


@dataclass
class _Meter:
    """One client's counts on this worker."""

    times: deque[float] = field(default_factory=deque)  # admissions, oldest first
    seen: deque[float] = field(default_factory=deque)  # admissions and refusals
    inflight: int = 0
    day: str = ""
    requests: int = 0
    tokens: int = 0
    limited: int = 0
    # what the last view allows this worker in total, per kind (absent: no cap but the limit)
    allow: dict[str, int] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)  # the other workers' counts, per kind

    def roll(self, now: float) -> None:
        cut = now - MINUTE
        while self.times and self.times[0] <= cut:
            self.times.popleft()
        cut = now - DEMAND_WINDOW
        while self.seen and self.seen[0] <= cut:
            self.seen.popleft()
        today = pacific_day(now)
        if self.day != today:
            self.day, self.requests, self.tokens, self.limited = today, 0, 0, 0

    def counts(self) -> Counts:
        return Counts(
            len(self.times),
            self.inflight,
            self.day,
            self.requests,
            self.tokens,
            len(self.seen),
            self.limited,
        )

    def published(self, worker: str) -> Counts:
        c = self.counts()
        c.worker, c.allow = worker, dict(self.allow)
        return c


def model_refusal(limits: ClientLimits, model: str | None) -> Refusal | None:
    """403 for a model outside the client's `models` globs (None: no model, or allowed)."""
    if model is None or not limits.models:
        return None
    if valid_model(model) and any(fnmatchcase(model, g) for g in limits.models):
        return None
    return Refusal(
        403,
        f"client limit models: {model[:128]} is not in {', '.join(limits.models)}",
        "client_model_not_allowed",
    )


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.time, worker: str = "") -> None:
        self.clock = clock
        self.worker = worker
        self.meters: dict[str, _Meter] = {}
        self.held: dict[str, tuple[str, str]] = {}  # request id -> (client, Pacific day)
        self.workers = 1  # workers last seen sharing the limits (self included)
        self.shared = False  # the last view came from Redis

    def meter(self, client: str) -> _Meter:
        m = self.meters.get(client)
        if m is None:
            m = self.meters[client] = _Meter(day=pacific_day(self.clock()))
        return m

    # --- the request path

    def check(
        self, client: str, limits: ClientLimits, model: str | None, request_id: str
    ) -> Refusal | None:
        """Admit the request (it holds its slots until `release`) or say which limit it is past.
        Clients without limits are counted too (their usage is shown), never refused."""
        if client in UNLIMITED_CLIENTS:
            return None
        refusal = model_refusal(limits, model)
        if refusal is not None:
            return refusal
        now = self.clock()
        m = self.meter(client)
        m.roll(now)
        m.seen.append(now)
        counts = m.counts()
        for kind in KINDS:
            limit = getattr(limits, kind)
            if limit is None:
                continue
            mine = counts.value(kind, m.day)
            others = m.others.get(kind, 0)
            cap = m.allow.get(kind)
            if mine + others >= limit or (cap is not None and mine >= cap):
                m.limited += 1
                return Refusal(
                    429,
                    f"client limit {kind.replace('_', ' ')} {limit} reached",
                    f"client_limit_{kind}",
                    self._retry_after(kind, m, now),
                )
        if len(m.times) < MAX_TIMES:
            m.times.append(now)
        m.inflight += 1
        m.requests += 1
        self.held[request_id] = (client, m.day)
        return None

    def release(self, request_id: str, tokens: int = 0) -> bool:
        """The request finished: free its slot, count its tokens. True only the first time."""
        held = self.held.pop(request_id, None)
        if held is None:
            return False
        client, day = held
        m = self.meter(client)
        m.inflight = max(0, m.inflight - 1)
        m.roll(self.clock())
        if m.day == day:
            m.tokens += max(0, tokens)
        return True

    def _retry_after(self, kind: str, m: _Meter, now: float) -> float:
        if kind == "rpm" and m.times:
            return max(1.0, math.ceil(m.times[0] + MINUTE - now))
        if kind == "rpm":
            return MINUTE  # the others' requests fill the minute: at most a minute
        if kind == "concurrent":
            return 1.0
        return max(1.0, math.ceil(next_pacific_midnight(now) - now))

    # --- several workers

    def own_counts(self) -> dict[str, Counts]:
        """This worker's counts of every client it has seen (to publish)."""
        now = self.clock()
        out = {}
        for client, m in self.meters.items():
            m.roll(now)
            out[client] = m.published(self.worker)
        return out

    def apply_view(
        self,
        others: Mapping[str, Iterable[Counts]] | None,
        workers: int,
        limits: Mapping[str, ClientLimits],
    ) -> None:
        """What the other workers counted, per client (None: Redis is away), and how many workers
        share the limits (self included). Sets each limited client's allowance until the next."""
        self.workers = max(1, workers)
        self.shared = others is not None
        now = self.clock()
        for client, lim in limits.items():
            m = self.meter(client)
            m.roll(now)
            mine = m.counts()
            if others is None:  # Redis away: a local share of each limit
                m.others = {}
                m.allow = {
                    k: math.ceil(getattr(lim, k) / self.workers)
                    for k in KINDS
                    if getattr(lim, k) is not None and self.workers > 1
                }
                continue
            theirs = list(others.get(client, ()))
            m.others = {k: sum(c.value(k, m.day) for c in theirs) for k in KINDS}
            m.allow = {}
            missing = max(0, self.workers - 1 - len(theirs))  # seen, with no count of it yet
            if not lim.any or (not theirs and not missing):
                continue  # no limit, or alone: the limit is all mine
            # the room the others have not taken or been given, split by recent demand: my part
            # of it is mine to use until the next view (a worker without demand keeps a sliver)
            weights = [max(1, c.demand) for c in theirs] + [1] * missing
            names = [c.worker for c in theirs] + [""] * missing
            my_weight = max(1, mine.demand)
            for k in KINDS:
                limit = getattr(lim, k)
                if limit is None:
                    continue
                have = mine.value(k, m.day)
                room = max(0, limit - have - sum(c.reserved(k, m.day) for c in theirs))
                m.allow[k] = have + _share(room, my_weight, self.worker, weights, names)

    # --- views

    def usage(self, client: str) -> dict[str, int]:
        """This client's counts today: this worker's plus the other workers' (last view)."""
        m = self.meter(client)
        m.roll(self.clock())
        c = m.counts()
        return {
            "requests_last_minute": c.minute + m.others.get("rpm", 0),
            "in_flight": c.inflight + m.others.get("concurrent", 0),
            "requests_today": c.requests + m.others.get("requests_per_day", 0),
            "tokens_today": c.tokens + m.others.get("tokens_per_day", 0),
            "limited_today": c.limited,
        }

    def seed(self, client: str, day: str, requests: int, tokens: int) -> None:
        """This worker's counts of today from its database (after a restart)."""
        m = self.meter(client)
        m.roll(self.clock())
        if m.day == day:
            m.requests = max(m.requests, requests)
            m.tokens = max(m.tokens, tokens)


def _share(room: int, mine: int, me: str, weights: list[int], names: list[str]) -> int:
    """My part of `room` by weight (demand). Rounded down; the remainder goes to the busiest
    worker (ties: the first name), so a limit of 1 is never given out twice."""
    total = mine + sum(weights)
    part = room * mine // total
    rest = room - part - sum(room * w // total for w in weights)
    busiest = min([(-mine, me)] + [(-w, n) for w, n in zip(weights, names, strict=True)])
    if rest > 0 and busiest == (-mine, me):
        part += rest
    return part


def usage_note(client: str, usage: Mapping[str, int]) -> str:
    """The mitmweb comment's line about the client: `alice: 17 requests, 12k tokens today`."""
    n = usage["requests_today"]
    return (
        f"{client}: {n} request{'s' if n != 1 else ''}, {short(usage['tokens_today'])} tokens today"
    )


def short(n: int) -> str:
    """12345 -> 12k, 3400000 -> 3.4M."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def describe(limits: ClientLimits) -> dict[str, object]:
    """A client's limits as JSON (only those set)."""
    out: dict[str, object] = {
        k: getattr(limits, k) for k in KINDS if getattr(limits, k) is not None
    }
    if limits.models:
        out["models"] = list(limits.models)
    return out


LOCAL = "local"  # the loopback mode's one caller (no `clients:` in the key file)


class ClientLimitCheck:
    """The pipeline's step-4 check: the caller's limits from the current config (reloads too)."""

    def __init__(self, limiter: Limiter, limits_of: Callable[[str], ClientLimits | None]) -> None:
        self.limiter = limiter
        self.limits_of = limits_of

    def __call__(self, req: Incoming, route: Route, rec: RequestRecord) -> ProxyAnswer | None:
        from .decisions import ProxyAnswer

        client = rec.client or (req.admit.client if req.admit else None)
        if client is None:
            return None
        limits = self.limits_of(client)
        if limits is None:
            return None
        refusal = body_model_refusal(req, route, client, limits) or self.limiter.check(
            client, limits, route.model, rec.request_id
        )
        if client != LOCAL:  # one owner (no clients:): the note would only repeat the pool's count
            rec.usage_note = usage_note(client, self.limiter.usage(client))
        if refusal is None:
            return None
        return ProxyAnswer(refusal.status, refusal.message, refusal.reason, refusal.retry_after)


def body_model_refusal(
    req: Incoming, route: Route, client: str, limits: ClientLimits
) -> Refusal | None:
    """A model the body names (a cached content's, countTokens' generateContentRequest's) must be
    one the client may use too; a body that cannot be read might name any (400)."""
    if not limits.models or client in UNLIMITED_CLIENTS:
        return None
    try:
        models = body_models(req.method, route, req.body)
    except RouteError as e:
        return Refusal(e.status, e.message, e.reason)
    return next(filter(None, (model_refusal(limits, m) for m in models)), None)
