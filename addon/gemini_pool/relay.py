"""Loopback relay that lets mitmproxy stream an upstream answer the addon already holds.

mitmproxy cannot stream a response an addon sets, and cannot retry a request itself. So for a
streaming request the addon makes the attempts with its own client until one answers 2xx, holds
that open answer here under an unguessable ticket, and points the flow at this relay; mitmproxy
then streams the relay's answer to the caller unbuffered. A failure after the first byte cuts
the connection (the caller sees a truncated stream, never a duplicated one).

The relay speaks just enough HTTP/1.1 for mitmproxy's requests (request line, headers, a
Content-Length body it skips; the addon sends none) on a bare asyncio protocol: it sits on the
path of every stream's first byte, and aiohttp's web server cost more CPU per request.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

TICKET_HEADER = "x-gemini-proxy-relay"
TICKET_FIELD = TICKET_HEADER.encode()  # as it appears in raw header fields
UNCLAIMED_TTL = 30.0
MAX_HEAD = 256 * 1024  # mitmproxy forwards the caller's headers; refuse anything absurd

_NOT_FOUND_BODY = b'{"error": "unknown relay ticket"}'
_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_NOT_FOUND_BODY), _NOT_FOUND_BODY)
)
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass
class Held:
    """An open 2xx upstream answer waiting for mitmproxy to fetch it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # hop-by-hop headers (length, encoding) already removed
    first: bytes  # the first chunk, already read (empty: the stream ended without a body)
    stream: aiohttp.ClientResponse  # the rest, not read yet
    on_chunk: Callable[[bytes], None]
    on_end: Callable[[str | None], None]  # called once with None (complete) or an error text
    created: float = field(default_factory=time.monotonic)

    def head(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason or 'OK'}\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        lines.append("transfer-encoding: chunked\r\n\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


class StreamRelay:
    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[_RelayConnection] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RelayConnection(self), host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """At exit the drain is over: streams still open are cut, not awaited."""
        for ticket in list(self._held):
            self._drop(ticket, "proxy shutting down")
        if self._server is not None:
            self._server.close()
            for conn in list(self._conns):
                conn.abort()
            await self._server.wait_closed()
            self._server = None
        self.port = 0

    def hold(self, held: Held) -> str:
        self._expire()
        ticket = secrets.token_urlsafe(24)
        self._held[ticket] = held
        return ticket

    def claim(self, ticket: str) -> Held | None:
        return self._held.pop(ticket, None)

    def cancel(self, ticket: str, why: str) -> None:
        """The flow died before mitmproxy fetched the stream."""
        self._drop(ticket, why)

    def _drop(self, ticket: str, why: str) -> None:
        held = self._held.pop(ticket, None)
        if held is not None:
            held.stream.close()
            held.on_end(why)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t, h in self._held.items() if now - h.created > UNCLAIMED_TTL]:
            self._drop(ticket, "stream never claimed")


class _RelayConnection(asyncio.Protocol):
    """One keep-alive connection from mitmproxy; it sends one request at a time."""

    def __init__(self, relay: StreamRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.discard = 0  # request body bytes still to skip
        self.busy = False  # a stream is being pumped
        self.pump: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._conns.discard(self)
        self.writable.set()
        if self.pump is not None:
            self.pump.cancel()  # mitmproxy dropped the stream: the caller went away

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next_request()

    # ---------------------------------------------------------------- requests

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _next_request(self) -> None:
        assert self.transport is not None
        if self.discard:
            n = min(self.discard, len(self.buf))
            del self.buf[:n]
            self.discard -= n
            if self.discard:
                return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._fail(_BAD_REQUEST)
            return
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        ticket = b""
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == TICKET_FIELD:
                ticket = value.strip()
            elif name == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif name == b"transfer-encoding":
                self._fail(_BAD_REQUEST)  # the addon never relays a chunked body
                return
        self.discard = length
        held = self.relay.claim(ticket.decode("ascii", "replace"))
        if held is None:
            self._fail(_NOT_FOUND)
            return
        self.busy = True
        # mitmproxy runs the loop with eager tasks: the pump may be done (and the next request
        # started) when this returns
        pump = asyncio.get_running_loop().create_task(self._stream(held))
        if not pump.done():
            self.pump = pump

    def _fail(self, answer: bytes) -> None:
        assert self.transport is not None
        self.transport.write(answer)
        self.transport.close()
        self.buf.clear()

    async def _stream(self, held: Held) -> None:
        assert self.transport is not None
        transport, upstream = self.transport, held.stream
        error: str | None = None
        try:
            if held.first:  # one write: mitmproxy reads the head and the first bytes at once
                held.on_chunk(held.first)
                transport.writelines(
                    (held.head(), b"%x\r\n" % len(held.first), held.first, b"\r\n")
                )
            else:
                transport.write(held.head())
            async for chunk in upstream.content.iter_any():
                held.on_chunk(chunk)
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                if not self.writable.is_set():
                    await self.writable.wait()  # the caller reads slower than Google writes
                if transport.is_closing():
                    raise ConnectionResetError("relay connection closed")
            transport.write(b"0\r\n\r\n")
        except (aiohttp.ClientError, TimeoutError) as e:
            error = f"upstream stream broke: {type(e).__name__}"
            transport.abort()  # mitmproxy (and the caller) see a truncated stream
        except ConnectionError as e:
            error = f"caller went away: {type(e).__name__}"
        except asyncio.CancelledError:
            error = "caller went away"
            raise
        finally:
            if error:
                upstream.close()
            else:
                upstream.release()  # back to the pool
            held.on_end(error)
            self.busy, self.pump = False, None
        if self.buf and not transport.is_closing():
            self._next_request()
