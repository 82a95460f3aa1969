#!/usr/bin/env python3
"""Benchmark gemini-proxy against mitmdump as users run it and a direct connection, in one run.

All sit in front of the project's fake Gemini on loopback:
  direct            - the client talks to the fake
  mitmdump          - mitmdump in reverse mode, default options (bodies buffered): the floor of
                      the unary workloads
  mitmdump+stream   - the same with scripts/bench_stream_floor.py, which streams 2xx
                      text/event-stream answers and streamed JSON arrays: the floor of the stream
                      workloads
  gemini-proxy      - mitmdump + gemini-proxy, 10 keys, SQLite on
  (--old-floor adds, for unary workloads, mitmdump with stream_large_bodies=1, which streams every body: the floor
  earlier runs used, slower than users' mitmdump, shown as an extra row only)
  (--decompose adds, for unary workloads, mitmdump answering in `request` and mitmdump fetching
  with aiohttp in `request`, scripts/bench_decompose_addon.py: mitmproxy's cost per flow, and the
  upstream call made as gemini-proxy makes it, without the addon's own work)
The client sends `Accept-Encoding: gzip, deflate` as the Gemini SDKs do, so the fake answers
gzip (streams flushed per event), as Google does for them. Prints a markdown table with ratios to
each workload's floor and writes scripts/bench_results.md; a last pass (`hooks`) times mitmproxy's
dispatch of each hook at concurrency 1 (scripts/hook_timer.py).
Not part of the test suite: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from _benchlib import cpu_seconds, free_port, rss_mib, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "gemini-2.5-flash"
GEN_BODY = b'{"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}]}'
CHAT_BODY = (
    b'{"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "Hello there"}]}'
)
# what the Gemini SDKs (httpx, requests) send: the fake then gzips its answers, as Google does
CLIENT_HEADERS = {"accept-encoding": "gzip, deflate"}
UNARY_FLOOR = "mitmdump"
STREAM_FLOOR = "mitmdump+stream"
OLD_FLOOR = "mitmdump, every body streamed"
ANSWER = "mitmdump answering in `request`"  # --decompose: no upstream connection at all
FETCH = "mitmdump fetching with aiohttp"  # --decompose: the upstream call as gemini-proxy makes it
PROXY = "gemini-proxy"


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
    # paired with the floor's run of the same repeat (the runs are interleaved)
    added_p50: list[float] = field(default_factory=list)
    added_ttfb: list[float] = field(default_factory=list)
    rps_ratio: list[float] = field(default_factory=list)
    ttfb_ratio: list[float] = field(default_factory=list)
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
    h = {**CLIENT_HEADERS, **headers}

    async def go(session: aiohttp.ClientSession, base: str) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        async with session.post(base + path, data=body, headers=h) as r:
            first = await r.content.readany()
            t1 = time.perf_counter()
            rest = await r.read()
            if r.status != 200:
                raise RuntimeError(f"status {r.status}: {(first + rest)[:200]!r}")
            return time.perf_counter() - t0, t1 - t0, len(first) + len(rest)

    return go


def stream(events: int, event_bytes: int, headers: dict[str, str], delay_ms: int = 0) -> Request:
    h = {
        **CLIENT_HEADERS,
        **headers,
        "x-fake-events": str(events),
        "x-fake-event-bytes": str(event_bytes),
        "x-fake-delay-ms": str(delay_ms),
    }
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
        # warm up caches (and let a pool learn), then open all `concurrency` connections (with
        # their relay connections behind them) before the clock starts
        for _ in range(min(concurrency, 20)):
            with contextlib.suppress(Exception):
                await req(session, base)
        await asyncio.gather(
            *(req(session, base) for _ in range(concurrency)), return_exceptions=True
        )

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


@dataclass
class Workload:
    name: str
    desc: str
    concurrency: int
    count: int
    factory: Callable[[dict[str, str]], Request]
    stream: bool = False

    @property
    def floor(self) -> str:
        return STREAM_FLOOR if self.stream else UNARY_FLOOR


def _unused(h: dict[str, str]) -> Request:
    raise NotImplementedError("main() gives FAULTY its request")


# gemini-proxy only (a bare mitmdump cannot skip a dead key): compared with unary-c16's floor
FAULTY = Workload(
    "faulty-30%", "generateContent c16, 3 of 10 keys dead / out of quota", 16, 3000, _unused
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply request counts (0.3 for a quick look)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="runs per workload (the setups interleaved); the median is reported",
    )
    ap.add_argument("--out", default=str(ROOT / "scripts" / "bench_results.md"))
    ap.add_argument(
        "--only",
        default="",
        help="comma list of workload names to run (unary-c1, ..., faulty-30%%, hooks)",
    )
    ap.add_argument(
        "--old-floor",
        action="store_true",
        help="unary workloads also run mitmdump with stream_large_bodies=1 (every body streamed:"
        " the floor earlier runs used), as an extra row",
    )
    ap.add_argument(
        "--decompose",
        action="store_true",
        help="unary workloads also run mitmdump with scripts/bench_decompose_addon.py, answering"
        " in `request` (no upstream) and fetching with aiohttp in `request`: extra rows that split"
        " gemini-proxy's cost into mitmproxy's, the upstream call's and the addon's own",
    )
    ap.add_argument(
        "--baseline",
        default="",
        metavar="DIR",
        help="also run gemini-proxy from another checkout (e.g. `git worktree add /tmp/base HEAD~3`)"
        " in every workload, interleaved with this tree's: before/after in the same run",
    )
    args = ap.parse_args()
    baseline = ""
    if args.baseline:
        base_dir = Path(args.baseline).resolve()
        rev = subprocess.run(
            ["git", "-C", str(base_dir), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        baseline = f"gemini-proxy @ {rev or base_dir.name}"
    print(
        "client sends Accept-Encoding: gzip, deflate (as the Gemini SDKs do): "
        "answers are gzipped as in production",
        flush=True,
    )

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

    def sse(h: dict[str, str]) -> Request:  # the stream: 20 events, 5 ms apart
        return stream(20, 200, h, delay_ms=5)

    workloads = [
        Workload("unary-c1", "generateContent, concurrency 1", 1, s(600), gen_req),
        Workload("unary-c16", "generateContent, concurrency 16", 16, s(3000), gen_req),
        Workload("unary-c64", "generateContent, concurrency 64", 64, s(3000), gen_req),
        Workload("openai-chat", "OpenAI-compat chat, concurrency 16", 16, s(2000), chat_req),
        Workload("sse-c1", "SSE, 20 events 5 ms apart, concurrency 1", 1, s(80), sse, True),
        Workload("sse-c16", "SSE, 20 events 5 ms apart, concurrency 16", 16, s(800), sse, True),
        Workload("sse-c64", "SSE, 20 events 5 ms apart, concurrency 64", 64, s(1600), sse, True),
        # RSS is read before and after: it must stay flat while 1 GB streams through
        Workload(
            "sse-1gb",
            "1 GB of SSE (800 streams x 20 x 64 KiB), concurrency 8",
            8,
            s(800),
            lambda h: stream(20, 64 * 1024, h),
            True,
        ),
        Workload(
            "body-5mb",
            "5 MB request bodies, concurrency 4",
            4,
            s(60),
            lambda h: unary(gen_path, big_body, h),
        ),
    ]
    only = set(args.only.split(",")) if args.only else set()
    if only:
        workloads = [w for w in workloads if w.name in only]

    def addon(tree: Path = ROOT) -> list[str]:
        return ["-s", str(tree / "addon" / "gemini_proxy.py"), "--set", f"gemini_keys={keys_file}"]

    def timer(name: str) -> tuple[list[str], dict[str, str]]:
        """mitmdump arguments and environment that load scripts/hook_timer.py."""
        out = tmp / f"hooks-{name}.json"
        return ["-s", str(ROOT / "scripts" / "hook_timer.py")], {"HOOK_TIMER_OUT": str(out)}

    def gemini_proxy(
        target: str, db: str, timed: str = "", tree: Path = ROOT, name: str = PROXY
    ) -> Setup:
        extra, env = timer(timed) if timed else ([], {})
        proc, port = start_mitmdump(
            [
                *addon(tree),
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
        return Setup(name, f"http://127.0.0.1:{port}", {"x-goog-api-key": "client"}, proc)

    def bare(
        name: str, options: list[str], timed: str = "", env: dict[str, str] | None = None
    ) -> Setup:
        """mitmdump in reverse mode, no key handling: the client sends a real key itself."""
        extra, timer_env = timer(timed) if timed else ([], {})
        env = {**timer_env, **(env or {})}
        log = tmp / (re.sub(r"[^A-Za-z0-9+.-]+", "_", name) + ".log")
        proc, port = start_mitmdump([*extra, "--mode", f"reverse:{upstream}", *options], log, env)
        return Setup(name, f"http://127.0.0.1:{port}", {"x-goog-api-key": good[0]}, proc)

    def direct() -> Setup:
        return Setup("direct", upstream, {"x-goog-api-key": good[0]}, None)

    def headers_for(setup: Setup, name: str) -> dict[str, str]:
        if name.startswith("openai"):  # the OpenAI way of sending the credential
            token = "client" if setup.name in (PROXY, baseline) else good[0]
            return {"authorization": f"Bearer {token}"}
        return setup.headers

    def run(setups: list[Setup], wl: Workload) -> None:
        """Run one workload `repeats` times on every setup, interleaved (direct, floor, proxy,
        direct, proxy, floor, ...): a machine that gets slower or faster during the run moves all
        of them, and no setup always runs right after another."""
        runs: dict[str, list[Stats]] = {setup.name: [] for setup in setups}
        for i in range(args.repeats):
            order = setups if i % 2 == 0 else [*setups[:1], *reversed(setups[1:])]
            for setup in order:
                req = wl.factory(headers_for(setup, wl.name))
                stats = asyncio.run(drive(setup.base, req, wl.concurrency, wl.count, setup.pid))
                runs[setup.name].append(stats)
        floor_runs = runs.get(wl.floor)
        for setup in setups:
            done = runs[setup.name]
            st = sorted(done, key=lambda r: r.rps)[len(done) // 2]  # the median run by throughput
            st.rss_start, st.rss_end = done[0].rss_start, done[-1].rss_end  # over all runs
            st.rss_peak = max(r.rss_peak for r in done)
            if floor_runs and setup.name != wl.floor:
                for mine, theirs in zip(done, floor_runs, strict=True):
                    p50, floor_p50 = mine.pct(mine.latencies, 50), theirs.pct(theirs.latencies, 50)
                    ttfb, floor_ttfb = mine.pct(mine.ttfbs, 50), theirs.pct(theirs.ttfbs, 50)
                    st.added_p50.append(p50 - floor_p50)
                    st.added_ttfb.append(ttfb - floor_ttfb)
                    st.rps_ratio.append(mine.rps / theirs.rps if theirs.rps else float("nan"))
                    st.ttfb_ratio.append(ttfb / floor_ttfb if floor_ttfb else float("nan"))
            results[(setup.name, wl.name)] = st
            vs = f"  vs floor {ratio_spread(st.rps_ratio)}" if st.rps_ratio else ""
            print(
                f"{setup.name:30} {wl.name:12} {st.rps:8.1f} req/s  p50 {st.pct(st.latencies, 50):7.2f} ms  "
                f"p99 {st.pct(st.latencies, 99):7.2f} ms  ttfb p50 {st.pct(st.ttfbs, 50):6.2f} ms  "
                f"cpu {st.cpu_ms:6.2f} ms/req  rss {st.rss_start:.0f}->{st.rss_end:.0f} "
                f"(peak {st.rss_peak:.0f}) MiB  errors {st.errors}{vs}",
                flush=True,
            )

    results: dict[tuple[str, str], Stats] = {}
    hook_times: dict[str, dict[str, dict[str, float]]] = {}
    setups: list[Setup] = []
    try:
        setups = [
            direct(),
            bare(UNARY_FLOOR, []),
            bare(STREAM_FLOOR, ["-s", str(ROOT / "scripts" / "bench_stream_floor.py")]),
            gemini_proxy(upstream, "bench.db"),
        ]
        if args.old_floor:
            setups.append(bare(OLD_FLOOR, ["--set", "stream_large_bodies=1"]))
        decompose = ["-s", str(ROOT / "scripts" / "bench_decompose_addon.py")]
        if args.decompose:
            setups.append(bare(ANSWER, decompose, env={"BENCH_DECOMPOSE": "answer"}))
            setups.append(bare(FETCH, decompose, env={"BENCH_DECOMPOSE": "fetch"}))
        if baseline:
            setups.append(gemini_proxy(upstream, "bench-base.db", tree=base_dir, name=baseline))
        extras = [
            *([OLD_FLOOR] if args.old_floor else []),
            *([ANSWER, FETCH] if args.decompose else []),
        ]
        by_name = {setup.name: setup for setup in setups}
        for wl in workloads:
            chosen = [by_name["direct"], by_name[wl.floor]]
            chosen += [by_name[n] for n in extras] if not wl.stream else []
            chosen += [by_name[baseline]] if baseline else []
            run([*chosen, by_name[PROXY]], wl)
        for setup in setups:
            setup.stop()
        if not only or "faulty-30%" in only:
            # 3 of 10 keys dead or out of quota: only meaningful for gemini-proxy
            setups = [gemini_proxy(f"http://127.0.0.1:{fake_bad_port}", "bench-faulty.db")]
            run(setups, dataclasses.replace(FAULTY, count=s(FAULTY.count), factory=gen_req))
            for setup in setups:  # before the next pass replaces the list
                setup.stop()
        if not only or "hooks" in only:
            # where the time goes: mitmproxy's dispatch of each hook, floor vs the addon, for
            # unary requests at c1 and, as a timeline to the first byte, streams at c1, c16, c64
            for tag, floor, req, conc, count in (
                ("unary", UNARY_FLOOR, gen_req, 1, s(600)),
                ("sse-c1", STREAM_FLOOR, sse, 1, s(60)),
                ("sse-c16", STREAM_FLOOR, sse, 16, s(480)),
                ("sse-c64", STREAM_FLOOR, sse, 64, s(1600)),
            ):
                floor_opts = (
                    []
                    if floor == UNARY_FLOOR
                    else ["-s", str(ROOT / "scripts" / "bench_stream_floor.py")]
                )
                for who, setup in (
                    ("floor", bare(floor, floor_opts, timed=f"{tag}-floor")),
                    ("proxy", gemini_proxy(upstream, f"bench-{tag}.db", timed=f"{tag}-proxy")),
                ):
                    setups = [setup]
                    st = asyncio.run(drive(setup.base, req(setup.headers), conc, count, setup.pid))
                    setup.stop()
                    path = tmp / f"hooks-{tag}-{who}.json"
                    if path.exists():
                        hook_times[f"{tag}-{who}"] = json.loads(path.read_text())
                        # how much of the run the proxy process was on a core
                        busy = 100 * st.cpu / st.elapsed if st.elapsed else 0.0
                        hook_times[f"{tag}-{who}"]["busy"] = {"percent": busy}
    finally:
        for setup in setups:
            setup.stop()
        fake_proc.terminate()
        fake_bad_proc.terminate()

    table = render(results, workloads, extras, baseline)
    goals = render_goals(results)
    if goals:
        table += "\n\n" + goals
    if hook_times:
        table += "\n\n" + render_hooks(hook_times)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Benchmark results\n\n"
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/bench` (scale {args.scale}, "
        f"{args.repeats} runs per workload, the setups interleaved) on: {machine()}.\n\n"
        "Floors, as users run mitmdump: unary workloads against `mitmdump` in reverse mode with "
        "default options (bodies buffered); stream workloads against `mitmdump+stream`, the same "
        "with `scripts/bench_stream_floor.py`, which streams 2xx `text/event-stream` answers and "
        "streamed JSON arrays. The client sends `Accept-Encoding: gzip, deflate`, as the Gemini "
        "SDKs do, so the fake Gemini gzips its answers (streams flushed per event), as Google "
        "does in production.\n\n"
        "Client, fake Gemini and proxy share the machine's cores (and other work ran on it), so "
        "absolute numbers are low and move between runs; compare within one run. CPU is the proxy "
        "process's user+system time per request; RSS is the proxy process's resident memory. "
        "Each repeat runs direct, the floor and gemini-proxy back to back (the order of the mitmdump "
        "setups alternating); the row shows the median run by throughput, and *vs floor*, *added "
        "p50/TTFB* and *TTFB vs floor* are the median over the repeats of the comparison with the "
        "floor's run of the same repeat, with their range in parentheses.\n\n" + table + "\n"
    )
    print(f"\nwritten to {out}")


def render_hooks(times: dict[str, dict[str, dict[str, float]]]) -> str:
    def cell(run: str, hook: str, what: str) -> float | None:
        return times.get(run, {}).get(hook, {}).get(what)

    def fmt(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    rows = [
        "Where the c1 time goes: mitmproxy's dispatch of each hook of a flow through all its addons"
        " (and its `update` pass after it), median ms, unary generateContent at concurrency 1, both"
        " with `scripts/hook_timer.py` loaded. In both every hook runs before the caller gets the"
        " answer (default mitmdump buffers it; gemini-proxy sets it in `request`).",
        "",
        "| hook | mitmdump ms | gemini-proxy ms |",
        "|---|---:|---:|",
    ]
    for hook in ("requestheaders", "request", "responseheaders", "response"):
        note = " (includes the upstream call)" if hook == "request" else ""
        rows.append(
            f"| {hook}{note} | {fmt(cell('unary-floor', hook, 'p50_ms'))} |"
            f" {fmt(cell('unary-proxy', hook, 'p50_ms'))} |"
        )
    runs = tuple(f"sse-c{c}-{who}" for c in (1, 16, 64) for who in ("floor", "proxy"))
    if not any(run in times for run in runs):
        return "\n".join(rows)

    def gap(run: str) -> float | None:
        a, b = cell(run, "request", "end_p50_ms"), cell(run, "responseheaders", "start_p50_ms")
        return b - a if a is not None and b is not None else None

    def pct(value: float | None) -> str:
        return f"{value:.0f} %" if value is not None else "-"

    rows += [
        "",
        "The path to a stream's first byte (SSE, 20 events 5 ms apart), median ms from the start of"
        " the flow's `requestheaders` hook, same tool. The first byte leaves once `responseheaders`"
        " has run. In mitmdump+stream the upstream fetch lies between the end of `request` and the"
        " start of `responseheaders`; in gemini-proxy the addon's attempts run inside `request` and"
        " that gap is the relay hop (mitmproxy asks the relay, the relay answers, mitmproxy reads"
        " it): each step waits for a turn of mitmproxy's event loop. *Loop turn* is how late the"
        " loop ran a 2 ms timer while flows were in flight (p50 / p90 ms): about the length of one"
        " turn. *Busy* is the proxy process's CPU time over the run's wall time: near 100 % the"
        " loop is the bottleneck, work queues up, and every turn (so every step to the first byte)"
        " gets longer.",
        "",
        "| milestone | mitmdump+stream c1 | gemini-proxy c1 | mitmdump+stream c16 | gemini-proxy c16"
        " | mitmdump+stream c64 | gemini-proxy c64 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, hook, what in (
        ("`request` hook starts", "request", "start_p50_ms"),
        ("`request` hook ends", "request", "end_p50_ms"),
        ("`responseheaders` starts", "responseheaders", "start_p50_ms"),
        ("`responseheaders` ends", "responseheaders", "end_p50_ms"),
    ):
        rows.append(f"| {label} | " + " | ".join(fmt(cell(r, hook, what)) for r in runs) + " |")
    rows.append(
        "| end of `request` → start of `responseheaders` | "
        + " | ".join(fmt(gap(r)) for r in runs)
        + " |"
    )
    rows.append(
        "| loop turn p50 / p90 ms | "
        + " | ".join(
            f"{fmt(cell(r, 'loop_turn', 'p50_ms'))} / {fmt(cell(r, 'loop_turn', 'p90_ms'))}"
            for r in runs
        )
        + " |"
    )
    rows.append(
        "| busy (proxy CPU / wall time) | "
        + " | ".join(pct(cell(r, "busy", "percent")) for r in runs)
        + " |"
    )
    return "\n".join(rows)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.median(values):+.2f} ({min(values):+.2f}…{max(values):+.2f})"


def ratio_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}×"
    return f"{statistics.median(values):.2f}× ({min(values):.2f}…{max(values):.2f})"


def render(
    results: dict[tuple[str, str], Stats],
    workloads: Sequence[Workload],
    extras: Sequence[str],
    baseline: str = "",
) -> str:
    rows = [
        "| workload | setup | req/s | p50 ms | p99 ms | TTFB p50 ms | CPU ms/req | RSS start→end (peak) MiB | errors | req/s vs floor | added p50 ms | added TTFB ms | TTFB vs floor |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for wl in [*workloads, FAULTY]:
        setups = [
            "direct",
            wl.floor,
            *(extras if not wl.stream else []),
            *([baseline] if baseline else []),
            PROXY,
        ]
        for setup in setups:
            st = results.get((setup, wl.name))
            if st is None:
                continue
            ratio = added = added_ttfb = ttfb_ratio = ""
            label = setup
            if setup == wl.floor:
                label, ratio = f"**{setup}** (floor)", "1.00×"
            elif st.rps_ratio:  # paired with the floor's run of the same repeat
                ratio, ttfb_ratio = ratio_spread(st.rps_ratio), ratio_spread(st.ttfb_ratio)
                added, added_ttfb = spread(st.added_p50), spread(st.added_ttfb)
            elif (base := results.get((UNARY_FLOOR, "unary-c16"))) and base.rps:
                ratio = f"{st.rps / base.rps:.2f}× of unary-c16's floor"
            rss = (
                f"{st.rss_start:.0f}→{st.rss_end:.0f} ({st.rss_peak:.0f})"
                if setup != "direct"
                else "-"
            )
            cpu = f"{st.cpu_ms:.2f}" if setup != "direct" else "-"
            rows.append(
                f"| {wl.name}: {wl.desc} | {label} | {st.rps:.0f} | {st.pct(st.latencies, 50):.2f} | {st.pct(st.latencies, 99):.2f} | "
                f"{st.pct(st.ttfbs, 50):.2f} | {cpu} | {rss} | {st.errors} | {ratio} | {added} | {added_ttfb} | {ttfb_ratio} |"
            )
    return "\n".join(rows)


RSS_FLAT_MIB = 16  # "flat": RSS after 1 GB of SSE within this of RSS before


def render_goals(results: dict[tuple[str, str], Stats]) -> str:
    """The goals of issue 10, against the floors, from the medians above."""
    rows = ["| goal (issue 10) | measured (median, range over repeats) | met |", "|---|---|---|"]

    def proxy(name: str) -> Stats | None:
        return results.get((PROXY, name))

    for name in ("unary-c16", "unary-c64", "sse-c16", "sse-c64"):
        st = proxy(name)
        if st and st.rps_ratio:
            m = statistics.median(st.rps_ratio)
            kind = "stream" if name.startswith("sse") else "unary"
            rows.append(
                f"| {kind} throughput ≥ 0.9× at {name} | {ratio_spread(st.rps_ratio)} | {'yes' if m >= 0.9 else '**no**'} |"
            )
    for name in ("sse-c1", "sse-c16"):
        st = proxy(name)
        if st and st.added_ttfb:
            m = statistics.median(st.added_ttfb)
            rows.append(
                f"| stream TTFB within 2 ms of the floor at {name} | {spread(st.added_ttfb)} ms | {'yes' if m <= 2 else '**no**'} |"
            )
    st = proxy("sse-c64")
    if st and st.ttfb_ratio:
        m = statistics.median(st.ttfb_ratio)
        rows.append(
            f"| stream TTFB within 25 % of the floor at sse-c64 | {ratio_spread(st.ttfb_ratio)} ({spread(st.added_ttfb)} ms) | {'yes' if m <= 1.25 else '**no**'} |"
        )
    st = proxy("sse-1gb")
    if st:
        grew = st.rss_end - st.rss_start
        rows.append(
            f"| RSS flat over 1 GB of SSE (grows < {RSS_FLAT_MIB} MiB) | {st.rss_start:.0f} → {st.rss_end:.0f} MiB (peak {st.rss_peak:.0f}) | {'yes' if grew < RSS_FLAT_MIB else '**no**'} |"
        )
    st = proxy("unary-c1")
    if st and st.added_p50:
        m = statistics.median(st.added_p50)
        rows.append(
            f"| unary c1 added p50 ≤ 1.5 ms | {spread(st.added_p50)} ms | {'yes' if m <= 1.5 else '**no**'} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


if __name__ == "__main__":
    main()
