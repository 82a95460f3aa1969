"""The floor scripts/bench compares streams with: mitmdump as a user would run it for Gemini.

    mitmdump --mode reverse:https://generativelanguage.googleapis.com -s scripts/bench_stream_floor.py

Every other answer stays buffered (mitmproxy's default); a 2xx `text/event-stream` answer and a
streamed JSON array (`:streamGenerateContent` without `alt=sse`) are streamed, decided in
`responseheaders` as mitmproxy's documentation shows. No key handling, no retries: the least an
addon must do to stream Gemini answers.
"""

from __future__ import annotations

from mitmproxy import http


class StreamFloor:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not 200 <= response.status_code < 300:
            return
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("text/event-stream") or (
            ":streamGenerateContent" in flow.request.path and "alt=sse" not in flow.request.path
        ):
            response.stream = True


addons = [StreamFloor()]
