"""The stream relay on its own: a real loopback upstream, raw HTTP/1.1 from the test as mitmproxy.

The loop runs with eager tasks, as mitmproxy's does (a pump can finish inside create_task).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web

from gemini_pool.relay import (
    TICKET_HEADER,
    UNCLAIMED_TTL,
    Held,
    Refusal,
    StreamRelay,
    _ChunkedSkipper,
    _RelayConnection,
)

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


class Uploader(asyncio.Protocol):
    """A raw client that keeps sending while it collects whatever the relay answers."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True  # the relay's half-close: keep sending, as mitmproxy would

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self.eof.set()
        if not self.lost.done():
            self.lost.set_result(exc)


async def upload(
    port: int, head: bytes, body: int, *, chunked: bool = False, piece: int = 64 * 1024
) -> tuple[bytes, int, Exception | None]:
    """Send `head`, then up to `body` bytes (stopping when the relay is gone), then half-close.

    Returns what the relay answered, how much of the body went out, and how the connection ended.
    """
    _, client = await asyncio.get_running_loop().create_connection(Uploader, "127.0.0.1", port)
    transport = client.transport
    transport.write(head)
    data = b"x" * piece  # one object, written again and again: the client holds no body
    frame = [b"%x\r\n" % piece, data, b"\r\n"] if chunked else [data]
    sent = 0
    while sent < body and not transport.is_closing():
        transport.writelines(frame)
        sent += piece
        await client.writable.wait()
        await asyncio.sleep(0)  # let the relay run even when the kernel takes everything
    if not transport.is_closing():
        if chunked:
            transport.write(b"0\r\n\r\n")
        transport.write_eof()
    await asyncio.wait_for(client.eof.wait(), 5)  # the answer is complete
    exc = client.lost.result() if client.lost.done() else None
    transport.close()
    return bytes(client.received), sent, exc


