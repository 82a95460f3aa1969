"""Token counts and in-band errors from the bytes of an answer, however they are chunked."""

from __future__ import annotations

import functools
import gzip
import json
import os
import struct
import time
import tracemalloc
import zlib
from typing import Any

import pytest

from gemini_pool.codings import decoded
from gemini_pool.usage import MAX_RATIO, PIECE, RATIO_FLOOR, TAIL, UsageTap


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)


def gemini_event(i: int, pad: int = 0) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": [{"text": "x" * pad}]}}],
        "usageMetadata": {
            "promptTokenCount": 7,
            "candidatesTokenCount": i,
            "totalTokenCount": 7 + i,
        },
    }


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096, 100_000])
def test_last_cumulative_usage_wins_across_any_chunking(chunk: int) -> None:
    raw = sse([gemini_event(i, pad=3000) for i in range(1, 21)])
    tap = UsageTap()
    for i in range(0, len(raw), chunk):
        tap.feed(raw[i : i + chunk])
    tap.finish()
    assert (tap.tokens_in, tap.tokens_out, tap.bytes, tap.stream_error) == (7, 20, len(raw), False)


def test_openai_usage_and_in_band_errors() -> None:
    tap = UsageTap()
    tap.feed(
        b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}\n\ndata: [DONE]\n\n'
    )
    tap.finish()
    assert (tap.tokens_in, tap.tokens_out) == (5, 9)
    tap = UsageTap()
    tap.feed(sse([gemini_event(1), {"error": {"code": 500, "message": "stream failed"}}]))
    tap.finish()
    assert tap.stream_error and tap.tokens_out == 1


def test_no_usage_is_none() -> None:
    tap = UsageTap()
    tap.feed(b'{"embedding": {"values": [0.1]}}')
    tap.finish()
    assert (tap.tokens_in, tap.tokens_out) == (None, None)


def gzip_stream(events: list[bytes], wbits: int = 31) -> bytes:
    """Compressed as Google streams it: one compressor, flushed after every event."""
    z = zlib.compressobj(6, zlib.DEFLATED, wbits)
    out = [z.compress(e) + z.flush(zlib.Z_SYNC_FLUSH) for e in events]
    return b"".join(out) + z.flush()


def feed_in(tap: UsageTap, raw: bytes, chunk: int) -> UsageTap:
    for i in range(0, len(raw), chunk):
        tap.feed(raw[i : i + chunk])
    tap.finish()
    return tap


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 10, 11, 100, 4096, 1 << 20])
def test_gzip_sse_is_read_at_any_chunking(chunk: int) -> None:
    events = [sse([gemini_event(i, pad=3000)]) for i in range(1, 21)]
    events.append(sse([{"error": {"code": 500, "message": "stream failed"}}]))
    raw = gzip_stream(events)
    tap = feed_in(UsageTap("gzip"), raw, chunk)
    assert (tap.tokens_in, tap.tokens_out, tap.bytes, tap.stream_error) == (7, 20, len(raw), True)


@pytest.mark.parametrize("encoding", ["gzip", "GZip", "x-gzip", "deflate", "identity, gzip"])
@pytest.mark.parametrize("chunk", [1, 5, 1000, 1 << 20])
def test_compressed_unary_answers(encoding: str, chunk: int) -> None:
    body = json.dumps(gemini_event(12, pad=20_000)).encode()
    wbits = 15 if encoding == "deflate" else 31
    raw = gzip_stream([body], wbits)
    tap = feed_in(UsageTap(encoding), raw, chunk)
    assert (tap.tokens_in, tap.tokens_out, tap.bytes, tap.stream_error) == (7, 12, len(raw), False)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_raw_deflate_as_some_servers_send_it(chunk: int) -> None:
    raw = gzip_stream([json.dumps(gemini_event(4)).encode()], -15)
    tap = feed_in(UsageTap("deflate"), raw, chunk)
    assert (tap.tokens_in, tap.tokens_out) == (7, 4)


