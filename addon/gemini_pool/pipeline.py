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
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from . import answer_cache, fallback, metrics, resources, upload_tokens
from .budgets import counted, estimate_tokens
from .codings import decoded, json_not_utf8, plain_request
from .decisions import (
    PUBLIC_NO_ANSWER,
    Check,
    Decision,
    Incoming,
    ProxyAnswer,
    Stream,
    Unary,
    no_answer,
)
from .dispatch import ProxyRequest, Result
from .gate import UPLOAD_NOT_FOUND, Admit
from .ownership import NOT_FOUND
from .records import RequestRecord
from .routing import Route, RouteError, route
from .tenant_lists import MAX_RESOURCE_ANSWER, list_for_group
from .uploads import (
    mask_upload_ids,
    names_upload_id,
    names_upload_urls,
    proxy_origin,
    rewrite_upload_headers,
    upstream_query,
)
from .upstream import UpstreamAnswer
from .usage import UsageTap

if TYPE_CHECKING:
    from .service import ProxyService

# a header that makes Google read another method than the one the proxy reasoned about
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})

__all__ = [
    "PUBLIC_NO_ANSWER",
    "Check",
    "Decision",
    "Incoming",
    "Pipeline",
    "ProxyAnswer",
    "Stream",
    "Unary",
]