def parse_answer(raw: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, headers and the Content-Length body of one whole HTTP/1.1 answer."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        assert k.lower() not in headers, f"duplicate {k}"
        headers[k.lower()] = v.strip()
    length = int(headers["content-length"])
    assert len(rest) == length, (len(rest), length)  # the whole body, and nothing after it
    return lines[0].encode(), headers, rest


def test_a_chunked_request_or_a_huge_head_is_refused_and_the_answer_arrives() -> None:
    """The refusal comes while the caller is still sending: it must still read it, every time.

    Closing at once with unread bytes made the kernel reset the connection (a flaky test).
    """

    async def go() -> None:
        async with _session() as (fx, _url):
            chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
            huge = b"POST / HTTP/1.1\r\nx-big: " + b"a" * 300_000
            for _ in range(5):
                # a body within the linger bound: all of it is read, the close is clean
                raw, sent, exc = await upload(fx.relay.port, chunked, 512 * 1024, chunked=True)
                assert raw.startswith(b"HTTP/1.1 400 ") and sent == 512 * 1024 and exc is None
                # past the bound: the relay stops reading and closes, but the answer got through
                raw, _, _ = await upload(fx.relay.port, chunked, 8 << 20, chunked=True)
                assert raw.startswith(b"HTTP/1.1 400 ")
                raw, _, _ = await upload(fx.relay.port, huge, 4 << 20)
                assert raw.startswith(b"HTTP/1.1 400 ")
            # and a bare one, read with a stream reader
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            writer.write(chunked + b"0\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            writer.close()

    run(go)


def test_a_refusal_is_answered_at_the_head_and_the_body_is_never_held() -> None:
    """50 MB behind a refusal ticket: the whole answer arrives, the relay keeps one read at most."""
    held, read = [0], [0]  # the most the relay kept between reads, and got in one read
    original = _RelayConnection.data_received

    def watched(self: _RelayConnection, data: bytes) -> None:
        read[0] = max(read[0], len(data))
        original(self, data)
        held[0] = max(held[0], len(self.buf))

    async def go() -> None:
        async with _session() as (fx, _url):
            fx.relay.linger_bytes = 64 << 20  # read it all, to see memory stay flat
            body = b'{"error": {"code": 413, "message": "too large"}}'
            headers = [("content-type", "application/json"), ("x-request-id", "r1")]
            for chunked in (False, True):
                ticket = fx.relay.refuse(413, "", headers, body)
                framing = "transfer-encoding: chunked" if chunked else f"content-length: {50 << 20}"
                head = (
                    f"POST /v1beta/x HTTP/1.1\r\nhost: 127.0.0.1\r\n{framing}\r\n"
                    f"{TICKET_HEADER}: {ticket}\r\n\r\n"
                ).encode()
                before = fx.relay.discarded
                tracemalloc.start()
                raw, sent, exc = await upload(fx.relay.port, head, 50 << 20, chunked=chunked)
                await asyncio.wait_for(_closed(fx.relay), 5)  # the relay read it all
                _, traced_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                status, got, payload = parse_answer(raw)
                assert status == b"HTTP/1.1 413 Request Entity Too Large"
                assert got == {
                    "content-type": "application/json",
                    "x-request-id": "r1",
                    "content-length": str(len(body)),
                    "connection": "close",
                }
                assert payload == body
                assert sent == 50 << 20 and exc is None  # all sent, all read, a clean close
                assert fx.relay.discarded - before >= 50 << 20  # every byte read and dropped
                assert held[0] == 0 and read[0] <= 256 * 1024  # one socket read at a time
                assert traced_peak < 8 << 20, traced_peak  # client and relay together
                print(
                    f"chunked={chunked}: discarded {fx.relay.discarded - before} bytes,"
                    f" relay kept {held[0]}, largest read {read[0]}, traced peak {traced_peak}"
                )

    with mock.patch.object(_RelayConnection, "data_received", watched):
        run(go)


def test_a_refusal_stops_reading_at_its_bound_and_still_delivers_the_answer() -> None:
    async def go() -> None:
        async with _session() as (fx, _url):
            ticket = fx.relay.refuse(401, "Unauthorized", [("x-why", "no key")], b"nope")
            head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\ncontent-length: {50 << 20}\r\n\r\n"
            raw, sent, _ = await upload(fx.relay.port, head.encode(), 50 << 20)
            status, headers, body = parse_answer(raw)
            assert (status, headers["x-why"], body) == (
                b"HTTP/1.1 401 Unauthorized",
                "no key",
                b"nope",
            )
            assert sent < 50 << 20  # the relay gave up reading: the rest was refused by a reset
            assert fx.relay.discarded <= fx.relay.linger_bytes + 2 * 256 * 1024
            # a peer that sends nothing more is closed after linger_seconds
            fx.relay.linger_seconds = 0.2
            ticket = fx.relay.refuse(401, "", [], b"")
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            writer.write(
                f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\ncontent-length: 9\r\n\r\n".encode()
            )
            t0 = time.monotonic()
            assert (await reader.read()).startswith(b"HTTP/1.1 401 Unauthorized\r\n")
            await asyncio.wait_for(_closed(fx.relay), 2)
            assert 0.15 < time.monotonic() - t0 < 1.5
            writer.close()

    run(go)


def test_a_refusal_ticket_works_once_and_unknown_tickets_get_404() -> None:
    async def go() -> None:
        async with _session() as (fx, _url):
            ticket = fx.relay.refuse(429, "Too Many Requests", [("retry-after", "3")], b"later")
            head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\ncontent-length: 0\r\n\r\n"
            raw, _, _ = await upload(fx.relay.port, head.encode(), 0)
            assert parse_answer(raw)[0] == b"HTTP/1.1 429 Too Many Requests"
            for ticket_used in (ticket, "made-up"):
                head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket_used}\r\ncontent-length: 3\r\n\r\nabc"
                raw, _, _ = await upload(fx.relay.port, head.encode(), 0)
                status, _, body = parse_answer(raw)
                assert status == b"HTTP/1.1 404 Not Found" and b"unknown relay ticket" in body
            # a chunked body with a stream ticket is still refused, and does not use the ticket up
            stream_ticket = fx.relay.refuse(200, "", [], b"")
            fx.relay._tickets[stream_ticket] = mock.Mock(spec=Held)
            head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {stream_ticket}\r\ntransfer-encoding: chunked\r\n\r\n"
            raw, _, _ = await upload(fx.relay.port, head.encode(), 0)
            assert raw.startswith(b"HTTP/1.1 400 ") and stream_ticket in fx.relay._tickets
            fx.relay._tickets.pop(stream_ticket)

    run(go)


def test_refusal_tickets_expire_and_can_be_cancelled() -> None:
    async def go() -> None:
        async with _session() as (fx, _url):
            old = fx.relay.refuse(413, "", [], b"")
            fx.relay._tickets[old].created -= UNCLAIMED_TTL + 1
            cancelled = fx.relay.refuse(413, "", [], b"")
            fx.relay.cancel(cancelled, "flow died")
            fresh = fx.relay.refuse(413, "", [], b"")
            assert old not in fx.relay._tickets and cancelled not in fx.relay._tickets
            assert fresh in fx.relay._tickets

    run(go)


def test_a_refusal_writes_only_its_own_framing() -> None:
    answer = Refusal(
        413,
        "bad\r\nx-injected: 1",
        [
            ("Content-Length", "5"),
            ("Connection", "keep-alive"),
            ("x-a", "1\r\nx-b: 2"),
            ("x-c", "3"),
        ],
        b"ab",
    ).answer()
    assert answer == (
        b"HTTP/1.1 413 Request Entity Too Large\r\nx-c: 3\r\ncontent-length: 2\r\n"
        b"connection: close\r\n\r\nab"
    )
    assert Refusal(599, "", [], b"").answer().startswith(b"HTTP/1.1 599 Unknown\r\n")


def test_an_after_body_refusal_reads_the_whole_body_first_in_constant_memory() -> None:
    """A caller that writes everything before it reads still gets the answer."""
    held = [0]
    original = _RelayConnection.data_received

    def watched(self: _RelayConnection, data: bytes) -> None:
        original(self, data)
        held[0] = max(held[0], len(self.buf))

    async def go() -> None:
        async with _session() as (fx, _url):
            for chunked in (False, True):
                ticket = fx.relay.refuse(413, "", [], b"too large", after_body=True)
                framing = "transfer-encoding: chunked" if chunked else f"content-length: {50 << 20}"
                head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\n{framing}\r\n\r\n"
                before = fx.relay.discarded
                raw, sent, exc = await upload(
                    fx.relay.port, head.encode(), 50 << 20, chunked=chunked
                )
                assert parse_answer(raw)[2] == b"too large" and sent == 50 << 20 and exc is None
                assert fx.relay.discarded - before >= 50 << 20
                assert held[0] == 0

    with mock.patch.object(_RelayConnection, "data_received", watched):
        run(go)


def test_an_after_body_refusal_answers_at_the_end_of_the_body_not_before() -> None:
    async def go() -> None:
        async with _session() as (fx, _url):
            for framing, first, rest in (
                ("content-length: 10", b"01234", b"56789"),
                ("transfer-encoding: chunked", b"5;ext=1\r\n01234\r\n", b"0\r\nx-t: 1\r\n\r\n"),
            ):
                ticket = fx.relay.refuse(413, "", [], b"no", after_body=True)
                reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
                writer.write(
                    f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\n{framing}\r\n\r\n".encode()
                    + first
                )
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 0.1)  # nothing before the end
                writer.write(rest)
                status, _, body = parse_answer(await asyncio.wait_for(reader.read(), 2))
                assert (status, body) == (b"HTTP/1.1 413 Request Entity Too Large", b"no")
                writer.close()
            # a peer that half-closes before its body ends still gets the answer
            ticket = fx.relay.refuse(413, "", [], b"no", after_body=True)
            head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\ncontent-length: 9\r\n\r\n"
            raw, _, _ = await upload(fx.relay.port, head.encode(), 0)
            assert parse_answer(raw)[2] == b"no"
            # no body at all: the answer comes at the head
            ticket = fx.relay.refuse(401, "", [], b"", after_body=True)
            head = f"GET / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\n\r\n"
            raw, _, _ = await upload(fx.relay.port, head.encode(), 0)
            assert raw.startswith(b"HTTP/1.1 401 ")

    run(go)


