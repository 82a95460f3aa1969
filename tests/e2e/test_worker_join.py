"""A worker that joins serves nothing before it knows the pool (real mitmdump workers, redis-server).

Worker 1 learns a dead key and a cooling project, and an operator disables a key. Worker 2 then
starts; its very first requests (sent the moment its port opens) must go to none of the three.
Three runs, as the issue's reproduction had.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp

from ..conftest import Fake, Proxy, key_entry, new_secret, wait_for
from .test_proxy import FLASH, gen
from .test_workers import RedisServer, generate_status, redis_server, workers

__all__ = ["redis_server"]  # the fixture, imported for pytest


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_a_joining_worker_takes_no_request_before_its_first_sync(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    dead, cool, off, good = (new_secret() for _ in range(4))
    fake.configure(
        {dead: "dead", cool: "ok", off: "ok", good: "ok"}, models={cool: {FLASH: "minute:600"}}
    )
    keys = [  # an empty state picks the bad ones first: they weigh 50 times more
        key_entry("dead", dead, weight=50),
        key_entry("cool", cool, project="p-cool", weight=50),
        key_entry("off", off, weight=50),
        key_entry("good", good),
    ]
    (w1,) = workers(make_proxy, redis_server, keys, n=1)
    prefix = w1.options["gemini_redis_prefix"]
    w1.admin.post("/admin/keys/off/disable").raise_for_status()
    for _ in range(4):
        assert gen(w1).status_code == 200
    w1.wait_key("dead", "dead")
    wait_for(lambda: FLASH in w1.keys_state()["cool"]["cooldowns"])
    r = redis_server.client()

    def in_redis() -> bool:
        marks = [json.loads(v) for v in r.hvals(f"{prefix}:marks")]
        return (
            any(m.get("dead") for m in marks)
            and any(m.get("enabled") is False for m in marks)
            and r.hlen(f"{prefix}:cooldowns") >= 1
        )

    wait_for(in_redis)
    bad = {dead, cool, off}
    for run in range(3):
        w2 = make_proxy(  # a fresh worker: its own empty SQLite file
            keys,
            start=False,
            options={
                "gemini_redis": redis_server.url,
                "gemini_redis_prefix": prefix,
                "gemini_worker": f"w{2 + run}",
            },
        )
        mark = len(fake.log())
        w2.start(wait=False)
        wait_for(lambda w2=w2: port_open(w2.port), timeout=30, interval=0.005)

        async def first_requests(w: Proxy = w2) -> list[int]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                return list(await asyncio.gather(*(generate_status(s, w) for _ in range(6))))

        statuses = asyncio.run(first_requests())
        assert statuses == [200] * 6, statuses
        used = [e["key"] for e in fake.log()[mark:]]
        assert not bad & set(used), f"run {run}: a joining worker used {used}"
        ready = w2.admin.get("/readyz").json()
        assert ready["ready"] and ready["shared_state"]["synced"], ready
        w2.stop()
