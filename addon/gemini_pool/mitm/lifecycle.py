"""Start and stop as a mitmproxy addon: the side servers once mitmproxy runs, the drain at exit.

`running` starts the relay, the admin server, shared state and housekeeping (`runtime.py`);
`done` returns the drain coroutine at a real shutdown (mitmproxy awaits it: listeners closed,
requests in flight finished, SQLite flushed) and nothing on a script reload, when the Runtime
lives on for the reloaded script. Both stay sync, as mitmproxy's script reloading needs.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from mitmproxy import ctx

from .. import runtime
from ..runtime import Runtime, raise_fd_limit
from .options import admin_token, parse_hostport


class Lifecycle:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def running(self) -> None:
        raise_fd_limit()
        if self.rt.started is not None:
            return  # a script reload: everything runs already
        # Everything loaded so far (mitmproxy, its addons, ours) lives as long as the process:
        # out of the collector's full passes, which then scan only what requests allocate
        # (measured: 0.04 ms less CPU per request at concurrency 16)
        gc.freeze()
        self.rt.started = asyncio.Event()
        o = ctx.options
        bind = (
            (*parse_hostport(o.gemini_admin), admin_token(o.gemini_admin_token_file))
            if o.gemini_admin
            else None
        )
        asyncio.get_running_loop().create_task(
            self.rt.start(bind, lambda: int(ctx.options.gemini_watch_ms))
        )

    def done(self) -> Any:
        master = getattr(ctx, "master", None)
        if master is not None and master.should_exit.is_set():
            return self._shutdown(master)  # real shutdown: mitmproxy awaits this
        return None  # script reload: the Runtime lives on for the reloaded script

    async def _shutdown(self, master: Any) -> None:
        await self.rt.shutdown(master, ctx.options.gemini_drain_timeout_ms / 1000)
        runtime.forget()