def test_an_after_body_refusal_answers_anyway_at_its_bounds_or_on_broken_framing() -> None:
    async def go() -> None:
        async with _session() as (fx, _url):
            fx.relay.drain_bytes, fx.relay.drain_seconds = 1 << 20, 0.2
            cases = [
                (f"content-length: {1 << 30}", b"x" * (2 << 20)),  # past drain_bytes
                ("content-length: 100", b"x" * 10),  # stalls: drain_seconds
                ("transfer-encoding: chunked", b"zz\r\n"),  # not a chunk size
                ("transfer-encoding: chunked", b"2\r\nabc\r\n"),  # chunk longer than its size
                ("transfer-encoding: chunked", b"1;" + b"e" * 5000),  # endless chunk line
            ]
            for framing, body in cases:
                ticket = fx.relay.refuse(413, "", [], b"no", after_body=True)
                reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
                head = f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\n{framing}\r\n\r\n"
                writer.write(head.encode() + body)
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nno"), 2)
                assert raw.startswith(b"HTTP/1.1 413 "), framing
                writer.close()

    run(go)


def test_an_after_body_refusal_answers_a_caller_that_stopped_sending() -> None:
    """A caller that sent only the head (a Content-Length over the limit, waiting for the
    answer) gets it once nothing came for `drain_idle`, not after `drain_seconds`."""

    async def go() -> None:
        async with _session() as (fx, _url):
            fx.relay.drain_seconds, fx.relay.drain_idle = 30.0, 0.2
            for sent in (b"", b"x" * 10):
                ticket = fx.relay.refuse(413, "", [], b"no", after_body=True)
                reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
                head = (
                    f"POST / HTTP/1.1\r\n{TICKET_HEADER}: {ticket}\r\ncontent-length: 100\r\n\r\n"
                )
                writer.write(head.encode() + sent)
                t0 = time.monotonic()
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nno"), 2)
                assert raw.startswith(b"HTTP/1.1 413 ") and time.monotonic() - t0 < 1.5
                writer.close()

    run(go)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 64, 10_000])
