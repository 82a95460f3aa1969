"""Memory bounded end to end, on a real mitmdump in front of the fake: a download streams through
without the proxy's memory following its size, request bodies in flight have a total budget, and
a caller that leaves mid-dispatch is still counted.

Heavy by nature (hundreds of MiB through the proxy): sizes are kept moderate, each test is bounded
by a pytest timeout (a 2-core machine shared with other work), and no test asserts a duration.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from ..conftest import ROOT, Fake, gen_body, key_entry, new_secret, wait_for
from .test_hardening import rss_kib
from .test_proxy import FLASH, gen

sys.path.insert(0, str(ROOT / "scripts"))
from fake_gemini import download_blocks

MIB = 1 << 20


class Peak:
    """The proxy's highest RSS (VmRSS, KiB) while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_kib(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 1024


@pytest.mark.timeout(240)
def test_a_300_mib_download_streams_through_with_bounded_memory(
    fake: Fake, make_proxy: Any
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)], options={"gemini_db": ""})
    assert proxy.proc is not None
    for _ in range(5):  # warm up: imports, pools, the relay
        assert gen(proxy).status_code == 200
    size = 300 * MIB
    expected = hashlib.sha256()
    for block in download_blocks(size):
        expected.update(block)
    got, received = hashlib.sha256(), 0
    with (
        Peak(proxy.proc.pid) as rss,
        httpx.stream(
            "GET",
            f"{proxy.url}/download/v1beta/files/big:download",
            params={"alt": "media"},
            headers={"x-goog-api-key": "u", "x-fake-download-bytes": str(size)},
            timeout=httpx.Timeout(60),
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["x-gemini-proxy-key"] == "a"
        for chunk in r.iter_raw(1 << 20):
            got.update(chunk)
            received += len(chunk)
    assert received == size and got.hexdigest() == expected.hexdigest()  # intact
    print(f"300 MiB download: RSS {rss.before / 1024:.0f} -> peak {rss.peak / 1024:.0f} MiB")
    assert rss.growth_mib < 150, f"RSS grew by {rss.growth_mib:.0f} MiB for a 300 MiB download"
    log = [e for e in fake.log() if e["path"].startswith("/download/")]
    assert [e["key"] for e in log] == [a]  # one attempt, the key never in the flow
    proxy.wait_ready()  # still serving


@pytest.mark.timeout(240)
def test_twelve_concurrent_40_mb_bodies_get_a_budget_not_an_oom(
    fake: Fake, make_proxy: Any
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"})
    proxy = make_proxy(
        [key_entry("a", a), key_entry("b", b)],
        options={"gemini_db": "", "gemini_max_inflight_bytes": 100 * MIB},
    )
    assert proxy.proc is not None
    for _ in range(5):
        assert gen(proxy).status_code == 200
    text = "x" * (40 * 1000 * 1000)
    body = json.dumps(gen_body(text)).encode()  # one object, shared by the twelve senders
    url = f"{proxy.url}/v1beta/models/{FLASH}:generateContent"
    # the fake holds each admitted request a moment, so that the twelve overlap
    headers = {"x-goog-api-key": "u", "content-type": "application/json"}
    start = threading.Barrier(12)
    answers: list[httpx.Response | BaseException] = []

    def send() -> None:
        try:
            start.wait(10)
            r = httpx.post(
                url, content=body, headers={**headers, "x-fake-latency-ms": "1500"}, timeout=120
            )
            answers.append(r)
        except BaseException as e:
            answers.append(e)

    with Peak(proxy.proc.pid) as rss:
        threads = [threading.Thread(target=send) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    print(f"12 x 40 MB: RSS {rss.before / 1024:.0f} -> peak {rss.peak / 1024:.0f} MiB")
    assert all(isinstance(r, httpx.Response) for r in answers), answers
    statuses = sorted(r.status_code for r in answers if isinstance(r, httpx.Response))
    assert len(statuses) == 12 and set(statuses) <= {200, 503}, statuses
    assert 1 <= statuses.count(200) < 12, statuses  # some admitted, some refused
    for r in answers:
        assert isinstance(r, httpx.Response)
        proxy.remember(r.content)
        if r.status_code == 503:  # Gemini's error shape, and when to come back
            assert r.headers["retry-after"] == "2"
            error = r.json()["error"]
            assert error["code"] == 503 and "gemini_max_inflight_bytes" in error["message"]
            assert r.headers["x-gemini-proxy-reason"] == "inflight_bytes_exhausted"
        else:
            assert r.json()["candidates"]
    # the admitted bodies arrived whole at Google
    sizes = [len(e["body"]) for e in fake.log() if e["path"].endswith(":generateContent")]
    assert len(sizes) >= statuses.count(200)
    assert rss.growth_mib < 400, f"RSS grew by {rss.growth_mib:.0f} MiB"
    # nothing held once they are done, and the proxy serves on
    wait_for(lambda: "gemini_proxy_request_body_bytes_in_flight 0.0" in proxy.metrics())
    assert gen(proxy).status_code == 200
    assert gen(proxy, body=gen_body("y" * (30 * 1000 * 1000))).status_code == 200  # one alone


@pytest.mark.timeout(60)
def test_a_caller_that_leaves_mid_dispatch_is_still_counted(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a = new_secret()
    fake.configure({a: "ok"})
    proxy = make_proxy([key_entry("a", a)])
    body = json.dumps(gen_body()).encode()
    head = (
        f"POST /v1beta/models/{FLASH}:generateContent HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{proxy.port}\r\nx-goog-api-key: u\r\n"
        "content-type: application/json\r\nx-fake-latency-ms: 1500\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(head + body)
        wait_for(lambda: any(e["path"].endswith(":generateContent") for e in fake.log()))
    # the caller is gone; Google answers 200 (and bills it) a moment later

    def counted() -> dict[str, Any] | None:
        rows = proxy.admin.get("/admin/requests", params={"limit": 5}).json()["requests"]
        return next((r for r in rows if r["attempts"] and r["status"] == 499), None)

    row = wait_for(counted, timeout=15)
    attempts = row["attempts"] if isinstance(row["attempts"], list) else json.loads(row["attempts"])
    assert [(x["key"], x["status"]) for x in attempts] == [("a", 200)]
    assert 'gemini_proxy_upstream_requests_total{key="a"' in proxy.metrics()
