"""Clients with their usage today and their limits: for GET /admin/clients, `gemini.clients` and
the page. Pure: built from the config, the limiter (live counts, the other workers' included) and
this worker's accounting rows from SQLite (per model)."""

from __future__ import annotations

from typing import Any

from .config import Config
from .limits import Limiter, describe, short


def describe_clients(
    config: Config, limiter: Limiter, accounting: dict[str, Any]
) -> list[dict[str, Any]]:
    """One entry per configured client (or `local` in loopback mode without clients)."""
    out = []
    specs = [
        (c.name, c.group_name if c.group else None, describe(c.limits)) for c in config.clients
    ]
    if not specs:
        specs = [("local", None, {})]
    for name, group, limits in specs:
        acc = accounting.get(name, {})
        out.append(
            {
                "name": name,
                "group": group,
                "limits": limits,
                "today": limiter.usage(name),  # every worker sharing Redis
                "accounting_today": {  # this worker's database, per model
                    "requests": acc.get("requests", 0),
                    "limited": acc.get("limited", 0),
                    "tokens_in": acc.get("tokens_in", 0),
                    "tokens_out": acc.get("tokens_out", 0),
                    "models": acc.get("models", {}),
                },
            }
        )
    return out


def client_line(c: dict[str, Any]) -> str:
    """One client as one line (the command bar)."""
    t, a, lim = c["today"], c["accounting_today"], c["limits"]
    limits = ", ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}" for k, v in lim.items())
    return (
        f"{c['name']}"
        + (f" (group {c['group']})" if c["group"] else "")
        + f": {t['requests_today']} requests, {short(t['tokens_today'])} tokens today"
        + f" ({short(a['tokens_in'])} in / {short(a['tokens_out'])} out here)"
        + f", {t['requests_last_minute']} in the last minute, {t['in_flight']} in flight"
        + (f", {t['limited_today']} refused by limits" if t["limited_today"] else "")
        + f"; limits: {limits or 'none'}"
    )
