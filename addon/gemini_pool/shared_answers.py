"""The answer cache across workers: entries written to Redis, a local miss reads Redis once.

On when `gemini_redis` is set and the key file has `cache:`. Each entry is one Redis string key,
`<prefix>:answer:<hash>` (the answer cache's key: a SHA-256 of the client group, API, method,
path, model and body; so groups never share), written with `PX` = the entry's remaining TTL:
Redis forgets it when it expires, nothing to prune. An entry whose value is over `MAX_ENTRY`
bytes stays local. The value is JSON: status, content type, group, expiry, the body in base64
(Google's answer to that group; never a key, a token or a client's name beyond its group).

A local miss looks Redis up once, bounded by `WAIT`; a stored answer is written before the
caller gets it (bounded too), so the group's next request finds it on any worker. Redis away or
slow: the local cache works alone, nothing fails. Pure of mitmproxy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .answer_cache import Entry

log = logging.getLogger("gemini_proxy")

MAX_ENTRY = 1 << 20  # bytes of one entry's Redis value; larger answers stay in the local cache
WAIT = 0.5  # seconds a lookup, or a write, may wait on Redis
MIN_TTL_MS = 10  # an entry with less left than this is not written


def encode(entry: Entry) -> str:
    return json.dumps(
        {
            "s": entry.status,
            "t": entry.content_type,
            "g": entry.group,
            "at": entry.stored,
            "e": entry.expires,
            "b": base64.b64encode(entry.body).decode("ascii"),
        },
        separators=(",", ":"),
    )


def decode(key: str, raw: Any, group: str, now: float) -> Entry | None:
    """An entry read from Redis for `group`; None if it is malformed, expired or another group's
    (the key's hash already holds the group: the check is a second lock on the same door)."""
    if not isinstance(raw, str | bytes) or len(raw) > MAX_ENTRY:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            return None
        status, content_type, owner = doc["s"], doc["t"], doc["g"]
        stored, expires = float(doc["at"]), float(doc["e"])
        body = base64.b64decode(str(doc["b"]), validate=True)
    except (ValueError, TypeError, KeyError, binascii.Error, RecursionError):
        return None
    if not (isinstance(status, int) and 200 <= status < 300 and isinstance(content_type, str)):
        return None
    if owner != group or expires <= now:
        return None
    return Entry(key, group, status, content_type, body, stored, expires)


class SharedAnswers:
    """Reads and writes answer-cache entries on the shared state's Redis connection."""

    def __init__(self, prefix: str, client: Callable[[], Any]) -> None:
        self.prefix = prefix
        self.client = client  # the Redis connection while it is up, else None
        self.read = self.found = self.written = self.refused = 0

    def redis_key(self, key: str) -> str:
        return f"{self.prefix}:answer:{key}"

    async def get(self, key: str, group: str, now: float, wait: float = WAIT) -> Entry | None:
        """The entry another worker stored, read once (at most `wait` seconds); None: none,
        or Redis is away, slow or holds something unreadable there."""
        redis = self.client()
        if redis is None:
            return None
        self.read += 1
        try:
            raw = await asyncio.wait_for(redis.get(self.redis_key(key)), wait)
        except (RedisError, OSError, TimeoutError) as e:
            log.debug("gemini-proxy: answer cache: Redis not read: %s", e)
            return None
        if raw is None:
            return None
        entry = decode(key, raw, group, now)
        self.found += entry is not None
        return entry

    async def put(self, entry: Entry, now: float, wait: float = WAIT) -> bool:
        """Write an entry with Redis expiring it with its TTL (at most `wait` seconds). False:
        too large, expired, or Redis away or slow (the local cache still holds it)."""
        redis = self.client()
        ttl_ms = int((entry.expires - now) * 1000)
        if redis is None or ttl_ms < MIN_TTL_MS:
            return False
        value = encode(entry)
        if len(value) > MAX_ENTRY:
            self.refused += 1
            return False
        try:
            await asyncio.wait_for(redis.set(self.redis_key(entry.key), value, px=ttl_ms), wait)
        except (RedisError, OSError, TimeoutError) as e:
            log.debug("gemini-proxy: answer cache: not written to Redis: %s", e)
            return False
        self.written += 1
        return True
