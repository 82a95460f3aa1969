"""No gate, no service: mitmdump never forwards a request the addon has not checked.

mitmproxy goes on serving as a plain reverse proxy when the script's part fails: a `--set
gemini_*` it cannot apply (given twice, "Received multiple values"; a malformed value) makes the
script's registration fail in a background task that nobody reads, and a `configure` that raises
(a key file that does not load) leaves the addon without keys. Callers' requests, their tokens
included, would then go upstream unchecked.

The guard is the script's first addon and its last:
- first: it answers every flow 503 (`proxy not configured`, nothing upstream, no later addon runs)
  until the proxy has configured once with its key file loaded;
- last (`options_check`): once the addon's options exist, it checks what mitmproxy deferred for them
  and says which `--set` is wrong, in one line; at `running`, a deferred `gemini_*` left over
  names no option at all (a typo).
A failure at start is logged as an error in one line, and mitmproxy's startup error check then
exits with status 1; a failure later (the options check of a reloaded script) shuts mitmdump down.
A failing configure after the start is re-raised: mitmproxy rolls the change back and says why.

mitmproxy reloads the entry script when it changes: it removes the script's addons first, and keeps
serving without them if the new version fails to load. So on such a reload the guard leaves a
fallback at the end of mitmproxy's chain that refuses every flow, until a guard of the reloaded
script has seen its proxy configured.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http

log = logging.getLogger("gemini_proxy")

_REFUSAL = json.dumps(
    {
        "error": {
            "code": 503,
            "message": "gemini-proxy is not configured: see the proxy's log",
            "status": "UNAVAILABLE",
        }
    }
).encode()
_MARK = "gemini_guard_refused"


class StartupGuard:
    """The script's first addon: refuses every flow until the gate is established."""

    def __init__(self, loaded: Callable[[], bool]) -> None:
        self.loaded = loaded  # the proxy has its key file (or GEMINI_API_KEYS) loaded
        self.ready = False
        self.failed: str | None = None
        self.running_seen = False
        self.options_check = _OptionsCheck(self)

    def around(self, addons: list[Any], watched: Any) -> list[Any]:
        """The script's addon list: this guard, `addons` (the configure of `watched`, one of them,
        is watched), and the options check."""
        original = watched.configure

        def configure(updated: set[str]) -> None:
            try:
                original(updated)
            except exceptions.OptionsError as e:
                if self.ready:
                    raise  # at run time: mitmproxy rolls the change back and says why
                self.fail(str(e))
                return
            if not self.ready and self.failed is None and self.loaded():
                self._became_ready()

        watched.configure = configure  # mitmproxy looks hooks up on the instance
        return [self, *addons, self.options_check]

    def _became_ready(self) -> None:
        self.ready = True
        master: Any = getattr(ctx, "master", None)
        fallback = master.addons.get(_Fallback.name) if master is not None else None
        if fallback is not None:
            master.addons.remove(fallback)
            log.info("gemini-proxy: the reloaded script took effect")

    def fail(self, message: str) -> None:
        if self.failed is not None:
            return
        self.failed, self.ready = message, False
        log.error(
            "gemini-proxy: cannot start: %s (without it every request would go upstream "
            "unchecked: stopping)",
            message,
        )
        if self.running_seen:  # mitmproxy's startup error check is over: stop it ourselves
            master = getattr(ctx, "master", None)
            if master is not None:
                master.shutdown()

    # ------------------------------------------------------------------ hooks

    def running(self) -> None:
        self.options_check.leftovers()
        self.running_seen = True
        if not self.ready and self.failed is None:
            self.fail("the key file was never loaded")

    def done(self) -> None:
        master = getattr(ctx, "master", None)
        if master is None or master.should_exit.is_set() or not self.ready:
            return  # a real shutdown (or a start that failed)
        # the script is being reloaded: nothing goes unchecked until the new one took effect
        if master.addons.get(_Fallback.name) is None:
            master.addons.add(_Fallback())
            log.warning("gemini-proxy: script reloading: requests get 503 until it has loaded")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.ready:
            _refuse(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(_MARK):
            raise exceptions.AddonHalt  # the refusal stands


def _refuse(flow: http.HTTPFlow) -> None:
    flow.metadata[_MARK] = True
    flow.response = http.Response.make(
        503, _REFUSAL, {"content-type": "application/json", "connection": "close"}
    )
    raise exceptions.AddonHalt  # no later addon sees it: nothing is forwarded


class _Fallback:
    """Left in mitmproxy's chain while the script reloads: refuses every flow."""

    name = "gemini_proxy_reloading"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        _refuse(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(_MARK):
            raise exceptions.AddonHalt


class _OptionsCheck:
    """The script's last addon: its `load` runs once every option of the script exists."""

    name = "gemini_options_check"

    def __init__(self, guard: StartupGuard) -> None:
        self.guard = guard

    def load(self, loader: Any) -> None:
        opts = loader.master.options
        known: dict[str, Any] = getattr(opts, "_options", {})
        for name, value in list(opts.deferred.items()):
            values = getattr(value, "val", None)
            if name not in known or not isinstance(values, list):
                continue
            try:
                opts._parse_setval(known[name], values)
            except exceptions.OptionsError as e:
                # dropped, so that mitmproxy still registers the script (and the guard refuses
                # every flow until the process has stopped)
                del opts.deferred[name]
                self.guard.fail(f"--set {name}: {e}")

    def leftovers(self) -> None:
        opts = ctx.options
        unknown = sorted(n for n in opts.deferred if n.startswith("gemini_"))
        if unknown:
            self.guard.fail(f"no such option: {', '.join(unknown)} (mitmdump --options lists them)")
