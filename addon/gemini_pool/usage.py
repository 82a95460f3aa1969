"""Token usage and in-band errors, read from response bytes as they pass (unary or streamed).

Gemini's usageMetadata is cumulative (the last value wins); OpenAI-compat sends `usage` in the
last chunk. A regex over the raw bytes serves SSE, JSON-array streams and unary bodies alike
and never has to hold a whole stream in memory.
"""

from __future__ import annotations

import re

_PATTERNS = {
    "in": re.compile(rb'"(?:promptTokenCount|prompt_tokens)"\s*:\s*(\d+)'),
    "out": re.compile(rb'"(?:candidatesTokenCount|completion_tokens)"\s*:\s*(\d+)'),
}
_STREAM_ERROR = re.compile(rb'(?:^|\n)data:\s*\{\s*"error"')
_CARRY = 256


class UsageTap:
    """Feed it chunks; it keeps the last token counts seen and notes in-band stream errors."""

    def __init__(self) -> None:
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.bytes = 0
        self.stream_error = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if not chunk:
            return
        data = self._tail + chunk
        if b"oken" in data or b"error" in data:
            for m in _PATTERNS["in"].finditer(data):
                self.tokens_in = int(m.group(1))
            for m in _PATTERNS["out"].finditer(data):
                self.tokens_out = int(m.group(1))
            if _STREAM_ERROR.search(data):
                self.stream_error = True
        self._tail = data[-_CARRY:]
