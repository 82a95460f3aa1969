"""Client limits across workers: each worker's counts through Redis, on the housekeeping tick.

Every tick (250 ms) a worker reads the hash `prefix:limits`: the other workers' fields younger
than FRESH seconds go to the limiter (`Limiter.apply_view`) with the number of workers seen.
Then it writes what it counted per client (requests in the last minute, in flight, requests and
tokens today, recent demand) and the allowance the view gave it, field `<client>\\x1f<worker>`,
with a timestamp, plus a heartbeat field `\\x1f<worker>`. Fields older than
STALE are deleted now and then. While Redis is away the limiter gets None and each worker keeps
to its local share (the limit over the workers it last saw). Names and numbers only, no secrets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from .config import ClientLimits
from .limits import Counts, Limiter

log = logging.getLogger("gemini_proxy")

SEP = "\x1f"
FRESH = 3.0  # a worker's counts older than this are not counted (it stopped, or lost Redis)
STALE = 600.0  # fields older than this are deleted
CLEAN_EVERY = 60.0


class SharedLimits:
    def __init__(self, limiter: Limiter, prefix: str) -> None:
        self.limiter = limiter
        self.prefix = prefix
        self._last_clean = 0.0
        self._warned = False

    @property
    def key(self) -> str:
        return f"{self.prefix}:limits"

    async def tick(self, redis: Any, limits: Mapping[str, ClientLimits]) -> None:
        """Publish this worker's counts and take the others' (redis None: Redis is away)."""
        limiter = self.limiter
        if redis is None:
            limiter.apply_view(None, limiter.workers, limits)
            return
        me = limiter.worker
        try:
            # read, decide, then write what this worker counted and was just given: another
            # worker reading after this one sees the room it took (published before the read,
            # an allowance would lag a tick and both workers could fill the same room)
            stored = await redis.hgetall(self.key)
            now = limiter.clock()
            others, workers, stale = read(stored, me, now)
            limiter.apply_view(others, len(workers | {me}), limits)
            fields = {
                f"{client}{SEP}{me}": json.dumps(_doc(c, now))
                for client, c in limiter.own_counts().items()
            }
            fields[f"{SEP}{me}"] = json.dumps({"t": now})
            await redis.hset(self.key, mapping=fields)
        except (RedisError, OSError) as e:
            log.debug("gemini-proxy: client limits not shared this tick: %s", e)
            limiter.apply_view(None, limiter.workers, limits)
            return
        if stale and time.monotonic() - self._last_clean >= CLEAN_EVERY:
            self._last_clean = time.monotonic()
            with contextlib.suppress(RedisError, OSError):
                await redis.hdel(self.key, *stale)


def _doc(c: Counts, now: float) -> dict[str, Any]:
    return {
        "t": now,
        "m": c.minute,
        "i": c.inflight,
        "d": c.day,
        "r": c.requests,
        "k": c.tokens,
        "s": c.demand,
        "l": c.limited,
        "a": c.allow,
    }


def read(
    stored: Mapping[Any, Any], me: str, now: float
) -> tuple[dict[str, list[Counts]], set[str], list[str]]:
    """The other workers' fresh counts per client, the workers seen, and the stale fields.
    A field that does not parse is skipped (and deleted with the stale ones)."""
    others: dict[str, list[Counts]] = {}
    workers: set[str] = set()
    stale: list[str] = []
    for raw_field, raw in stored.items():
        fld = str(raw_field)
        client, sep, worker = fld.partition(SEP)
        try:
            if not sep or not worker:
                raise ValueError("no worker in the field")
            doc = json.loads(raw)
            t = float(doc["t"])
            if t < now - STALE:
                stale.append(fld)
                continue
            if t < now - FRESH or worker == me:
                continue
            if not client:
                workers.add(worker)
                continue  # a heartbeat
            c = Counts(
                minute=_int(doc["m"]),
                inflight=_int(doc["i"]),
                day=str(doc["d"]),
                requests=_int(doc["r"]),
                tokens=_int(doc["k"]),
                demand=_int(doc["s"]),
                limited=_int(doc.get("l", 0)),
                worker=worker,
                allow={str(k): _int(v) for k, v in dict(doc.get("a") or {}).items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            if not fld.endswith(SEP + me):
                stale.append(fld)
            continue
        workers.add(worker)
        others.setdefault(client, []).append(c)
    return others, workers, stale


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"not a count: {v!r}")
    return v