# paths whose 2xx answers can name a project-bound resource (files, caches, batches, operations)
RESOURCE_PATHS = (
    "/upload/",
    "files",
    "cachedContents",
    "batches",
    "operations",
    ":batch",
    ":async",
    ":predictLongRunning",  # a video generation: its operation (models/X/operations/Y)
)
NO_UPLOAD = ("", "")  # _upload_session: the request continues no upload session


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
        # 1b. the body as Google will read it: no Content-Encoding, UTF-8 JSON (every check below
        # reads bytes; a compressed or UTF-16 body must not slip past them)
        readable = plain_request(req.headers, req.body, settings.max_body)
        if readable is None:
            return ProxyAnswer(
                415,
                "request body's Content-Encoding cannot be read: send it plain, gzip or deflate "
                f"(at most {settings.max_body} bytes decoded)",
                "unsupported_encoding",
            )
        if readable[1] is not req.body:
            req = replace(req, headers=readable[0], body=readable[1])
        if any(k.lower() in METHOD_OVERRIDES for k, _ in req.headers):
            return ProxyAnswer(
                400,
                "method override headers are not accepted: send the method itself",
                "bad_request",
            )
        if admit.upload_id is None and json_not_utf8(req.headers, req.body):
            return ProxyAnswer(400, "request body must be JSON in UTF-8", "bad_request")
        # 2. route
        try:
            r = route(req.method, req.path, req.query, admit.bearer_only, req.body)
        except RouteError as e:
            return ProxyAnswer(e.status, e.message, e.reason)
        rec.api, rec.model, rec.streaming = str(r.api), r.model, r.streaming
        rec.upstream_path = r.path_and_query  # an upload's follow-up: its token, not Google's id
        # 2b. an upload's follow-up goes upstream with Google's upload_id, opened with its token
        session = self._upload_session(req, admit)
        if session is None:  # flows and records show no upload id but the proxy's tokens
            rec.upstream_path = replace(r, query=mask_upload_ids(r.query)).path_and_query
            return ProxyAnswer(404, UPLOAD_NOT_FOUND, "upload_not_found")
        upstream_route = r
        if session is not NO_UPLOAD:
            upstream_route = replace(r, query=upstream_query(r.query, session[0]))
        # 3. owners and pins
        now = time.time()
        group = self.ownership.group(admit, now)
        if group is not None and resources.collection_refused(req.method, r.path):
            return ProxyAnswer(404, NOT_FOUND, "not_found")  # every group's, not the caller's
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
            return await list_for_group(service, req, admit, r, rec, group, kind, now)
        # 5. dispatch (a request that spends quota is counted against its project's budget)
        tokens = (
            estimate_tokens(req.body) if counted(req.method, r.method, r.path, r.model) else None
        )
        proxy_req = ProxyRequest(
            req.method,
            admit.upstream.base,
            upstream_route,
            list(req.headers),
            req.body,
            project,
            tokens,
        )
        if admit.upload_key is not None and (spec := service.config.key(admit.upload_key)):
            proxy_req.upload_egress = (spec.egress,)  # the upload's bytes leave as its start did
        result = await service.dispatcher.dispatch(proxy_req)
        if result.proxy_made and result.reason == "all_keys_cooling":
            result = await self._fall_back(req.method, proxy_req, result, rec)  # 5b. fallbacks:
        rec.attempts, rec.waited, rec.spend = result.attempts, result.waited, result.spend
        if result.proxy_made:
            return no_answer(result, r, group)
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
        if rec.asked_model is not None:  # served by a fallback model: say which
            headers.append((fallback.MODEL_HEADER, rec.model or ""))
        # 6. upload URLs back at the proxy, each with a token of ours instead of Google's id
        if session is not NO_UPLOAD:
            _hide_upload_id(answer, *session)
        if names_upload_urls(answer.headers):
            answer.headers, started = rewrite_upload_headers(
                answer.headers,
                admit.upstream.host,
                proxy_origin(req.where(), settings.public_url, settings.trusted_proxies),
                dict([session]) if session is not NO_UPLOAD else None,
            )
            for new in started:
                sealed = upload_tokens.seal(new.token, new.upload_id)
                service.pins.remember_upload(new.token, key.name, new.path, now, sealed)
                self.ownership.upload_started(new.token, group, now)
            if started:
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
        if cache_key is not None:  # (another model's answer is no answer to this request)
            said = "miss" if rec.asked_model else await self._cache_store(cache_key, answer, rec)
            headers.append((answer_cache.CACHE_HEADER, said))
        # 8. Google's whole answer
        return Unary(answer, headers)

    async def _fall_back(
        self, http_method: str, sent: ProxyRequest, result: Result, rec: RequestRecord
    ) -> Result:
        """5b. Every project is out for the model asked: the first fallback model (`fallbacks:`)
        the client may use and some key can serve takes the request, rewritten for it."""
        service = self.service
        asked = sent.route.model
        targets = fallback.targets_of(service.config.fallbacks, asked)
        if (
            asked is None
            or not targets
            or not fallback.eligible(http_method, sent.route, sent.body)
        ):
            return result
        client = rec.admit.client if rec.admit is not None else None
        spec = next((c for c in service.config.clients if c.name == client), None)
        now = time.time()
        model = fallback.choose(
            targets,
            spec.limits.models if spec is not None else (),
            lambda m: service.pool.peek(m, now, sent.project, sent.tokens) is None,
        )
        if model is None:
            return result
        try:
            route, body = fallback.rewrite(sent.route, sent.body, model)
        except ValueError:
            return result
        again = await service.dispatcher.dispatch(replace(sent, route=route, body=body))
        if again.proxy_made:  # the fallback's keys went meanwhile: the answer for the model asked
            result.attempts += again.attempts
            return result
        again.attempts[:0] = result.attempts
        again.waited += result.waited
        rec.asked_model, rec.model, rec.upstream_path = asked, model, route.path_and_query
        metrics.FALLBACKS.labels(asked, model).inc()
        return again

    def _upload_session(self, req: Incoming, admit: Admit) -> tuple[str, str] | None:
        """(Google's upload_id, the token) of the upload session a follow-up continues; NO_UPLOAD
        for a request that names none; None for one that names an upload id the proxy did not hand
        out, or whose sealed id its token does not open: refused, nothing goes upstream (a raw
        Google upload_id included)."""
        token = admit.upload_id
        if token is None:
            return None if names_upload_id(req.query) else NO_UPLOAD
        pin = self.service.pins.upload_session(token, req.method, req.path, time.time())
        if admit.upload_key is None or pin is None or pin.key != admit.upload_key:
            return None
        upload_id = upload_tokens.unseal(token, pin.sealed)
        return None if upload_id is None else (upload_id, token)

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


def _upload_over(answer: UpstreamAnswer) -> bool:
    """An upload follow-up's answer that ends the session: finalized, cancelled or failed."""
    status = answer.header("x-goog-upload-status").lower()
    return status in ("final", "cancelled") or answer.status >= 400


def _hide_upload_id(answer: UpstreamAnswer, upload_id: str, token: str) -> None:
    """Google's upload_id, wherever a follow-up's answer repeats it (headers; a plain, whole body),
    becomes the caller's token: the caller, mitmweb and dumps see only the token."""
    answer.headers = [(k, v.replace(upload_id, token)) for k, v in answer.headers]
    raw = upload_id.encode()
    if answer.stream is None and not answer.header("content-encoding") and raw in answer.body:
        answer.body = answer.body.replace(raw, token.encode())
