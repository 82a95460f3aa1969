"""List calls for a client group: only its own resources, across every project that holds them.

A group's files (cached contents, batches) may sit in several projects, and Google lists one
project at a time, everyone's resources mixed. So a list call walks the group's projects in a
fixed order, one upstream page per call, keeps only what the group owns, and hands back its own
`nextPageToken`: the project it is in and Google's token there. A page is never empty while
more follow (google-genai's pager stops on an empty page): pages without an item of the
group's are skipped, a bounded number per call. The token is opaque to callers
but not secret: a made-up one can only name a project of the caller's own group (anything else
is refused) and every item is still filtered by owner, so it can reveal nothing. Pure: no
mitmproxy.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .resources import LISTS, root

TOKEN_PREFIX = "gp1."
MAX_TOKEN = 4096


@dataclass(frozen=True)
class Page:
    project: str  # the project this page lists
    token: str  # Google's pageToken there ("" for its first page)
    seen: int = 0  # items of the group's already listed from this project


def encode(page: Page) -> str:
    raw = json.dumps([page.project, page.token, page.seen], separators=(",", ":")).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, projects: Collection[str]) -> Page | None:
    """The page a caller's pageToken names ("" = the first); None if it is not one of ours or
    names a project outside `projects`."""
    if not token:
        return Page(next(iter(projects)), "") if projects else None
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN:
        return None
    body = token[len(TOKEN_PREFIX) :]
    try:
        doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if (
        not isinstance(doc, list)
        or len(doc) != 3
        or not all(isinstance(x, str) for x in doc[:2])
        or doc[0] not in projects
        or not isinstance(doc[2], int)
        or isinstance(doc[2], bool)
        or not 0 <= doc[2] <= 1 << 30
    ):
        return None
    return Page(doc[0], doc[1], doc[2])


def upstream_query(query: str, page: Page) -> str:
    """The caller's query with Google's pageToken in place of ours."""
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0] != "pageToken"]
    if page.token:
        kept.append("pageToken=" + quote(page.token, safe=""))
    return "&".join(kept)


def owned_items(body: bytes, kind: str, owned: set[str]) -> tuple[list[Any], str] | None:
    """From Google's list answer for one project: the items `owned` names, and Google's
    nextPageToken there ("" at the end); None if it is not a list answer."""
    try:
        doc = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    items = doc.get(LISTS[kind])
    keep = [
        item
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, dict)
        and isinstance(item.get("name"), str)
        and root(item["name"]) in owned
    ]
    upstream_next = doc.get("nextPageToken")
    return keep, upstream_next if isinstance(upstream_next, str) else ""


def next_page(page: Page, upstream_next: str, found: int, projects: dict[str, int]) -> Page | None:
    """Where the listing goes on after `page`, which listed `found` of the group's items:
    Google's next page there while the project holds more of them (`projects`: how many each
    holds), else the next project's first page, else nowhere. So no page the caller is handed
    a token for comes back empty (google-genai's pager stops with an error on one)."""
    seen = page.seen + found
    if upstream_next and seen < projects.get(page.project, 0):
        return Page(page.project, upstream_next, seen)
    order = list(projects)
    i = order.index(page.project) if page.project in order else len(order)
    return Page(order[i + 1], "") if i + 1 < len(order) else None


def render(kind: str, items: list[Any], following: Page | None) -> bytes:
    """The caller's page: Google's shape (no field for an empty list), our nextPageToken."""
    out: dict[str, Any] = {LISTS[kind]: items} if items else {}
    if following is not None:
        out["nextPageToken"] = encode(following)
    return json.dumps(out).encode()
