"""Token counts and in-band errors from the bytes of an answer, however they are chunked."""

from __future__ import annotations

import json

import pytest

from gemini_pool.usage import UsageTap


def sse(events: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)


def gemini_event(i: int, pad: int = 0) -> dict:
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
