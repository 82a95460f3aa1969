"""Upload follow-ups on a worker that has not yet heard of their session (several workers).

A resumable upload starts on one worker and its bytes may reach another a few milliseconds later,
before the first worker's pin of the session has arrived through Redis. Without the pin the gate
would refuse the follow-up (401: no client token) or, without clients, send it with any key. This
addon runs before the gate: for a follow-up naming an unknown session while shared state is up, it
waits, bounded (UPLOAD_WAIT), for the pin from Redis. Every other request passes untouched and
without an await.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import http

from ..pins import upload_digest
from ..routing import query_param
from ..upload_tokens import is_token

UPLOAD_WAIT = 2.0  # seconds a follow-up waits for its session's pin from another worker


class UploadCatchUp:
    def __init__(self, service: Callable[[], Any]) -> None:
        self.service = service  # the ProxyService (it changes with a fresh Runtime)

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[bool] | None:
        path = flow.request.path
        if "upload_id" not in path:
            return None
        service = self.service()
        shared = service.shared
        if shared is None or not shared.up:
            return None
        upload_id = query_param(path.partition("?")[2], "upload_id")
        if not upload_id or not is_token(upload_id):  # only the proxy's own tokens name sessions
            return None
        digest = upload_digest(upload_id)
        if digest in service.pins.uploads:
            return None
        result: Awaitable[bool] = shared.learn_upload(digest, UPLOAD_WAIT)
        return result
