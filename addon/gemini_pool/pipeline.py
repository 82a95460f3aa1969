"""A client request's way through the proxy, step by step, with no mitmproxy in sight.

The mitmproxy layer (`mitm/forwarding.py`) turns a flow into an `Incoming` request, awaits
`Pipeline.handle`, and turns the `Decision` back into the flow. Everything the proxy decides about
a request after the gate admitted its head happens here, in this order:

1. admit: the gate's admission is present, the body within gemini_max_body;
2. route: native or OpenAI-compatible, the model, streaming or not (`routing.route`);
3. owners and pins: a resource of another client's group is 404, one the request names goes to
   its own project (`ownership`, `pins`);
4. checks: the client's limits, each a `Check` that may answer before any upstream call
   (`limits`); then the answer cache, whose hit spends no quota (`answer_cache`; across workers
   `shared_answers`);
5. dispatch: pick a key with budget left, send, classify, retry on another key
   (`dispatch.Dispatcher`; the projects' budgets are the selector's);
6. rewrite upload URLs that point at Google back at the proxy (`uploads`);
7. remember what a 2xx answer created (files, cached contents, batches, operations);
8. build the answer: the proxy's own error, Google's whole answer, or an open stream (streams,
   downloads and any 2xx answer over `upstream.STREAM_OVER`: memory never follows their size).

The RequestRecord is where each step notes what happened (for mitmweb, the log and SQLite).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from . import answer_cache, listing, metrics, resources
from .budgets import counted, estimate_tokens
from .codings import decoded
from .dispatch import Attempt, ProxyRequest, Result
from .gate import Admit
from .ownership import NOT_FOUND
from .records import RequestRecord
from .routing import Route, RouteError, query_param, route
from .uploads import Where, names_upload_urls, proxy_origin, rewrite_upload_headers
from .upstream import UpstreamAnswer
from .usage import UsageTap

if TYPE_CHECKING:
    from .service import ProxyService

# paths whose 2xx answers can name a project-bound resource (files, caches, batches, operations)
RESOURCE_PATHS = (
    "/upload/",
    "files",
    "cachedContents",
    "batches",
    "operations",
    ":batch",
    ":async",
)
MAX_RESOURCE_ANSWER = 4 << 20  # larger answers are not read for names
MAX_LIST_PAGES = 10  # upstream pages one list call of a tenant may read past empty ones


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the caller sent, as the gate let it through."""

    method: str
    path: str  # without the query
    query: str  # without credentials (the gate removed them)
    headers: Sequence[tuple[str, str]]  # without credentials and Host
    body: bytes
    admit: Admit | None  # the gate's admission; None: no gate ran for this request
    # how the caller reached the proxy (asked only when an answer names an upload URL)
    where: Callable[[], Where] = Where


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    """The proxy answers itself, in the caller's API's error shape; nothing (more) upstream."""

    status: int
    message: str
    reason: str
    retry_after: float | None = None
    close: bool = False  # close the connection (a body the proxy did not read may follow)
    detail: str = ""  # for the log, mitmweb and the admin API only (which keys were tried)


@dataclass(frozen=True, slots=True)
class Unary:
    """Google's whole answer, with the proxy's own headers to add."""

    answer: UpstreamAnswer
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Stream:
    """An open 2xx answer to relay as it arrives, with the proxy's own headers to add."""

    answer: UpstreamAnswer
    headers: list[tuple[str, str]]


Decision = ProxyAnswer | Unary | Stream


class Check(Protocol):
    """Step 4: a limit or budget. Returns an answer to refuse with, or None to go on."""

    def __call__(self, req: Incoming, route: Route, rec: RequestRecord) -> ProxyAnswer | None: ...


