"""A client request's way through the proxy, step by step, with no mitmproxy in sight.

The mitmproxy layer (`mitm/forwarding.py`) turns a flow into an `Incoming` request, awaits
`Pipeline.handle`, and turns the `Decision` back into the flow. Everything the proxy decides about
a request after the gate admitted its head happens here, in this order:

1. admit: the gate's admission is present, the body within gemini_max_body;
2. route: native or OpenAI-compatible, the model, streaming or not (`routing.route`);
3. owner and pins: a resource the request names goes to its own project (`pins`);
4. checks: limits and budgets, each a `Check` that may answer before any upstream call;
5. dispatch: pick a key, send, classify, retry on another key (`dispatch.Dispatcher`);
6. rewrite upload URLs that point at Google back at the proxy (`uploads`);
7. remember what a 2xx answer created (files, cached contents, batches, operations);
8. build the answer: the proxy's own error, Google's whole answer, or an open stream.

The RequestRecord is where each step notes what happened (for mitmweb, the log and SQLite).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .budgets import counted, estimate_tokens
from .codings import decoded
from .dispatch import ProxyRequest
from .gate import Admit
from .records import RequestRecord
from .routing import Route, RouteError, route
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

    async def handle(self, req: Incoming, rec: RequestRecord) -> Decision:
        """Walk the steps; every answer the proxy makes itself is noted on `rec`."""
        decision = await self._walk(req, rec)
        if isinstance(decision, ProxyAnswer):
            rec.answered(decision.status, decision.reason, decision.message)
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
        # 3. owner and pins
        now = time.time()
        project = self._project(req, admit, r, now)
        # 4. limits and budgets
        for check in self.checks:
            refusal = check(req, r, rec)
            if refusal is not None:
                return refusal
        # 5. dispatch (a request that spends quota is counted against its project's budget)
        tokens = (
            estimate_tokens(req.body) if counted(req.method, r.method, r.path, r.model) else None
        )
        proxy_req = ProxyRequest(
            req.method, admit.upstream.base, r, list(req.headers), req.body, project, tokens
        )
        result = await service.dispatcher.dispatch(proxy_req)
        rec.attempts, rec.waited, rec.spend = result.attempts, result.waited, result.spend
        if result.proxy_made:
            return ProxyAnswer(result.status, result.message, result.reason, result.retry_after)
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
        if answer.stream is not None:
            return Stream(answer, headers)  # 8. a stream: relayed as it arrives
        # 6. upload URLs back at the proxy
        if names_upload_urls(answer.headers):
            answer.headers, started = rewrite_upload_headers(
                answer.headers,
                admit.upstream.host,
                proxy_origin(req.where(), settings.public_url, settings.trusted_proxies),
            )
            for upload_id, upload_path in started if admit.upload_id is None else ():
                service.pins.remember_upload(upload_id, key.name, upload_path, now)
        # 7. what a 2xx answer created
        if 200 <= answer.status < 300 and any(p in r.path for p in RESOURCE_PATHS):
            plain = decoded(answer.body, encoding, MAX_RESOURCE_ANSWER)
            if plain is not None:
                service.pins.remember_resources(plain, key.project, now)
        # 8. Google's whole answer
        return Unary(answer, headers)

    def _project(self, req: Incoming, admit: Admit, r: Route, now: float) -> str | None:
        """The project a request must go to: an upload session's own key's, or the owner of a
        resource it names (path or body); None: any."""
        service = self.service
        if admit.upload_key is not None:
            spec = service.config.key(admit.upload_key)
            return spec.project if spec else None
        return service.pins.project_for(r.path, req.body, now)
