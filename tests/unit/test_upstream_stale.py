"""A kept-alive connection the server spoilt is retried once on a new one, against the real fake.

The fake spoils a connection on request (x-fake-poison): the next request on it gets no answer
(`close`, a keep-alive race) or bytes that are no status line (`garbage`). It also answers HEAD
with a body, which spoils a connection the same way.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from gemini_pool.upstream import UpstreamClient, UpstreamError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fake_gemini import FakeGemini, make_app

pytestmark = pytest.mark.timeout(20)
KEY = "AIzaSyKEY-STALE"
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()


def run(scenario: Callable[[str, FakeGemini], Awaitable[None]]) -> FakeGemini:
    fake = FakeGemini()
    fake.keys[KEY] = "ok"

    async def main() -> None:
        runner = web.AppRunner(make_app(fake), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            await asyncio.wait_for(scenario(f"http://{host}:{port}", fake), 10)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return fake


async def post(
    client: UpstreamClient, base: str, *extra: tuple[str, str], repeatable: bool = True
) -> int:
    answer = await client.send(
        "POST",
        base + GEN,
        [("x-goog-api-key", KEY), ("Content-Type", "application/json"), *extra],
        BODY,
        stream=False,
        timeout=5,
        repeatable=repeatable,
    )
    return answer.status


@pytest.mark.parametrize("how", ["close", "garbage"])
def test_a_spoilt_pooled_connection_is_retried_once_on_a_new_one(how: str) -> None:
    async def scenario(base: str, fake: FakeGemini) -> None:
        client = UpstreamClient(connect_timeout=2, read_timeout=5)
        try:
            assert await post(client, base, ("x-fake-poison", how)) == 200
            assert await post(client, base) == 200  # the pooled connection fails, a new one serves
            assert client.stale_retries == 1
            assert await post(client, base) == 200
            assert client.stale_retries == 1
        finally:
            await client.close()

    fake = run(scenario)
    assert [e["status"] for e in fake.log] == [200, 0, 200, 200]
    assert fake.log[1]["poisoned"] == how


def test_a_request_not_safe_to_repeat_never_meets_a_pooled_connection() -> None:
    async def scenario(base: str, fake: FakeGemini) -> None:
        client = UpstreamClient(connect_timeout=2, read_timeout=5)
        try:
            assert await post(client, base, ("x-fake-poison", "close"), repeatable=False) == 200
            assert await post(client, base, repeatable=False) == 200
            assert client.stale_retries == 0
        finally:
            await client.close()

    fake = run(scenario)
    assert [e["status"] for e in fake.log] == [200, 200]


def test_a_new_connection_that_fails_is_a_failure_and_is_not_retried_again() -> None:
    async def scenario(base: str, fake: FakeGemini) -> None:
        fake.keys[KEY] = "drop"
        client = UpstreamClient(connect_timeout=2, read_timeout=5)
        try:
            with pytest.raises(UpstreamError) as e:
                await post(client, base)
            assert e.value.sent and client.stale_retries == 0
        finally:
            await client.close()

    fake = run(scenario)
    assert [e["status"] for e in fake.log] == [0]


def test_the_fake_answers_head_with_a_body_on_purpose() -> None:
    async def scenario(base: str, fake: FakeGemini) -> None:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"HEAD {GEN} HTTP/1.1\r\nHost: x\r\nx-goog-api-key: {KEY}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        stray = await asyncio.wait_for(reader.readexactly(10), 5)
        assert stray.startswith(b'{"wrong"')  # a body where HTTP allows none
        writer.close()

    fake = run(scenario)
    assert [(e["method"], e["status"]) for e in fake.log] == [("HEAD", 200)]


def test_the_fake_takes_dollar_key_as_a_credential_like_google() -> None:
    async def scenario(base: str, fake: FakeGemini) -> None:
        client = UpstreamClient(connect_timeout=2, read_timeout=5)
        try:
            answer = await client.send(
                "POST",
                f"{base}{GEN}?%24key={KEY}",
                [("x-goog-api-key", KEY)],
                BODY,
                stream=False,
                timeout=5,
            )
            assert answer.status == 400 and b"Multiple authentication" in answer.body
        finally:
            await client.close()

    run(scenario)
