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
import aiohttp_socks
import yarl

from .egress import Egress

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
# a 2xx answer larger than this (by Content-Length, or by what arrived of one without a length)
# is relayed as it arrives instead of read whole: the proxy's memory must not follow an answer's
# size (a batch result, a downloaded file). Resource names are read only from smaller answers.
STREAM_OVER = 4 << 20


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


RETIRED_GRACE = 3600.0  # an egress gone from the key file: its last streams get this long


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


def _new_session(egress: Egress | None, fresh: bool = False) -> aiohttp.ClientSession:
    """A pooled session through `egress` (None: direct); `fresh`: a new connection every time,
    for what must never meet a stale pooled one (creates, deletes, the resend after a stale
    connection failed)."""
    pooling: dict[str, Any] = {"force_close": True} if fresh else {"keepalive_timeout": 30}
    connector: aiohttp.BaseConnector
    if egress is not None and egress.scheme.startswith("socks5"):
        host, port = egress.host_port
        creds = egress.credentials
        connector = aiohttp_socks.ProxyConnector(
            host,
            port,
            aiohttp_socks.ProxyType.SOCKS5,
            username=creds[0] if creds else None,
            password=creds[1] if creds else None,
            rdns=egress.scheme == "socks5h",
            limit=0,
            ttl_dns_cache=300,
            **pooling,
        )
    else:  # direct, or an http:// proxy (given per request: aiohttp pools per proxy anyway)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, **pooling)
    return aiohttp.ClientSession(
        auto_decompress=False,
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=[] if fresh else [_tracing()],
    )


class UpstreamClient:
    """One pooled session per egress (direct, or each key's forward proxy), made on first use."""

    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 300.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.stream_over = STREAM_OVER
        self._sessions: dict[tuple[Egress | None, bool], aiohttp.ClientSession] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self.stale_retries = 0  # requests re-sent on a fresh connection after a stale one failed

    @property
    def session(self) -> aiohttp.ClientSession:
        """The direct pooled session (no egress proxy)."""
        return self.session_for(None)

    def session_for(self, egress: Egress | None, fresh: bool = False) -> aiohttp.ClientSession:
        session = self._sessions.get((egress, fresh))
        if session is None or session.closed:
            session = self._sessions[(egress, fresh)] = _new_session(egress, fresh)
        return session

    def keep_egresses(self, wanted: set[Egress]) -> list[str]:
        """After a reload: sessions of egresses no key uses any more are retired (closed once
        their connections are idle, at most RETIRED_GRACE later). Returns their URLs."""
        gone = [k for k in self._sessions if k[0] is not None and k[0] not in wanted]
        for k in gone:
            session = self._sessions.pop(k)
            try:
                task = asyncio.get_running_loop().create_task(_retire(session))
            except RuntimeError:  # no loop (at load): nothing can be in flight on it
                continue
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return sorted({e.url for e, _ in gone if e is not None})

    @property
    def egress_sessions(self) -> int:
        return len({e for e, _ in self._sessions if e is not None})

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
        sessions, self._sessions = list(self._sessions.values()), {}
        for task in list(self._retired):
            task.cancel()
        for session in sessions:
            if not session.closed:
                await session.close()

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
        egress: Egress | None = None,
    ) -> UpstreamAnswer:
        """Send one attempt. A 2xx streaming answer comes back open, with its first chunk read;
        so does a 2xx answer over `stream_over` bytes (or one without a length that turns out
        to be), with what was read of it so far.

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
        http_proxy = egress is not None and egress.scheme == "http"
        proxy_headers = _proxy_headers(egress) if http_proxy else None
        if proxy_headers and url.startswith("http:"):  # no CONNECT: the proxy reads the request
            out.extend(proxy_headers.items())
        session = self.session_for(egress, fresh=not repeatable)
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
                    proxy=egress.url if http_proxy and egress else None,
                    proxy_headers=proxy_headers,  # for the CONNECT of an https upstream
                    trace_request_ctx=ctx,
                )
                break
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                if egress is not None and _egress_failed(e):
                    raise UpstreamError(_describe_egress(e, egress), sent=False) from None
                if last or not ctx.reused or not stale_connection(e):
                    raise UpstreamError(_describe(e), sent=not _never_connected(e)) from None
                self.stale_retries += 1
                session = self.session_for(egress, fresh=True)
            except (aiohttp_socks.ProxyError, aiohttp_socks.ProxyConnectionError) as e:
                assert egress is not None
                raise UpstreamError(_describe_egress(e, egress), sent=False) from None
            except aiohttp_socks.ProxyTimeoutError as e:
                assert egress is not None
                raise UpstreamError(_describe_egress(e, egress), sent=False) from None
        if resp.status == 407 and http_proxy and egress is not None:
            resp.release()  # the egress proxy refused us (plain-http upstream: no CONNECT)
            raise UpstreamError(
                f"cannot connect to upstream: {EGRESS_UNREACHABLE} {egress.url} (it answered 407)",
                sent=False,
            )
        out_headers = forwardable(list(resp.headers.items()))
        if 200 <= resp.status < 300 and (stream or _maybe_large(resp, self.stream_over)):
            try:
                first = await _head_of(resp, 0 if stream else self.stream_over)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                resp.close()
                raise UpstreamError(f"{_describe(e)} before the first byte", sent=True) from None
            if not stream and resp.content.at_eof():  # it was small after all: a whole answer
                resp.release()
                return UpstreamAnswer(resp.status, resp.reason or "", out_headers, first)
            return UpstreamAnswer(resp.status, resp.reason or "", out_headers, first, resp)
        try:
            body_out = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise UpstreamError(_describe(e), sent=True) from None
        finally:
            resp.release()
        return UpstreamAnswer(resp.status, resp.reason or "", out_headers, body_out)


async def _retire(session: aiohttp.ClientSession) -> None:
    """Close a session once none of its connections is in use (a stream may still run on it)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + RETIRED_GRACE
    try:
        while loop.time() < until and getattr(session.connector, "_acquired", None):
            await asyncio.sleep(1.0)
    finally:
        await session.close()


