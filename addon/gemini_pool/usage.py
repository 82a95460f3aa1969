"""Token usage and in-band errors, read from response bytes as they pass (unary or streamed).

Gemini's usageMetadata is cumulative and comes last in each answer or event (the last value
wins); OpenAI-compat sends `usage` in the last chunk; an in-band stream error is the last event.
So the tap only keeps the tail of the bytes and reads it once, at the end: per chunk it costs a
slice, not a scan (scanning every chunk cost more than relaying it, measured with 64 KiB events).

Google gzips answers, streamed ones too, whenever the caller accepts it: the tap then inflates
as the bytes pass and keeps the tail of the decoded text. Inflating is bounded: at most PIECE
bytes of output exist at a time, and a stream that inflates past MAX_RATIO times its wire size
(beyond a floor) is a bomb, not an answer: the tap stops decoding and only counts bytes.
"""

from __future__ import annotations

import re
import zlib

from .codings import coding_of, wbits

# at most 15 digits: a longer number is no token count (and would not fit SQLite's INTEGER)
_TOKENS_IN = re.compile(rb'"(?:promptTokenCount|prompt_tokens)"\s*:\s*(\d{1,15})(?![0-9])')
_TOKENS_OUT = re.compile(rb'"(?:candidatesTokenCount|completion_tokens)"\s*:\s*(\d{1,15})(?![0-9])')
# "data:" is a literal the regex engine can search for; `(?:^|\n)data:...` was tried at every
# position of the tail (~0.1 ms per answer): the line start is checked for each hit instead
_STREAM_ERROR = re.compile(rb'data:\s*\{\s*"error"')
TAIL = 8192
PIECE = 64 * 1024  # most decoded bytes produced by one inflate step
WINDOW = 16 * 1024  # most encoded bytes handed to one run of inflate steps
MAX_RATIO = 100  # decoded bytes per wire byte before the tap calls it a bomb ...
RATIO_FLOOR = 64 * 1024 * 1024  # ... once past this much decoded output


class UsageTap:
    """Feed it chunks; `finish()` reads token counts and an in-band stream error from the tail.

    `encoding` is the answer's Content-Encoding: gzip and deflate are decoded as they pass,
    anything else it cannot decode makes the tap count bytes only. `bytes` counts wire bytes.
    """

    def __init__(self, encoding: str = "") -> None:
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.bytes = 0
        self.events = 0  # SSE events seen ("data:"; a piece split between chunks is missed)
        self.stream_error = False
        self._tail = b""
        self._coding: str | None = coding_of(encoding) if encoding else ""
        self._inflate: zlib._Decompress | None = None
        self._pending = b""  # the first bytes of a deflate answer, until its header is known
        self._decoded = 0  # bytes inflated so far

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self._coding:
            self._feed_encoded(chunk)
        elif self._coding is not None:  # identity
            self.events += chunk.count(b"data:")
            if len(chunk) >= TAIL:
                self._tail = chunk[-TAIL:]
            elif chunk:
                self._tail = (self._tail + chunk)[-TAIL:]

    def _feed_encoded(self, data: bytes) -> None:
        try:
            # a window at a time: decompress(data, max_length) copies the input it has not
            # consumed into unconsumed_tail on every step, which must stay small
            for at in range(0, len(data), WINDOW):
                if not self._inflate_window(data[at : at + WINDOW]):
                    return
        except zlib.error:
            self._give_up()  # corrupt: what was decoded so far stays readable

    def _inflate_window(self, data: bytes) -> bool:
        """Inflate a little input, PIECE bytes of output at a time; False once given up."""
        coding = self._coding
        assert coding
        while data:
            if self._inflate is None:  # the first bytes, or the next gzip member
                if len(self._pending) + len(data) < 2:
                    self._pending += data
                    return True
                data, self._pending = self._pending + data, b""
                self._inflate = zlib.decompressobj(wbits(coding, data))
            inflate = self._inflate
            while True:
                piece = inflate.decompress(data, PIECE)
                if piece:
                    self._keep(piece)
                data = inflate.unconsumed_tail
                if inflate.eof or (not data and len(piece) < PIECE):
                    break
                if self._decoded > max(RATIO_FLOOR, MAX_RATIO * self.bytes):
                    self._give_up()  # a bomb: stop inflating, keep counting bytes
                    return False
            if inflate.eof:
                data = inflate.unused_data
                self._inflate = None
        return True

    def _give_up(self) -> None:
        if self._coding:
            self._coding = None
            self._inflate = None
            self._pending = b""

    def _keep(self, piece: bytes) -> None:
        self._decoded += len(piece)
        self.events += piece.count(b"data:")
        if len(piece) >= TAIL:
            self._tail = piece[-TAIL:]
        else:
            self._tail = (self._tail + piece)[-TAIL:]

    def finish(self) -> None:
        tail = self._tail
        if found := _TOKENS_IN.findall(tail):
            self.tokens_in = int(found[-1])
        if found := _TOKENS_OUT.findall(tail):
            self.tokens_out = int(found[-1])
        self.stream_error = any(
            m.start() == 0 or tail[m.start() - 1] == 0x0A for m in _STREAM_ERROR.finditer(tail)
        )
