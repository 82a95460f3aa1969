"""Loopback relay that lets mitmproxy stream an upstream answer the addon already holds.

mitmproxy cannot stream a response an addon sets, and cannot retry a request itself. So for a
streaming request the addon makes the attempts with its own client until one answers 2xx, holds
that open answer here under an unguessable ticket, and points the flow at this relay; mitmproxy
then streams the relay's answer to the caller unbuffered. A failure after the first byte cuts
the connection (the caller sees a truncated stream, never a duplicated one).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

TICKET_HEADER = "x-gemini-proxy-relay"
UNCLAIMED_TTL = 30.0


@dataclass
class Held:
    response: aiohttp.ClientResponse
    headers: list[tuple[str, str]]
    on_chunk: Callable[[bytes], None]
    on_end: Callable[[str | None], None]  # called once with None (complete) or an error text
    created: float = field(default_factory=time.monotonic)


class StreamRelay:
    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # shutdown_timeout: at exit the drain is over; streams still open are cut, not awaited
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for ticket in list(self._held):
            self._drop(ticket, "proxy shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def hold(self, held: Held) -> str:
        self._expire()
        ticket = secrets.token_urlsafe(24)
        self._held[ticket] = held
        return ticket

    def cancel(self, ticket: str, why: str) -> None:
        """The flow died before mitmproxy fetched the stream."""
        self._drop(ticket, why)

    def _drop(self, ticket: str, why: str) -> None:
        held = self._held.pop(ticket, None)
        if held is not None:
            held.response.close()
            held.on_end(why)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t, h in self._held.items() if now - h.created > UNCLAIMED_TTL]:
            self._drop(ticket, "stream never claimed")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        held = self._held.pop(request.headers.get(TICKET_HEADER, ""), None)
        if held is None:
            return web.json_response({"error": "unknown relay ticket"}, status=404)
        upstream = held.response
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in held.headers:
            out.headers.add(k, v)
        error: str | None = None
        try:
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                held.on_chunk(chunk)
                await out.write(chunk)
            await out.write_eof()
        except (aiohttp.ClientError, TimeoutError) as e:
            error = f"upstream stream broke: {type(e).__name__}"
            # cut the connection so mitmproxy (and the caller) see a truncated stream
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, asyncio.CancelledError) as e:
            error = f"caller went away: {type(e).__name__}"
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            if error:
                upstream.close()
            else:
                upstream.release()  # back to the pool
            held.on_end(error)
        return out
