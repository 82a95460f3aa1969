"""The shared state against a real redis-server: idle subscriptions, malformed fields, expiry, and
a joining worker's readiness. Two SharedStates in one event loop stand for two workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from gemini_pool.config import Config, KeySpec
from gemini_pool.pins import KIND_RESOURCE, Pin, ResourcePins
from gemini_pool.selector import KeyPool, PoolPolicy
from gemini_pool.shared import SEP, SharedState, await_ready

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is missing (./scripts/test installs it from the OS packages)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait(5)


def worker(url: str, name: str, prefix: str = "t", **kw: float) -> SharedState:
    pool = KeyPool(PoolPolicy())
    pool.apply_config(Config((KeySpec("a", "secret-a", "pa", 1, True),), (), "test"))
    shared = SharedState(pool, ResourcePins(), url, prefix, name, **kw)
    pool.on_change = shared.key_changed
    return shared


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def two_workers_up(url: str) -> AsyncIterator[tuple[SharedState, SharedState]]:
    """Two workers on one Redis, both synced; stopped at the end."""
    w1, w2 = worker(url, "w1"), worker(url, "w2")
    for w in (w1, w2):
        w.start()
    try:
        await until(lambda: w1.up and w2.up)
        yield w1, w2
    finally:
        await w1.stop()
        await w2.stop()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 50))


def test_an_idle_worker_stays_subscribed_past_the_socket_timeout(redis_url: str) -> None:
    """redis-py before 8.0.1 timed an idle async pub/sub out every socket_timeout (a resync)."""

    async def scenario() -> None:
        w1, w2 = worker(redis_url, "w1", socket_timeout=0.3), worker(redis_url, "w2")
        w1.start()
        w2.start()
        try:
            await until(lambda: w1.ready.is_set() and w2.ready.is_set() and w1.up and w2.up)
            await asyncio.sleep(2.0)  # idle for over 6 socket timeouts: nothing to await instead
            assert w1.up and w1.syncs == 1, (w1.syncs, w1.last_error)
            w2._put("cooldowns", f"pa{SEP}m", {"until": time.time() + 60, "reason": "test"})
            await until(lambda: ("pa", "m") in w1.pool.cooldowns)  # still listening
            assert w1.syncs == 1
        finally:
            await w1.stop()
            await w2.stop()

    run(scenario)


def test_malformed_fields_are_skipped_with_one_warning_and_no_reconnect(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = redis.Redis.from_url(redis_url)
    fp = next(iter(worker(redis_url, "x").pool.keys.values())).spec.fingerprint
    r.hset("t:marks", fp, b"{not json")
    r.hset("t:breakers", "zz", b"[1, 2]")
    r.hset("t:cooldowns", f"pa{SEP}m".encode(), b"\xff\xfe\x00")
    r.hset("t:cooldowns", f"pa{SEP}n", json.dumps({"until": "soon", "reason": 3}))
    r.hset("t:pins", f"{KIND_RESOURCE}{SEP}files/x", json.dumps({"owner": None}))
    good = {"until": time.time() + 300, "reason": "429 test"}
    r.hset("t:cooldowns", f"pa{SEP}ok", json.dumps(good))
    caplog.set_level(logging.WARNING, "gemini_proxy")

    async def scenario() -> None:
        w = worker(redis_url, "w1")
        w.start()
        try:
            await until(lambda: w.ready.is_set() and w.up)
            assert ("pa", "ok") in w.pool.cooldowns  # the good field next to them was applied
            # events that do not parse: skipped, still subscribed
            r.publish("t:events", "[1]")
            r.publish("t:events", json.dumps({"w": "other", "items": [[1], ["pins", "a", 7]]}))
            r.publish(
                "t:events", json.dumps({"w": "other", "items": [["cooldowns", f"pb{SEP}m", good]]})
            )
            await until(lambda: ("pb", "m") in w.pool.cooldowns)
            # a write onto a malformed field replaces it (the merge script does not fail)
            w.key_changed("marks", next(iter(w.pool.keys.values())))
            await until(lambda: r.hget("t:marks", fp) not in (None, b"{not json"))
            await asyncio.sleep(0.3)  # a reconnect would show as a second sync
            assert w.up and w.syncs == 1, w.last_error
        finally:
            await w.stop()

    run(scenario)
    warnings = [m.getMessage() for m in caplog.records if "malformed" in m.getMessage()]
    assert len([m for m in warnings if "shared-state field" in m]) == 5 + 2, warnings  # 5 stored
    assert len([m for m in warnings if "shared-state event" in m]) == 1, warnings  # "[1]"
    assert not any("unreachable" in m.getMessage() for m in caplog.records)


def test_expired_cooldowns_and_pins_are_deleted_from_redis(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    now = time.time()
    r.hset("t:cooldowns", f"pa{SEP}old", json.dumps({"until": now - 1, "reason": "x"}))
    r.hset("t:cooldowns", f"pa{SEP}new", json.dumps({"until": now + 300, "reason": "x"}))
    pin = {"owner": "pa", "path": "", "expires": now - 1}
    r.hset("t:pins", f"{KIND_RESOURCE}{SEP}files/old", json.dumps(pin))
    r.hset("t:pins", f"{KIND_RESOURCE}{SEP}files/new", json.dumps({**pin, "expires": now + 300}))

    async def scenario() -> None:
        w = worker(redis_url, "w1")
        w.start()
        try:
            await until(lambda: w.ready.is_set() and w.up)
        finally:
            await w.stop()

    run(scenario)
    assert set(r.hkeys("t:cooldowns")) == {f"pa{SEP}new"}
    assert set(r.hkeys("t:pins")) == {f"{KIND_RESOURCE}{SEP}files/new"}


def test_a_joining_worker_is_ready_after_its_first_sync_or_after_a_bounded_wait(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gemini_proxy")

    async def scenario() -> None:
        w = worker(redis_url, "w1")
        assert not w.ready.is_set()
        w.start()
        await await_ready(lambda: w, timeout=10)
        assert w.ready.is_set() and w.syncs == 1
        await w.stop()
        # Redis unreachable: ready after `ready_wait`, with a warning
        dead = worker(f"redis://127.0.0.1:{_free_port()}/0", "w2", ready_wait=0.5)
        dead.start()
        await await_ready(lambda: dead, timeout=10)
        assert dead.ready.is_set() and dead.syncs == 0
        await dead.stop()
        # sharing configured, the state not made yet: the wait is bounded too
        await await_ready(lambda: None, timeout=0.1)

    run(scenario)
    assert any("no sync with the shared state" in m.getMessage() for m in caplog.records)


def test_a_creation_is_in_redis_when_written_returns_and_a_miss_reads_it_once(
    redis_url: str,
) -> None:
    """Read your own writes across workers: the creating worker waits until Redis holds the pin;
    a worker that has not heard of it yet (its event still on the way) reads it from Redis."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    field = f"{KIND_RESOURCE}{SEP}files/new"

    async def scenario() -> None:
        async with two_workers_up(redis_url) as (w1, w2):
            pin = Pin(KIND_RESOURCE, "files/new", "pa", "", time.time() + 300)
            w1.pins.restore([pin], time.time())
            w1.pin_added(pin)
            assert await w1.written(5)
            assert r.hget("t:pins", field) is not None  # no wait: it is there already
            # a pin that only Redis holds (its publish not yet seen by w2)
            r.hset(
                "t:pins",
                f"{KIND_RESOURCE}{SEP}files/other",
                json.dumps({"owner": "pb", "path": "", "expires": time.time() + 300}),
            )
            assert w2.pins.project_for("v1beta/files/other", b"", time.time()) is None
            learnt = await w2.learn_pins([(KIND_RESOURCE, "files/other")], 2)
            assert learnt == 1
            assert w2.pins.project_for("v1beta/files/other", b"", time.time()) == "pb"
            # a name nobody created: one read, nothing learnt, no wait
            assert await w2.learn_pins([(KIND_RESOURCE, "files/nobody")], 2) == 0

    run(scenario)


def test_an_ended_pin_leaves_redis_so_no_worker_takes_it_back(redis_url: str) -> None:
    """A deleted resource: Redis's merge keeps the longer expiry, so the ended pin is deleted
    outright; a worker that reads Redis on a miss finds nothing to take back."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    field = f"{KIND_RESOURCE}{SEP}files/gone"

    async def scenario() -> None:
        async with two_workers_up(redis_url) as (w1, w2):
            w1.pin_added(Pin(KIND_RESOURCE, "files/gone", "pa", "", time.time() + 300))
            assert await w1.written(5) and r.hget("t:pins", field) is not None
            w1.pin_added(Pin(KIND_RESOURCE, "files/gone", "pa", "", time.time()))  # deleted
            assert await w1.written(5)
            assert r.hget("t:pins", field) is None
            assert await w2.learn_pins([(KIND_RESOURCE, "files/gone")], 2) == 0

    run(scenario)
