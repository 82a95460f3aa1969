"""The pool's admin page as server-rendered HTML (pure: no aiohttp, no mitmproxy import).

Every value goes through `esc` (key names, projects, errors and client names come from the key
file or from Google). Nothing here ever sees a secret: the page is built from the same views as
the admin API (masked keys, names, scrubbed errors). A section is one entry in SECTIONS (keys,
budgets, recent failures, clients): a new view adds a renderer there and nothing else.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

PREFIX = "/page"
REFRESH_SECONDS = 5
FAILURES_SHOWN = 20


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def clock(t: float, now: float | None = None) -> str:
    """HH:MM:SS UTC; with the date when `t` is not on `now`'s day."""
    same_day = now is None or time.gmtime(t)[:3] == time.gmtime(now)[:3]
    return time.strftime("%H:%M:%S" if same_day else "%b %d %H:%M", time.gmtime(t)) + " UTC"


def seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


@dataclass
class PageData:
    """What one rendering shows; each field is a plain view the admin API also serves."""

    now: float
    keys: list[dict[str, Any]]  # ProxyService.describe_keys(usage_today)
    health: dict[str, Any]  # ProxyService.health()
    failures: list[dict[str, Any]] | None = None  # recent outcomes >= 400; None: no database
    clients: list[str] = field(default_factory=list)  # client names from the key file
    client_lines: list[str] = field(default_factory=list)  # clients_view.client_line of each
    budget_lines: list[str] = field(default_factory=list)  # pool_views.budget_line of each
    worker: str | None = None  # this worker's name when workers share state
    csrf: str = ""  # the session's CSRF token ("" when signed in by bearer header)


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    render: Callable[[PageData], str]


# --- pieces


def _form(action: str, label: str, csrf: str, cls: str = "") -> str:
    return (
        f'<form method="post" action="{esc(action)}">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<button type="submit" class="{esc(cls)}">{esc(label)}</button></form>'
    )


def _table(head: list[str], rows: list[str], cls: str) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<table class="{esc(cls)}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def key_state(k: dict[str, Any], now: float) -> tuple[str, str]:
    """(css class, words) for a key's state: active, cooling until…, dead and why, disabled by whom."""
    status = k.get("status")
    if status == "disabled":
        who = "an operator" if k.get("enabled_override") is False else "the key file"
        return "disabled", f"disabled by {who}"
    if status == "dead":
        check = k.get("next_check_in")
        again = f" (checked again in {seconds(check)})" if check is not None else ""
        return "dead", f"dead: {k.get('disabled_reason')}{again}"
    if status == "suspect":
        return "dead", f"suspected dead: {k.get('suspect')} (being checked)"
    if status == "open":
        left = float(k.get("breaker", {}).get("seconds_left") or 0)
        return "cooling", f"breaker open until {clock(now + left, now)} (in {seconds(left)})"
    cooling = k.get("cooldowns") or {}
    if cooling:
        parts = []
        for model, c in sorted(cooling.items()):
            left = float(c.get("seconds_left") or 0)
            what = "all models" if model == "*" else model
            parts.append(
                f"{what} until {clock(now + left, now)}, in {seconds(left)} ({c.get('reason')})"
            )
        label = "cooling" if status == "cooling" else "active"  # active: only some models cool
        return label, f"{label}: " + "; ".join(parts)
    return "active", "active"


def _key_row(k: dict[str, Any], data: PageData) -> str:
    name = str(k.get("name", ""))
    cls, state = key_state(k, data.now)
    b = k.get("breaker") or {}
    breaker = f"{b.get('state', '?')}"
    if b.get("failures") or b.get("trips"):
        breaker += f" · {b.get('failures', 0)} failures · {b.get('trips', 0)} trips"
    u = k.get("usage_today") or {}
    today = (
        f"{int(u.get('requests') or 0)} req · {int(u.get('errors') or 0)} err<br>"
        f"{int(u.get('tokens_in') or 0)} in · {int(u.get('tokens_out') or 0)} out"
    )
    health = float(k.get("health") or 0.0)
    weight = f"{k.get('weight')}" + (" (set here)" if k.get("weight_override") else "")
    base = f"{PREFIX}/keys/{quote(name, safe='')}"
    toggle = (
        _form(f"{base}/disable", "disable", data.csrf, "warn")
        if k.get("enabled")
        else _form(f"{base}/enable", "enable", data.csrf)
    )
    actions = toggle + _form(f"{base}/reset", "reset", data.csrf)
    error = k.get("last_error")
    return (
        f'<tr class="key {esc(cls)}" data-key="{esc(name)}">'
        f'<td class="name">{esc(name)}</td>'
        f'<td class="mask">{esc(k.get("key"))}</td>'
        f"<td>{esc(k.get('project'))}</td>"
        f'<td class="state">{esc(state)}</td>'
        f"<td>{esc(breaker)}</td>"
        f'<td class="num"><meter min="0" max="1" low="0.5" optimum="1" value="{health:.3f}"></meter>'
        f" {health:.0%}</td>"
        f"<td>{esc(weight)}</td>"
        f'<td class="num">{today}</td>'
        f'<td class="error">{esc(error) if error else "—"}</td>'
        f'<td class="actions">{actions}</td></tr>'
    )


def render_keys(data: PageData) -> str:
    if not data.keys:
        return '<p class="empty">No keys are configured: add some to the key file, then reload.</p>'
    head = [
        "Key",
        "Mask",
        "Project",
        "State",
        "Breaker",
        "Health",
        "Weight",
        "Today",
        "Last error",
        "",
    ]
    return _table(head, [_key_row(k, data) for k in data.keys], "keys")


