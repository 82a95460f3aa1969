"""Key-pool state shared by several workers through Redis (or Valkey): optional (gemini_redis).

What one worker learns, every worker knows within milliseconds: dead and suspect marks with their
reasons and operator overrides (by key fingerprint), breaker trips, cooldowns per project x model,
project pins (files, cached contents, batches, upload sessions), and budget limits learned from
Google's 429s (per project x model x kind; the newer wins). Selection never waits on
Redis: each worker decides from its local state; changes are queued, written and published by a
background task, and other workers apply what they hear. Two locks make work happen once across
the pool: the half-open probe of a breaker, and the no-quota check of a key that answered dead.

Redis is no single point of failure: while it is unreachable workers serve on their local state
(`up` is False, `gemini_proxy_shared_state_up` 0), reconnect with back-off, and on reconnect merge
both ways: they read everything, keep what is newer (an expiry: the later one; marks and
overrides: the newer change, so a dead mark stays until someone enables the key), and write back
everything they know (a Redis restarted empty gets the whole state again).

Layout (every key under `prefix:`): hashes `marks` and `breakers` (field: key fingerprint),
`cooldowns` (field: project, model), `pins` (field: kind, name), `limits` (field: project, model,
kind); channel `events`; locks
`probe:<fingerprint>` and `check:<fingerprint>` (SET NX PX). Never a secret: fingerprints, names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics
from .budgets import Budgets
from .pins import Pin, ResourcePins
from .selector import KeyPool, KeyState

log = logging.getLogger("gemini_proxy")

SEP = "\x1f"  # between the parts of a hash field (project and model, kind and name)
QUEUE_LIMIT = 50_000  # changes waiting to be written; past it they are dropped, then resynced
PROBE_LOCK_MS = 10_000  # a probe grant; renewed while the breaker still waits for its probe
CHECK_LOCK_MS = 30_000
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

# Write a hash field only if the new value is newer: by `t` (marks, breakers) or by the later
# expiry (cooldowns: `until`, pins: `expires`). Returns 1 if written.
_MERGE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local old = cjson.decode(cur)[ARGV[3]] or 0
  local new = cjson.decode(ARGV[2])[ARGV[3]] or 0
  if old >= new then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
_ORDER = {"marks": "t", "breakers": "t", "cooldowns": "until", "pins": "expires", "limits": "at"}
# marks merge field-wise (selector.merge_marks): the newer change wins, but a dead mark stays
# until the key was revived after it
_MERGE_MARKS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end
local a = cjson.decode(cur)
local b = cjson.decode(ARGV[2])
local function num(x) if type(x) == 'number' then return x end return 0 end
local function marked(x) return (x['dead'] and x['dead'] ~= cjson.null) or (x['suspect'] and x['suspect'] ~= cjson.null) end
local new, old = a, b
if num(b['t']) > num(a['t']) then new, old = b, a end
local out = {}
for k, v in pairs(old) do out[k] = v end
for k, v in pairs(new) do out[k] = v end
local dead_at = math.max(num(new['dead_at']), num(old['dead_at']))
local revived_at = math.max(num(new['revived_at']), num(old['revived_at']))
out['dead_at'] = dead_at
out['revived_at'] = revived_at
if (not marked(new)) and marked(old) and num(old['dead_at']) > revived_at then
  for _, f in ipairs({'dead', 'suspect', 'next_check', 'backoff'}) do out[f] = old[f] end
end
local enc = cjson.encode(out)
if enc == cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], enc)
return 1
"""
# a probe grant ends with the probe (the breaker closed or opened again): free it if it is ours
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SharedState:
    def __init__(
        self,
        pool: KeyPool,
        pins: ResourcePins,
        url: str,
        prefix: str,
        worker: str,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool, self.pins = pool, pins
        self.url, self.prefix, self.worker = url, prefix, worker
        self.on_change = on_change  # local state changed (persist it)
        self.up = False
        self.last_error: str | None = None
        self._queue: asyncio.Queue[tuple[str, str, dict[str, Any] | None]] = asyncio.Queue(
            QUEUE_LIMIT
        )
        self._overflow = False
        self._task: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._release: Any = None
        self._merge_marks: Any = None
        self.budgets: Budgets | None = None  # learned limits are shared when set

    # ------------------------------------------------------------------ hooks from the pool

    def key_changed(self, kind: str, what: Any) -> None:
        """KeyPool.on_change: queue what other workers must learn (never blocks)."""
        if kind == "marks":
            state: KeyState = what
            self._put("marks", state.spec.fingerprint, self.pool.shared_marks(state))
        elif kind == "breaker":
            state = what
            self._put("breakers", state.spec.fingerprint, self.pool.shared_breaker(state))
        elif kind == "cooldown":
            project, model, cool = what
            value = None if cool is None else {"until": cool.until, "reason": cool.reason}
            self._put("cooldowns", f"{project}{SEP}{model}", value)

    def pin_added(self, pin: Pin) -> None:
        self._put(
            "pins",
            f"{pin.kind}{SEP}{pin.name}",
            {"owner": pin.owner, "path": pin.path, "expires": pin.expires},
        )

    def limit_learned(self, project: str, model: str, kind: str, value: int, at: float) -> None:
        self._put("limits", SEP.join((project, model, kind)), {"value": value, "at": at})

    def spent(self, project: str, model: str, at: float, tokens: int, before: int | None) -> None:
        """An attempt charged to a limited project x model (or its correction): published only,
        never stored (counts are transient; each worker keeps its own)."""
        self._put("spends", SEP.join((project, model)), {"at": at, "n": tokens, "b": before})

    def _put(self, table: str, field: str, value: dict[str, Any] | None) -> None:
        try:
            self._queue.put_nowait((table, field, value))
        except asyncio.QueueFull:
            self._overflow = True  # written in full at the next resync

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._close()
        self._set_up(False, quiet=True)

    def _set_up(self, up: bool, error: str | None = None, quiet: bool = False) -> None:
        if up != self.up and not quiet:
            if up:
                log.info("gemini-proxy: shared state on %s (worker %s)", self._where(), self.worker)
            else:
                log.warning(
                    "gemini-proxy: shared state unreachable (%s): serving on local state",
                    error or "stopped",
                )
        self.up, self.last_error = up, error
        metrics.SHARED_UP.set(1 if up else 0)
        for state in self.pool.keys.values():  # one probe across workers needs Redis
            state.breaker.shared = up
            if not up:
                state.breaker.probe_granted = False

    def _where(self) -> str:
        return self.url.split("@")[-1]  # no credentials in logs

    async def _close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                self._redis = aioredis.from_url(
                    self.url,
                    password=os.environ.get("GEMINI_REDIS_PASSWORD") or None,
                    socket_connect_timeout=2,
                    socket_timeout=5,
                    health_check_interval=5,
                    decode_responses=True,
                )
                await self._redis.ping()
                merge = self._redis.register_script(_MERGE)
                self._merge_marks = self._redis.register_script(_MERGE_MARKS)
                self._release = self._redis.register_script(_RELEASE)
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self._k("events"))
                await self._resync(merge)
                self._set_up(True)
                attempt = 0
                await _first_failure(self._listen(pubsub), self._write(merge))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ConnectionError, TimeoutError, ValueError) as e:
                self._set_up(False, f"{type(e).__name__}: {e}")
            except Exception as e:  # keep serving on local state whatever happens here
                log.exception("gemini-proxy: shared state failed")
                self._set_up(False, f"{type(e).__name__}: {e}")
            await self._close()
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    # ------------------------------------------------------------------ both ways

    async def _resync(self, merge: Any) -> None:
        """Learn everything Redis holds, then write back everything this worker knows."""
        assert self._redis is not None
        for table in _ORDER:
            entries = await self._redis.hgetall(self._k(table))
            for field, raw in entries.items():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    self._apply(table, str(field), json.loads(raw))
        self._overflow = False
        while not self._queue.empty():  # superseded by the full state below
            self._queue.get_nowait()
        items: list[tuple[str, str, dict[str, Any] | None]] = []
        for state in self.pool.keys.values():
            items.append(("marks", state.spec.fingerprint, self.pool.shared_marks(state)))
            items.append(("breakers", state.spec.fingerprint, self.pool.shared_breaker(state)))
        for (project, model), c in self.pool.cooldowns.items():
            if c.until > time.time():
                items.append(
                    ("cooldowns", f"{project}{SEP}{model}", {"until": c.until, "reason": c.reason})
                )
        for pin in self.pins.all_pins(time.time()):
            items.append(
                (
                    "pins",
                    f"{pin.kind}{SEP}{pin.name}",
                    {"owner": pin.owner, "path": pin.path, "expires": pin.expires},
                )
            )
        if self.budgets is not None:
            for r in self.budgets.learned_rows():
                field = SEP.join((r["project"], r["model"], r["kind"]))
                items.append(("limits", field, {"value": r["value"], "at": r["at"]}))
        await self._flush(merge, items, publish=True)
        self.on_change()

    async def _write(self, merge: Any) -> None:
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty() and len(items) < 500:
                items.append(self._queue.get_nowait())
            await self._flush(merge, items, publish=True)
            if self._overflow:
                raise ConnectionError("change queue overflowed: resync")

    async def _flush(
        self, merge: Any, items: list[tuple[str, str, dict[str, Any] | None]], publish: bool
    ) -> None:
        assert self._redis is not None
        if not items:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for table, field, value in items:
                if table == "spends":
                    continue
                if value is None:
                    pipe.hdel(self._k(table), field)
                else:
                    await (self._merge_marks if table == "marks" else merge)(
                        keys=[self._k(table)],
                        args=[field, json.dumps(value), _ORDER[table]],
                        client=pipe,
                    )
                if table == "breakers" and self._release is not None:
                    await self._release(
                        keys=[self._k(f"probe:{field}")], args=[self.worker], client=pipe
                    )
            if publish:
                message = {"w": self.worker, "items": [[t, f, v] for t, f, v in items]}
                pipe.publish(self._k("events"), json.dumps(message))
            await pipe.execute()

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                doc = json.loads(message["data"])
                if doc.get("w") == self.worker:
                    continue
                changed = False
                for table, field, value in doc["items"]:
                    changed |= self._apply(table, field, value)
            except (ValueError, TypeError, KeyError) as e:
                log.warning("gemini-proxy: ignoring a malformed shared-state event: %s", e)
                continue
            if changed:
                self.on_change()

    def _apply(self, table: str, field: str, value: dict[str, Any] | None) -> bool:
        now = time.time()
        if table == "marks" and value is not None:
            return self.pool.apply_marks(field, value)
        if table == "breakers" and value is not None:
            return self.pool.apply_breaker(field, value)
        if table == "cooldowns":
            project, _, model = field.partition(SEP)
            if value is None:
                return self.pool.apply_cooldown(project, model, None, "")
            until = float(value["until"])
            return until > now and self.pool.apply_cooldown(
                project, model, until, str(value["reason"])
            )
        if table == "spends" and value is not None and self.budgets is not None:
            project, model = field.split(SEP, 1)
            before = value.get("b")
            before = None if before is None else int(before)
            self.budgets.spent_elsewhere(
                project, model, float(value["at"]), int(value["n"]), before, now
            )
            return False  # counts are not persisted
        if table == "limits" and value is not None and self.budgets is not None:
            project, model, kind = field.split(SEP, 2)
            row = {"project": project, "model": model, "kind": kind, **value}
            return self.budgets.restore_learned([row]) > 0
        if table == "pins" and value is not None:
            kind, _, name = field.partition(SEP)
            pin = Pin(
                kind, name, str(value["owner"]), str(value.get("path", "")), float(value["expires"])
            )
            return self.pins.restore([pin], now) > 0
        return False

    # ------------------------------------------------------------------ work done once

    async def grant_probes(self, now: float) -> None:
        """Breakers waiting for their half-open probe: one worker across the pool gets it."""
        for state in self.pool.keys.values():
            state.breaker.shared = self.up  # keys a reload added, too
        if not self.up or self._redis is None:
            return
        for state in self.pool.keys.values():
            if state.breaker.wants_probe(now):
                with contextlib.suppress(RedisError, OSError):
                    got = await self._redis.set(
                        self._k(f"probe:{state.spec.fingerprint}"),
                        self.worker,
                        nx=True,
                        px=PROBE_LOCK_MS,
                    )
                    state.breaker.probe_granted = bool(got)

    async def claim_check(self, state: KeyState) -> bool:
        """May this worker run the no-quota check of `state` now? (One worker across the pool.)"""
        if not self.up or self._redis is None:
            return True
        try:
            got = await self._redis.set(
                self._k(f"check:{state.spec.fingerprint}"), self.worker, nx=True, px=CHECK_LOCK_MS
            )
        except (RedisError, OSError):
            return True  # Redis just went away: checking twice beats not checking
        return bool(got)


async def _first_failure(*coros: Any) -> None:
    """Run until one of them ends (they only end by failing); cancel the others with it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raises what ended it
        raise ConnectionError("the connection to Redis ended")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
