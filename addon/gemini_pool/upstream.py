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


class UpstreamClient:
    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 300.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.stream_over = STREAM_OVER
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

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
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        stream: bool,
        timeout: float,
    ) -> UpstreamAnswer:
        """Send one attempt. A 2xx streaming answer comes back open, with its first chunk read;
        so does a 2xx answer over `stream_over` bytes (or one without a length that turns out
        to be), with what was read of it so far.

        Reading the first chunk here makes a stream that breaks before it a failed attempt, retried
        on another key like any other, since nothing has reached the caller yet.
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
        try:
            resp = await self.session.request(
                method,
                yarl.URL(url, encoded=True),  # forward the path exactly as routed
                headers=out,
                data=body or None,
                skip_auto_headers=skip,
                allow_redirects=False,
                timeout=t,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise UpstreamError(_describe(e), sent=not _never_connected(e)) from None
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
