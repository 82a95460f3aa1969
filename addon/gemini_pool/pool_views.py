"""What the service shows: read-only views of the pool for the admin API, the page, the commands
and the metrics (key states, health, rotation, usage, clients, budgets). ProxyService binds them
as its methods (`service.health()`); none of them changes anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import metrics
from .breaker import BreakerState
from .budgets import KINDS
from .classify import pacific_day
from .clients_view import describe_clients as _describe_clients

if TYPE_CHECKING:
    from .service import ProxyService
    from .store import Store

log = logging.getLogger("gemini_proxy")

BREAKER_CODE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def gauge_rows(service: ProxyService) -> tuple[list[metrics.KeyGaugeRow], int]:
    now = time.time()
    rows = []
    for s in service.pool.keys.values():
        cool = service.pool.cooldowns_of(s.spec.project, now)
        rows.append(
            metrics.KeyGaugeRow(
                key=s.name,
                breaker=BREAKER_CODE[s.breaker.state],
                cooldown_seconds=max([c.until - now for c in cool] + [s.breaker.seconds_left(now)]),
                health=s.health.ratio,
                enabled=s.usable_ever,
                usable=service.pool.status(s, now) == "active",
            )
        )
    return rows, service.store.queue_depth if service.store else 0


def usage_today(service: ProxyService) -> dict[str, dict[str, int]]:
    return _today(service, lambda store, day: store.usage(day), "usage")


def clients_today(service: ProxyService) -> dict[str, Any]:
    """This worker's accounting per client today, from SQLite (call from a worker thread)."""
    return _today(service, lambda store, day: store.client_usage(day), "usage per client")


def _today(
    service: ProxyService, read: Callable[[Store, str], dict[str, Any]], what: str
) -> dict[str, Any]:
    """Today's (Pacific) rows from this worker's database; {} without one or when it fails."""
    if service.store is None:
        return {}
    try:
        return read(service.store, pacific_day(time.time()))
    except Exception as e:  # the admin view must not fail because of the database
        log.warning("gemini-proxy: cannot read %s: %s", what, e)
        return {}


def describe_clients(
    service: ProxyService, accounting: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return _describe_clients(service.config, service.limiter, accounting or {})


def describe_keys(
    service: ProxyService, usage: dict[str, dict[str, int]] | None = None
) -> list[dict[str, Any]]:
    now = time.time()
    usage = usage or {}
    out = []
    for s in service.pool.keys.values():
        d = service.pool.describe(s, now)
        d["usage_today"] = usage.get(s.name, {})
        d["egress"] = s.spec.egress.url if s.spec.egress else None  # never its credentials
        d["overrides_yaml"] = {
            k: v
            for k, v in (("enabled", s.operator_enabled), ("weight", s.operator_weight))
            if v is not None
        }
        out.append(d)
    return out


def health(service: ProxyService) -> dict[str, Any]:
    now = time.time()
    counts = {"active": 0, "cooling": 0, "open": 0, "suspect": 0, "dead": 0, "disabled": 0}
    errors = {}
    for s in service.pool.keys.values():
        status = service.pool.status(s, now)
        counts[status] += 1
        if s.last_error:
            errors[s.name] = s.last_error
    return {
        "keys": len(service.pool.keys),
        **counts,
        "last_errors": errors,
        "inflight": service.inflight,
    }


def rotation(service: ProxyService) -> dict[str, list[str]]:
    now = time.time()
    models = sorted({m for (_p, m) in service.pool.cooldowns if m != "*"} | {"*"})
    # one weighted round of the keys that can serve at all
    cycle = min(100, max(1, sum(s.weight for s in service.pool.keys.values() if s.usable_ever)))
    return {m: service.pool.rotation(m, now, count=cycle) for m in models}


def describe_budgets(service: ProxyService) -> list[dict[str, Any]]:
    return service.budgets.describe(time.time(), [p.name for p in service.config.projects])


def budget_rows(service: ProxyService) -> list[tuple[str, str, str, float, float]]:
    """Budget left and its limit per project x model x kind, for the gauges: bounded labels only
    (the projects of configured keys, models that answered 2xx or are named in `projects:`)."""
    now = time.time()
    projects = sorted({k.project for k in service.config.keys})
    models = set(service.models.known) | {
        m.pattern
        for p in service.config.projects
        for m in p.limits
        if "*" not in m.pattern and "?" not in m.pattern
    }
    rows = []
    for project in projects:
        for model in sorted(models):
            for kind in KINDS:
                left = service.budgets.left(project, model, kind, now)
                limit = service.budgets.limits(project, model).get(kind)
                if left is not None and limit is not None:
                    rows.append((project, model, kind, left, float(limit.value)))
    return rows


def budget_line(b: dict[str, Any], now: float | None = None) -> str:
    """One project x model as one line: "proj-a gemini-2.5-flash rpd 17/20 (learned) ..."."""
    now = time.time() if now is None else now
    parts = [f"{b['project']} {b['model']}: {b['requests_today']} requests today"]
    for kind, lim in b["limits"].items():
        parts.append(
            f"{kind} {lim['used']}/{lim['limit']} ({lim['source']}), {lim['left']} left,"
            f" resets in {max(0.0, lim['resets_at'] - now):.0f}s"
        )
    return "; ".join(parts)
