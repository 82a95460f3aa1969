"""The admin page's stylesheet and script, served from the admin port itself (CSP 'self').

The script only fetches the live part of the page again every few seconds and swaps it in: no
framework, no build step, nothing from elsewhere. The page works without it (reload by hand).
"""

from __future__ import annotations

CSS = """\
:root { color-scheme: light dark; --bg: #fbfbfa; --fg: #1d1d1f; --mute: #6b6b70; --line: #e3e3e0;
  --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --off: #6b6b70; --card: #fff; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #111214; --fg: #e8e8ea; --mute: #9a9aa2; --line: #2b2d31; --card: #18191c;
    --ok: #3fb950; --warn: #d29922; --bad: #f85149; --off: #8b8b93; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 1.2rem 1.6rem 3rem; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; align-items: baseline; justify-content: space-between; gap: 1rem;
  border-bottom: 1px solid var(--line); padding-bottom: .6rem; }
h1 { font-size: 1.25rem; margin: 0; } h1 .sub { color: var(--mute); font-weight: 400; }
h2 { font-size: 1rem; margin: 1.6rem 0 .5rem; }
nav { display: flex; gap: .5rem; }
form { display: inline; margin: 0; }
button { font: inherit; font-size: .85rem; padding: .2rem .6rem; border-radius: 6px; cursor: pointer;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); }
button:hover { border-color: var(--mute); } button.warn { color: var(--bad); }
.summary { color: var(--mute); margin: .8rem 0 0; }
.count.active { color: var(--ok); } .count.cooling, .count.open { color: var(--warn); }
.count.dead, .count.suspect { color: var(--bad); } .count.zero { color: var(--mute); }
table { border-collapse: collapse; width: 100%; background: var(--card);
  border: 1px solid var(--line); border-radius: 8px; }
th, td { text-align: left; vertical-align: top; padding: .45rem .6rem; border-bottom: 1px solid var(--line); }
th { font-weight: 600; color: var(--mute); font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; }
tr:last-child td { border-bottom: 0; }
td.name { font-weight: 600; white-space: nowrap; } td.mask, .mono { font-family: ui-monospace, Menlo, monospace; font-size: .85em; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
td.error { color: var(--mute); max-width: 28rem; overflow-wrap: anywhere; }
td.actions { white-space: nowrap; } td.actions form + form { margin-left: .3rem; }
tr.key td.state { font-weight: 500; }
tr.active td.state { color: var(--ok); } tr.cooling td.state { color: var(--warn); }
tr.dead td.state { color: var(--bad); } tr.disabled td.state { color: var(--off); }
tr.disabled td.name { color: var(--off); }
meter { width: 4rem; vertical-align: middle; }
.empty { color: var(--mute); }
.notice { padding: .5rem .8rem; border: 1px solid var(--line); border-radius: 6px; background: var(--card); }
#live.stale .summary::after { content: " · not updating: the admin port did not answer"; color: var(--bad); }
main.signin { max-width: 22rem; margin: 12vh auto; }
form.login { display: flex; flex-direction: column; gap: .5rem; }
form.login input { font: inherit; padding: .4rem .5rem; border: 1px solid var(--line); border-radius: 6px;
  background: var(--card); color: var(--fg); }
form.login button { padding: .45rem; font-size: .95rem; }
"""

JS = """\
"use strict";
// Fetch the live part of the page every few seconds and swap it in (HTML rendered and escaped
// by the server). A signed-out answer (401) reloads the page, which then shows the sign-in form.
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const src = live.dataset.src;
  const every = (Number(live.dataset.every) || 5) * 1000;
  let busy = false;
  let count = 0;
  async function refresh() {
    if (busy || document.visibilityState === "hidden") return;
    busy = true;
    try {
      const r = await fetch(src, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { window.location.reload(); return; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      live.innerHTML = await r.text();
      live.classList.remove("stale");
      live.dataset.refreshes = String(++count);
    } catch (e) {
      live.classList.add("stale");
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
})();
"""
