"""Several workers, one pool: three real mitmdump workers sharing key state on a real redis-server."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from ..conftest import Fake, Proxy, free_port, gen_body, key_entry, new_secret, wait_for
from .test_operations import sample
from .test_proxy import FLASH, gen

PRO = "gemini-2.5-pro"


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is missing (./scripts/test installs it from the OS packages)")
        self.exe, self.dir, self.port = exe, workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_for(lambda: client.ping(), timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def workers(
    make_proxy: Callable[..., Proxy],
    server: RedisServer,
    keys: list[dict[str, Any]],
    n: int = 3,
    prefix: str | None = None,
    first: int = 1,
    **options: Any,
) -> list[Proxy]:
    prefix = prefix or "t-" + secrets.token_hex(4)
    return [
        make_proxy(
            keys,
            options={
                "gemini_redis": server.url,
                "gemini_redis_prefix": prefix,
                "gemini_worker": f"w{first + i}",
                **options,
            },
        )
        for i in range(n)
    ]


async def generate_status(s: aiohttp.ClientSession, w: Proxy) -> int:
    """One generateContent through worker `w`: its status."""
    async with s.post(
        f"{w.url}/v1beta/models/{FLASH}:generateContent",
        json=gen_body(),
        headers={"x-goog-api-key": "u"},
    ) as r:
        await r.read()
        return r.status


def shared_up(p: Proxy) -> bool:
    return bool(p.admin.get("/readyz").json().get("shared_state", {}).get("up"))


def test_what_one_worker_learns_the_others_know_at_once(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    dead, day, ok1, ok2 = (new_secret() for _ in range(4))
    fake.configure({dead: "dead", day: "ok", ok1: "ok", ok2: "ok"}, models={day: {PRO: "day"}})
    keys = [
        key_entry("dead", dead, weight=50),
        key_entry("day", day, project="p-day", weight=50),
        key_entry("ok1", ok1),
        key_entry("ok2", ok2),
    ]
    w1, w2, w3 = workers(make_proxy, redis_server, keys)
    wait_for(lambda: all(shared_up(w) for w in (w1, w2, w3)))
    assert gen(w1).status_code == 200  # meets the dead key first (weight), served elsewhere
    assert gen(w1, model=PRO).status_code == 200  # day's project is out of daily quota for pro
    w1.wait_key("dead", "dead")
    t0 = time.monotonic()
    for w in (w2, w3):
        w.wait_key("dead", "dead")
        wait_for(lambda w=w: PRO in w.keys_state()["day"]["cooldowns"])
    learned = time.monotonic() - t0
    # the dead-key check ran once across the pool, not once per worker
    assert len(fake.checks()) == 1
    mark = len(fake.log())
    for w in (w2, w3):
        for _ in range(6):
            assert gen(w).status_code == 200 and gen(w, model=PRO).status_code == 200
    after = fake.log()[mark:]
    assert dead not in {e["key"] for e in after}
    assert day not in {e["key"] for e in after if e["model"] == PRO}
    # an operator action on one worker's admin API holds on all of them
    w2.admin.post("/admin/keys/ok1/disable").raise_for_status()
    for w in (w1, w3):
        wait_for(lambda w=w: w.keys_state()["ok1"]["enabled"] is False)
    mark = len(fake.log())
    for w in (w1, w3):
        for _ in range(4):
            assert gen(w).status_code == 200
    assert ok1 not in {e["key"] for e in fake.log()[mark:]}
    # a worker started later picks up the pool's state
    (w4,) = workers(
        make_proxy, redis_server, keys, n=1, prefix=w1.options["gemini_redis_prefix"], first=4
    )
    wait_for(lambda: w4.keys_state()["dead"]["status"] == "dead")
    state = w4.keys_state()
    assert state["ok1"]["enabled"] is False and PRO in state["day"]["cooldowns"]
    m = w4.metrics()
    assert sample(m, "gemini_proxy_shared_state_up") == 1
    assert sample(m, "gemini_proxy_worker_info", worker="w4") == 1
    print(f"learned by the other workers within {learned * 1000:.0f} ms (polling included)")


def test_an_upload_started_on_one_worker_goes_on_through_another(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    keys = [key_entry("a", a, project="p1"), key_entry("b", b, project="p2")]
    clients = [{"name": "app", "token": "tok-app-1"}]
    w1, w2 = workers(make_proxy, redis_server, keys, n=2)
    for w in (w1, w2):
        w.write_keys(keys, clients)
    wait_for(lambda: all(w.admin.get("/readyz").json()["shared_state"]["up"] for w in (w1, w2)))
    # both have read the clients (each reloads the key file on its own): a worker without them
    # would take the bytes as a loopback caller's, with any key
    for w in (w1, w2):
        wait_for(lambda w=w: w.http.post("/v1beta/models", headers={}).status_code == 401, 5)
    start = w1.http.post(
        "/upload/v1beta/files",
        headers={
            "x-goog-api-key": "tok-app-1",
            "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start",
        },
        json={"file": {"display_name": "x"}},
    )
    url = start.headers["x-goog-upload-url"]
    owner = start.headers["x-gemini-proxy-key"]
    path_and_query = url.split(str(w1.port), 1)[1]
    # the bytes go to the other worker at once, with nothing but the upload_id to go on: it waits
    # for the session's pin from Redis instead of refusing them
    done = w2.http.post(
        path_and_query,
        headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
        content=b"hello",
    )
    assert done.status_code == 200, done.text
    name = done.json()["file"]["name"]
    assert done.headers["x-gemini-proxy-key"] == owner
    # and the file it made is known to belong to its project on every worker
    for w in (w1, w2):
        for _ in range(3):
            r = w.http.get(f"/v1beta/{name}", headers={"x-goog-api-key": "tok-app-1"})
            assert r.status_code == 200 and r.headers["x-gemini-proxy-key"] == owner


def test_exactly_one_half_open_probe_across_the_workers(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    flaky, good = new_secret(), new_secret()
    fake.configure({flaky: "drop", good: "ok"})
    keys = [key_entry("flaky", flaky, weight=100), key_entry("good", good)]
    ws = workers(
        make_proxy,
        redis_server,
        keys,
        gemini_breaker_failures=1,
        gemini_breaker_cooldown_ms=1500,
        gemini_breaker_max_cooldown_ms=60000,
    )
    wait_for(lambda: all(shared_up(w) for w in ws))
    assert gen(ws[0]).status_code == 200  # flaky drops: its breaker opens; good serves
    for w in ws:
        wait_for(lambda w=w: w.keys_state()["flaky"]["breaker"]["state"] == "open")
    # the key works again, slowly: a probe takes 0.8 s, time enough for every worker to send one
    fake.configure({flaky: "slow:800", good: "ok"})

    async def load() -> list[int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            out: list[int] = []
            end = time.monotonic() + 2.5  # across the end of the cooldown and past it

            async def keep_sending(w: Proxy) -> None:  # each caller on its own: none waits
                while time.monotonic() < end:
                    out.append(await generate_status(s, w))
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(keep_sending(w) for w in ws for _ in range(2)))
            return out

    statuses = asyncio.run(load())
    assert set(statuses) == {200}
    tried = [e["t"] for e in fake.log() if e["key"] == flaky]
    probes = [t for t in tried if t < tried[0] + 0.6]  # sent while the first probe was running
    assert len(probes) == 1, f"{len(probes)} probes of the half-open breaker across 3 workers"
    # the probe succeeded: every worker uses the key again (awaited: the window above may close
    # right after the probe on a busy machine)
    for w in ws:
        before = len([e for e in fake.log() if e["key"] == flaky])
        wait_for(
            lambda w=w, before=before: (
                gen(w).status_code == 200
                and len([e for e in fake.log() if e["key"] == flaky]) > before
            ),
            timeout=10,
        )


def test_redis_going_away_fails_no_request_and_the_state_converges_after(
    fake: Fake, make_proxy: Any, redis_server: RedisServer
) -> None:
    a, b, z = new_secret(), new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok", z: "ok"})
    keys = [key_entry("a", a), key_entry("b", b), key_entry("z", z)]
    w1, w2, w3 = workers(make_proxy, redis_server, keys)
    wait_for(lambda: all(shared_up(w) for w in (w1, w2, w3)))
    results: list[int] = []

    async def load(seconds: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                w = (w1, w2, w3)[i % 3]
                i += 1
                try:
                    results.append(await generate_status(s, w))
                except aiohttp.ClientError:
                    results.append(0)

    async def scenario() -> None:
        runner = asyncio.create_task(load(3.0))
        await asyncio.sleep(0.5)
        redis_server.stop()  # killed under load
        await runner

    asyncio.run(scenario())
    assert results and set(results) == {200}, f"{results.count(0)} failed of {len(results)}"
    wait_for(lambda: not any(shared_up(w) for w in (w1, w2, w3)), timeout=10)
    ready = w1.admin.get("/readyz")
    assert ready.status_code == 200 and ready.json()["shared_state"]["up"] is False
    assert sample(w1.metrics(), "gemini_proxy_shared_state_up") == 0
    assert "shared state unreachable" in w1.logs()
    # learned while Redis is away: only w1 knows
    fake.configure({a: "ok", b: "ok", z: "dead"})
    w1.admin.post("/admin/keys/a/disable").raise_for_status()
    for _ in range(4):
        gen(w1)
    w1.wait_key("z", "dead")
    assert w2.keys_state()["z"]["status"] == "active"
    # meanwhile an operator changes z's weight on w2: newer, but it never saw the dead mark
    w2.admin.patch("/admin/keys/z", json={"weight": 5}).raise_for_status()
    # Redis comes back empty: the workers reconnect, merge both ways, the state converges
    redis_server.start()
    wait_for(lambda: all(shared_up(w) for w in (w1, w2, w3)), timeout=20)
    for w in (w1, w2, w3):  # both changes hold everywhere: the dead mark and the weight
        assert w.wait_key("z", "dead")["weight"] == 5
        wait_for(lambda w=w: w.keys_state()["a"]["enabled"] is False)
    stored = redis_server.client().hgetall(f"{w1.options['gemini_redis_prefix']}:marks")
    assert len(stored) == 3  # republished into the empty Redis
