#!/usr/bin/env python3
"""Benchmark gemini-proxy against bare mitmdump and a direct connection, in one run.

All three sit in front of the project's fake Gemini on loopback:
  direct  - the client talks to the fake (the floor)
  bare    - mitmdump in reverse mode, streaming on, no addon (the floor for any mitmproxy addon)
  proxy   - mitmdump + gemini-proxy, 10 keys, SQLite on
Prints a markdown table with ratios to bare mitmdump and writes bench/RESULTS.md; a last pass
(`hooks`) times mitmproxy's dispatch of each hook at concurrency 1 (scripts/hook_timer.py).
Not part of the test suite: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK = os.sysconf("SC_CLK_TCK")
MODEL = "gemini-2.5-flash"
GEN_BODY = b'{"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}]}'
CHAT_BODY = (
    b'{"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "Hello there"}]}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # proxy CPU seconds
    rss_peak: float = 0.0
    rss_start: float = 0.0
    rss_end: float = 0.0
    # paired with bare mitmdump's run of the same repeat (the runs are interleaved)
    added_p50: list[float] = field(default_factory=list)
    added_ttfb: list[float] = field(default_factory=list)
    bytes: int = 0

    @property
    def n(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.n / self.elapsed if self.elapsed else 0.0

    def pct(self, values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000

    @property
    def cpu_ms(self) -> float:
        return self.cpu / self.n * 1000 if self.n else float("nan")


Request = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[float, float, int]]]


def unary(path: str, body: bytes, headers: dict[str, str]) -> Request:
    async def go(session: aiohttp.ClientSession, base: str) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        async with session.post(base + path, data=body, headers=headers) as r:
            first = await r.content.readany()
            t1 = time.perf_counter()
            rest = await r.read()
            if r.status != 200:
                raise RuntimeError(f"status {r.status}: {(first + rest)[:200]!r}")
            return time.perf_counter() - t0, t1 - t0, len(first) + len(rest)

    return go


def stream(events: int, event_bytes: int, headers: dict[str, str]) -> Request:
    h = {**headers, "x-fake-events": str(events), "x-fake-event-bytes": str(event_bytes)}
    path = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"

    async def go(session: aiohttp.ClientSession, base: str) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        async with session.post(base + path, data=GEN_BODY, headers=h) as r:
            first = await r.content.readany()
            t1 = time.perf_counter()
            n = len(first)
            async for chunk in r.content.iter_any():
                n += len(chunk)
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")
            return time.perf_counter() - t0, t1 - t0, n

    return go


async def drive(base: str, req: Request, concurrency: int, count: int, pid: int | None) -> Stats:
    stats = Stats()
    left = count
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=conn, timeout=timeout, auto_decompress=False
    ) as session:
        for _ in range(
            min(concurrency, 20)
        ):  # warm up connections and caches (and let a pool learn)
            with contextlib.suppress(Exception):
                await req(session, base)

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                try:
                    total, ttfb, n = await req(session, base)
                except Exception:
                    stats.errors += 1
                    continue
                stats.latencies.append(total)
                stats.ttfbs.append(ttfb)
                stats.bytes += n

        async def watch() -> None:
            while pid is not None:
                stats.rss_peak = max(stats.rss_peak, rss_mib(pid))
                await asyncio.sleep(0.05)

        cpu0 = cpu_seconds(pid) if pid else 0.0
        stats.rss_start = rss_mib(pid) if pid else 0.0
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stats.elapsed = time.perf_counter() - t0
        watcher.cancel()
        stats.cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
        stats.rss_end = rss_mib(pid) if pid else 0.0
    return stats


class Setup:
    def __init__(
        self, name: str, base: str, headers: dict[str, str], proc: subprocess.Popen[bytes] | None
    ):
        self.name, self.base, self.headers, self.proc = name, base, headers, proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_fake(keys: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    spec = ",".join(f"{k}={v}" for k, v in keys.items())
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "fake_gemini.py"),
            "--port",
            str(port),
            "--keys",
            spec,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port(port)
    return proc, port


def start_mitmdump(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", str(port), "-q", *args]
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    wait_port(port)
    time.sleep(0.5)
    return proc, port


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    from importlib.metadata import version

    return (
        f"{os.cpu_count()} cores ({cpu}), {int(mem) // 1024 // 1024} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, mitmproxy {version('mitmproxy')}, aiohttp {version('aiohttp')}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply request counts (0.2 for a quick look)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="runs per workload (the setups interleaved); the median is reported",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument(
        "--only",
        default="",
        help="comma list of workload names to run (unary-c1, ..., faulty-30%%, hooks)",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gemini-bench-"))
    good = [f"bench-{secrets.token_hex(12)}" for _ in range(10)]
    bad = {good[7]: "dead", good[8]: "minute:3600", good[9]: "day"}
    fake_keys = {k: "ok" for k in good}
    fake_proc, fake_port = start_fake(fake_keys, tmp / "fake.log")
    fake_bad_proc, fake_bad_port = start_fake({**fake_keys, **bad}, tmp / "fake-bad.log")
    upstream = f"http://127.0.0.1:{fake_port}"
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(
        "keys:\n" + "".join(f"  - {{name: k{i}, key: {k}}}\n" for i, k in enumerate(good))
    )

    def s(n: int) -> int:
        return max(10, int(n * args.scale))

    gen_path = f"/v1beta/models/{MODEL}:generateContent"
    big_body = b'{"contents": [{"parts": [{"text": "' + b"x" * (5 << 20) + b'"}]}]}'

    def gen_req(h: dict[str, str]) -> Request:
        return unary(gen_path, GEN_BODY, h)

    def chat_req(h: dict[str, str]) -> Request:
        return unary(
            "/v1beta/openai/chat/completions", CHAT_BODY, {**h, "content-type": "application/json"}
        )

    workloads: list[tuple[str, str, int, int, Callable[[dict[str, str]], Request]]] = [
        # name, description, concurrency, requests, request factory
        ("unary-c1", "generateContent, concurrency 1", 1, s(600), gen_req),
        ("unary-c16", "generateContent, concurrency 16", 16, s(3000), gen_req),
        ("unary-c64", "generateContent, concurrency 64", 64, s(3000), gen_req),
        ("openai-chat", "OpenAI-compat chat, concurrency 16", 16, s(2000), chat_req),
        (
            "sse-c1",
            "SSE stream of 20 events, concurrency 1 (time to first byte)",
            1,
            s(300),
            lambda h: stream(20, 200, h),
        ),
        (
            "sse-20",
            "SSE stream of 20 events, concurrency 8",
            8,
            s(600),
            lambda h: stream(20, 200, h),
        ),
        # RSS is read before and after: it must stay flat while 1 GB streams through
        (
            "sse-1gb",
            "1 GB of SSE (800 streams x 20 x 64 KiB), concurrency 8",
            8,
            s(800),
            lambda h: stream(20, 64 * 1024, h),
        ),
        (
            "body-5mb",
            "5 MB request bodies, concurrency 4",
            4,
            s(60),
            lambda h: unary(gen_path, big_body, h),
        ),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        workloads = [w for w in workloads if w[0] in wanted]

    addon = ["-s", str(ROOT / "addon" / "gemini_proxy.py"), "--set", f"gemini_keys={keys_file}"]

    def timer(name: str) -> tuple[list[str], dict[str, str]]:
        """mitmdump arguments and environment that load scripts/hook_timer.py."""
        out = tmp / f"hooks-{name}.json"
        return ["-s", str(ROOT / "scripts" / "hook_timer.py")], {"HOOK_TIMER_OUT": str(out)}

    def gemini_proxy(target: str, db: str, timed: bool = False) -> Setup:
        extra, env = timer("proxy") if timed else ([], {})
        proc, port = start_mitmdump(
            [
                *addon,
                *extra,
                "--mode",
                f"reverse:{target}",
                "--set",
                f"gemini_db={tmp / db}",
                "--set",
                f"gemini_admin=127.0.0.1:{free_port()}",
            ],
            tmp / f"{db}.log",
            env,
        )
        return Setup("gemini-proxy", f"http://127.0.0.1:{port}", {"x-goog-api-key": "client"}, proc)

    def bare(timed: bool = False) -> Setup:
        extra, env = timer("bare") if timed else ([], {})
        proc, port = start_mitmdump(
            [
                *extra,
                "--mode",
                f"reverse:{upstream}",
                "--set",
                "stream_large_bodies=1",
                "--set",
                "connection_strategy=lazy",
            ],
            tmp / "bare.log",
            env,
        )
        return Setup("bare mitmdump", f"http://127.0.0.1:{port}", {"x-goog-api-key": good[0]}, proc)

    def direct() -> Setup:
        return Setup("direct", upstream, {"x-goog-api-key": good[0]}, None)

    def headers_for(setup: Setup, name: str) -> dict[str, str]:
        if name.startswith("openai"):  # the OpenAI way of sending the credential
            token = good[0] if setup.name != "gemini-proxy" else "client"
            return {"authorization": f"Bearer {token}"}
        return setup.headers

    def run(
        setups: list[Setup],
        name: str,
        conc: int,
        count: int,
        factory: Callable[[dict[str, str]], Request],
    ) -> None:
        """Run one workload `repeats` times on every setup, interleaved (direct, bare, proxy,
        direct, ...): a machine that gets slower or faster during the run moves all of them."""
        runs: dict[str, list[Stats]] = {setup.name: [] for setup in setups}
        for _ in range(args.repeats):
            for setup in setups:
                req = factory(headers_for(setup, name))
                runs[setup.name].append(asyncio.run(drive(setup.base, req, conc, count, setup.pid)))
        bare_runs = runs.get("bare mitmdump")
        for setup in setups:
            done = runs[setup.name]
            st = sorted(done, key=lambda r: r.rps)[len(done) // 2]  # the median run by throughput
            st.rss_start, st.rss_end = done[0].rss_start, done[-1].rss_end  # over all runs
            st.rss_peak = max(r.rss_peak for r in done)
            if bare_runs and setup.name != "bare mitmdump":
                for mine, theirs in zip(done, bare_runs, strict=True):
                    st.added_p50.append(
                        mine.pct(mine.latencies, 50) - theirs.pct(theirs.latencies, 50)
                    )
                    st.added_ttfb.append(mine.pct(mine.ttfbs, 50) - theirs.pct(theirs.ttfbs, 50))
            results[(setup.name, name)] = st
            print(
                f"{setup.name:14} {name:12} {st.rps:8.1f} req/s  p50 {st.pct(st.latencies, 50):7.2f} ms  "
                f"p99 {st.pct(st.latencies, 99):7.2f} ms  ttfb p50 {st.pct(st.ttfbs, 50):6.2f} ms  "
                f"cpu {st.cpu_ms:6.2f} ms/req  rss {st.rss_start:.0f}->{st.rss_end:.0f} "
                f"(peak {st.rss_peak:.0f}) MiB  errors {st.errors}",
                flush=True,
            )

    results: dict[tuple[str, str], Stats] = {}
    hook_times: dict[str, dict[str, dict[str, float]]] = {}
    setups: list[Setup] = []
    try:
        setups = [direct(), bare(), gemini_proxy(upstream, "bench.db")]
        for name, _desc, conc, count, factory in workloads:
            run(setups, name, conc, count, factory)
        for setup in setups:
            setup.stop()
        if not args.only or "faulty-30%" in args.only.split(","):
            # 3 of 10 keys dead or out of quota: only meaningful for gemini-proxy
            setups = [gemini_proxy(f"http://127.0.0.1:{fake_bad_port}", "bench-faulty.db")]
            run(
                setups,
                "faulty-30%",
                16,
                s(3000),
                lambda h: unary(f"/v1beta/models/{MODEL}:generateContent", GEN_BODY, h),
            )
        if not args.only or "hooks" in args.only.split(","):
            # where the c1 latency goes: mitmproxy's dispatch of each hook, bare vs the addon
            setups = [bare(timed=True), gemini_proxy(upstream, "bench-hooks.db", timed=True)]
            for setup in setups:
                asyncio.run(drive(setup.base, gen_req(setup.headers), 1, s(600), setup.pid))
            for setup in setups:
                setup.stop()
            for name in ("bare", "proxy"):
                path = tmp / f"hooks-{name}.json"
                if path.exists():
                    hook_times[name] = json.loads(path.read_text())
    finally:
        for setup in setups:
            setup.stop()
        fake_proc.terminate()
        fake_bad_proc.terminate()

    table = render(results, workloads)
    if hook_times:
        table += "\n\n" + render_hooks(hook_times)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Benchmark results\n\n"
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/bench` (scale {args.scale}, "
        f"median of {args.repeats} runs per workload, the setups interleaved) on: {machine()}.\n\n"
        "Client, fake Gemini and proxy share the machine's cores, so absolute numbers are low; the ratios "
        "to bare mitmdump are what to compare. CPU is the proxy process's user+system time per request; "
        "RSS is the proxy process's resident memory. Each repeat runs direct, bare and proxy back to "
        "back; *added p50/TTFB* is the median over the repeats of (this setup's p50 − bare's p50 in the "
        "same repeat), with the range in parentheses: on a shared machine single runs move by ±0.5 ms.\n\n"
        + table
        + "\n"
    )
    print(f"\nwritten to {out}")


# When mitmproxy sends the answer relative to each hook of a unary flow: bare mitmdump streams
# (the `response` hook runs once the body is out); an answer an addon sets in `request` is sent
# only after `responseheaders` and `response` have run through every addon.
HOOK_ORDER = {
    "requestheaders": ("before", "before"),
    "request": ("before", "before (includes the upstream call)"),
    "responseheaders": ("before", "before"),
    "response": ("**after**", "before"),
}


def render_hooks(times: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = [
        "Where the c1 time goes: mitmproxy's dispatch of each hook of a flow through all its addons"
        " (and its `update` pass after it), median ms, unary generateContent at concurrency 1, both"
        " with `scripts/hook_timer.py` loaded. *Sent* says whether the caller gets the answer"
        " before or after the hook runs.",
        "",
        "| hook | bare mitmdump ms | sent | gemini-proxy ms | sent |",
        "|---|---:|---|---:|---|",
    ]
    for hook, (bare_when, proxy_when) in HOOK_ORDER.items():
        b = times.get("bare", {}).get(hook, {}).get("p50_ms")
        p = times.get("proxy", {}).get(hook, {}).get("p50_ms")
        fb = f"{b:.2f}" if b is not None else "-"
        fp = f"{p:.2f}" if p is not None else "-"
        rows.append(f"| {hook} | {fb} | {bare_when} | {fp} | {proxy_when} |")
    return "\n".join(rows)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.median(values):+.2f} ({min(values):+.2f}…{max(values):+.2f})"


def render(
    results: dict[tuple[str, str], Stats], workloads: Sequence[tuple[str, str, int, int, object]]
) -> str:
    rows = [
        "| workload | setup | req/s | p50 ms | p99 ms | TTFB p50 ms | CPU ms/req | RSS start→end (peak) MiB | errors | req/s vs bare | added p50 ms | added TTFB ms |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    names = [w[0] for w in workloads] + ["faulty-30%"]
    descs = {w[0]: w[1] for w in workloads} | {
        "faulty-30%": "generateContent c16, 3 of 10 keys dead / out of quota"
    }
    for name in names:
        bare = results.get(("bare mitmdump", name)) or results.get(("bare mitmdump", "unary-c16"))
        for setup in ("direct", "bare mitmdump", "gemini-proxy"):
            st = results.get((setup, name))
            if st is None:
                continue
            ratio = f"{st.rps / bare.rps:.2f}×" if bare and bare.rps else ""
            added = added_ttfb = ""
            if st.added_p50:  # the median of the paired differences, and their range
                added, added_ttfb = spread(st.added_p50), spread(st.added_ttfb)
            elif bare and setup != "bare mitmdump":
                added = f"{st.pct(st.latencies, 50) - bare.pct(bare.latencies, 50):+.2f}"
                added_ttfb = f"{st.pct(st.ttfbs, 50) - bare.pct(bare.ttfbs, 50):+.2f}"
            rss = (
                f"{st.rss_start:.0f}→{st.rss_end:.0f} ({st.rss_peak:.0f})"
                if setup != "direct"
                else "-"
            )
            cpu = f"{st.cpu_ms:.2f}" if setup != "direct" else "-"
            rows.append(
                f"| {name}: {descs[name]} | {setup} | {st.rps:.0f} | {st.pct(st.latencies, 50):.2f} | {st.pct(st.latencies, 99):.2f} | "
                f"{st.pct(st.ttfbs, 50):.2f} | {cpu} | {rss} | {st.errors} | {ratio} | {added} | {added_ttfb} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
