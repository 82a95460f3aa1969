"""Token usage and in-band errors, read from response bytes as they pass (unary or streamed).

Gemini's usageMetadata is cumulative and comes last in each answer or event (the last value
wins); OpenAI-compat sends `usage` in the last chunk; an in-band stream error is the last event.
So the tap only keeps the tail of the bytes and reads it once, at the end: per chunk it costs a
slice, not a scan (scanning every chunk cost more than relaying it, measured with 64 KiB events).
"""

from __future__ import annotations

import re

_TOKENS_IN = re.compile(rb'"(?:promptTokenCount|prompt_tokens)"\s*:\s*(\d+)')
_TOKENS_OUT = re.compile(rb'"(?:candidatesTokenCount|completion_tokens)"\s*:\s*(\d+)')
_STREAM_ERROR = re.compile(rb'(?:^|\n)data:\s*\{\s*"error"')
TAIL = 8192


class UsageTap:
    """Feed it chunks; `finish()` reads token counts and an in-band stream error from the tail."""

    def __init__(self) -> None:
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.bytes = 0
        self.stream_error = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if len(chunk) >= TAIL:
            self._tail = chunk[-TAIL:]
        elif chunk:
            self._tail = (self._tail + chunk)[-TAIL:]

    def finish(self) -> None:
        tail = self._tail
        if found := _TOKENS_IN.findall(tail):
            self.tokens_in = int(found[-1])
        if found := _TOKENS_OUT.findall(tail):
            self.tokens_out = int(found[-1])
        self.stream_error = bool(_STREAM_ERROR.search(tail))
