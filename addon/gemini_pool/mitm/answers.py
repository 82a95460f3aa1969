"""The answers the addon puts on a flow: its own errors, and Google's answers it fetched itself."""

from __future__ import annotations

import time

from mitmproxy import http

from ..decisions import ProxyAnswer
from ..errors import error_body
from ..records import RequestRecord
from ..routing import Api
from ..upstream import UpstreamAnswer


def s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as mitmproxy and aiohttp decode headers


def b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def error_parts(
    api: Api,
    request_id: str,
    status: int,
    message: str,
    reason: str,
    retry_after: float | None = None,
) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and JSON body of a proxy-made error, in the shape the caller's SDK parses."""
    headers = [
        ("content-type", "application/json; charset=UTF-8"),
        ("x-request-id", request_id),
        ("x-gemini-proxy-reason", reason),
    ]
    if retry_after is not None:
        headers.append(("retry-after", str(max(1, round(retry_after)))))
    return headers, error_body(api, status, message, reason)


def error_response(
    api: Api,
    request_id: str,
    status: int,
    message: str,
    reason: str,
    retry_after: float | None = None,
    close: bool = False,
) -> http.Response:
    headers, body = error_parts(api, request_id, status, message, reason, retry_after)
    if close:
        headers.append(("connection", "close"))
    return http.Response.make(status, body, http.Headers([(b(k), b(v)) for k, v in headers]))


def upstream_response(answer: UpstreamAnswer, extra: list[tuple[str, str]]) -> http.Response:
    fields = [(b(k), b(v)) for k, v in answer.headers + extra]
    fields.append((b"content-length", str(len(answer.body)).encode()))
    now = time.time()
    return http.Response(
        b"HTTP/1.1",
        answer.status,
        (answer.reason or "").encode(),
        http.Headers(fields),
        answer.body,
        None,
        now,
        now,
    )


def answer_with(flow: http.HTTPFlow, rec: RequestRecord, a: ProxyAnswer) -> None:
    """The proxy's own answer on the flow, noted on the record."""
    flow.response = error_response(
        Api(rec.api), rec.request_id, a.status, a.message, a.reason, a.retry_after, a.close
    )
    rec.answered(a.status, a.reason, a.message)
