"""A mitmproxy script for scripts/bench: how long mitmproxy takes to run each event hook.

    mitmdump -s scripts/hook_timer.py ...   (HOOK_TIMER_OUT=file.json to choose where it writes)

It times `AddonManager.handle_lifecycle`, the call the proxy core awaits for every hook of every
flow: the event through all addons, then mitmproxy's `update` pass through all addons again. At
shutdown it writes the median milliseconds per hook name (the first fifth dropped as warm-up).

A measuring tool only: it wraps a mitmproxy method, which the proxy itself never does.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

from mitmproxy import ctx, hooks


class HookTimer:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def running(self) -> None:
        manager = ctx.master.addons
        inner = manager.handle_lifecycle

        async def timed(event: hooks.Hook) -> None:
            t0 = time.perf_counter()
            try:
                await inner(event)
            finally:
                self.times[event.name].append((time.perf_counter() - t0) * 1000)

        manager.handle_lifecycle = timed  # type: ignore[method-assign]

    def done(self) -> None:
        out: dict[str, Any] = {}
        for name, values in self.times.items():
            kept = values[len(values) // 5 :] or values
            out[name] = {"n": len(kept), "p50_ms": statistics.median(kept)}
        path = os.environ.get("HOOK_TIMER_OUT", "hook_timer.json")
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)


addons = [HookTimer()]
