"""What a finished request adds up to: Prometheus counters and its SQLite rows.

Pure bookkeeping over a RequestRecord (no mitmproxy): `count` feeds the metrics, `outcome_row` and
`usage_deltas` are what the store keeps (one row per request; usage per key, model and Pacific day,
every attempt counted, as Google counts every request against the key's project).
"""

from __future__ import annotations

import logging
from collections.abc import Container

from . import metrics
from .classify import Outcome, pacific_day
from .records import RequestRecord
from .store import ClientDelta, OutcomeRow, UsageDelta

log = logging.getLogger("gemini_proxy")


LIMIT_REASONS = ("client_limit_", "client_model_not_allowed")


def client_label(client: str | None, configured: Container[str]) -> str:
    """The client as a metric label and accounting row: a configured client's name, `local`
    (loopback mode without clients), else `unknown` (refused at the gate, an upload's follow-up,
    a client a reload removed): a bounded set, whatever callers send."""
    if client is not None and client in configured:
        return client
    return "local" if client == "local" and not configured else "unknown"


def limited(rec: RequestRecord) -> bool:
    """Refused by the client's own limits."""
    return bool(rec.proxy_reason and rec.proxy_reason.startswith(LIMIT_REASONS))


def client_delta(rec: RequestRecord, client: str, model: str) -> ClientDelta:
    """One request of a client, for the per-client table (client x model x Pacific day)."""
    return ClientDelta(
        pacific_day(rec.started_wall),
        client,
        model,
        requests=1,
        limited=int(limited(rec)),
        tokens_in=rec.tap.tokens_in or 0,
        tokens_out=rec.tap.tokens_out or 0,
    )


def count(rec: RequestRecord, model: str, client: str = "unknown") -> None:
    """Every attempt, retry, request and token of one finished request, into the metrics."""
    for a in rec.attempts:
        metrics.ATTEMPTS.labels(a.key, model, str(a.verdict.outcome), str(a.status or 0)).inc()
        metrics.LATENCY.labels(a.key, model).observe(a.seconds)
        if a.verdict.outcome is Outcome.DEAD_KEY:
            log.warning(
                "gemini-proxy: key %s answered %s: out of rotation until a check confirms it",
                a.key,
                a.verdict.reason,
            )
    for a in rec.attempts[:-1]:
        metrics.RETRIES.labels(str(a.verdict.outcome)).inc()
    metrics.REQUESTS.labels(client, rec.api, str(rec.status)).inc()
    metrics.CLIENT_REQUESTS.labels(client, model).inc()
    if rec.tap.tokens_in:
        metrics.CLIENT_TOKENS.labels(client, model, "in").inc(rec.tap.tokens_in)
    if rec.tap.tokens_out:
        metrics.CLIENT_TOKENS.labels(client, model, "out").inc(rec.tap.tokens_out)
    if limited(rec):
        metrics.CLIENT_LIMITED.labels(client, rec.proxy_reason or "").inc()
    if rec.proxy_reason:
        metrics.PROXY_ANSWERS.labels(str(rec.status), rec.proxy_reason).inc()
    if rec.key:
        if rec.ttfb is not None:
            metrics.TTFB.labels(rec.key, model).observe(rec.ttfb)
        if rec.tap.tokens_in:
            metrics.TOKENS.labels(rec.key, model, "in").inc(rec.tap.tokens_in)
        if rec.tap.tokens_out:
            metrics.TOKENS.labels(rec.key, model, "out").inc(rec.tap.tokens_out)


def outcome_row(rec: RequestRecord) -> OutcomeRow:
    ttfb = rec.ttfb
    return OutcomeRow(
        t=rec.started_wall,
        request_id=rec.request_id,
        client=rec.client,
        key=rec.key,
        model=rec.model,
        api=rec.api,
        stream=rec.streaming,
        status=rec.status,
        outcome=rec.outcome,
        attempts=rec.attempts_json(),
        latency_ms=round(rec.latency * 1000, 2),
        ttfb_ms=None if ttfb is None else round(ttfb * 1000, 2),
        bytes=rec.tap.bytes,
        tokens_in=rec.tap.tokens_in,
        tokens_out=rec.tap.tokens_out,
        proxy_reason=rec.proxy_reason,
    )


def usage_deltas(rec: RequestRecord, projects: dict[str, str], model: str) -> list[UsageDelta]:
    """Per-attempt usage (Google counts every request against the key's project)."""
    day = pacific_day(rec.started_wall)
    out: dict[str, UsageDelta] = {}
    for a in rec.attempts:
        d = out.setdefault(a.key, UsageDelta(day, a.key, projects.get(a.key, a.key), model))
        d.requests += 1
        if a.verdict.outcome is not Outcome.OK:
            d.errors += 1
    if rec.key and rec.key in out:
        out[rec.key].tokens_in += rec.tap.tokens_in or 0
        out[rec.key].tokens_out += rec.tap.tokens_out or 0
    return list(out.values())