def test_the_chunked_skipper_finds_the_end_at_any_split(step: int) -> None:
    body = (
        b"4\r\nWiki\r\n"
        b"5;name=value\r\npedia\r\n"
        b"E\r\n in\r\n\r\nchunks.\r\n"
        b"000\r\n"
        b"Expires: never\r\n"
        b"\r\n"
    )
    skipper = _ChunkedSkipper()
    ends = [skipper.feed(body[i : i + step]) for i in range(0, len(body), step)]
    assert ends[-1] is True and not any(ends[:-1])
    assert _ChunkedSkipper().feed(b"0\n\n") is True  # bare LF, as lenient parsers accept


async def _closed(relay: StreamRelay) -> None:
    while relay._conns:
        await asyncio.sleep(0.01)


def test_an_upstream_break_cuts_the_relay_connection() -> None:
    async def go() -> None:
        async with _session(events=2, then="cut") as (fx, url):
            ticket = await fx.hold(url)
            reader, writer = await asyncio.open_connection("127.0.0.1", fx.relay.port)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await fetch(reader, writer, ticket)
            await asyncio.wait_for(_filled(fx.ends), 5)
            assert fx.ends == ["upstream broke off the answer mid-stream"]  # in words
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


def test_a_cut_stream_is_said_in_words_never_a_class_name() -> None:
    from gemini_pool.relay import upstream_cut

    cases = [
        TimeoutError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientError(),
    ]
    said = [upstream_cut(e) for e in cases]
    assert said == [
        "upstream sent nothing for too long (read timeout)",
        "upstream broke off the answer mid-stream",
        "upstream closed the connection mid-stream",
        "upstream connection failed mid-stream",
        "upstream stream failed",
    ]
    assert not any("Error" in s for s in said)  # and each starts "upstream": the key is blamed
