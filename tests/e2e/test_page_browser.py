"""The pool's page in a real headless Chromium (Debian's `chromium`), driven over the DevTools
protocol: sign in through the form, read the keys table, watch it refresh without a reload, act
through a form, and keep a screenshot (tests/artifacts/page.png, git-ignored)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import pytest

from ..conftest import ROOT, Fake, Proxy, key_entry, new_secret, wait_for
from .test_proxy import gen

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: ./scripts/test installs it (apt-get install chromium)",
)


class Cdp:
    """The least of a DevTools protocol client: numbered calls, events kept for inspection."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            fut = self.pending.pop(data.get("id", -1), None)
            if fut is None:
                self.events.append(data)
            elif "error" in data:
                fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
            else:
                fut.set_result(data.get("result", {}))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        return await asyncio.wait_for(fut, 30)

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression: str, timeout: float = 30.0) -> Any:
        """Wait for a page-side condition (polled; bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while loop.time() < deadline:
            with contextlib.suppress(AssertionError, RuntimeError):
                last = await self.js(expression)
                if last:
                    return last
            await asyncio.sleep(0.1)
        body = await self.js("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise AssertionError(f"not true within {timeout}s: {expression} (page: {body!r})")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Cdp]:
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # the suite may run as root (containers, CI)
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--hide-scrollbars",
            "--renderer-process-limit=1",  # the machine has 2 cores
            "--window-size=1400,900",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"

        def devtools_port() -> int:
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}")
            return int(port_file.read_text().split()[0])

        port = await asyncio.to_thread(wait_for, devtools_port, 60)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url, max_msg_size=0) as ws,
        ):
            cdp = Cdp(ws)
            for domain in ("Page", "Runtime", "Log"):
                await cdp.call(f"{domain}.enable")
            await cdp.call(
                "Emulation.setDeviceMetricsOverride",
                width=1400,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield cdp
            cdp.reader.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def rows_js() -> str:
    return (
        "JSON.stringify([...document.querySelectorAll('table.keys tr.key')].map("
        "r => [r.dataset.key, r.querySelector('td.state').innerText]))"
    )


def test_the_page_in_chromium_signs_in_shows_the_keys_refreshes_and_acts(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    secrets = {"alpha-key": new_secret(), "beta-key": new_secret(), "gamma-key": new_secret()}
    fake.configure(
        {secrets["alpha-key"]: "ok", secrets["beta-key"]: "ok", secrets["gamma-key"]: "cap"}
    )
    proxy: Proxy = make_proxy(
        [
            key_entry("alpha-key", secrets["alpha-key"], project="proj-a"),
            key_entry("beta-key", secrets["beta-key"], project="proj-b"),
            key_entry("gamma-key", secrets["gamma-key"], project="proj-c", weight=50),
        ]
    )
    assert gen(proxy).status_code == 200  # gamma answers 429 (spending cap): it cools down
    assert gen(proxy, model="no-such-model").status_code == 404  # a failure for the list
    proxy.admin.get("/admin/requests")  # commit what is queued
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "page.png"

    def admin_state(name: str) -> Callable[[], bool]:
        return lambda: proxy.keys_state()[name]["status"] == "disabled"

    async def run() -> None:
        async with chromium(tmp_path / "profile") as cdp:
            await cdp.call("Page.navigate", url=f"{proxy.admin_url}/")
            await cdp.until(
                "document.readyState === 'complete' && !!document.getElementById('token')"
            )
            signed_out = await cdp.js("document.documentElement.outerHTML")
            proxy.remember(signed_out.encode())
            png = await cdp.call("Page.captureScreenshot", format="png")
            (ARTIFACTS / "page-signin.png").write_bytes(base64.b64decode(png["data"]))
            for name in secrets:
                assert name not in signed_out
            await cdp.js("document.getElementById('token').focus()")
            await cdp.call("Input.insertText", text=proxy.admin_token)
            await cdp.js("document.querySelector('form.login button').click()")
            await cdp.until("document.querySelectorAll('table.keys tr.key').length === 3")
            rows = dict(json.loads(await cdp.js(rows_js())))
            assert set(rows) == set(secrets)
            assert rows["alpha-key"] == "active" and rows["beta-key"] == "active"
            assert rows["gamma-key"].startswith("cooling: all models until"), rows
            # the stylesheet and the script were allowed by the CSP and did their work
            assert (
                await cdp.js(
                    "getComputedStyle(document.querySelector('table.keys')).borderCollapse"
                )
                == "collapse"
            )
            assert await cdp.js("document.cookie") == ""  # HttpOnly: no script reads the session
            html = await cdp.js("document.documentElement.outerHTML")
            proxy.remember(html.encode())
            assert "no-such-model" in html and proxy.admin_token not in html
            for s in secrets.values():
                assert s not in html

            # an operator disables beta elsewhere: the table shows it without a reload
            await cdp.js("window.sameDocument = 'yes'")
            refreshes = int(await cdp.js("document.getElementById('live').dataset.refreshes || 0"))
            assert proxy.admin.post("/admin/keys/beta-key/disable").status_code == 200
            await cdp.until(
                "[...document.querySelectorAll('tr.key')].some(r => r.dataset.key === 'beta-key'"
                " && r.querySelector('td.state').innerText === 'disabled by an operator')",
                timeout=30,
            )
            assert await cdp.js("window.sameDocument") == "yes"
            assert (
                int(await cdp.js("document.getElementById('live').dataset.refreshes")) > refreshes
            )

            # the page's own form disables alpha (POST with the session's CSRF token)
            await cdp.js(
                'document.querySelector(\'tr[data-key="alpha-key"] form[action$="/disable"]'
                " button').click()"
            )
            await asyncio.to_thread(wait_for, admin_state("alpha-key"), 20)
            await cdp.until(
                "document.readyState === 'complete' && !!document.querySelector("
                '\'tr[data-key="alpha-key"] form[action$="/enable"]\')'
            )
            assert proxy.keys_state()["alpha-key"]["enabled_override"] is False
            rows = dict(json.loads(await cdp.js(rows_js())))
            assert rows["alpha-key"] == "disabled by an operator"

            png = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            shot.write_bytes(base64.b64decode(png["data"]))
            (tmp_path / "page.png").write_bytes(shot.read_bytes())

            # signing out shows the form again and no key
            await cdp.js("document.querySelector('form[action=\"/page/logout\"] button').click()")
            await cdp.until("!!document.getElementById('token')")
            after = await cdp.js("document.documentElement.outerHTML")
            for name in secrets:
                assert name not in after

            blocked = [
                e
                for e in cdp.events
                if e.get("method") == "Runtime.exceptionThrown"
                or "Content Security Policy" in json.dumps(e.get("params", {}))
            ]
            assert not blocked, blocked

    asyncio.run(run())
    print(f"\nscreenshot of the page: {shot}")
    assert shot.stat().st_size > 10_000
