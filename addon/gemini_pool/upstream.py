"""The pooled aiohttp client that talks to Google (every attempt, first or retry, goes through it).

Bodies pass through untouched (no decompression), hop-by-hop headers are dropped. The caller's
Accept-Encoding is narrowed to the codings the proxy itself can read (gzip, deflate, identity):
the proxy reads usage, resource names and in-band errors out of answers.
"""

from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import yarl

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)


class UpstreamError(Exception):
    """No HTTP answer: connect failure, timeout, dropped connection.

    `sent` is False only when the request provably never reached the server (no connection could
    be made: refused, DNS, TLS handshake, connect timeout); a request that is not safe to repeat
    may be retried only then.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


READABLE_CODINGS = frozenset({"gzip", "deflate", "identity"})


@functools.lru_cache(maxsize=256)  # callers send a handful of distinct values
def accept_encoding(value: str) -> str:
    """The caller's Accept-Encoding narrowed to gzip, deflate and identity, q-values kept.

    Codings the caller refuses (q=0), repeats and malformed entries are left out; when nothing is
    left, "identity". Other parameters than q are dropped.
    """
    kept: dict[str, str] = {}
    for item in value.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if coding not in READABLE_CODINGS or coding in kept:
            continue
        q = "1"
        for param in params.split(";"):
            name, _, val = param.partition("=")
            if name.strip().lower() == "q":
                q = val.strip()
        if not _QVALUE.fullmatch(q):
            continue
        if not q.strip("0."):
            continue  # q=0: "not this one"
        kept[coding] = coding if q[0] == "1" else f"{coding};q={q}"
    return ", ".join(kept.values()) or "identity"


_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")  # RFC 9110 qvalue, ASCII digits only


@dataclass
class UpstreamAnswer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes  # while `stream` is held open: its first chunk only
    stream: aiohttp.ClientResponse | None = None  # a 2xx streaming answer, rest not read yet

    def header(self, name: str) -> str:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), "")


def forwardable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


async def _on_reuse(_session: Any, ctx: SimpleNamespace, _params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, SimpleNamespace):
        ctx.trace_request_ctx.reused = True


def _tracing() -> aiohttp.TraceConfig:
    """Tells a request sent on a pooled (kept-alive) connection from one on a new connection."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_on_reuse)
    return trace


def stale_connection(e: BaseException) -> bool:
    """A failure a kept-alive connection gives when the server closed or spoilt it while it sat
    in the pool: closed (ServerDisconnectedError), reset (ClientOSError), or bytes that are no
    answer ("Bad status line", a protocol error). Not a failure to connect."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return False
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return True
    return isinstance(e, aiohttp.ClientResponseError) and isinstance(
        e.__cause__, aiohttp.http_exceptions.HttpProcessingError
    )


class UpstreamClient:
    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 300.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self.stale_retries = 0  # requests re-sent on a fresh connection after a stale one failed

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
                trace_configs=[_tracing()],
            )
        return self._session

    @property
    def fresh(self) -> aiohttp.ClientSession:
        """A new connection for every request: for what must not meet a stale pooled one."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = aiohttp.ClientSession(
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._fresh

    @functools.lru_cache(maxsize=256)  # noqa: B019 - a few distinct values, client lives forever
    def _timeout(self, stream: bool, timeout: float) -> aiohttp.ClientTimeout:
        # a unary answer is bounded by `total`; a per-read timeout (re-armed on every read) is
        # only needed to notice a stream that stalls
        return aiohttp.ClientTimeout(
            total=None if stream else timeout,
            connect=min(self.connect_timeout, timeout),
            sock_read=min(self.read_timeout, timeout) if stream else None,
        )

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None and not session.closed:
                await session.close()
        self._session = self._fresh = None

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        stream: bool,
        timeout: float,
        repeatable: bool = True,
    ) -> UpstreamAnswer:
        """Send one attempt. A 2xx streaming answer comes back open, with its first chunk read.

        Reading the first chunk here makes a stream that breaks before it a failed attempt, retried
        on another key like any other, since nothing has reached the caller yet.

        A kept-alive connection can go stale in the pool (the server closed it, or an answer left
        stray bytes on it). A repeatable request that fails that way on a reused connection is
        sent once more on a new connection before the failure counts (against no key so far);
        a request that is not safe to repeat (a create, a delete) always gets a new connection.
        """
        lower = {k.lower() for k, _ in headers}
        skip = [
            h for h in ("User-Agent", "Accept-Encoding", "Content-Type") if h.lower() not in lower
        ]
        out = forwardable(headers)
        if "accept-encoding" in lower:  # only codings the proxy can read in the answer
            accepted = ", ".join(v for k, v in out if k.lower() == "accept-encoding")
            out = [(k, v) for k, v in out if k.lower() != "accept-encoding"]
            out.append(("Accept-Encoding", accept_encoding(accepted)))
        t = self._timeout(stream, timeout)
        session = self.session if repeatable else self.fresh
        for last in (False, True):
            ctx = SimpleNamespace(reused=False)
            try:
                resp = await session.request(
                    method,
                    yarl.URL(url, encoded=True),  # forward the path exactly as routed
                    headers=out,
                    data=body or None,
                    skip_auto_headers=skip,
                    allow_redirects=False,
                    timeout=t,
                    trace_request_ctx=ctx,
                )
                break
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                if last or not ctx.reused or not stale_connection(e):
                    raise UpstreamError(_describe(e), sent=not _never_connected(e)) from None
                self.stale_retries += 1
                session = self.fresh
        out_headers = forwardable(list(resp.headers.items()))
        if stream and 200 <= resp.status < 300:
            try:
                first = await resp.content.readany()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                resp.close()
                raise UpstreamError(f"{_describe(e)} before the first byte", sent=True) from None
            return UpstreamAnswer(resp.status, resp.reason or "", out_headers, first, resp)
        try:
            body_out = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise UpstreamError(_describe(e), sent=True) from None
        finally:
            resp.release()
        return UpstreamAnswer(resp.status, resp.reason or "", out_headers, body_out)


def _never_connected(e: BaseException) -> bool:
    """No connection was made, so no byte of the request left: refused, DNS, TLS, connect timeout.

    aiohttp writes the request only on an established connection; a failure after that (a dropped
    or reset connection, a read timeout) leaves open whether the server got and acted on it.
    """
    return isinstance(e, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return "cannot connect to upstream: timed out"
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "upstream timed out"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect to upstream: {e.os_error.strerror or e.os_error}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "upstream closed the connection"
    return f"upstream failed: {type(e).__name__}: {e}"
