"""mitmweb as an operator reads it: a stream's comment while it runs (over mitmweb's own
websocket, as its UI gets it), the filter box on the #tags, the command bar's errors, and the
Comment tab in a real headless Chromium (screenshot: tests/artifacts/mitmweb-comment.png)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import pytest

from ..conftest import ROOT, Fake, Proxy, free_port, gen_body, key_entry, new_secret, wait_for
from .test_page_browser import CHROMIUM, chromium
from .test_proxy import FLASH, gen

PASSWORD = "web-pass-789"
STREAM = f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"


def mitmweb(fake: Fake, make_proxy: Any) -> tuple[Proxy, int, str, str]:
    """alpha (weight 10, tried first) is out of per-minute quota; beta serves."""
    a, b = new_secret(), new_secret()
    fake.configure({a: "minute:60", b: "ok"})
    web_port = free_port()
    proxy: Proxy = make_proxy(
        [key_entry("alpha", a, weight=10), key_entry("beta", b)],
        tool="mitmweb",
        options={"web_port": web_port, "web_password": PASSWORD, "web_open_browser": False},
    )
    return proxy, web_port, a, b


class Updates:
    """mitmweb's /updates websocket, as its UI reads it: flow updates and filter results."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            self.messages.append(json.loads(msg.data))

    def comments(self, flow_id: str) -> list[str]:
        return [
            m["payload"]["flow"]["comment"]
            for m in self.messages
            if m["type"] in ("flows/add", "flows/update") and m["payload"]["flow"]["id"] == flow_id
        ]

    async def search(self, expr: str) -> list[str]:
        """What mitmweb's filter box does: the server filters, the UI shows these flow ids."""
        mark = len(self.messages)
        await self.ws.send_json(
            {"type": "flows/updateFilter", "payload": {"name": "search", "expr": expr}}
        )
        for _ in range(200):
            for m in self.messages[mark:]:
                if m["type"] == "flows/filterUpdate" and m["payload"]["name"] == "search":
                    return sorted(m["payload"]["matching_flow_ids"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"no filter answer for {expr!r}")


def test_mitmweb_shows_a_running_stream_and_its_filter_box_finds_the_tags(
    fake: Fake, make_proxy: Any
) -> None:
    proxy, web_port, a, b = mitmweb(fake, make_proxy)
    auth = {"Authorization": f"Bearer {PASSWORD}"}
    assert gen(proxy).status_code == 200  # alpha 429, then beta: a retried success
    # alpha cools for a minute: the stream goes to beta at once

    async def run() -> None:
        async with (
            aiohttp.ClientSession(headers=auth) as web,
            web.ws_connect(f"ws://127.0.0.1:{web_port}/updates") as ws,
            aiohttp.ClientSession() as caller,
        ):
            updates = Updates(ws)
            headers = {"x-goog-api-key": "u", "x-fake-events": "40", "x-fake-delay-ms": "150"}
            async with caller.post(f"{proxy.url}{STREAM}", json=gen_body(), headers=headers) as r:
                assert r.status == 200
                body = await r.read()
            assert body.count(b"data: ") == 40
            flows = await (await web.get(f"http://127.0.0.1:{web_port}/flows")).json()
            assert len(flows) == 2
            plain_id, stream_id = flows[0]["id"], flows[1]["id"]
            # while it ran, mitmweb was told what the stream carried so far, more each time
            said = [c for c in updates.comments(stream_id) if c]  # added with no comment yet
            assert said[0] == "served by beta: 200 · stream started"
            running = [c for c in said if "streaming:" in c]
            assert len(running) >= 2, said
            events = [
                int(m.group(1)) for c in running if (m := re.search(r"B, (\d+) events? so far$", c))
            ]
            assert (
                len(events) == len(running) and events == sorted(events) and events[0] < events[-1]
            )
            assert all(c.startswith("served by beta: 200 · streaming: ") for c in running)
            final = flows[1]["comment"]
            assert final.endswith(", 40 events, tokens 5 in / 40 out, complete"), final
            assert "\n" not in final and "streaming" not in final

            # the filter box: tags are literal there; "[quota]" would be a character class
            assert await updates.search("~comment #quota") == [plain_id]
            assert await updates.search('~comment "served by beta:"') == sorted(
                [plain_id, stream_id]
            )
            assert await updates.search('~comment "served by alpha:"') == []
            assert await updates.search("~comment #dead-key") == []
            assert await updates.search("~comment #cut") == []
            assert len(await updates.search("~comment [quota]")) == 2  # matches any "a", "u", ...
            assert await updates.search("~meta streaming") == []  # metadata: key, attempts, ...
            assert await updates.search("~meta alpha") == [plain_id]  # alpha's failed attempt

            # a stream Google cuts says so in words, and is found by its tag
            fake.configure({a: "minute:60", b: "cut:2"})
            async with caller.post(f"{proxy.url}{STREAM}", json=gen_body(), headers=headers) as r:
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await r.read()
            flows = await (await web.get(f"http://127.0.0.1:{web_port}/flows")).json()
            cut = flows[2]["comment"]
            assert cut.startswith("failed: the stream from beta was cut · streamed "), cut
            assert cut.endswith(
                ", then cut: upstream broke off the answer mid-stream #cut"
            ) or cut.endswith(", then cut: upstream closed the connection mid-stream #cut"), cut
            assert "Error" not in cut and flows[2]["marked"] == "\u26a0"
            assert await updates.search("~comment #cut") == [flows[2]["id"]]
            updates.reader.cancel()

    asyncio.run(asyncio.wait_for(run(), 60))
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=auth, timeout=10)
    for secret in (a, b):
        assert secret not in web.get("/flows").text

    # the command bar shows a result as JSON on one line: the event log has one line per key
    web.cookies.set("_mitmproxy_xsrf", "t0k")  # tornado's XSRF check: cookie == header
    xsrf = {"X-XSRFToken": "t0k"}

    def command(cmd: str, *args: str) -> Any:
        return web.post(f"/commands/{cmd}", json={"arguments": list(args)}, headers=xsrf).json()

    keys = command("gemini.keys")["value"]
    assert [k.split(" ")[:2] for k in keys] == [
        ["alpha", f"(AIza…{a[-4:]})"],
        ["beta", f"(AIza…{b[-4:]})"],
    ]

    assert " cooling " in keys[0] and " health=1.0 " in keys[0]  # a 429 cools, health stays

    def key_events() -> list[str]:
        return [e["message"] for e in web.get("/events").json() if "gemini.keys:" in e["message"]]

    events = wait_for(lambda: len(e := key_events()) == 2 and e)  # "[time] gemini.keys: ..."
    assert [e.split("] ", 1)[1] for e in events] == [f"gemini.keys: {k}" for k in keys]
    said = command("gemini.disable", "x")["error"]
    assert said == "error: no key named 'x' (gemini.keys lists them)"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_the_comment_tab_reads_as_a_paragraph_in_chromium(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    proxy, web_port, _, _ = mitmweb(fake, make_proxy)
    assert gen(proxy).status_code == 200
    auth = {"Authorization": f"Bearer {PASSWORD}"}
    flows = wait_for(
        lambda: (f := httpx.get(f"http://127.0.0.1:{web_port}/flows", headers=auth).json()) and f
    )
    flow_id, comment = flows[0]["id"], flows[0]["comment"]

    async def run() -> str:
        async with chromium(tmp_path / "profile") as cdp:
            url = f"http://127.0.0.1:{web_port}/?token={PASSWORD}#/flows/{flow_id}/comment"
            await cdp.call("Page.navigate", url=url)
            await cdp.until("document.querySelector('section.timing .kv-value') !== null")
            shown = await cdp.until(
                "(document.querySelector('section.timing .kv-value') || {}).innerText"
            )
            shot = await cdp.call("Page.captureScreenshot", format="png")
            artifacts = ROOT / "tests" / "artifacts"
            artifacts.mkdir(exist_ok=True)
            (artifacts / "mitmweb-comment.png").write_bytes(base64.b64decode(shot["data"]))
            return str(shown)

    shown = asyncio.run(asyncio.wait_for(run(), 120))
    assert shown.strip() == comment
    assert shown.startswith("served by beta: 200 · first alpha: 429 per-minute quota ")
    assert "#quota, Google said: You exceeded your current quota" in shown
    assert shown.endswith("… · then beta: 200")