def _attempts(attempts: Any) -> str:
    if not isinstance(attempts, list):
        return ""
    parts = []
    for a in attempts:
        if isinstance(a, dict):
            parts.append(f"{a.get('key')}: {a.get('reason') or a.get('outcome')}")
    return " → ".join(parts)


def render_failures(data: PageData) -> str:
    if data.failures is None:
        return '<p class="empty">Persistence is off (gemini_db is empty): no request history.</p>'
    more = f'<p><a href="{PREFIX}/requests?limit=200">All recent requests</a> (JSON, as <code>GET /admin/requests</code>)</p>'
    if not data.failures:
        return '<p class="empty">No failed requests recorded.</p>' + more
    rows = []
    for f in data.failures[:FAILURES_SHOWN]:
        key = f.get("key")
        status = f.get("status")
        key_link = (
            f'<a href="{PREFIX}/requests?{esc(urlencode({"tried": key}))}">{esc(key)}</a>'
            if key
            else "—"
        )
        rows.append(
            "<tr>"
            f"<td>{esc(clock(float(f.get('t') or 0), data.now))}</td>"
            f'<td><a href="{PREFIX}/requests?{esc(urlencode({"status": status}))}">{esc(status)}</a></td>'
            f"<td>{esc(f.get('outcome'))}</td>"
            f"<td>{key_link}</td>"
            f"<td>{esc(f.get('model'))}</td>"
            f"<td>{esc(f.get('client') or '—')}</td>"
            f'<td class="error">{esc(f.get("proxy_reason") or _attempts(f.get("attempts")))}</td>'
            f'<td class="mono">{esc(f.get("request_id"))}</td>'
            "</tr>"
        )
    head = ["Time", "Status", "Outcome", "Key", "Model", "Client", "What happened", "Request id"]
    return _table(head, rows, "failures") + more


def render_clients(data: PageData) -> str:
    if not data.clients:
        return '<p class="empty">No client tokens: any caller may use the pool.</p>'
    items = "".join(f"<li>{esc(c)}</li>" for c in data.client_lines or data.clients)
    return f'<ul class="clients">{items}</ul>'


def render_budgets(data: PageData) -> str:
    if not data.budget_lines:
        return (
            '<p class="empty">No budgets: none configured (<code>projects:</code> in the key '
            "file) or learned from Google's 429s yet.</p>"
        )
    items = "".join(f"<li>{esc(b)}</li>" for b in data.budget_lines)
    return f'<ul class="budgets">{items}</ul>'


SECTIONS: list[Section] = [
    Section("keys", "Keys", render_keys),
    Section("budgets", "Budgets per project and model", render_budgets),
    Section("failures", "Recent failures", render_failures),
    Section("clients", "Clients", render_clients),
]


def render_summary(data: PageData) -> str:
    h = data.health
    counts = " · ".join(
        f'<span class="count {esc(k) if h.get(k) else "zero"}">{esc(h.get(k, 0))} {esc(k)}</span>'
        for k in ("active", "cooling", "open", "suspect", "dead", "disabled")
    )
    worker = f" · worker {esc(data.worker)}" if data.worker else ""
    return (
        f'<p class="summary">{esc(h.get("keys", 0))} keys: {counts} · '
        f"{esc(h.get('inflight', 0))} in flight{worker} · "
        f'<span id="updated">updated {esc(clock(data.now))}</span></p>'
    )


def render_live(data: PageData, sections: list[Section] | None = None) -> str:
    """The part the page's script fetches again every few seconds and swaps in."""
    out = [render_summary(data)]
    for s in sections if sections is not None else SECTIONS:
        out.append(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.render(data)}</section>')
    return "".join(out)


def _document(title: str, body: str) -> str:
    return (
        "<!doctype html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>{esc(title)}</title>"
        f'<link rel="stylesheet" href="{PREFIX}/page.css">'
        f'<script src="{PREFIX}/page.js" defer></script>'
        f"</head><body>{body}</body></html>"
    )


def render_page(data: PageData, notice: str = "") -> str:
    header = (
        '<header><h1>gemini-proxy <span class="sub">key pool</span></h1><nav>'
        + _form(f"{PREFIX}/reload", "reload key file", data.csrf)
        + (_form(f"{PREFIX}/logout", "sign out", data.csrf) if data.csrf else "")
        + "</nav></header>"
    )
    flash = f'<p class="notice" role="status">{esc(notice)}</p>' if notice else ""
    live = (
        f'<main id="live" data-src="{PREFIX}/live" data-every="{REFRESH_SECONDS}">'
        f"{render_live(data)}</main>"
    )
    return _document("gemini-proxy · key pool", header + flash + live)


def render_login(message: str = "", off: bool = False) -> str:
    """The sign-in form: no key name, no count, nothing about the pool."""
    if off:
        form = (
            '<p class="notice">The page is off: give the admin a token in the environment '
            "(GEMINI_ADMIN_TOKEN=...) or in a file (--set gemini_admin_token_file=PATH).</p>"
        )
    else:
        form = (
            f'<form class="login" method="post" action="{PREFIX}/login">'
            '<label for="token">Admin token</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" '
            "required autofocus>"
            '<button type="submit">Sign in</button></form>'
        )
    note = f'<p class="notice" role="alert">{esc(message)}</p>' if message else ""
    body = f'<main class="signin"><h1>gemini-proxy</h1><p>Sign in with the admin token.</p>{note}{form}</main>'
    return _document("gemini-proxy · sign in", body)
