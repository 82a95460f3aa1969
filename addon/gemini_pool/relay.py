"""Loopback relay that lets mitmproxy stream an upstream answer the addon already holds.

mitmproxy cannot stream a response an addon sets, and cannot retry a request itself. So for a
streaming request the addon makes the attempts with its own client until one answers 2xx, holds
that open answer here under an unguessable ticket, and points the flow at this relay; mitmproxy
then streams the relay's answer to the caller unbuffered. A failure after the first byte cuts
the connection (the caller sees a truncated stream, never a duplicated one).

The relay also refuses requests without holding their bodies: the addon files a small answer
(`refuse`) and points a flow whose request body mitmproxy streams (`flow.request.stream`) at the
relay. By default the relay answers as soon as it has the head, then reads and throws away a
bounded amount of what still comes. With `after_body=True` it first reads and throws away the
whole body (by its Content-Length or chunked framing, in constant memory, up to `drain_bytes` or
`drain_seconds`) and answers then: through mitmproxy, a caller that writes its whole body before
reading (http.client, requests, httpx) only receives an answer given after the body, because
mitmproxy stops reading the caller once an early answer is complete, and neither reads nor closes
that connection again.

The relay speaks just enough HTTP/1.1 for mitmproxy's requests (request line, headers, a
Content-Length body it skips; the addon sends none) on a bare asyncio protocol: it sits on the
path of every stream's first byte, and aiohttp's web server cost more CPU per request.

Every answer that ends a connection (a refusal, 400, 404) is followed by a graceful close: shut
down the write side, read and discard what the peer still sends up to a bound, then close. Closing
with unread bytes would make the kernel send a reset, which can destroy the answer in flight.

It stays one module (under 500 lines): the tickets, the HTTP/1.1 framing and the graceful close
are one small server, measured as a whole on the stream's first byte.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import aiohttp

TICKET_HEADER = "x-gemini-proxy-relay"
TICKET_FIELD = TICKET_HEADER.encode()  # as it appears in raw header fields
UNCLAIMED_TTL = 30.0
MAX_HEAD = 256 * 1024  # mitmproxy forwards the caller's headers; refuse anything absurd
LINGER_BYTES = 1024 * 1024  # after a final answer: discard at most this much of what still comes
LINGER_SECONDS = 2.0  # ... or for at most this long, whichever ends first
DRAIN_BYTES = 256 * 1024 * 1024  # an after-body refusal reads at most this much body ...
DRAIN_SECONDS = 30.0  # ... or for at most this long, then answers anyway
DRAIN_IDLE = 1.0  # ... or once nothing came for this long (a caller that sent only the head)
MAX_CHUNK_LINE = 4096  # a chunk-size line (with extensions) or trailer line

_NOT_FOUND_BODY = b'{"error": "unknown relay ticket"}'
_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_NOT_FOUND_BODY), _NOT_FOUND_BODY)
)
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
# headers a refusal writes itself
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


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


@dataclass
class Refusal:
    """A whole answer given at the request head, or after its body is read and thrown away."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # framing headers are the relay's own and are dropped here
    body: bytes
    after_body: bool = False
    created: float = field(default_factory=time.monotonic)

    def answer(self) -> bytes:
        phrase = self.reason
        if not phrase or _breaks_line(phrase):
            try:
                phrase = HTTPStatus(self.status).phrase
            except ValueError:
                phrase = "Unknown"
        lines = [f"HTTP/1.1 {self.status} {phrase}\r\n"]
        lines.extend(
            f"{k}: {v}\r\n"
            for k, v in self.headers
            if k.lower() not in _OWN_HEADERS and not _breaks_line(k + v)
        )
        lines.append(f"content-length: {len(self.body)}\r\nconnection: close\r\n\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape") + self.body


def _breaks_line(text: str) -> bool:
    return "\r" in text or "\n" in text