def _proxy_headers(egress: Egress | None) -> dict[str, str] | None:
    creds = egress.credentials if egress is not None else None
    return {"Proxy-Authorization": aiohttp.encode_basic_auth(*creds)} if creds else None


EGRESS_UNREACHABLE = "egress proxy unreachable"


def _egress_failed(e: BaseException) -> bool:
    """The egress proxy itself failed: no connection to it, or it refused the tunnel (407, 502)."""
    return isinstance(e, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError)


def _describe_egress(e: BaseException, egress: Egress) -> str:
    """Why the egress proxy failed, naming it by its URL (which holds no credentials)."""
    if isinstance(e, aiohttp.ClientHttpProxyError):
        why = f"it answered {e.status}"
    elif isinstance(e, aiohttp.ClientConnectorError):
        why = str(e.os_error.strerror or e.os_error)
    elif isinstance(e, aiohttp_socks.ProxyTimeoutError):
        why = "timed out"
    else:
        why = type(e).__name__
        if egress.auth is None or egress.auth not in str(e):
            why = f"{why}: {e}"[:200]
    return f"cannot connect to upstream: {EGRESS_UNREACHABLE} {egress.url} ({why})"


def _maybe_large(resp: aiohttp.ClientResponse, limit: int) -> bool:
    """A Content-Length over `limit`, or none at all (then only reading tells)."""
    length = resp.content_length
    return length is None or length > limit


async def _head_of(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The first chunk; with a `limit`, chunks until the answer ends or more than `limit`
    bytes arrived (an answer that announced more than `limit`: its first chunk only)."""
    first = await resp.content.readany()
    length = resp.content_length
    if not limit or (length is not None and length > limit):
        return first
    parts, size = [first], len(first)
    while size <= limit and first and not resp.content.at_eof():
        first = await resp.content.readany()
        parts.append(first)
        size += len(first)
    return b"".join(parts)


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
