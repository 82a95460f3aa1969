"""Two stand-ins scripts/bench --decompose runs beside mitmdump and gemini-proxy, to split the cost.

    BENCH_DECOMPOSE=answer  mitmdump answers every request in `request` with a canned 200: what
                            mitmproxy costs per flow when no upstream connection is made
    BENCH_DECOMPOSE=fetch   mitmdump fetches the answer in `request` with one pooled aiohttp
                            client (the fake Gemini's first key, no retries, no records): mitmproxy
                            plus the upstream call made the way gemini-proxy makes it

gemini-proxy's CPU per request minus the `fetch` row's is what the addon's own work costs.
Benchmark tool only: not part of the proxy.
"""

from __future__ import annotations

import os
import time

import aiohttp
import yarl
from mitmproxy import http

_SKIP = frozenset({"transfer-encoding", "connection", "keep-alive"})


class Decompose:
    def __init__(self) -> None:
        self.mode = os.environ.get("BENCH_DECOMPOSE", "answer")
        self.session: aiohttp.ClientSession | None = None

    async def request(self, flow: http.HTTPFlow) -> None:
        now = time.time()
        if self.mode == "answer":
            body = b'{"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}]}'
            headers = [(b"content-type", b"application/json")]
            flow.response = http.Response(
                b"HTTP/1.1", 200, b"OK", http.Headers(headers), body, None, now, now
            )
            flow.response.headers["content-length"] = str(len(body))
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        req = flow.request
        url = f"{req.scheme}://{req.host}:{req.port}{req.path}"
        async with self.session.request(
            req.method,
            yarl.URL(url, encoded=True),
            headers=[
                (k.decode(), v.decode()) for k, v in req.headers.fields if k.lower() != b"host"
            ],
            data=req.raw_content or None,
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            fields = [
                (k.encode(), v.encode()) for k, v in resp.headers.items() if k.lower() not in _SKIP
            ]
        if not any(k.lower() == b"content-length" for k, _ in fields):
            fields.append((b"content-length", str(len(body)).encode()))
        flow.response = http.Response(
            b"HTTP/1.1", resp.status, b"OK", http.Headers(fields), body, None, now, time.time()
        )


addons = [Decompose()]