def test_concatenated_gzip_members() -> None:
    raw = gzip.compress(b'{"x": 1}') + gzip.compress(json.dumps(gemini_event(3)).encode())
    assert feed_in(UsageTap("gzip"), raw, 5).tokens_out == 3
    assert decoded(raw, "gzip", 1 << 20) == b'{"x": 1}' + json.dumps(gemini_event(3)).encode()


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress", "bogus"])
def test_an_encoding_it_cannot_read_counts_bytes_only(encoding: str) -> None:
    raw = sse([gemini_event(5)])
    tap = feed_in(UsageTap(encoding), raw, 100)
    assert (tap.tokens_in, tap.tokens_out, tap.bytes) == (None, None, len(raw))


@functools.cache
def bomb(mib: int) -> bytes:
    """A valid gzip of `mib` MiB of zeros, about 1 KB per MiB (the zeros never exist at once).

    After a full flush a deflate stream starts afresh, so every MiB compresses to the same bytes.
    """
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    segment = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    return header + segment * mib + b"\x03\x00" + trailer  # \x03\x00: an empty last block


def test_the_bomb_is_what_it_says() -> None:
    raw, inflate, total = bomb(64), zlib.decompressobj(47), 0
    data = raw
    while data:
        total += len(inflate.decompress(data, 64 << 20))
        data = inflate.unconsumed_tail
    assert total == 64 << 20 and inflate.eof and len(raw) < 70_000


@pytest.mark.parametrize("chunk", [64 * 1024, 1 << 30])
def test_a_gzip_bomb_keeps_memory_small_and_does_not_raise(chunk: int) -> None:
    raw = bomb(1024)  # 1 GiB of zeros in about 1 MB
    tracemalloc.start()
    t0 = time.perf_counter()
    tap = feed_in(UsageTap("gzip"), raw, chunk)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tap.bytes == len(raw) and tap.tokens_out is None
    assert peak < 2 * 1024 * 1024, peak  # PIECE-sized pieces, never the inflated whole
    assert tap._decoded <= max(RATIO_FLOOR, MAX_RATIO * len(raw)) + PIECE  # gave up early
    assert seconds < 2, seconds
    print(f"bomb of {len(raw)} bytes in {chunk}-byte chunks: peak {peak} B, {seconds:.3f} s")
    assert decoded(raw, "gzip", 10 << 20) is None


def test_garbage_does_not_raise_and_keeps_what_it_read() -> None:
    good = gzip_stream([sse([gemini_event(2)])])
    for raw in (b"\x00" * 100, b"not gzip at all", os.urandom(5000), good[:20] + b"\xff" * 50):
        tap = feed_in(UsageTap("gzip"), raw, 3)
        assert tap.bytes == len(raw)
    for raw in (os.urandom(3000), b"\x78"):
        feed_in(UsageTap("deflate"), raw, 7)
    tap = feed_in(UsageTap("gzip"), good + b"trailing garbage", 4)  # what came before counts
    assert tap.tokens_out == 2
    assert decoded(good + b"trailing garbage", "gzip", 1 << 20) is None


def test_identity_stays_a_slice() -> None:
    tap = UsageTap("")
    assert tap._inflate is None
    tap.feed(b"x" * 100_000)
    assert len(tap._tail) == TAIL and tap._inflate is None


def test_events_are_counted_as_they_pass_plain_or_gzipped() -> None:
    import gzip as _gzip

    sse = b"".join(b'data: {"n": %d}\r\n\r\n' % i for i in range(7))
    plain, packed = UsageTap(), UsageTap("gzip")
    plain.feed(b"")
    plain.feed(sse)
    data = _gzip.compress(sse)
    for i in range(0, len(data), 11):
        packed.feed(data[i : i + 11])
    assert plain.events == 7 and packed.events == 7


def test_absurd_token_counts_are_no_token_counts() -> None:
    tap = UsageTap()
    tap.feed(
        b'{"usageMetadata": {"promptTokenCount": 123456789012345678901, "candidatesTokenCount": 7}}'
    )
    tap.finish()
    assert tap.tokens_in is None and tap.tokens_out == 7  # 21 digits: not stored, not counted
