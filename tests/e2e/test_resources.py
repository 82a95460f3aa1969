"""Project-bound resources (resumable uploads, files) and script reloads."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import httpx2 as httpx
from google import genai
from google.genai import types

from ..conftest import ROOT, Fake, free_port, key_entry, new_secret, wait_for
from .test_proxy import gen


def test_uploads_go_through_the_proxy_and_files_stay_with_their_project(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    proxy = make_proxy([key_entry("a", a, project="p1"), key_entry("b", b, project="p2")])
    client = genai.Client(
        api_key="u", http_options=types.HttpOptions(base_url=proxy.url, api_version="v1beta")
    )
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    uploaded = client.files.upload(file=str(doc))
    assert uploaded.name and uploaded.name.startswith("files/")
    owner = fake.log()[0]["key"]
    for _ in range(4):  # round robin would send half of these to the other project: 403
        assert client.files.get(name=uploaded.name).name == uploaded.name
    part = types.Part.from_uri(file_uri=uploaded.uri or "", mime_type="text/plain")
    assert client.models.generate_content(
        model="gemini-2.5-flash", contents=[part, "describe"]
    ).text
    log = fake.log()
    assert [e["path"] for e in log[:2]] == ["/upload/v1beta/files", "/upload/v1beta/files"]
    assert log[1].get("upload") and log[1]["status"] == 200  # the bytes went through the proxy
    assert {e["key"] for e in log} == {owner}
    assert all(e["status"] == 200 for e in log)


def test_a_script_reload_keeps_state_and_servers(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "dead", b: "ok"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b)])
    gen(proxy)
    proxy.wait_key("a", "dead")
    entry = ROOT / "addon" / "gemini_proxy.py"
    entry.touch()  # mitmproxy re-imports the entry script
    wait_for(lambda: proxy.logs().count("Loading script") >= 2, timeout=10)
    assert gen(proxy).status_code == 200
    proxy.wait_key("a", "dead")  # the pool survived the reload
    assert "duplicated timeseries" not in proxy.logs() and "Traceback" not in proxy.logs()
    assert proxy.metrics().count("gemini_proxy_requests_total{") >= 1


class Forwarder:
    """A TCP forwarder on another port (what docker -p, a Kubernetes Service or NAT does)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

        async def main() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            ready.set()
            await self.server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(main())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


def test_uploads_work_through_a_forwarder_and_forwarded_headers_need_trust(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    fwd = Forwarder(proxy.port)
    try:
        client = genai.Client(
            api_key="u",
            http_options=types.HttpOptions(
                base_url=f"http://127.0.0.1:{fwd.port}", api_version="v1beta"
            ),
        )
        doc = tmp_path / "doc.txt"
        doc.write_text("hello")
        uploaded = client.files.upload(file=str(doc))  # the chunks go where the SDK can reach
        assert uploaded.name and uploaded.state and uploaded.state.name == "ACTIVE"
        r = httpx.post(
            f"http://127.0.0.1:{fwd.port}/upload/v1beta/files",
            headers={
                "x-goog-upload-protocol": "resumable",
                "x-goog-upload-command": "start",
                "x-goog-api-key": "u",
            },
            json={"file": {"display_name": "x"}},
        )
        # the address the caller used, not the proxy's own socket (unreachable behind docker -p)
        assert r.headers["x-goog-upload-url"].startswith(f"http://127.0.0.1:{fwd.port}/upload/")
    finally:
        fwd.close()

    def upload_url(headers: dict[str, str]) -> str:
        r = proxy.http.post(
            "/upload/v1beta/files",
            headers={
                "x-goog-upload-protocol": "resumable",
                "x-goog-upload-command": "start",
                "x-goog-api-key": "u",
                **headers,
            },
            json={"file": {"display_name": "x"}},
        )
        return str(r.headers["x-goog-upload-url"])

    assert upload_url({}).startswith(f"{proxy.url}/upload/v1beta/files?upload_id=")
    # a caller cannot point an upload at a host of its choosing
    spoofed = upload_url({"x-forwarded-host": "evil.example", "x-forwarded-proto": "https"})
    assert spoofed.startswith(f"{proxy.url}/")


def test_public_url_and_trusted_front_proxies_decide_upload_urls(
    fake: Fake, make_proxy: Any
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy(
        [key_entry("a", a)],
        options={"gemini_trusted_proxies": "10.0.0.0/8, 127.0.0.0/8"},
    )
    h = {
        "x-goog-upload-protocol": "resumable",
        "x-goog-upload-command": "start",
        "x-goog-api-key": "u",
        "x-forwarded-host": "gemini.example.com",
        "x-forwarded-proto": "https",
    }
    r = proxy.http.post("/upload/v1beta/files", headers=h, json={"file": {}})
    assert r.headers["x-goog-upload-url"].startswith(
        "https://gemini.example.com/upload/v1beta/files?"
    )
    proxy.stop()
    proxy.options["gemini_public_url"] = "https://public.example:8443/"
    proxy.start()
    r = proxy.http.post("/upload/v1beta/files", headers=h, json={"file": {}})
    assert r.headers["x-goog-upload-url"].startswith(
        "https://public.example:8443/upload/v1beta/files?"
    )
