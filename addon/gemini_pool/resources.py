"""Which project-bound resources a request names, and which ones an answer created or listed.

Files, cached contents, batches, operations and tuned models belong to the Google Cloud project
whose key created them, and (with clients configured) to the client group that created them
through the proxy. Their names are read from exactly three places, never from any other string:
- a request: its path (`/v1beta/files/abc:download`) and the body fields Gemini reads a resource
  from (`pins.body_resource_names`: fileUri, cachedContent, a batch's input fileName);
- a creation answer: its own `name`, `file.name`, `metadata.name` (and `metadata.tunedModel`);
- a list answer: the `name` of each listed object.
A `displayName`, a text part or any other field can say anything and is never read. Pure: no
mitmproxy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from .pins import MAX_ANSWER_SCAN, body_resource_names, parse_rfc3339

KINDS = ("files", "cachedContents", "batches", "operations", "tunedModels")
# a whole resource name; an operation of a tuned model ("tunedModels/x/operations/y") is the
# tuned model's: the first two segments
NAME = re.compile(r"(files|cachedContents|batches|operations|tunedModels)/([A-Za-z0-9_-]{1,128})")
_VERSIONED = re.compile(r"/(?:upload/|download/)?v1(?:beta|alpha)?\d*/")
LISTS = {"files": "files", "cachedContents": "cachedContents", "batches": "operations"}
MAX_NAMED = 64  # resource names read from one request


def root(name: str) -> str | None:
    """The resource a name belongs to ("tunedModels/x/operations/y" -> "tunedModels/x")."""
    m = NAME.match(name)
    return m.group(0) if m else None


def path_name(path: str) -> str | None:
    """The resource a request path names, if any: `/v1beta/files/abc:download` -> files/abc."""
    m = _VERSIONED.match(path)
    if m is None:
        return None
    rest = path[m.end() :]
    found = NAME.match(rest)
    if found is None:
        return None
    end = found.end()
    if end < len(rest) and rest[end] not in "/:":
        return None  # "files/abc.def": not a name the API has
    return found.group(0)


def list_kind(method: str, path: str) -> str | None:
    """The kind a list call lists (GET /v1beta/files -> "files"), else None."""
    if method != "GET":
        return None
    m = _VERSIONED.match(path)
    if m is None or path.startswith(("/upload/", "/download/")):
        return None
    rest = path[m.end() :].rstrip("/")
    return rest if rest in LISTS else None


def named(path: str, body: bytes) -> list[str]:
    """Every resource a request names (path first, then body), each once, at most MAX_NAMED."""
    out: dict[str, None] = {}
    first = path_name(path)
    if first is not None:
        out[first] = None
    for name in body_resource_names(body, limit=MAX_NAMED):
        r = root(name)
        if r is not None:
            out[r] = None
    return list(out)[:MAX_NAMED]


def _document(body: bytes) -> Any:
    if len(body) > MAX_ANSWER_SCAN:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _expiry(obj: dict[str, Any]) -> float | None:
    when = obj.get("expireTime", obj.get("expirationTime"))
    return parse_rfc3339(when) if isinstance(when, str) else None


def _own(obj: Any) -> Iterator[tuple[str, float | None]]:
    if isinstance(obj, dict):
        name = obj.get("name")
        if isinstance(name, str) and (r := root(name)) is not None:
            yield r, _expiry(obj)


def created(body: bytes) -> dict[str, float | None]:
    """name -> its own expiry (if the answer says) of what a creation answer made."""
    doc = _document(body)
    if not isinstance(doc, dict):
        return {}
    out: dict[str, float | None] = {}
    for obj in (doc, doc.get("file"), doc.get("metadata")):
        for name, expires in _own(obj):
            out.setdefault(name, expires)
    meta = doc.get("metadata")
    tuned = meta.get("tunedModel") if isinstance(meta, dict) else None
    if isinstance(tuned, str) and (r := root(tuned)) is not None:
        out.setdefault(r, None)
    return out


def listed(body: bytes, kind: str) -> dict[str, float | None]:
    """name -> expiry of each object a list answer of `kind` lists (by its own `name`)."""
    doc = _document(body)
    items = doc.get(LISTS.get(kind, kind)) if isinstance(doc, dict) else None
    out: dict[str, float | None] = {}
    for item in items if isinstance(items, list) else ():
        for name, expires in _own(item):
            out[name] = expires
    return out
