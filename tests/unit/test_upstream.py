"""The upstream client against small loopback servers: what reached the server, what it was sent."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from unittest import mock

import aiohttp
import pytest

from gemini_pool.upstream import UpstreamClient, UpstreamError, _never_connected, accept_encoding

pytestmark = pytest.mark.timeout(20)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("gzip, deflate", "gzip, deflate"),
        ("gzip, deflate, br, zstd", "gzip, deflate"),  # what the SDKs' httpx sends
        ("br;q=1, zstd", "identity"),
        ("br", "identity"),
        ("*", "identity"),
        ("*;q=0.5, gzip;q=0.2", "gzip;q=0.2"),
        ("", "identity"),
        (" , ,, ", "identity"),
        ("identity", "identity"),
        ("GZIP;Q=0.8 ,\tDeflate ; q=0.5", "gzip;q=0.8, deflate;q=0.5"),
        ("gzip;q=1.0, identity;q=0.001", "gzip, identity;q=0.001"),
        ("gzip;q=0, deflate", "deflate"),  # refused by the caller: not offered
        ("gzip;q=0.000", "identity"),
        ("identity;q=0", "identity"),
        ("gzip;q=2, deflate;q=0.5555, identity;q=abc", "identity"),  # malformed q-values
        ("gzip;q=٠.5", "identity"),  # not ASCII digits
        ("gzip;level=9;q=0.5", "gzip;q=0.5"),
        ("gzip, gzip;q=0.1, GZIP", "gzip"),
        ("gzip\r\nx-injected: 1", "identity"),
        ("x-gzip, compress, deflate", "deflate"),
        ("gzip" + ", br" * 100_000, "gzip"),
        ("br, " * 100_000 + "deflate;q=0.3", "deflate;q=0.3"),
    ],
)
def test_accept_encoding_keeps_what_the_proxy_can_read(given: str, sent: str) -> None:
    assert accept_encoding(given) == sent


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def attempt(
    handler: Handler | None,
    *,
    stream: bool = False,
    timeout: float = 2,
    scheme: str = "http",
    headers: list[tuple[str, str]] | None = None,
) -> UpstreamError:
    """Send one request to `handler` (None: to a closed port); it must fail."""
    if handler is None:
        with socket.socket() as s:  # a port nothing listens on any more
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = None
    else:
        server, port = await serve(handler)
    client = UpstreamClient(connect_timeout=2, read_timeout=timeout)
    try:
        with pytest.raises(UpstreamError) as e:
            await client.send(
                "POST",
                f"{scheme}://127.0.0.1:{port}/v1beta/models/m:generateContent",
                headers or [("Content-Type", "application/json")],
                b"{}",
                stream=stream,
                timeout=timeout,
            )
        return e.value
    finally:
        await client.close()
        if server is not None:
            server.close()


def test_a_refused_connection_was_never_sent() -> None:
    e = asyncio.run(attempt(None))
    assert e.sent is False and str(e).startswith("cannot connect to upstream")


def test_a_failed_tls_handshake_was_never_sent() -> None:
    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)  # the ClientHello
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    e = asyncio.run(attempt(plain_http, scheme="https"))
    assert e.sent is False


def test_a_connection_closed_without_an_answer_may_have_been_sent() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.close()

    e = asyncio.run(attempt(hang_up))
    assert e.sent is True and "closed the connection" in str(e)


def test_a_slow_answer_timed_out_after_it_was_sent() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(3)
        writer.close()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        e = await attempt(slow, timeout=0.3)
        assert e.sent is True and "timed out" in str(e)
        assert loop.time() - t0 < 2

    asyncio.run(go())


def test_a_stream_that_stalls_before_its_first_byte_was_sent() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(3)
        writer.close()

    e = asyncio.run(attempt(stall, stream=True, timeout=0.3))
    assert e.sent is True and str(e).endswith("before the first byte")


def test_only_connect_errors_are_never_sent() -> None:
    key = mock.Mock()  # aiohttp's connection key, only stored
    assert _never_connected(aiohttp.ClientConnectorDNSError(key, OSError(-2, "not known")))
    assert _never_connected(aiohttp.ClientConnectorError(key, OSError(111, "refused")))
    assert _never_connected(aiohttp.ConnectionTimeoutError())
    assert not _never_connected(aiohttp.SocketTimeoutError())
    assert not _never_connected(aiohttp.ServerDisconnectedError())
    assert not _never_connected(aiohttp.ClientOSError(104, "reset"))
    assert not _never_connected(TimeoutError())


@pytest.mark.parametrize(
    ("headers", "seen"),
    [
        ([("Accept-Encoding", "gzip, deflate, br, zstd")], [b"gzip, deflate"]),
        ([("accept-encoding", "br"), ("Accept-Encoding", "gzip;q=0.5")], [b"gzip;q=0.5"]),
        ([("Accept-Encoding", "zstd")], [b"identity"]),
        ([], []),  # none asked, none sent (aiohttp would add its own)
    ],
)
def test_the_request_carries_only_readable_encodings(
    headers: list[tuple[str, str]], seen: list[bytes]
) -> None:
    got: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept-encoding":
                got.append(value.strip())
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def go() -> None:
        server, port = await serve(echo)
        client = UpstreamClient()
        try:
            answer = await client.send(
                "GET", f"http://127.0.0.1:{port}/", headers, b"", stream=False, timeout=2
            )
            assert answer.status == 204
        finally:
            await client.close()
            server.close()

    asyncio.run(go())
    assert got == seen


async def answer_of(
    chunks: list[bytes], length: int | None, stream_over: int
) -> tuple[bytes, bool, bytes]:
    """(what `send` read, whether it came back open, the rest) for a 200 with `chunks` as its
    body: chunked framing when `length` is None."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.readexactly(2)
        framing = (
            f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
        )
        writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
        for c in chunks:
            writer.write(c if length is not None else b"%x\r\n%s\r\n" % (len(c), c))
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads on the client's side
        if length is None:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    server, port = await serve(handler)
    client = UpstreamClient()
    client.stream_over = stream_over
    try:
        answer = await client.send(
            "POST", f"http://127.0.0.1:{port}/v1beta/x", [], b"{}", stream=False, timeout=5
        )
        rest = b""
        if answer.stream is not None:
            rest = await answer.stream.read()
            answer.stream.release()
        return answer.body, answer.stream is not None, rest
    finally:
        await client.close()
        server.close()


def test_an_answer_over_the_limit_comes_back_open_and_a_small_one_whole() -> None:
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    whole = b"".join(chunks)
    # a Content-Length within the limit: read whole, as always
    assert asyncio.run(answer_of(chunks, len(whole), 5000)) == (whole, False, b"")
    # over it: open at once, with just the first chunk read
    first, is_open, rest = asyncio.run(answer_of(chunks, len(whole), 1500))
    assert is_open and first + rest == whole and len(first) < len(whole)
    # no length, and it ends within the limit: whole
    assert asyncio.run(answer_of(chunks, None, 5000)) == (whole, False, b"")
    # no length, past the limit: open, with what arrived up to just past the limit
    first, is_open, rest = asyncio.run(answer_of(chunks, None, 1500))
    assert is_open and first + rest == whole and 1500 < len(first) < len(whole)
