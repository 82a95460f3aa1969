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

A request that may name a resource in a spelling these readers do not take (a lenient server
could still resolve it) names `UNREADABLE` instead, which no group owns: with clients configured
it is refused like another group's resource. That is a path that, percent-decoded (repeatedly),
in any case, with `//`, `.` and `..` folded, starts with a resource collection but is not spelled
the plain way (`/v1beta/Files/x`, `/v1beta/%66iles/x`, `/v1beta//files/x`), and OpenAI-compatible
`files` and `batches` paths (ownership reads Gemini's own names only); and a body with a resource
key written with `\\u` escapes (`"file\\u0055ri"`), more than MAX_NAMED resource keys, a value
too long to read, or a value naming `files/ID` / `cachedContents/ID` in another spelling
(`files/abc?alt=media`, `FILES/abc`, `files%2Fabc`, a Google URL with a query).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from .pins import (
    _BODY_KEY,
    _STRING_VALUE,
    _VALUE_OF,
    MAX_ANSWER_SCAN,
    MAX_VALUE,
    parse_rfc3339,
    value_pattern,
)

KINDS = ("files", "cachedContents", "batches", "operations", "tunedModels")
# a whole resource name; an operation of a tuned model ("tunedModels/x/operations/y") is the
# tuned model's: the first two segments. A model's long-running operation (a video generation:
# "models/veo-3.0-generate-001/operations/x", from predictLongRunning) is a resource of its own.
NAME = re.compile(
    r"(?:files|cachedContents|batches|operations|tunedModels)/[A-Za-z0-9_-]{1,128}"
    r"|models/[A-Za-z0-9._-]{1,128}/operations/[A-Za-z0-9_-]{1,128}"
)
_VERSIONED = re.compile(r"/(?:upload/|download/)?v1(?:beta|alpha)?\d*/")
LISTS = {"files": "files", "cachedContents": "cachedContents", "batches": "operations"}
MAX_NAMED = 64  # resource keys read from one request body (more: UNREADABLE)
UNREADABLE = "?"  # a request naming a resource in a spelling the proxy does not read: no owner
_KINDS_FOLDED = frozenset(k.lower() for k in KINDS)
_PLAIN_REST = re.compile(
    r"(?:files|cachedContents|batches|operations|tunedModels)(?:/[A-Za-z0-9_-]{1,128})*/?"
    r"(?::[A-Za-z]+)?"
)
_OPENAI_KINDS = frozenset({"files", "batches"})
_TOKEN = re.compile(r"[/:;]")
# `"key"` then `:` and the opening quote of a string (whose end _STRING_VALUE did not find)
_STRING_START = re.compile(rb'[ \t\r\n]{0,64}:[ \t\r\n]{0,64}"')
# a \u escape of an ASCII letter or `_`: what a JSON writer uses only to hide a key's spelling
_ESCAPED_LETTER = re.compile(rb"\\u00(?:4[1-9A-Fa-f]|5[0-9AaFf]|6[1-9A-Fa-f]|7[0-9Aa])")
_BODY_KEYS = frozenset(k.decode().lower() for k in _VALUE_OF)
_CACHE_KEYS = frozenset({"cachedcontent", "cached_content"})
_BARE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# escaped letters, or more space than _STRING_VALUE reads around a colon: the body is parsed
_PARSE_WHOLE = re.compile(_ESCAPED_LETTER.pattern + rb"|[ \t\r\n]{65}")
# resources no group owns (the proxy tracks none of them): named in a body, refused for tenants
# and a tuned model used as a model (group 1: its name): one pass over the body for both
_OTHER_IN_BODY = re.compile(
    rb"(?i)filesearchstore|file_search_store|corpora/|((tunedmodels)/[A-Za-z0-9_-]{1,128})"
)
_NOT_A_STRING = re.compile(rb"[ \t\r\n]{0,64}:[ \t\r\n]{0,64}[\[{]")  # an array or an object
# a value naming files/ID or cachedContents/ID, read leniently (folded, decoded)
_LOOSE_VALUE = re.compile(
    r"(?:^|[/\s])(?:files|cachedcontents)/[a-z0-9_-]{1,128}(?:$|[/?#:;\s\x00-\x1f\x7f])"
)


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
    rest = _api_rest(path)
    return None if rest is None or rest.rstrip("/") not in LISTS else rest.rstrip("/")


def _api_rest(path: str) -> str | None:
    """What follows the API version (`files/abc` of `/v1beta/files/abc`); None for a path outside
    the API or under /upload/ or /download/ (the bytes of a file, not a call on a collection)."""
    m = _VERSIONED.match(path)
    if m is None or path.startswith(("/upload/", "/download/")):
        return None
    return path[m.end() :]


_UNTRACKED = frozenset({"filesearchstores", "corpora", "generatedfiles"})
_MODEL_OPERATIONS = re.compile(r"models/[^/:]+/operations/?(?::[A-Za-z]+)?")
_CREATED_BY_POST = frozenset({"cachedContents", "tunedModels"})  # POST to the collection creates


def collection_refused(method: str, path: str) -> bool:
    """A call on a resource collection itself that a tenant may not make: it would act on, or
    list, every group's resources of the project. Allowed: the lists the proxy filters (GET files,
    cachedContents, batches) and creations (POST cachedContents, tunedModels; uploads). Refused:
    a verb on a collection (`files:list`), a list the proxy does not filter (operations, tuned
    models), and any other method on a collection."""
    rest = _api_rest(path)
    if rest is None:
        return False
    if _MODEL_OPERATIONS.fullmatch(rest):
        return True  # a model's operations, every group's
    head = re.split(r"[/:]", rest, maxsplit=1)[0]
    if head.lower() in _UNTRACKED:
        return True  # File Search stores, corpora, generated files: the proxy tracks no owner
    if head not in KINDS:
        return False
    tail = rest[len(head) :]
    if tail.startswith(":"):
        return True
    if tail not in ("", "/"):
        return False  # a named resource: the owner check's
    if method == "GET":
        return head not in LISTS
    return not (method == "POST" and head in _CREATED_BY_POST)


def named(path: str, body: bytes) -> list[str]:
    """Every resource a request names (path first, then body), each once; UNREADABLE for a
    spelling the proxy does not read (see the module's doc). At most MAX_NAMED + 1 names."""
    out: dict[str, None] = {}
    first = path_name(path)
    if first is not None:
        out[first] = None
    elif odd_path(path):
        out[UNREADABLE] = None
    for name in body_names(body):
        out[name] = None
    for n, m in enumerate(_OTHER_IN_BODY.finditer(body)):
        if m.group(1) is None or n >= MAX_NAMED or m.group(2) != b"tunedModels":
            out[UNREADABLE] = None  # a File Search store, a corpus (no group owns one), too
            break  # many names, or another spelling
        out[m.group(1).decode()] = None  # a tuned model used as a model (a cache's, a batch's)
    return list(out)[: MAX_NAMED + 1]


def _folded(text: str) -> str:
    """Percent-decoded until it stops changing (at most 8 rounds), `\\` as `/`, lower case."""
    for _ in range(8):
        decoded = unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    return text.replace("\\", "/").lower()


def odd_path(path: str) -> bool:
    """Does a path, read leniently, lie under a resource collection without being spelled the
    plain way `path_name` and `list_kind` read? (An OpenAI-compatible files or batches path too.)"""
    m = _VERSIONED.match(path)
    if m is None:
        return False
    rest = path[m.end() :]
    segments: list[str] = []
    for segment in _folded(rest).split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    tokens = [t for t in _TOKEN.split("/".join(segments)) if t]
    if not tokens:
        return False
    if tokens[0] == "openai":
        return len(tokens) > 1 and tokens[1] in _OPENAI_KINDS
    return tokens[0] in _KINDS_FOLDED and _PLAIN_REST.fullmatch(rest) is None


def body_names(body: bytes) -> list[str]:
    """The resources a request body names where Gemini reads them (fileUri, cachedContent, a
    batch's fileName), in order; UNREADABLE (last) for a spelling not read. Never raises."""
    if _PARSE_WHOLE.search(body):
        # escaped letters, or more space around a key's colon than the byte scan reads: parsed
        return _parsed_body_names(body)
    out: list[str] = []
    odd = False
    for n, key in enumerate(_BODY_KEY.finditer(body)):
        if n >= MAX_NAMED:
            odd = True
            break
        m = _STRING_VALUE.match(body, key.end())
        if m is None:
            odd |= _STRING_START.match(body, key.end()) is not None  # a value too long to read
            odd |= _NOT_A_STRING.match(body, key.end()) is not None  # a list or an object
            continue
        raw = m.group(1)
        if b"\\" in raw:  # an escaped value ("https:\/\/..."): decode it, strictly
            try:
                text = json.loads(b'"' + raw + b'"')
            except ValueError:
                odd = True
                continue
        else:
            text = raw.decode(errors="replace")
        name, unread = _value_name(key.group(1).decode(), text)
        if name is not None:
            out.append(name)
        odd |= unread
    return [*out, UNREADABLE] if odd else out


def _value_name(key: str, value: str) -> tuple[str | None, bool]:
    """The resource a body value names (in the plain spelling), and whether it may name one in
    another spelling."""
    try:
        raw = value.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return None, True
    m = value_pattern(key.encode()).search(raw)
    if m is not None:
        return m.group(1).decode(), False
    if key.lower() in _CACHE_KEYS and _BARE_ID.fullmatch(value.strip()):
        return f"cachedContents/{value.strip()}", False  # a bare id reads as a cached content's
    # "files//x", "files/./x": one resource to a lenient reader
    folded = re.sub(r"/(?:\./)*/+|/(?:\./)+", "/", _folded(value).strip())
    if not _LOOSE_VALUE.search(folded):
        return None, False
    try:
        host = urlsplit(folded).hostname if "://" in folded else None
    except ValueError:
        return None, True
    # a URL of another host is that host's business, not a Gemini resource
    return None, host is None or host == "googleapis.com" or host.endswith(".googleapis.com")


def _parsed_body_names(body: bytes) -> list[str]:
    """A body with escaped letters: parsed whole (bounded), every key read decoded."""
    doc = _document(body, pairs=True)
    if doc is None:
        return [UNREADABLE]
    out: list[str] = []
    odd, seen, stack = False, 0, [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, _Pairs):  # an object, every member of it (duplicates too)
            for key, value in item:
                if isinstance(key, str) and key.lower() in _BODY_KEYS:
                    seen += 1
                    odd |= isinstance(value, list)  # a name inside a list or an object: not read
                    if isinstance(value, str):
                        name, unread = (
                            _value_name(key, value) if len(value) <= MAX_VALUE else (None, True)
                        )
                        if name is not None:
                            out.append(name)
                        odd |= unread
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(reversed(item))
    if seen > MAX_NAMED:
        odd = True
    return [*out, UNREADABLE] if odd else out


class _Pairs(list[tuple[Any, Any]]):
    """A JSON object as the list of its members, duplicates kept (json's object_pairs_hook)."""


def _document(body: bytes, pairs: bool = False) -> Any:
    """A body parsed (bounded); `pairs`: every object as the list of its members, duplicates
    kept. None when it is too large or no JSON."""
    if len(body) > MAX_ANSWER_SCAN:
        return None
    try:
        return json.loads(body, object_pairs_hook=_Pairs if pairs else None)
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
