"""Key-pool state shared by several workers through Redis (or Valkey): optional (gemini_redis).

What one worker learns, every worker knows within milliseconds: dead and suspect marks with their
reasons and operator overrides (by key fingerprint), breaker trips, cooldowns per project x model,
project pins (files, cached contents, batches, upload sessions), and budget limits learned from
Google's 429s (per project x model x kind; the newer wins). Selection never waits on
Redis: each worker decides from its local state; changes are queued, written and published by a
background task, and other workers apply what they hear. Two locks make work happen once across
the pool: the half-open probe of a breaker, and the no-quota check of a key that answered dead
(shared_locks.py). A creation waits until Redis holds it (`written`) and a worker reads what it
has not heard of yet on demand (`learn_pins`, `learn_upload` in shared_reads.py): read your own
writes.

This module stays whole (about 500 lines) on purpose: the queue, the merge scripts, the resync and
the listener are one protocol, and each half only makes sense next to the other. What has its own
concern lives beside it: shared_locks, shared_reads, shared_limits, shared_spends, shared_answers,
shared_scripts.

Redis is no single point of failure: while it is unreachable workers serve on their local state
(`up` is False, `gemini_proxy_shared_state_up` 0), reconnect with back-off, and on reconnect merge
both ways: they read everything, keep what is newer (an expiry: the later one; marks and
overrides: the newer change, so a dead mark stays until someone enables the key), and write back
everything they know (a Redis restarted empty gets the whole state again).

Layout (every key under `prefix:`): hashes `marks` and `breakers` (field: key fingerprint),
`cooldowns` (field: project, model), `pins` (field: kind, name), `learned` (budget limits learned from
Google; field: project, model, kind), `limits` (client limits, shared_limits.py); channel `events`; locks
`probe:<fingerprint>` and `check:<fingerprint>` (SET NX PX); list `away` (budget spends made while
a worker was cut off, shared_spends.py); strings `answer:<hash>` (the answer cache,
shared_answers.py). Never a secret: fingerprints, names.

Entries that expire (cooldowns, pins, upload sessions) are deleted from Redis once expired, at
every sync and every PRUNE_EVERY seconds, by every worker (Redis 7.0 has no per-field TTL). A
field that does not parse is skipped with one warning, never a reconnect: the merge scripts
overwrite it on the next write. A worker that joins takes no request before its first sync
(`await_ready`), or READY_WAIT seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics, shared_reads
from .budgets import Budgets
from .pins import Pin, ResourcePins
from .redis_url import shown
from .selector import KeyPool, KeyState
from .shared_locks import SharedLocks
from .shared_reads import SEP as SEP  # between the parts of a hash field
from .shared_scripts import MERGE as _MERGE
from .shared_scripts import MERGE_MARKS as _MERGE_MARKS
from .shared_scripts import RELEASE as _RELEASE
from .shared_spends import AwaySpends

log = logging.getLogger("gemini_proxy")

QUEUE_LIMIT = 50_000  # changes waiting to be written; past it they are dropped, then resynced
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
READY_WAIT = 5.0  # longest a joining worker holds requests back waiting for its first sync
PRUNE_EVERY = 300.0  # seconds between deletions of expired entries from Redis
WARNED_LIMIT = 1000  # malformed fields remembered (each is warned about once)

_ORDER = {"marks": "t", "breakers": "t", "cooldowns": "until", "pins": "expires", "learned": "at"}
_EXPIRY = {"cooldowns": "until", "pins": "expires"}  # tables whose entries expire


class SharedState:
    def __init__(
        self,
        pool: KeyPool,
        pins: ResourcePins,
        url: str,
        prefix: str,
        worker: str,
        on_change: Callable[[], None] = lambda: None,
        *,
        socket_timeout: float = 5.0,
        ready_wait: float = READY_WAIT,
    ) -> None:
        self.pool, self.pins = pool, pins
        self.url, self.prefix, self.worker = url, prefix, worker
        self.on_change = on_change  # local state changed (persist it)
        self.socket_timeout, self.ready_wait = socket_timeout, ready_wait
        self.up = False
        self.last_error: str | None = None
        self.ready = asyncio.Event()  # set by the first sync, or after `ready_wait` without one
        self.syncs = 0  # full syncs with Redis (one per connection)
        self._warned: set[tuple[str, str]] = set()
        self._queue: asyncio.Queue[tuple[str, str, dict[str, Any] | None]] = asyncio.Queue(
            QUEUE_LIMIT
        )
        self._overflow = False
        self._queued = 0  # changes queued so far ...
        self._written = 0  # ... and written to Redis (or superseded by a full resync)
        self._progress = asyncio.Event()  # set (and replaced) whenever `_written` moves
        self._task: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._release: Any = None
        self._merge_marks: Any = None
        self.budgets: Budgets | None = None  # learned limits are shared when set
        self.away = AwaySpends(prefix, worker)  # budget spends made while Redis was away
        self.locks = SharedLocks(self)  # probes and key checks: one worker across the pool

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
        field = f"{pin.kind}{SEP}{pin.name}"
        self._put("pins", field, _pin_value(pin))  # published: the other workers drop it too
        if pin.expires <= time.time():
            # ended (an upload finalized, a resource deleted, an owner forgotten): Redis's merge
            # keeps the longer expiry, and a worker catching up (learn_upload, learn_pins) would
            # take it back from there; delete it outright
            self._put("pins", field, None)

    def limit_learned(self, project: str, model: str, kind: str, value: int, at: float) -> None:
        self._put("learned", SEP.join((project, model, kind)), {"value": value, "at": at})

    def spent(self, project: str, model: str, at: float, tokens: int, before: int | None) -> None:
        """An attempt charged to a limited project x model (or its correction): published only,
        never stored (counts are transient; each worker keeps its own)."""
        self._put("spends", SEP.join((project, model)), {"at": at, "n": tokens, "b": before})

    def _put(self, table: str, field: str, value: dict[str, Any] | None) -> None:
        try:
            self._queue.put_nowait((table, field, value))
            self._queued += 1
        except asyncio.QueueFull:
            self._overflow = True  # written in full at the next resync

    def client(self) -> aioredis.Redis | None:
        """The connection while Redis is up (client limits share counts on it), else None."""
        return self._redis if self.up else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run())
            loop.call_later(self.ready_wait, self._ready_anyway)

    def _ready_anyway(self) -> None:
        if not self.ready.is_set():
            log.warning(
                "gemini-proxy: no sync with the shared state within %.0f s of start (%s): "
                "serving on this worker's local state until it comes",
                self.ready_wait,
                self.last_error or "Redis did not answer",
            )
            self.ready.set()

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
        return shown(self.url)  # no credentials in logs

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
                    socket_timeout=self.socket_timeout,
                    health_check_interval=5,
                    decode_responses=True,
                    encoding_errors="replace",  # bytes that are no UTF-8: a malformed field
                )
                await self._redis.ping()
                merge = self._redis.register_script(_MERGE)
                self._merge_marks = self._redis.register_script(_MERGE_MARKS)
                self._release = self._redis.register_script(_RELEASE)
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self._k("events"))
                await self._resync(merge)
                self._set_up(True)
                self.ready.set()
                attempt = 0
                await _first_failure(self._listen(pubsub), self._write(merge), self._prune())
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
        now = time.time()
        for table in _ORDER:
            entries = await self._redis.hgetall(self._k(table))
            expired = list(self._apply_stored(table, entries.items(), now))
            if expired:
                await self._redis.hdel(self._k(table), *expired)
        self.syncs += 1
        self._overflow = False
        away: list[tuple[str, str, dict[str, Any] | None]] = []
        while not self._queue.empty():  # superseded by the full state below, but for spends:
            item = self._queue.get_nowait()  # attempts made while away (shared_spends.py)
            if item[0] == "spends":
                away.append(item)
        told = await self.away.exchange(self._redis, away, self._apply)
        if told is not None:
            await self._redis.publish(self._k("events"), json.dumps(told))
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
            items.append(("pins", f"{pin.kind}{SEP}{pin.name}", _pin_value(pin)))
        if self.budgets is not None:
            for r in self.budgets.learned_rows():
                field = SEP.join((r["project"], r["model"], r["kind"]))
                items.append(("learned", field, {"value": r["value"], "at": r["at"]}))
        await self._flush(merge, items, publish=True)
        self._advance(self._queued)  # what was queued before is superseded by the full state
        self.on_change()

    def _apply_stored(
        self, table: str, entries: Iterable[tuple[Any, Any]], now: float
    ) -> Iterable[str]:
        """Apply fields read from Redis; yield the ones that have expired (to delete)."""
        for field, raw in entries:
            try:
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise TypeError(f"a JSON {type(value).__name__}, not an object")
                until = value.get(_EXPIRY[table]) if table in _EXPIRY else None
                if until is not None and float(until) <= now:
                    yield str(field)
                    continue
                self._apply(table, str(field), value)
            except Exception as e:  # whatever is in there: skip it, keep the connection
                self._malformed(table, str(field), e)

    def _malformed(self, table: str, field: str, e: Exception) -> None:
        if (table, field) in self._warned:
            return
        if len(self._warned) < WARNED_LIMIT:
            self._warned.add((table, field))
        log.warning(
            "gemini-proxy: skipping a malformed shared-state field %s %r: %s: %s",
            self._k(table),
            field[:80],
            type(e).__name__,
            str(e)[:200],
        )

    async def _prune(self) -> None:
        """Delete expired cooldowns, pins and upload sessions from Redis, now and then."""
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            assert self._redis is not None
            now = time.time()
            for table in _EXPIRY:
                expired = []
                async for field, raw in self._redis.hscan_iter(self._k(table), count=500):
                    with contextlib.suppress(Exception):
                        value = json.loads(raw)
                        if float(value[_EXPIRY[table]]) <= now:
                            expired.append(field)
                for i in range(0, len(expired), 500):
                    await self._redis.hdel(self._k(table), *expired[i : i + 500])

    async def _write(self, merge: Any) -> None:
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty() and len(items) < 500:
                items.append(self._queue.get_nowait())
            await self._flush(merge, items, publish=True)
            self._advance(self._written + len(items))
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
            changed = False
            try:
                doc = json.loads(message["data"])
                if doc.get("w") == self.worker:
                    continue
                if "id" in doc and not self.away.first_time(str(doc["id"])):
                    continue  # spends made while away, counted from the list already
                for item in doc["items"]:
                    try:
                        table, field, value = item
                        changed |= self._apply(table, field, value)
                    except Exception as e:  # one bad item spoils nothing else
                        self._malformed("events", repr(item)[:80], e)
            except Exception as e:  # never a reason to drop the subscription
                log.warning(
                    "gemini-proxy: ignoring a malformed shared-state event: %s: %s",
                    type(e).__name__,
                    str(e)[:200],
                )
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
        if table == "learned" and value is not None and self.budgets is not None:
            project, model, kind = field.split(SEP, 2)
            row = {"project": project, "model": model, "kind": kind, **value}
            return self.budgets.restore_learned([row]) > 0
        if table == "pins" and value is not None:
            kind, _, name = field.partition(SEP)
            pin = Pin(
                kind,
                name,
                str(value["owner"]),
                str(value.get("path", "")),
                float(value["expires"]),
                str(value.get("sealed", "")),
            )
            return self.pins.restore([pin], now) > 0
        return False

    def _advance(self, written: int) -> None:
        self._written = max(self._written, written)
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def written(self, wait: float) -> bool:
        """Wait, at most `wait` seconds, until every change queued so far is in Redis. A creation
        answer leaves only then, so that the caller's next request finds what it created on any
        worker (read your own writes). False if Redis is away or slower than that."""
        target = self._queued
        deadline = time.monotonic() + wait
        while self._written < target:
            left = deadline - time.monotonic()
            if left <= 0 or not self.up:
                return False
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except TimeoutError:
                return False
        return True

    # reads on demand (shared_reads.py): a resource or an upload this worker has not heard of
    learn_pins = shared_reads.learn_pins
    learn_upload = shared_reads.learn_upload


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


def _pin_value(pin: Pin) -> dict[str, Any]:
    """A pin as its Redis hash field's value (an upload's sealed id only where there is one)."""
    value: dict[str, Any] = {"owner": pin.owner, "path": pin.path, "expires": pin.expires}
    if pin.sealed:
        value["sealed"] = pin.sealed
    return value


async def await_ready(get: Callable[[], SharedState | None], timeout: float = READY_WAIT) -> None:
    """The request path's wait for a joining worker's first sync with the pool (bounded).

    `get` returns the worker's SharedState; it is None until the event loop runs, though sharing
    is configured. Returns at once once the first sync is done (or `ready_wait` has passed).
    """
    shared = get()
    if shared is not None and shared.ready.is_set():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while shared is None:
        if loop.time() >= deadline:
            return
        await asyncio.sleep(0.01)
        shared = get()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shared.ready.wait(), max(0.0, deadline - loop.time()))
