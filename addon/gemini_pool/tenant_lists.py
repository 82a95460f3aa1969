"""A tenant's list call (`files`, `cachedContents`, `batches`) as the pipeline's step: one
project's page through the dispatcher at a time, only what the caller's group owns, the proxy's
own page token (listing.py holds the pure page and token logic). No mitmproxy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import listing, resources
from .codings import decoded
from .decisions import Decision, Incoming, ProxyAnswer, Unary, json_answer, no_answer
from .dispatch import Attempt, ProxyRequest
from .gate import Admit
from .records import RequestRecord
from .routing import Route, query_param

if TYPE_CHECKING:
    from .service import ProxyService

MAX_RESOURCE_ANSWER = 4 << 20  # larger answers are not read for names
MAX_LIST_PAGES = 10  # upstream pages one list call of a tenant may read past empty ones


async def list_for_group(
    service: ProxyService,
    req: Incoming,
    admit: Admit,
    r: Route,
    rec: RequestRecord,
    group: str,
    kind: str,
    now: float,
) -> Decision:
    """A list call of a tenant: one project's page, only what `group` owns, our page token."""
    owned = set(service.owners.names_of(group, kind + "/", now))
    held = Counter(p for n in owned if (p := service.pins.project_of(n, now)))
    projects = dict(sorted(held.items()))  # project -> how many of the group's it holds
    page = listing.decode(query_param(r.query, "pageToken") or "", projects)
    if page is None and not projects:
        return Unary(json_answer(b"{}"), [("x-request-id", rec.request_id)])
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
            return no_answer(result, r, group)
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
    return Unary(json_answer(listing.render(kind, items, following)), headers)
