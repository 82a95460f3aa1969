"""Key checks: confirm a dead-key answer before a key is disabled, and find out when it works again.

A check asks Google something that spends no generation quota (listing one model): a key the check
accepts is not disabled; a dead key is re-checked with a backoff (minutes, doubling, capped at
hours) and comes back by itself once Google accepts it. Checks run in the background: a request
that met a dead key has already moved on to the next one.

No mitmproxy here: the service calls `KeyChecker.run_due` from its housekeeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from . import metrics
from .classify import Outcome, Verdict, classify, decode_body
from .egress import Egress
from .selector import KeyPool, KeyState
from .upstream import UpstreamClient, UpstreamError

log = logging.getLogger("gemini_proxy")

CHECK_PATH = "/v1beta/models?pageSize=1"
CLAIM_RETRY = 30.0  # another worker holds the check: look again after this (its lock's life)
CHECK_TIMEOUT = 15.0
# answers that prove Google accepted the key, though it cannot serve right now
_ACCEPTED = {
    Outcome.OK,
    Outcome.QUOTA_MINUTE,
    Outcome.QUOTA_DAY,
    Outcome.QUOTA_UNKNOWN,
    Outcome.MODEL_UNAVAILABLE,
    Outcome.PROJECT_CAPPED,
}


async def check_key(
    upstream: UpstreamClient, base: str, secret: str, egress: Egress | None = None
) -> Verdict | None:
    """OK if Google accepts the key, a DEAD_KEY verdict if it refuses it, None if unknown.
    The check leaves through the key's own egress, as its requests do."""
    try:
        answer = await upstream.send(
            "GET",
            base + CHECK_PATH,
            [("x-goog-api-key", secret), ("Accept-Encoding", "identity")],
            b"",
            stream=False,
            timeout=CHECK_TIMEOUT,
            egress=egress,
        )
    except UpstreamError:
        return None
    body = decode_body(answer.body, answer.header("content-encoding"))
    verdict = classify(answer.status, body, None, time.time())
    if verdict.outcome in _ACCEPTED:
        return Verdict(Outcome.OK, f"check: {answer.status}")
    if verdict.outcome is Outcome.DEAD_KEY:
        return verdict
    return None  # 5xx, or an answer that says nothing about the key


class KeyChecker:
    def __init__(
        self,
        pool: KeyPool,
        upstream: UpstreamClient,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.on_change = on_change
        self.base: str | None = None  # the upstream, once known
        self.tasks: set[asyncio.Task[None]] = set()
        # with several workers: may this one run the check now? (one worker across the pool)
        self.claim: Callable[[KeyState], Awaitable[bool]] | None = None

    def run_due(self, now: float) -> int:
        """Start the checks that are due (each key at most one at a time)."""
        if self.base is None:
            return 0
        due = self.pool.due_checks(now)
        for state in due:
            state.checking = True
            task = asyncio.get_running_loop().create_task(self._check(state, self.base))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return len(due)

    async def _check(self, state: KeyState, base: str) -> None:
        name, was = state.name, state.suspect or state.disabled_reason
        if self.claim is not None and not await self.claim(state):
            # another worker checks it; its verdict arrives with the shared state
            state.checking = False
            state.next_check = time.time() + CLAIM_RETRY
            return
        try:
            verdict = await check_key(self.upstream, base, state.spec.secret, state.spec.egress)
        except Exception:  # a check must never take the proxy down
            log.exception("gemini-proxy: checking key %s failed", name)
            verdict = None
        result = (
            "inconclusive"
            if verdict is None
            else ("alive" if verdict.outcome is Outcome.OK else "dead")
        )
        metrics.KEY_CHECKS.labels(name, result).inc()
        change = self.pool.check_result(name, verdict, time.time())
        if change == "dead":
            log.warning(
                "gemini-proxy: key %s disabled: %s (confirmed by a check; re-checked in %.0fs)",
                name,
                was,
                state.check_backoff,
            )
        elif change == "cleared":
            log.warning(
                "gemini-proxy: key %s answered %s, but a check says Google accepts it: not disabled",
                name,
                was,
            )
        elif change == "recovered":
            log.warning("gemini-proxy: key %s is accepted by Google again: back in rotation", name)
        elif result == "dead":
            log.info(
                "gemini-proxy: key %s still dead (%s); next check in %.0fs",
                name,
                verdict.reason if verdict else was,
                state.check_backoff,
            )
        self.on_change()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
