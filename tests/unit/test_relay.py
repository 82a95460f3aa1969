"""The stream relay on its own: a real loopback upstream, raw HTTP/1.1 from the test as mitmproxy.

The loop runs with eager tasks, as mitmproxy's does (a pump can finish inside create_task).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gemini_pool.relay import TICKET_HEADER, Held, StreamRelay

pytestmark = pytest.mark.timeout(20)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[arg-type]
        await test()

    asyncio.run(main())


async def upstream_app(events: int, then: str) -> web.AppRunner:
    """An SSE upstream that sends `events` events, then ends, cuts the connection or hangs."""

    async def handler(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await out.prepare(request)
        for i in range(events):
            await out.write(f"data: {i}\n\n".encode())
        if then == "cut":
            assert request.transport is not None
            request.transport.abort()
        elif then == "hang":
            await asyncio.sleep(60)
        else:
            await out.write_eof()
        return out

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def port_of(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


class Fixture:
    def __init__(self) -> None:
        self.relay = StreamRelay()
        self.session = aiohttp.ClientSession()
        self.ends: list[str | None] = []
        self.chunks: list[bytes] = []
        self.upstreams: list[aiohttp.ClientResponse] = []

    async def hold(self, url: str, read_first: bool = False) -> str:
        """Hold an upstream answer (with its first chunk read already, as the addon does)."""
        resp = await self.session.get(url)
        self.upstreams.append(resp)
        first = await resp.content.readany() if read_first else b""
        return self.relay.hold(
            Held(
                200,
                "OK",
                [("content-type", "text/event-stream"), ("x-gemini-proxy-key", "k0")],
                first,
                resp,
                self.chunks.append,
                self.ends.append,
            )
        )


async def fetch(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ticket: str, body: bytes = b""
) -> tuple[bytes, bytes]:
    writer.write(
        b"POST /v1beta/x HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        + f"{TICKET_HEADER}: {ticket}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    body_out = b""
    if b"transfer-encoding: chunked" in head:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body_out += chunk[:-2]
    else:
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        body_out = await reader.readexactly(length)
    return head, body_out


@contextlib.asynccontextmanager
async def _session(events: int = 3, then: str = "end") -> AsyncIterator[tuple[Fixture, str]]:
    up = await upstream_app(events, then)
    fx = Fixture()
    await fx.relay.start()
    try:
        yield fx, f"http://127.0.0.1:{port_of(up)}/"
    finally:
        await fx.relay.stop()
        await fx.session.close()
        await up.cleanup()


def test_several_streams_on_one_keepalive_connection() -> None:
    async def go() -> None:
        async with _session() as (fx, url):
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            for i in range(3):
                ticket = await fx.hold(url, read_first=i == 1)
                await asyncio.sleep(0.05)  # the upstream answer is complete before the fetch
                head, body = await fetch(reader, writer, ticket, b'{"ignored": "body"}')
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"x-gemini-proxy-key: k0\r\n" in head
                assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert fx.ends == [None, None, None]
            assert b"".join(fx.chunks) == 3 * b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            writer.close()

    run(go)


def test_unknown_ticket_is_a_404_and_a_ticket_works_once() -> None:
    async def go() -> None:
        async with _session() as (fx, url):
            ticket = await fx.hold(url)
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            await fetch(reader, writer, ticket)
            head, body = await fetch(reader, writer, ticket)
            assert head.startswith(b"HTTP/1.1 404 ") and b"unknown relay ticket" in body
            assert await reader.read() == b""  # and the connection is closed
            writer.close()

    run(go)


def test_a_chunked_request_or_a_huge_head_is_refused() -> None:
    async def go() -> None:
        async with _session() as (fx, _url):
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            writer.write(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            writer.write(b"POST / HTTP/1.1\r\nx-big: " + b"a" * 300_000)
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            writer.close()

    run(go)


def test_an_upstream_break_cuts_the_relay_connection() -> None:
    async def go() -> None:
        async with _session(events=2, then="cut") as (fx, url):
            ticket = await fx.hold(url)
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await fetch(reader, writer, ticket)
            await asyncio.wait_for(_filled(fx.ends), 5)
            assert fx.ends[0] is not None and fx.ends[0].startswith("upstream stream broke")
            writer.close()

    run(go)


def test_the_caller_going_away_ends_the_pump_and_frees_the_upstream() -> None:
    async def go() -> None:
        async with _session(events=1, then="hang") as (fx, url):
            ticket = await fx.hold(url)
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            writer.write(
                f"GET / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\ncontent-length: 0\r\n\r\n".encode()
            )
            await reader.readuntil(b"\r\n\r\n")
            first = b"9\r\ndata: 0\n\n\r\n"
            assert await reader.readexactly(len(first)) == first
            writer.transport.abort()
            await asyncio.wait_for(_filled(fx.ends), 5)
            assert fx.ends == ["caller went away"]
            assert fx.upstreams[0].closed  # the upstream connection is not left open

    run(go)


def test_an_unclaimed_stream_is_closed_and_reported() -> None:
    async def go() -> None:
        async with _session() as (fx, url):
            ticket = await fx.hold(url)
            fx.relay.cancel(ticket, "flow failed before the stream started")
            assert fx.ends == ["flow failed before the stream started"]

    run(go)


async def _filled(items: list[Any]) -> None:
    while not items:
        await asyncio.sleep(0.01)
