"""Reads on demand from the shared state: what this worker has not heard of yet (a resource
created, an upload started through another worker a moment ago), read from Redis once or for a
bounded time. SharedState binds these as its methods.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from .pins import KIND_UPLOAD

if TYPE_CHECKING:
    from .shared import SharedState

SEP = "\x1f"  # between the parts of a hash field (project and model, kind and name)
UPLOAD_POLL = 0.05  # learn_upload: how often it looks again


async def learn_pins(
    shared: SharedState, kind_names: Iterable[tuple[str, str]], wait: float
) -> int:
    """Pins this worker does not know, read once from Redis (at most `wait` seconds): a
    resource created through another worker a moment ago. Returns how many were learnt."""
    if not shared.up or shared._redis is None:
        return 0
    fields = [f"{kind}{SEP}{name}" for kind, name in kind_names]
    if not fields:
        return 0
    try:
        raws = await asyncio.wait_for(shared._redis.hmget(shared._k("pins"), fields), wait)
    except (RedisError, OSError, TimeoutError):
        return 0
    learnt = 0
    for field, raw in zip(fields, raws, strict=True):
        if raw is None:
            continue
        try:
            learnt += bool(shared._apply("pins", field, json.loads(raw)))
        except (ValueError, TypeError, KeyError) as e:
            shared._malformed("pins", field, e)
    return learnt


async def learn_upload(shared: SharedState, digest: str, wait: float) -> bool:
    """An upload follow-up names a session this worker has not heard of: it may have started
    on another worker a moment ago, its pin still on the way. Look for it in Redis (and in
    what the other workers publish) for at most `wait` seconds. True once it is known here."""
    field = f"{KIND_UPLOAD}{SEP}{digest}"
    deadline = time.monotonic() + wait
    while digest not in shared.pins.uploads:
        left = deadline - time.monotonic()
        if left <= 0 or not shared.up or shared._redis is None:
            return False
        try:
            raw = await asyncio.wait_for(shared._redis.hget(shared._k("pins"), field), left)
            if raw is not None:
                shared._apply("pins", field, json.loads(raw))
                continue
        except (RedisError, OSError, ValueError, TypeError, KeyError):
            return digest in shared.pins.uploads
        await asyncio.sleep(min(UPLOAD_POLL, max(0.0, deadline - time.monotonic())))
    return True
