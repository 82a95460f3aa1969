"""One client request's way upstream: pick a key, send, classify, retry on another key.

No mitmproxy here: the addon hands in a plain ProxyRequest and gets a Result back. Retries
happen only before any byte reached the caller (every attempt here is pre-first-byte).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .budgets import Budgets, Spend
from .classify import Outcome, Verdict, classify, decode_body, network_verdict
from .config import KeySpec
from .egress import Egress
from .incidents import GO, Admission, Incidents
from .routing import Api, Route
from .selector import BACKOFF_BASE, KeyPool, NoKey
from .upstream import UpstreamAnswer, UpstreamClient, UpstreamError

MAX_OVERSIZED = 2  # projects that may find a request over their token limit before it is refused


@dataclass(frozen=True)
class DispatchPolicy:
    # attempts that could have been served (5xx, timeouts, dropped connections); answers that
    # only say "not this key" (dead key, quota, another project's resource) do not count
    max_attempts: int = 3
    ceiling: int = 32  # every upstream call of one request, whatever its outcome
    deadline: float = 300.0  # seconds for all attempts and waits together
    max_wait: float = 10.0  # longest wait for a cooling key before answering 429


@dataclass
class ProxyRequest:
    method: str
    base_url: str  # scheme://host[:port] of Google (or the fake)
    route: Route
    headers: list[tuple[str, str]]  # client credentials already removed
    body: bytes
    project: str | None = None  # pinned: the resource belongs to this project
    tokens: int | None = None  # spends per-model quota: its estimated input tokens (budgets)
    # an upload session's bytes leave the way its start did: that key's egress (None: direct)
    upload_egress: tuple[Egress | None] | None = None


# what a failed attempt says, as a tag people type into mitmweb's filter box (`~comment #quota`):
# "#" and "-" are literal in mitmproxy's filter regexes, unlike "[quota]" (a character class)
TAGS = {
    Outcome.OK: "#ok",
    Outcome.DEAD_KEY: "#dead-key",
    Outcome.PROJECT_CAPPED: "#quota",
    Outcome.QUOTA_MINUTE: "#quota",
    Outcome.QUOTA_DAY: "#quota",
    Outcome.MODEL_UNAVAILABLE: "#quota",
    Outcome.QUOTA_UNKNOWN: "#quota",
    Outcome.TRANSIENT: "#google-error",
    Outcome.NETWORK: "#network",
    Outcome.WRONG_PROJECT: "#other-project",
    Outcome.CALLER_ERROR: "#caller-error",
}


@dataclass
class Attempt:
    key: str
    status: int | None  # None: no HTTP answer
    verdict: Verdict
    seconds: float

    def describe(self) -> str:
        if self.status is not None and self.status < 400:
            return f"{self.key}: {self.status}"
        return f"{self.key}: {self.verdict.reason} {TAGS[self.verdict.outcome]}"


@dataclass
class Result:
    """Either an upstream answer (possibly an open stream) or a proxy-made error."""

    attempts: list[Attempt] = field(default_factory=list)
    answer: UpstreamAnswer | None = None
    key: KeySpec | None = None  # the key whose answer this is
    # proxy-made answer
    status: int = 0
    message: str = ""
    reason: str = ""
    retry_after: float | None = None
    waited: float = 0.0
    spend: Spend | None = None  # what the last attempt was charged to (budgets)

    @property
    def proxy_made(self) -> bool:
        return self.answer is None


Clock = Callable[[], float]


class Dispatcher:
    def __init__(
        self,
        pool: KeyPool,
        upstream: UpstreamClient,
        policy: DispatchPolicy,
        clock: Clock = time.time,
        on_wait: Callable[[int], None] | None = None,
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.policy = policy
        self.clock = clock
        self.on_wait = on_wait or (lambda delta: None)
        self.budgets: Budgets | None = None  # counts attempts that spend quota
        self.on_learn: Callable[[list[str]], None] = lambda said: None
        self.incidents = Incidents()  # whole-pool incidents (incidents.py)

    async def dispatch(self, req: ProxyRequest) -> Result:
        model = req.route.model_or_default
        start = self.clock()
        result = Result()
        admission = await self._hold(model, result, start) if self.incidents.open else GO
        if admission is None:  # held as long as the caller may wait: the proxy answers
            return self._incident_answer(result, model)
        try:
            return await self._dispatch(req, result, start, admission.probe)
        finally:
            if admission.probe is not None:
                self.incidents.done(model, admission.probe)

    async def _hold(self, model: str, result: Result, start: float) -> Admission | None:
        """A new request for a model in an incident waits (bounded by gemini_max_wait_ms and the
        deadline) until it may go; None: it would have to wait longer."""
        bound = min(self.policy.max_wait, self.policy.deadline)
        counted = False
        while True:
            now = self.clock()
            admission = self.incidents.admit(model, now)
            if not admission.wait_until:
                return admission
            if admission.wait_until - start > bound:
                return None
            if not counted:
                self.incidents.held(model)
                counted = True
            wait = max(admission.wait_until - now, 0.01)
            self.on_wait(+1)
            try:
                await asyncio.sleep(wait)
            finally:
                self.on_wait(-1)
            result.waited += wait

    def _incident_answer(self, result: Result, model: str) -> Result:
        now = self.clock()
        incident = self.incidents.active(model, now)
        until = incident.hold_until if incident is not None else now
        result.status, result.reason = 503, "pool_incident"
        result.retry_after = max(1.0, until - now)
        what = f"{incident.projects} of {incident.of}" if incident is not None else "most"
        result.message = (
            f"Google is throttling or overloaded for {model} across the pool ({what} projects"
            " answered 503 or 429 without a quota id); the proxy holds requests while one probe"
            f" checks; retry in {result.retry_after:.0f}s"
        )
        return result

    def _observe(
        self,
        project: str,
        model: str,
        answer: UpstreamAnswer | None,
        verdict: Verdict,
        probe: int | None,
    ) -> Verdict:
        """Tell the incidents what an answer says about the pool. In an incident, a 429 without a
        quota id cools its project only briefly: the pool's hold paces it, not a backoff per
        project that would outlast the incident."""
        trouble = verdict.outcome is Outcome.QUOTA_UNKNOWN or (
            answer is not None and answer.status == 503
        )
        if not trouble and verdict.outcome is not Outcome.OK:
            return verdict
        now = self.clock()
        projects = (  # counted only on trouble: a served answer needs no count
            len({s.spec.project for s in self.pool.keys.values() if s.usable_ever})
            if trouble
            else 0
        )
        self.incidents.observe(model, project, trouble, now, projects, probe)
        if (
            verdict.outcome is Outcome.QUOTA_UNKNOWN
            and verdict.cooldown_until is None
            and self.incidents.active(model, now) is not None
        ):
            return replace(
                verdict,
                cooldown_until=now + BACKOFF_BASE,
                reason=f"{verdict.reason} (pool incident: {BACKOFF_BASE:.0f}s)",
            )
        return verdict

    async def _dispatch(
        self, req: ProxyRequest, result: Result, start: float, probe: int | None
    ) -> Result:
        route = req.route
        model = route.model_or_default
        deadline = start + self.policy.deadline
        tried: set[str] = set()
        last: tuple[UpstreamAnswer | None, Verdict, KeySpec] | None = None
        served = 0  # attempts that count toward max_attempts
        too_large = 0  # Google's 429s naming a minute token limit below this request's size
        while served < self.policy.max_attempts and len(result.attempts) < self.policy.ceiling:
            now = self.clock()
            pick = self.pool.select(
                model, now, exclude=tried, project=req.project, tokens=req.tokens
            )
            if isinstance(pick, NoKey):
                if last is not None and last[1].outcome is Outcome.WRONG_PROJECT:
                    result.answer, result.key = last[0], last[2]  # no project owns it: Google's 403
                    return result
                wait = pick.retry_at - now
                can_wait = (
                    not pick.all_disabled
                    and result.waited + wait <= self.policy.max_wait
                    and now + wait < deadline
                )
                if not can_wait:
                    return self._no_key(result, pick, last, now)
                self.on_wait(+1)
                try:
                    await asyncio.sleep(max(wait, 0.01))
                finally:
                    self.on_wait(-1)
                result.waited += max(wait, 0.01)
                tried.clear()  # a key tried earlier may be back after its cooldown
                continue
            key = pick.key
            tried.add(key.name)
            budgets = self.budgets if req.tokens is not None else None
            if budgets is not None:
                result.spend = budgets.charge(key.project, model, req.tokens or 0, now)
            try:
                answer, verdict, seconds = await self._attempt(req, key, deadline - now)
            except BaseException:  # cancelled (the caller left, shutdown) or a bug: no outcome
                self.pool.release(key.name)  # a half-open probe must not stay taken
                raise
            verdict = self._observe(key.project, model, answer, verdict, probe)
            oversized = False
            if budgets is not None and answer is not None and answer.status == 429:
                if result.spend is not None:  # Google counts no tokens of a refused request
                    budgets.correct(result.spend, 0, self.clock())
                self.on_learn(budgets.learn(key.project, model, answer.body, self.clock()))
                # the limit Google just named is below this one request: the project is not
                # spent, the request is too large; it must not cool the pool project by project
                oversized = verdict.outcome is Outcome.QUOTA_MINUTE and math.isinf(
                    budgets.ready_at(key.project, model, req.tokens or 0, self.clock())
                )
            if oversized:
                verdict = Verdict(Outcome.CALLER_ERROR, "429 request over the token budget")
            self.pool.record(key.name, model, verdict, self.clock())
            result.attempts.append(
                Attempt(key.name, answer.status if answer else None, verdict, seconds)
            )
            last = (answer, verdict, key)
            if oversized:  # another project may take it, but it is not tried on the whole pool
                too_large += 1
                if too_large < MAX_OVERSIZED:
                    continue
                result.status, result.reason = 413, "over_token_budget"
                result.message = (
                    f"the request's ~{req.tokens} input tokens exceed the per-minute input token"
                    f" limit for {model} of {too_large} projects (learned from Google's 429s)"
                    + _tried(result)
                )
                return result
            if answer is not None and not verdict.retry:
                result.answer, result.key = answer, key
                return result
            if not route.repeatable and verdict.processed:
                break  # Google may have acted on it: a create or delete is never sent twice
            if verdict.outcome is Outcome.WRONG_PROJECT:
                if req.project is not None:  # the owner is known: its answer stands
                    result.answer, result.key = answer, key
                    return result
                tried |= self.pool.keys_of_project(key.project)  # try the other projects
            if not verdict.not_this_key:
                served += 1
            if self.clock() >= deadline:
                break
        return self._exhausted(req, result, last)

    async def _attempt(
        self, req: ProxyRequest, key: KeySpec, time_left: float
    ) -> tuple[UpstreamAnswer | None, Verdict, float]:
        headers = [*req.headers, credential_header(req.route, key.secret)]
        url = req.base_url + req.route.path_and_query
        t0 = time.perf_counter()
        try:
            answer = await self.upstream.send(
                req.method,
                url,
                headers,
                req.body,
                stream=req.route.streaming or req.route.download,
                timeout=max(math.ceil(time_left), 1),  # whole seconds: timeouts get reused
                repeatable=req.route.repeatable,
                egress=key.egress if req.upload_egress is None else req.upload_egress[0],
            )
        except UpstreamError as e:  # its message never repeats the query (an upload's id)
            why = str(e).replace(req.route.query, "…") if req.route.query else str(e)
            return None, network_verdict(why, e.sent), time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if 200 <= answer.status < 300:
            return answer, Verdict(Outcome.OK, str(answer.status)), seconds
        encoding = answer.header("content-encoding")
        if encoding:  # error bodies are small: decode so they can be classified and scrubbed
            answer.body = decode_body(answer.body, encoding)
            answer.headers = [(k, v) for k, v in answer.headers if k.lower() != "content-encoding"]
        scrub_answer(answer, key.secret)
        return answer, classify(answer.status, answer.body, req.route.model, self.clock()), seconds

    def _no_key(
        self,
        result: Result,
        nokey: NoKey,
        last: tuple[UpstreamAnswer | None, Verdict, KeySpec] | None,
        now: float,
    ) -> Result:
        if last is not None and last[0] is not None and last[1].outcome is Outcome.TRANSIENT:
            result.answer, result.key = last[0], last[2]  # Google's own 5xx says it best
            return result
        if nokey.too_large:
            result.status, result.reason = 413, "over_token_budget"
            result.retry_after = None
        elif nokey.all_disabled:
            result.status, result.reason = 503, "no_usable_key"
            result.retry_after = None
        else:
            result.status, result.reason = (
                (429, "all_keys_cooling") if nokey.quota else (503, "keys_unavailable")
            )
            result.retry_after = max(1.0, nokey.retry_at - now)
        result.message = nokey.reason + _tried(result)
        if result.retry_after is not None:
            result.message += f"; retry in {result.retry_after:.0f}s"
        return result

    def _exhausted(
        self,
        req: ProxyRequest,
        result: Result,
        last: tuple[UpstreamAnswer | None, Verdict, KeySpec] | None,
    ) -> Result:
        assert last is not None
        answer, verdict, key = last
        if answer is not None and verdict.outcome is Outcome.TRANSIENT:
            result.answer, result.key = answer, key
            return result
        nokey = self.pool.peek(req.route.model_or_default, self.clock(), req.project, req.tokens)
        if nokey is not None and verdict.outcome is not Outcome.NETWORK:
            return self._no_key(result, nokey, last, self.clock())  # e.g. every key now cooling
        if verdict.outcome is Outcome.NETWORK:
            timed_out = "timed out" in verdict.reason
            result.status = 504 if timed_out else 502
            result.reason = "upstream_timeout" if timed_out else "upstream_unreachable"
            result.message = f"{verdict.reason}{_tried(result)}"
            return result
        result.status, result.reason = 503, "attempts_exhausted"
        result.message = f"no key answered after {len(result.attempts)} attempts{_tried(result)}"
        return result


def _tried(result: Result) -> str:
    if not result.attempts:
        return ""
    return " (tried " + ", ".join(a.describe() for a in result.attempts) + ")"


def credential_header(route: Route, secret: str) -> tuple[str, str]:
    if route.api is Api.OPENAI:
        return ("Authorization", f"Bearer {secret}")
    return ("x-goog-api-key", secret)


def scrub_answer(answer: UpstreamAnswer, secret: str) -> None:
    """Google echoes the key in some messages (leaked key) and headers (302 on download)."""
    raw = secret.encode()
    if raw in answer.body:
        answer.body = answer.body.replace(raw, b"[redacted key]")
    answer.headers = [
        (k, v) for k, v in answer.headers if secret not in v and k.lower() != "x-goog-api-key"
    ]