class StreamRelay:
    def __init__(self) -> None:
        self._tickets: dict[str, Held | Refusal] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[_RelayConnection] = set()
        self.port = 0
        self.linger_bytes = LINGER_BYTES
        self.linger_seconds = LINGER_SECONDS
        self.drain_bytes = DRAIN_BYTES
        self.drain_seconds = DRAIN_SECONDS
        self.drain_idle = DRAIN_IDLE
        self.discarded = 0  # request bytes read and thrown away after a final answer, in all

    async def start(self, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RelayConnection(self), host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """At exit the drain is over: streams still open are cut, not awaited."""
        for ticket in list(self._tickets):
            self._drop(ticket, "proxy shutting down")
        if self._server is not None:
            self._server.close()
            for conn in list(self._conns):
                conn.abort()
            await self._server.wait_closed()
            self._server = None
        self.port = 0

    def hold(self, held: Held) -> str:
        """File an open stream; the ticket fetches it once, within UNCLAIMED_TTL."""
        return self._issue(held)

    def refuse(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        after_body: bool = False,
    ) -> str:
        """File a whole answer; the ticket gets it once, within UNCLAIMED_TTL.

        The answer goes out when the request head arrives, or with `after_body` once the request
        body has been read and dropped (or `drain_bytes` / `drain_seconds` ran out); the body is
        never held either way. `reason` may be empty (the standard phrase is used);
        `content-length` and `connection: close` are added, framing headers in `headers` dropped.
        """
        return self._issue(Refusal(status, reason, headers, body, after_body))

    def claim(self, ticket: str) -> Held | Refusal | None:
        return self._tickets.pop(ticket, None)

    def cancel(self, ticket: str, why: str) -> None:
        """The flow died before mitmproxy fetched its ticket."""
        self._drop(ticket, why)

    def _issue(self, item: Held | Refusal) -> str:
        self._expire()
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = item
        return ticket

    def _drop(self, ticket: str, why: str) -> None:
        item = self._tickets.pop(ticket, None)
        if isinstance(item, Held):
            item.stream.close()
            item.on_end(why)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t, h in self._tickets.items() if now - h.created > UNCLAIMED_TTL]:
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
        self.linger: asyncio.TimerHandle | None = None  # set once the final answer is written
        self.linger_left = 0  # bytes still to discard before closing
        self.refusal: Refusal | None = None  # an after-body refusal, reading the body
        self.skipper: _LengthSkipper | _ChunkedSkipper | None = None
        self.drained = 0
        self.drain_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._conns.discard(self)
        self.writable.set()
        for timer in (self.linger, self.drain_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        if self.pump is not None:
            self.pump.cancel()  # mitmproxy dropped the stream: the caller went away

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if self.linger is not None:  # answered and closing: count, drop, never keep
            self.relay.discarded += len(data)
            self.linger_left -= len(data)
            if self.linger_left < 0:
                self._close()
            return
        if self.skipper is not None:  # an after-body refusal: drop the body as it comes
            self._drain(data)
            return
        if self.discard and not self.buf:  # a body to skip: skip it without copying it
            n = min(self.discard, len(data))
            self.discard -= n
            data = data[n:]
        self.buf += data
        if not self.busy:
            self._next_request()
        elif len(self.buf) > MAX_HEAD:  # mitmproxy never pipelines: not mitmproxy
            self.abort()

    def eof_received(self) -> None:
        """The peer is done sending: close (once what is written has gone out)."""
        if self.skipper is not None:  # the body ended early; a half-closed peer still reads
            self._answer_refusal()

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
        if end < 0 or end > MAX_HEAD:
            if len(self.buf) > MAX_HEAD:
                self._answer_and_close(_BAD_REQUEST)
            return
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        ticket = b""
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == TICKET_FIELD:
                ticket = value.strip()
            elif name == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        key = ticket.decode("ascii", "replace")
        if isinstance(self.relay._tickets.get(key), Refusal):
            refusal = self.relay.claim(key)
            assert isinstance(refusal, Refusal)
            if refusal.after_body and (chunked or length):
                self._drain_then_answer(
                    refusal, _ChunkedSkipper() if chunked else _LengthSkipper(length)
                )
            else:
                self._answer_and_close(refusal.answer())  # now, whatever body follows
            return
        if chunked:
            self._answer_and_close(_BAD_REQUEST)  # the addon never relays a chunked body
            return
        self.discard = length
        held = self.relay.claim(key)
        if held is None:
            self._answer_and_close(_NOT_FOUND)
            return
        assert isinstance(held, Held)
        self.busy = True
        # mitmproxy runs the loop with eager tasks: the pump may be done (and the next request
        # started) when this returns
        pump = asyncio.get_running_loop().create_task(self._stream(held))
        if not pump.done():
            self.pump = pump

    def _drain_then_answer(
        self, refusal: Refusal, skipper: _LengthSkipper | _ChunkedSkipper
    ) -> None:
        self.refusal, self.skipper = refusal, skipper
        loop = asyncio.get_running_loop()
        self.drain_timer = loop.call_later(self.relay.drain_seconds, self._answer_refusal)
        self.idle_timer = loop.call_later(self.relay.drain_idle, self._answer_refusal)
        data, self.buf = bytes(self.buf), bytearray()
        if data:
            self._drain(data)

    def _drain(self, data: bytes) -> None:
        assert self.skipper is not None
        self.relay.discarded += len(data)
        self.drained += len(data)
        if self.idle_timer is not None:  # still sending: wait for the rest
            self.idle_timer.cancel()
            self.idle_timer = asyncio.get_running_loop().call_later(
                self.relay.drain_idle, self._answer_refusal
            )
        try:
            done = self.skipper.feed(data)
        except ValueError:
            done = True  # broken framing: the end cannot be found, answer now
        if done or self.drained > self.relay.drain_bytes:
            self._answer_refusal()

    def _answer_refusal(self) -> None:
        refusal = self.refusal
        assert refusal is not None
        for timer in (self.drain_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        self.refusal = self.skipper = self.drain_timer = self.idle_timer = None
        self._answer_and_close(refusal.answer())

    def _answer_and_close(self, answer: bytes) -> None:
        """Write a final answer, stop writing, and close once the peer stops sending (bounded).

        Closing at once with unread request bytes makes the kernel reset the connection, and the
        peer may then never read the answer. So: FIN after the answer, then read and drop what
        still comes, up to `linger_bytes` or `linger_seconds`; never more than one read is held.
        """
        transport = self.transport
        assert transport is not None
        self.relay.discarded += len(self.buf)
        self.buf = bytearray()
        self.discard = 0
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self.linger_left = self.relay.linger_bytes
        self.linger = asyncio.get_running_loop().call_later(self.relay.linger_seconds, self._close)

    def _close(self) -> None:
        assert self.transport is not None and self.linger is not None
        self.linger.cancel()
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # the peer does not even read the answer
        else:
            self.transport.close()

    async def _stream(self, held: Held) -> None:
        assert self.transport is not None
        transport, upstream = self.transport, held.stream
        error: str | None = None
        try:
            if held.first:  # one write: mitmproxy reads the head and the first bytes at once
                held.on_chunk(held.first)
                transport.write(
                    b"".join((held.head(), b"%x\r\n" % len(held.first), held.first, b"\r\n"))
                )
            else:
                transport.write(held.head())
            async for chunk in upstream.content.iter_any():
                held.on_chunk(chunk)
                # write, not writelines: Python before 3.12.3 never pauses the writer on
                # writelines, so a slow caller would let the whole answer pile up here
                transport.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
                if not self.writable.is_set():
                    await self.writable.wait()  # the caller reads slower than Google writes
                if transport.is_closing():
                    raise ConnectionResetError("relay connection closed")
            transport.write(b"0\r\n\r\n")
        except (aiohttp.ClientError, TimeoutError) as e:
            error = upstream_cut(e)
            transport.abort()  # mitmproxy (and the caller) see a truncated stream
        except ConnectionError:
            error = "caller went away"
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


def upstream_cut(e: BaseException) -> str:
    """What broke a stream on Google's side, in words (on_end: "upstream ..." blames the key)."""
    if isinstance(e, TimeoutError):
        return "upstream sent nothing for too long (read timeout)"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "upstream broke off the answer mid-stream"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "upstream closed the connection mid-stream"
    if isinstance(e, aiohttp.ClientConnectionError):
        return "upstream connection failed mid-stream"
    return "upstream stream failed"


class _LengthSkipper:
    """The end of a Content-Length body, counted."""

    def __init__(self, length: int) -> None:
        self.left = length

    def feed(self, data: bytes) -> bool:
        """True once the body has ended (bytes after it are ignored)."""
        self.left -= min(self.left, len(data))
        return not self.left


class _ChunkedSkipper:
    """The end of a chunked body, found in constant memory (one bounded line at most).

    Raises ValueError on framing it cannot follow.
    """

    def __init__(self) -> None:
        self.state = "size"  # size, data, data-end, trailer
        self.left = 0
        self.line = bytearray()

    def feed(self, data: bytes) -> bool:
        """True once the body has ended (the last chunk and the trailer section are in)."""
        at, end = 0, len(data)
        while at < end:
            if self.state == "data":
                take = min(self.left, end - at)
                at += take
                self.left -= take
                if not self.left:
                    self.state = "data-end"
                continue
            eol = data.find(b"\n", at)
            self.line += data[at : end if eol < 0 else eol]
            if len(self.line) > MAX_CHUNK_LINE:
                raise ValueError("chunk line too long")
            if eol < 0:
                return False
            at = eol + 1
            line = bytes(self.line).rstrip(b"\r")
            self.line.clear()
            if self.state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise ValueError(f"bad chunk size {size[:20]!r}")
                self.left = int(size, 16)
                self.state = "data" if self.left else "trailer"
            elif self.state == "data-end":
                if line:
                    raise ValueError("chunk data longer than its size")
                self.state = "size"
            elif not line:  # trailer: an empty line ends the body
                return True
        return False
