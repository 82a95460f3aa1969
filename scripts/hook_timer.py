"""A mitmproxy script for scripts/bench: how long mitmproxy takes to run each event hook, and when.

    mitmdump -s scripts/hook_timer.py ...   (HOOK_TIMER_OUT=file.json to choose where it writes)

It times `AddonManager.handle_lifecycle`, the call the proxy core awaits for every hook of every
flow: the event through all addons, then mitmproxy's `update` pass through all addons again. At
shutdown it writes, per hook name, the median milliseconds the call took (`p50_ms`) and, for the
hooks of a flow, the median time from the start of that flow's `requestheaders` to the start and
to the end of the call (`start_p50_ms`, `end_p50_ms`): a timeline of the path to the first byte
(the first fifth of the samples dropped as warm-up).

It also measures how late the event loop runs a 2 ms timer while flows are in flight (`loop_turn`:
p50/p90 ms, samples taken before the first fifth of the flows started dropped as warm-up): about
one turn of the loop, which each step on a flow's path waits for once per turn it needs.

A measuring tool only: it wraps a mitmproxy method, which the proxy itself never does.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

from mitmproxy import ctx, flow, hooks

_LAST = ("response", "error")  # the hooks after which a flow's timeline is complete
PROBE = 0.002  # seconds: the loop-turn probe's timer


class HookTimer:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.starts: dict[str, list[float]] = defaultdict(list)
        self.ends: dict[str, list[float]] = defaultdict(list)
        self.origin: dict[str, float] = {}  # flow id -> start of its requestheaders
        self.flows = 0  # flows started so far
        self.lags: list[tuple[int, float]] = []  # (flows started by then, ms late)
        self.prober: asyncio.Task[None] | None = None

    async def probe(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(PROBE)
            if self.origin:  # only while flows are in flight
                self.lags.append((self.flows, (time.perf_counter() - t0 - PROBE) * 1000))

    def running(self) -> None:
        self.prober = asyncio.get_running_loop().create_task(self.probe())
        manager = ctx.master.addons
        inner = manager.handle_lifecycle

        async def timed(event: hooks.Hook) -> None:
            message = event.args()[0] if event.args() else None
            fid = message.id if isinstance(message, flow.Flow) else None
            t0 = time.perf_counter()
            if fid is not None and event.name == "requestheaders":
                self.origin[fid] = t0
                self.flows += 1
            try:
                await inner(event)
            finally:
                t1 = time.perf_counter()
                self.times[event.name].append((t1 - t0) * 1000)
                origin = self.origin.get(fid) if fid is not None else None
                if origin is not None:
                    self.starts[event.name].append((t0 - origin) * 1000)
                    self.ends[event.name].append((t1 - origin) * 1000)
                    if event.name in _LAST:
                        del self.origin[fid]

        manager.handle_lifecycle = timed  # type: ignore[method-assign]

    def done(self) -> None:
        def median(values: list[float]) -> float:
            return statistics.median(values[len(values) // 5 :] or values)

        out: dict[str, Any] = {}
        for name, values in self.times.items():
            out[name] = {"n": len(values), "p50_ms": median(values)}
            if self.starts[name]:
                out[name]["start_p50_ms"] = median(self.starts[name])
                out[name]["end_p50_ms"] = median(self.ends[name])
        if self.prober is not None:
            self.prober.cancel()
        lags = sorted(ms for flows, ms in self.lags if flows >= self.flows // 5)
        if lags:
            out["loop_turn"] = {
                "n": len(lags),
                "p50_ms": statistics.median(lags),
                "p90_ms": lags[min(len(lags) - 1, len(lags) * 9 // 10)],
            }
        path = os.environ.get("HOOK_TIMER_OUT", "hook_timer.json")
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)


addons = [HookTimer()]
