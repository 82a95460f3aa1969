#!/usr/bin/env python3
"""Measure several workers sharing one pool (gemini_redis), against the fake Gemini on loopback.

1. propagation: worker A meets a per-minute 429 on a project; how long until worker B's state
   has that project x model cooling (polled on B's admin API, so an upper bound), over N rounds;
2. throughput of unary generateContent at concurrency C: one worker without Redis, one worker
   with Redis, two workers with Redis behind HAProxy (TCP, round robin); with each setup's
   worker CPU per request and the load generator's own CPU.
Not part of the test suite; needs redis-server and haproxy (./scripts/run --workers installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from _benchlib import cpu_seconds, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLASH = "gemini-2.5-flash"
BODY = b'{"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}]}'


class Stack:
    """The processes of one setup; stopped together."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"p{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def worker(
    stack: Stack, upstream: str, keys: Path, name: str, redis: str | None, prefix: str = "bench"
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin = free_port(), free_port()
    cmd = [
        str(BIN / "mitmdump"), "-q", "-s", str(ROOT / "addon" / "gemini_proxy.py"),
        "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1", "-p", str(port),
        "--set", f"gemini_keys={keys}", "--set", f"gemini_db={stack.work / (name + '.db')}",
        "--set", f"gemini_admin=127.0.0.1:{admin}", "--set", f"gemini_worker={name}",
    ]  # fmt: skip
    if redis:
        cmd += ["--set", f"gemini_redis={redis}", "--set", f"gemini_redis_prefix={prefix}"]
    proc = stack.spawn(*cmd, env={**os.environ, "GEMINI_ADMIN_TOKEN": "bench-admin"})
    wait_port(port)
    wait_port(admin)
    return proc, port, admin


async def load(url: str, seconds: float, concurrency: int) -> tuple[int, int]:
    ok = errors = 0
    end = time.monotonic() + seconds
    headers = {"x-goog-api-key": "u", "content-type": "application/json"}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one() -> None:
            nonlocal ok, errors
            while time.monotonic() < end:
                try:
                    async with s.post(url, data=BODY, headers=headers) as r:
                        await r.read()
                        ok, errors = (ok + 1, errors) if r.status == 200 else (ok, errors + 1)
                except aiohttp.ClientError:
                    errors += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return ok, errors


def measure(
    url: str, pids: list[int], seconds: float, concurrency: int
) -> tuple[float, float, float, int]:
    asyncio.run(load(url, 1.0, concurrency))  # warm up
    cpu0 = sum(cpu_seconds(p) for p in pids)
    me0 = time.process_time()
    t0 = time.monotonic()
    ok, errors = asyncio.run(load(url, seconds, concurrency))
    elapsed = time.monotonic() - t0
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    return ok / elapsed, cpu / max(ok, 1) * 1000, (time.process_time() - me0) / elapsed, errors


def haproxy_cfg(work: Path, port: int, backends: list[int]) -> Path:
    servers = "\n".join(f"    server w{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    cfg = work / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 5s\n"
        "    timeout client 10m\n    timeout server 10m\n"
        f"frontend gemini\n    bind 127.0.0.1:{port}\n    default_backend workers\n"
        f"backend workers\n    balance roundrobin\n{servers}\n"
    )
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=40, help="propagation rounds")
    ap.add_argument("--seconds", type=float, default=5.0, help="each throughput run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for exe in ("redis-server", "haproxy"):
        if shutil.which(exe) is None:
            sys.exit(f"{exe} is missing: apt-get install redis-server haproxy")
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    base = Stack(work)
    try:
        redis_port = free_port()
        base.spawn("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(work))  # fmt: skip
        redis = f"redis://127.0.0.1:{redis_port}/0"
        secrets_ = [f"bench-{secrets.token_hex(12)}" for _ in range(max(args.rounds, 10))]
        fake_port = free_port()
        base.spawn(sys.executable, str(ROOT / "scripts" / "fake_gemini.py"), "--port",
                   str(fake_port), "--keys", ",".join(f"{s}=ok" for s in secrets_))  # fmt: skip
        wait_port(fake_port)
        wait_port(redis_port)
        upstream = f"http://127.0.0.1:{fake_port}"
        keys = work / "keys.yaml"
        keys.write_text(
            "keys:\n"
            + "".join(
                f"  - {{name: k{i}, key: {s}, project: p{i}}}\n" for i, s in enumerate(secrets_)
            )
        )
        print(f"work dir {work}; {len(secrets_)} keys, each its own project\n")

        # 1. propagation of a 429 from worker A to worker B
        stack = Stack(work)
        _, a_port, _ = worker(stack, upstream, keys, "A", redis)
        _, _, b_admin = worker(stack, upstream, keys, "B", redis)
        import httpx2 as httpx

        fake = httpx.Client(base_url=upstream)
        b = httpx.Client(
            base_url=f"http://127.0.0.1:{b_admin}", headers={"Authorization": "Bearer bench-admin"}
        )
        a = httpx.Client(base_url=f"http://127.0.0.1:{a_port}")
        time.sleep(1.0)
        latencies = []
        for i in range(args.rounds):
            s = secrets_[i]
            fake.post(
                "/_fake/config",
                json={"keys": {x: "ok" for x in secrets_}, "models": {s: {FLASH: "minute:300"}}},
            )
            for _ in range(len(secrets_) + 1):  # until A's rotation reaches k{i}
                r = a.post(
                    f"/v1beta/models/{FLASH}:generateContent",
                    content=BODY,
                    headers={"x-goog-api-key": "u"},
                )
                if int(r.headers.get("x-gemini-proxy-attempts", "1")) > 1:
                    break
            t0 = time.perf_counter()
            while FLASH not in b.get(f"/admin/keys/k{i}").json()["cooldowns"]:
                if time.perf_counter() - t0 > 5:
                    raise SystemExit(f"round {i}: B never learned the cooldown")
            latencies.append((time.perf_counter() - t0) * 1000)
        stack.stop()
        fake.post("/_fake/config", json={"keys": {x: "ok" for x in secrets_}, "models": {}})
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"429 learned by A, cooling on B after: p50 {statistics.median(latencies):.1f} ms, "
            f"p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms ({len(latencies)} rounds; "
            "each poll of B's admin API costs ~1-2 ms, included)\n"
        )

        # 2. throughput
        rows: dict[str, list[tuple[float, float, float, int]]] = {}
        for rep in range(args.repeats):
            for setup in ("1 worker", "1 worker + Redis", "2 workers + Redis + HAProxy"):
                stack = Stack(work)
                use_redis = redis if "Redis" in setup else None
                n = 2 if setup.startswith("2") else 1
                prefix = f"tp{rep}{n}"  # a pool of its own: no cooldown from the rounds above
                procs = [
                    worker(stack, upstream, keys, f"t{j}", use_redis, prefix) for j in range(n)
                ]
                port = procs[0][1]
                if n > 1:
                    port = free_port()
                    cfg = haproxy_cfg(work, port, [p[1] for p in procs])
                    stack.spawn("haproxy", "-f", str(cfg))
                    wait_port(port)
                url = f"http://127.0.0.1:{port}/v1beta/models/{FLASH}:generateContent"
                rows.setdefault(setup, []).append(
                    measure(url, [p[0].pid for p in procs], args.seconds, args.concurrency)
                )
                stack.stop()
        print(f"unary generateContent, concurrency {args.concurrency}, median of {args.repeats} runs "
              "(setups interleaved; client, fake, Redis, HAProxy and workers share the cores):\n")  # fmt: skip
        print(
            "| setup | req/s | vs 1 worker | worker CPU ms/req | load generator CPU (cores) | errors |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        first = statistics.median(r[0] for r in rows["1 worker"])
        for setup, runs in rows.items():
            rps = statistics.median(r[0] for r in runs)
            print(
                f"| {setup} | {rps:.0f} | {rps / first:.2f}x | "
                f"{statistics.median(r[1] for r in runs):.2f} | "
                f"{statistics.median(r[2] for r in runs):.2f} | {sum(r[3] for r in runs)} |"
            )
    finally:
        base.stop()


if __name__ == "__main__":
    main()
