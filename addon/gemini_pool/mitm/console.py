"""The console as a mitmproxy addon: the gemini.* commands, and what each flow shows in mitmweb.

Commands work in mitmweb's and mitmproxy's command bar (`gemini.keys`, `gemini.disable NAME`, ...).
`annotate` puts a request's comment, metadata and mark (built in `comments.py`) on its flow;
`Progress` refreshes a stream's comment while it runs. mitmweb's command bar shows a result as JSON
(a list in one line, an error like a value): `gemini.keys` also writes one event-log line per key,
and a command's error starts with "error:".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.hooks import UpdateHook

from ..clients_view import client_line
from ..comments import comment, mark, metadata
from ..pool_views import budget_line
from ..records import RequestRecord
from ..runtime import Runtime


def annotate(flow: http.HTTPFlow, rec: RequestRecord) -> None:
    flow.comment = text = comment(rec)
    if rec.ended:
        rec.final_comment = text
    flow.metadata["gemini"] = metadata(rec)
    marker = mark(rec)
    if marker is not None:
        flow.marked = marker


log = logging.getLogger("gemini_proxy")

PROGRESS_EVERY = 1.0  # seconds between two refreshes of a running stream's comment


class Progress:
    """A stream in flight: its bytes and events so far in the flow's comment, at most once per
    PROGRESS_EVERY, with an update event so mitmweb (and the console) show the change."""

    __slots__ = ("flow", "rec", "shown")

    def __init__(self, flow: http.HTTPFlow, rec: RequestRecord) -> None:
        self.flow, self.rec, self.shown = flow, rec, time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        # the flow points at the relay until mitmproxy read the answer's head: show it after
        if now - self.shown < PROGRESS_EVERY or self.rec.ended or self.rec.detour is not None:
            return
        self.shown = now
        try:
            self.flow.comment = comment(self.rec)
            ctx.master.addons.trigger(UpdateHook([self.flow]))
        except Exception:  # showing progress must never break the stream it shows
            log.exception("gemini-proxy: cannot show the progress of %s", self.rec.request_id)


class Console:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @command.command("gemini.keys")
    def keys_cmd(self) -> Sequence[str]:
        """Every key, one line each: status, breaker, cooldowns, health, last error."""
        lines = [describe_line(k) for k in self.rt.service.describe_keys()] or [
            "no keys configured"
        ]
        for line in lines:  # mitmweb's command bar shows the list as one JSON line
            log.info("gemini.keys: %s", line)
        return lines

    @command.command("gemini.clients")
    def clients_cmd(self) -> Sequence[str]:
        """Every client, one line each: usage today (requests, tokens, in flight) and limits."""
        service = self.rt.service
        return [client_line(c) for c in service.describe_clients(service.clients_today())]

    def _operate(self, name: str, action: str) -> str:
        before = next((k for k in self.rt.service.describe_keys() if k["name"] == name), None)
        if before is None:
            raise exceptions.CommandError(f"error: no key named {name!r} (gemini.keys lists them)")
        after = self.rt.service.operator(name, action)
        return f"{action}: {name} was {_condition(before)}, now {_condition(after)}"

    @command.command("gemini.enable")
    def enable_cmd(self, name: str) -> str:
        """Enable a key (overrides the YAML and a dead-key disable)."""
        return self._operate(name, "enable")

    @command.command("gemini.disable")
    def disable_cmd(self, name: str) -> str:
        """Disable a key until enabled again (survives restarts)."""
        return self._operate(name, "disable")

    @command.command("gemini.reset")
    def reset_cmd(self, name: str) -> str:
        """Forget a key's failures, cooldowns, dead mark and operator overrides."""
        return self._operate(name, "reset")

    @command.command("gemini.own")
    def own_cmd(self, name: str, client: str) -> str:
        """Hand a resource (files/ID, cachedContents/ID, ...) to a client's group."""
        try:
            done = self.rt.service.hand_over(name, client=client)
        except ValueError as e:
            raise exceptions.CommandError(str(e)) from None
        return f"{done['name']} now belongs to {client}'s group ({done['group']})"

    @command.command("gemini.budgets")
    def budgets_cmd(self) -> Sequence[str]:
        """Budgets per project x model: each limit with its source, used, left, resets in."""
        lines = [budget_line(b) for b in self.rt.service.describe_budgets()]
        return lines or ["no budgets: no limits configured (projects:) or learned, nothing counted"]

    @command.command("gemini.reload")
    def reload_cmd(self) -> str:
        """Re-read the key file now."""
        before = set(self.rt.service.pool.keys)
        if not self.rt.reload_keys("gemini.reload command"):
            raise exceptions.CommandError(
                "error: reload failed; the old config stays (see the log)"
            )
        after = set(self.rt.service.pool.keys)
        added, removed = sorted(after - before), sorted(before - after)
        return (
            f"reloaded {self.rt.service.settings.keys_path}: {len(after)} keys"
            f"; added: {', '.join(added) or '-'}; removed: {', '.join(removed) or '-'}"
        )


def describe_line(k: dict[str, Any]) -> str:
    """One key as one line, for the command bar and the log."""
    cool = ", ".join(f"{m} {c['seconds_left']:.0f}s" for m, c in k["cooldowns"].items())
    return (
        f"{k['name']} ({k['key']}) {k['status']}"
        + (
            f" ({k['disabled_reason'] or k['suspect']})"
            if k["disabled_reason"] or k["suspect"]
            else ""
        )
        + f" project={k['project']} weight={k['weight']} breaker={k['breaker']['state']}"
        + f" health={k['health']}"
        + (f" cooling=[{cool}]" if cool else "")
        + (f" next_check={k['next_check_in']:.0f}s" if k["next_check_in"] is not None else "")
        + (f" last_error={k['last_error']}" if k["last_error"] else "")
    )


def _condition(k: dict[str, Any]) -> str:
    why = k["disabled_reason"] or k["suspect"]
    cool = ", ".join(f"{m} cooling {c['seconds_left']:.0f}s" for m, c in k["cooldowns"].items())
    return (
        str(k["status"])
        + (f" ({why})" if why else "")
        + f", weight {k['weight']}"
        + (f", {cool}" if cool else "")
    )