class Pipeline:
    def __init__(self, service: ProxyService, checks: Sequence[Check] = ()) -> None:
        self.service = service
        self.checks = list(checks)
        self.ownership = service.ownership

    async def handle(self, req: Incoming, rec: RequestRecord) -> Decision:
        """Walk the steps; every answer the proxy makes itself is noted on `rec`."""
        decision = await self._walk(req, rec)
        if isinstance(decision, ProxyAnswer):
            message = f"{decision.message} ({decision.detail})" if decision.detail else None
            rec.answered(decision.status, decision.reason, message or decision.message)
        return decision

    async def _walk(self, req: Incoming, rec: RequestRecord) -> Decision:
        service = self.service
        settings = service.settings
        # 1. admit
        admit = req.admit
        if admit is None:
            return ProxyAnswer(401, "caller not authenticated", "invalid_token")
        if len(req.body) > settings.max_body:
            return ProxyAnswer(
                413,
                f"request body is {len(req.body)} bytes; this proxy accepts at most "
                f"{settings.max_body} (gemini_max_body)",
                "request_too_large",
                close=True,
            )
        # 2. route
        try:
            r = route(req.method, req.path, req.query, admit.bearer_only, req.body)
        except RouteError as e:
            return ProxyAnswer(e.status, e.message, e.reason)
        rec.api, rec.model, rec.streaming = str(r.api), r.model, r.streaming
        rec.upstream_path = r.path_and_query
        # 3. owners and pins
        now = time.time()
        group = self.ownership.group(admit, now)
        stranger = self.ownership.foreign(r, req.body, group, now)
        while stranger is not None:
            # maybe created through another worker a moment ago: Redis knows (one bounded read)
            if not await self.ownership.catch_up(stranger):
                return ProxyAnswer(404, NOT_FOUND, "not_found")
            again = self.ownership.foreign(r, req.body, group, now)
            if again == stranger:
                return ProxyAnswer(404, NOT_FOUND, "not_found")
            stranger = again
        kind = resources.list_kind(req.method, r.path) if group is not None else None
        project = self.ownership.project(admit, r, req.body, now)
        # 4. the client's limits (a cache hit counts too: it is the client's request; the pool's
        # budgets are the dispatcher's, spent only by what goes upstream)
        for check in self.checks:
            refusal = check(req, r, rec)
            if refusal is not None:
                return refusal
        # 4b. the answer cache: a hit spends no quota
        cache_key = self._cache_key(req, admit, r, project)
        if cache_key is not None:
            hit = await self._cache_hit(cache_key, admit, rec, now)
            if hit is not None:
                return hit
        if kind is not None and group is not None:
            return await self._listing(req, admit, r, rec, group, kind, now)
        # 5. dispatch (a request that spends quota is counted against its project's budget)
        tokens = (
            estimate_tokens(req.body) if counted(req.method, r.method, r.path, r.model) else None
        )
        proxy_req = ProxyRequest(
            req.method, admit.upstream.base, r, list(req.headers), req.body, project, tokens
        )
        if admit.upload_key is not None and (spec := service.config.key(admit.upload_key)):
            proxy_req.upload_egress = (spec.egress,)  # the upload's bytes leave as its start did
        result = await service.dispatcher.dispatch(proxy_req)
        rec.attempts, rec.waited, rec.spend = result.attempts, result.waited, result.spend
        if result.proxy_made:
            return self._no_answer(result, r, group)
        answer, key = result.answer, result.key
        assert answer is not None and key is not None
        rec.key, rec.status = key.name, answer.status
        encoding = answer.header("content-encoding")
        rec.tap = UsageTap(encoding)
        headers = [
            ("x-gemini-proxy-key", key.name),
            ("x-gemini-proxy-attempts", str(len(rec.attempts))),
            ("x-request-id", rec.request_id),
        ]
        # 6. upload URLs back at the proxy
        if names_upload_urls(answer.headers):
            answer.headers, started = rewrite_upload_headers(
                answer.headers,
                admit.upstream.host,
                proxy_origin(req.where(), settings.public_url, settings.trusted_proxies),
            )
            for upload_id, upload_path in started if admit.upload_id is None else ():
                service.pins.remember_upload(upload_id, key.name, upload_path, now)
                self.ownership.upload_started(upload_id, group, now)
            if started and admit.upload_id is None:
                await self.ownership.shared_written()  # its bytes may go to another worker
        if admit.upload_id is not None and _upload_over(answer):
            self.ownership.upload_ended(admit.upload_id, now)
        if answer.stream is not None:  # a stream, a download, an answer over a few MiB
            return Stream(answer, headers)  # 8. relayed as it arrives
        # 7. what a 2xx answer created, listed, changed or deleted
        if 200 <= answer.status < 300 and any(p in r.path for p in RESOURCE_PATHS):
            plain = decoded(answer.body, encoding, MAX_RESOURCE_ANSWER)
            if plain is not None and self.ownership.answered(
                req.method, r, plain, key.project, group, now
            ):
                await self.ownership.shared_written()  # the next request may reach another worker
        # 7b. an answer that does not change, kept for the next caller of the group
        if cache_key is not None:
            said = await self._cache_store(cache_key, answer, rec)
            headers.append((answer_cache.CACHE_HEADER, said))
        # 8. Google's whole answer
        return Unary(answer, headers)

    def _cache_key(self, req: Incoming, admit: Admit, r: Route, project: str | None) -> str | None:
        """The answer cache's key for this request; None: the cache is off or it is not cacheable."""
        if self.service.answers is None or admit.upload_key is not None:
            return None
        if not answer_cache.cacheable(req.method, r, req.body, project):
            return None
        group = answer_cache.client_group(admit.client, self.service.groups)
        return answer_cache.cache_key(group, req.method, r, req.body)

    async def _cache_hit(
        self, key: str, admit: Admit, rec: RequestRecord, now: float
    ) -> Unary | None:
        cache, shared = self.service.answers, self.service.shared_answers
        entry = cache.get(key, now) if cache is not None else None
        if entry is None and cache is not None and shared is not None:
            # stored through another worker? one bounded read of Redis
            group = answer_cache.client_group(admit.client, self.service.groups)
            entry = await shared.get(key, group, now)
            if entry is not None:
                cache.adopt(entry, now)
        rec.cache = "miss" if entry is None else "hit"
        metrics.ANSWER_CACHE.labels(rec.cache).inc()
        if entry is None:
            return None
        rec.status = entry.status
        answer = UpstreamAnswer(
            entry.status, "OK", [("content-type", entry.content_type)], entry.body
        )
        rec.tap = UsageTap("")
        return Unary(
            answer,
            [(answer_cache.CACHE_HEADER, "hit"), ("x-request-id", rec.request_id)],
        )

    async def _cache_store(self, key: str, answer: UpstreamAnswer, rec: RequestRecord) -> str:
        """Keep a 2xx unary answer; says what became of it ("stored" or "miss")."""
        cache = self.service.answers
        if cache is None or not 200 <= answer.status < 300 or answer.stream is not None:
            return "miss"
        limit = cache.spec.max_bytes
        plain = decoded(answer.body, answer.header("content-encoding"), limit)
        if plain is None:
            return "miss"
        content_type = answer.header("content-type") or "application/json"
        group = (
            answer_cache.client_group(rec.admit.client, self.service.groups) if rec.admit else ""
        )
        now = time.time()
        entry = cache.put(key, group, answer.status, content_type, plain, now)
        if entry is None:
            return "miss"
        if self.service.shared_answers is not None:  # before the answer leaves (bounded)
            await self.service.shared_answers.put(entry, now)
        rec.cache = "stored"
        metrics.ANSWER_CACHE.labels("stored").inc()
        return "stored"

    def _no_answer(self, result: Result, r: Route, group: str | None) -> ProxyAnswer:
        """The proxy answers for the pool (no key could serve). A tenant client learns what to
        do, not which keys were tried or why: that goes to the log, mitmweb and the admin API."""
        full = result.message
        if group is None:
            return ProxyAnswer(result.status, full, result.reason, result.retry_after)
        public = PUBLIC_NO_ANSWER.get(result.reason, "the proxy could not serve this request")
        public = public.format(model=r.model_or_default, attempts=len(result.attempts))
        if result.retry_after is not None:
            public += f"; retry in {result.retry_after:.0f}s"
        return ProxyAnswer(result.status, public, result.reason, result.retry_after, detail=full)

    async def _listing(
        self,
        req: Incoming,
        admit: Admit,
        r: Route,
        rec: RequestRecord,
        group: str,
        kind: str,
        now: float,
    ) -> Decision:
        """A list call of a tenant: one project's page, only what `group` owns, our page token."""
        service = self.service
        owned = set(service.owners.names_of(group, kind + "/", now))
        held = Counter(p for n in owned if (p := service.pins.project_of(n, now)))
        projects = dict(sorted(held.items()))  # project -> how many of the group's it holds
        page = listing.decode(query_param(r.query, "pageToken") or "", projects)
        if page is None and not projects:
            return Unary(_json_answer(b"{}"), [("x-request-id", rec.request_id)])
        if page is None:
            return ProxyAnswer(400, "Invalid page token.", "invalid_page_token")
        items: list[Any] = []
        attempts: list[Attempt] = []
        following: listing.Page | None = page
        headers = [("x-request-id", rec.request_id)]
        for _ in range(MAX_LIST_PAGES):  # skip pages with nothing of the group's, bounded
            listed = replace(r, query=listing.upstream_query(r.query, page))
            rec.upstream_path = listed.path_and_query
            result = await service.dispatcher.dispatch(
                ProxyRequest(
                    req.method, admit.upstream.base, listed, list(req.headers), b"", page.project
                )
            )
            attempts += result.attempts
            rec.attempts, rec.waited = attempts, rec.waited + result.waited
            if result.proxy_made:
                return self._no_answer(result, r, group)
            answer, key = result.answer, result.key
            assert answer is not None and key is not None
            rec.key, rec.status = key.name, answer.status
            headers = [
                ("x-gemini-proxy-key", key.name),
                ("x-gemini-proxy-attempts", str(len(attempts))),
                ("x-request-id", rec.request_id),
            ]
            if not 200 <= answer.status < 300:
                return Unary(answer, headers)
            plain = decoded(answer.body, answer.header("content-encoding"), MAX_RESOURCE_ANSWER)
            found = None if plain is None else listing.owned_items(plain, kind, owned)
            if plain is None or found is None:
                return ProxyAnswer(502, "Google's list answer could not be read", "bad_list")
            service.pins.remember(resources.listed(plain, kind), key.project, now)
            items += found[0]
            following = listing.next_page(page, found[1], len(found[0]), projects)
            if items or following is None:
                break
            page = following
        return Unary(_json_answer(listing.render(kind, items, following)), headers)


PUBLIC_NO_ANSWER = {
    "all_keys_cooling": "every API key for {model} is out of quota for now",
    "keys_unavailable": "no API key can serve {model} right now",
    "no_usable_key": "the proxy has no usable API key",
    "upstream_timeout": "Google did not answer in time",
    "upstream_unreachable": "Google could not be reached",
    "attempts_exhausted": "no key answered after {attempts} attempts",
}


def _upload_over(answer: UpstreamAnswer) -> bool:
    """An upload follow-up's answer that ends the session: finalized, cancelled or failed."""
    status = answer.header("x-goog-upload-status").lower()
    return status in ("final", "cancelled") or answer.status >= 400


def _json_answer(body: bytes) -> UpstreamAnswer:
    """An answer the proxy composed itself in Google's place (a filtered list)."""
    return UpstreamAnswer(200, "OK", [("content-type", "application/json; charset=UTF-8")], body)
