"""Prometheus metrics. A package module, so the registry survives mitmproxy's script reloads.

Labels carry key and client *names*, never secrets. Per-key gauges are read from the live pool at
scrape time through `set_state_source`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

ATTEMPTS = Counter(
    "gemini_proxy_upstream_requests",
    "Upstream attempts by key, model, outcome class and HTTP status (0: no answer)",
    ["key", "model", "outcome", "status"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "gemini_proxy_requests",
    "Client requests answered, by client (configured names, local, unknown), API and status",
    ["client", "api", "status"],
    registry=REGISTRY,
)
CLIENT_REQUESTS = Counter(
    "gemini_proxy_client_requests",
    "Client requests answered, by client (configured names, local, unknown) and model",
    ["client", "model"],
    registry=REGISTRY,
)
CLIENT_TOKENS = Counter(
    "gemini_proxy_client_tokens",
    "Tokens reported by Gemini (usageMetadata / usage), by client, model and direction",
    ["client", "model", "direction"],
    registry=REGISTRY,
)
CLIENT_LIMITED = Counter(
    "gemini_proxy_client_limited",
    "Client requests refused by the client's limits, by client and limit",
    ["client", "reason"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "gemini_proxy_upstream_latency_seconds",
    "Upstream attempt latency (to response headers for streams)",
    ["key", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TTFB = Histogram(
    "gemini_proxy_time_to_first_byte_seconds",
    "Time from the client's request to the first response byte sent back",
    ["key", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TOKENS = Counter(
    "gemini_proxy_tokens",
    "Tokens reported by Gemini (usageMetadata / usage)",
    ["key", "model", "direction"],
    registry=REGISTRY,
)
INFLIGHT = Gauge("gemini_proxy_requests_in_flight", "Client requests in flight", registry=REGISTRY)
BODY_BYTES_IN_FLIGHT = Gauge(
    "gemini_proxy_request_body_bytes_in_flight",
    "Request body bytes held for requests in flight (bounded by gemini_max_inflight_bytes)",
    registry=REGISTRY,
)
WAITING = Gauge(
    "gemini_proxy_requests_waiting_for_key",
    "Client requests waiting for a cooling key to come back",
    registry=REGISTRY,
)
RETRIES = Counter(
    "gemini_proxy_retries", "Retries on another key, by reason", ["reason"], registry=REGISTRY
)
PROXY_ANSWERS = Counter(
    "gemini_proxy_proxy_answers",
    "Answers made by the proxy itself, by status and reason",
    ["status", "reason"],
    registry=REGISTRY,
)
ANSWER_CACHE = Counter(
    "gemini_proxy_answer_cache",
    "Answer cache lookups and stores: hit (no upstream call, no quota), miss, stored",
    ["result"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "gemini_proxy_fallbacks",
    "Requests served by a fallback model (`fallbacks:`), by the model asked and the one that"
    " served (configured model names only)",
    ["asked", "served"],
    registry=REGISTRY,
)
INCIDENTS = Counter(
    "gemini_proxy_incidents",
    "Whole-pool incidents started (most projects answering 503 or 429 without a quota id)",
    registry=REGISTRY,
)
RELOADS = Counter(
    "gemini_proxy_config_reloads", "Key file reloads by result", ["result"], registry=REGISTRY
)
DB_WRITE_ERRORS = Counter(
    "gemini_proxy_db_write_errors",
    "SQLite writes lost (rows, pins, key-state snapshots)",
    registry=REGISTRY,
)
KEY_CHECKS = Counter(
    "gemini_proxy_key_checks",
    "Checks of keys that answered as dead (no generation quota spent), by result: "
    "dead (confirmed or still dead), alive (Google accepts the key), inconclusive",
    ["key", "result"],
    registry=REGISTRY,
)
GATE_REFUSALS = Counter(
    "gemini_proxy_refused",
    "Requests refused before anything went upstream, by reason",
    ["reason"],
    registry=REGISTRY,
)

SHARED_UP = Gauge(
    "gemini_proxy_shared_state_up",
    "1 while the shared key state (gemini_redis) is reachable; 0 when down or not configured",
    registry=REGISTRY,
)
WORKER = Gauge(
    "gemini_proxy_worker_info",
    "This worker's name (gemini_worker): sum the other series over workers by it",
    ["worker"],
    registry=REGISTRY,
)

MAX_MODEL_LABELS = 64


class ModelLabels:
    """Model label values from a bounded set: models that answered 2xx, else `other`.

    Callers choose model names; a made-up one must not become a metric series."""

    def __init__(self, limit: int = MAX_MODEL_LABELS) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def label(self, model: str | None, served: bool) -> str:
        if not model:
            return "*"
        if model in self.known:
            return model
        if served and len(self.known) < self.limit:
            self.known.add(model)
            return model
        return "other"


@dataclass(frozen=True)
class KeyGaugeRow:
    key: str
    breaker: int  # 0 closed, 1 half-open, 2 open
    cooldown_seconds: float
    health: float
    enabled: bool
    usable: bool


StateSource = Callable[[], tuple[list[KeyGaugeRow], int]]  # (keys, db queue depth)
_state_source: list[StateSource] = []


def set_state_source(source: StateSource | None) -> None:
    _state_source.clear()
    if source is not None:
        _state_source.append(source)


class _PoolCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        rows, depth = _state_source[0]() if _state_source else ([], 0)
        families = {
            "breaker": GaugeMetricFamily(
                "gemini_proxy_key_breaker_state",
                "Breaker: 0 closed, 1 half-open, 2 open",
                labels=["key"],
            ),
            "cool": GaugeMetricFamily(
                "gemini_proxy_key_cooldown_seconds",
                "Longest cooldown left on the key's project",
                labels=["key"],
            ),
            "health": GaugeMetricFamily(
                "gemini_proxy_key_health_ratio",
                "Success ratio over the health window",
                labels=["key"],
            ),
            "enabled": GaugeMetricFamily(
                "gemini_proxy_key_enabled", "1 if enabled and not disabled as dead", labels=["key"]
            ),
        }
        for r in rows:
            families["breaker"].add_metric([r.key], r.breaker)
            families["cool"].add_metric([r.key], r.cooldown_seconds)
            families["health"].add_metric([r.key], r.health)
            families["enabled"].add_metric([r.key], 1.0 if r.enabled else 0.0)
        yield from families.values()
        yield GaugeMetricFamily(
            "gemini_proxy_keys_usable", "Keys usable right now", value=sum(r.usable for r in rows)
        )
        yield GaugeMetricFamily(
            "gemini_proxy_db_queue_depth", "Writes queued for the next SQLite commit", value=depth
        )


REGISTRY.register(_PoolCollector())

# (project, model, kind, left, limit)
BudgetSource = Callable[[], list[tuple[str, str, str, float, float]]]
_budget_source: list[BudgetSource] = []


def set_budget_source(source: BudgetSource | None) -> None:
    _budget_source.clear()
    if source is not None:
        _budget_source.append(source)


class _BudgetCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gemini_proxy_budget_left",
            "Budget left per project x model: rpm and tpm in the rolling minute, rpd today"
            " (Pacific); only where a limit is configured or learned",
            labels=["project", "model", "kind"],
        )
        limits = GaugeMetricFamily(
            "gemini_proxy_budget_limit",
            "The limit of each budget in gemini_proxy_budget_left (configured or learned)",
            labels=["project", "model", "kind"],
        )
        for project, model, kind, left, limit in _budget_source[0]() if _budget_source else []:
            family.add_metric([project, model, kind], left)
            limits.add_metric([project, model, kind], limit)
        yield family
        yield limits


REGISTRY.register(_BudgetCollector())

_incident_source: list[Callable[[], int]] = []


def set_incident_source(source: Callable[[], int] | None) -> None:
    _incident_source.clear()
    if source is not None:
        _incident_source.append(source)


class _IncidentCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "gemini_proxy_incident",
            "Models in a whole-pool incident now (0: none): requests for them are held briefly",
            value=_incident_source[0]() if _incident_source else 0,
        )


REGISTRY.register(_IncidentCollector())


def render() -> bytes:
    return generate_latest(REGISTRY)
