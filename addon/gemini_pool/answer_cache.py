"""The answer cache: answers that do not change, served again without spending quota.

Opt-in (`cache:` in the key file). Pure: no mitmproxy, no I/O; the clock is injected.

What is cached: 2xx unary answers to embeddings (`embedContent`, `batchEmbedContents`, OpenAI
`embeddings`), `countTokens`, and generations the caller marks cacheable (temperature 0 in
`generationConfig`, OpenAI `temperature: 0`). Never a stream, never a request that names a
project-bound resource (a file, a cached content: their answers depend on what the project holds).

Keyed by a hash of the client group, the API, the method, the path with its query, the model and
the body: entries are never shared across groups. Bounded in entries and bytes (least recently
used goes first) and by a TTL.

Held in memory, persisted to SQLite (`store.py`, table `answer_cache`) through the store's batched
writes: a lookup never touches the disk, so it never blocks the event loop, and `max_bytes` bounds
the memory it takes. A restart reads the entries back. With `gemini_redis` the entries are
shared across workers too (`shared_answers.py`): a local miss reads Redis once, bounded.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .routing import Api, Route

CACHE_HEADER = "x-gemini-proxy-cache"
UNCHANGING_RPCS = frozenset({"embedContent", "batchEmbedContents", "countTokens"})
TEMPERATURE_RPCS = frozenset({"generateContent"})
RESOURCE_MARKERS = (b"cachedContent", b"fileUri", b"fileData", b"files/")
ENTRY_OVERHEAD = 200  # bytes counted per entry beyond its body (key, headers, bookkeeping)


@dataclass(frozen=True)
class CacheSpec:
    ttl_s: float = 3600
    max_entries: int = 10_000
    max_bytes: int = 100_000_000


@dataclass(slots=True)
class Entry:
    key: str
    group: str
    status: int
    content_type: str
    body: bytes  # decoded (no content-encoding): any caller can take it
    stored: float
    expires: float

    @property
    def size(self) -> int:
        return len(self.body) + len(self.content_type) + len(self.key) + ENTRY_OVERHEAD


def client_group(client: str, groups: Mapping[str, str]) -> str:
    """The group whose callers share cache entries: the client's `group:` (a client without one
    is a group of its own; "local" in loopback mode)."""
    return groups.get(client, client)


def _zero_temperature(doc: object, *path: str) -> bool:
    for name in path:
        if not isinstance(doc, dict):
            return False
        doc = doc.get(name)
    return isinstance(doc, int | float) and not isinstance(doc, bool) and doc == 0


def cacheable(method: str, route: Route, body: bytes, project: str | None) -> bool:
    """Is this request's answer one that does not change?"""
    if method != "POST" or route.streaming or project is not None:
        return False
    if any(marker in body for marker in RESOURCE_MARKERS):
        return False  # names a resource: its answer depends on what the project holds
    if route.api is Api.OPENAI:
        if route.path.endswith("/embeddings"):
            return True
        if route.path.endswith("/chat/completions"):
            return _zero_temperature(_json(body), "temperature")
        return False
    if route.method in UNCHANGING_RPCS:
        return True
    if route.method in TEMPERATURE_RPCS:
        return _zero_temperature(_json(body), "generationConfig", "temperature")
    return False


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def cache_key(group: str, method: str, route: Route, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (group, str(route.api), method, route.path_and_query, route.model or ""):
        h.update(part.encode())
        h.update(b"\0")
    h.update(body)
    return h.hexdigest()


class AnswerCache:
    """An LRU of answers with a TTL, bounded in entries and bytes. `on_put` / `on_drop` persist."""

    def __init__(
        self,
        spec: CacheSpec,
        on_put: Callable[[Entry], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.on_put = on_put or (lambda entry: None)
        self.on_drop = on_drop or (lambda key: None)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.stored = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            self._remove(key)
            self.on_drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(
        self, key: str, group: str, status: int, content_type: str, body: bytes, now: float
    ) -> Entry | None:
        """Keep an answer (None: too large for the cache on its own)."""
        entry = Entry(key, group, status, content_type, body, now, now + self.spec.ttl_s)
        if not self._admit(entry):
            return None
        self.stored += 1
        self.on_put(entry)
        return entry

    def restore(self, entries: Iterable[Entry], now: float) -> int:
        """Entries read back at start (oldest first), within today's bounds; no persistence."""
        n = 0
        for entry in entries:
            if entry.expires > now and self._admit(entry, persist=False):
                n += 1
        return n

    def adopt(self, entry: Entry, now: float) -> bool:
        """An entry another worker stored (read from Redis): held here until its own expiry,
        counted as a hit (the local lookup counted a miss), not written to SQLite again."""
        if entry.expires <= now or not self._admit(entry):
            return False
        self.misses = max(0, self.misses - 1)
        self.hits += 1
        return True

    def configure(self, spec: CacheSpec) -> None:
        """New bounds (a reload): shrink at once if needed; TTLs of held entries stay."""
        self.spec = spec
        self._trim()

    def _admit(self, entry: Entry, persist: bool = True) -> bool:
        if entry.size > self.spec.max_bytes or self.spec.max_entries < 1:
            return False
        if entry.key in self._entries:
            self._remove(entry.key)
        self._entries[entry.key] = entry
        self.bytes += entry.size
        self._trim(persist)
        return True

    def _trim(self, persist: bool = True) -> None:
        while self._entries and (
            len(self._entries) > self.spec.max_entries or self.bytes > self.spec.max_bytes
        ):
            key, entry = self._entries.popitem(last=False)
            self.bytes -= entry.size
            self.evicted += 1
            if persist:
                self.on_drop(key)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
