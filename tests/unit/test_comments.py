"""The flow comment and the access log line: one readable line, searchable tags."""

from __future__ import annotations

import json

import pytest
from mitmproxy import flowfilter
from mitmproxy.test import tflow

from gemini_pool.access_log import RequestLine
from gemini_pool.classify import Outcome, Verdict
from gemini_pool.comments import comment, shorten
from gemini_pool.dispatch import TAGS, Attempt
from gemini_pool.records import RequestRecord

QUOTA_MSG = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)


def quota(key: str) -> Attempt:
    verdict = Verdict(Outcome.QUOTA_MINUTE, "429 per-minute quota gemini-2.5-flash", 9, QUOTA_MSG)
    return Attempt(key, 429, verdict, 0.1)


def ok(key: str) -> Attempt:
    return Attempt(key, 200, Verdict(Outcome.OK, "200"), 0.2)


def record(*attempts: Attempt, key: str | None = None, status: int = 200) -> RequestRecord:
    rec = RequestRecord(model="gemini-2.5-flash", attempts=list(attempts), key=key, status=status)
    rec.ended = True
    return rec


def test_a_retried_success_reads_as_one_line_one_attempt_per_clause() -> None:
    text = comment(record(quota("alpha"), ok("beta"), key="beta"))
    assert "\n" not in text
    assert text == (
        "served by beta: 200 · first alpha: 429 per-minute quota gemini-2.5-flash #quota, "
        "Google said: You exceeded your current quota, please check your plan and billing "
        "details. For more information…"
        " · then beta: 200"
    )


def test_a_plain_success_is_short() -> None:
    assert comment(record(ok("beta"), key="beta")) == "served by beta: 200"


def test_a_failed_answer_never_reads_served_by() -> None:
    verdict = Verdict(Outcome.CALLER_ERROR, "400 INVALID_ARGUMENT", None, "Bad")
    bad = Attempt("beta", 400, verdict, 0.1)
    text = comment(record(bad, key="beta", status=400))
    assert text == (
        "failed: 400 from Google via beta · beta: 400 INVALID_ARGUMENT #caller-error, "
        "Google said: Bad"
    )
    rec = record(quota("a"), quota("b"), status=429)
    rec.answered(429, "pool_exhausted", "every key is cooling\nretry in 9s")
    text = comment(rec)
    assert "served by" not in text and "\n" not in text
    assert text.startswith("proxy answered 429 (pool_exhausted) · every key is cooling retry in 9s")
    assert " · first a: 429 " in text and " · then b: 429 " in text
    cut = record(ok("beta"), key="beta")
    cut.relay_ticket, cut.stream_error = "t", "upstream closed the connection mid-stream"
    cut.tap.feed(b"data: {}\n\ndata: {}\n\n")
    assert comment(cut) == (
        "failed: the stream from beta was cut · streamed 20 B, 2 events, then cut: "
        "upstream closed the connection mid-stream #cut"
    )
    gone = record(status=499)
    gone.stream_error = "Client disconnected."
    assert comment(gone) == "failed: 499 · Client disconnected. #cut"


def test_a_stream_in_flight_says_what_it_carried_so_far() -> None:
    rec = record(ok("beta"), key="beta")
    rec.ended, rec.relay_ticket = False, "t"
    rec.tap.feed(b"data: 1\n\n" * 3)
    assert comment(rec) == "served by beta: 200 · streaming: 27 B, 3 events so far"


def test_google_s_message_is_shortened_at_a_word() -> None:
    assert shorten("short enough", 20) == "short enough"
    assert shorten("one two three four five", 14) == "one two three…"
    assert shorten("one two, three", 10) == "one two…"  # no dangling comma
    assert shorten("a" * 30, 10) == "a" * 9 + "…"  # one long word: cut inside it
    assert shorten("line\nbreaks  and   spaces", 40) == "line breaks and spaces"


@pytest.mark.parametrize("tag", sorted(set(TAGS.values()) | {"#cut"}))
def test_every_tag_matches_literally_in_mitmproxy_s_filter(tag: str) -> None:
    """`~comment #quota` (unquoted, as typed in mitmweb's filter box) finds exactly the tag."""
    tagged, other = tflow.tflow(), tflow.tflow()
    tagged.comment = f"served by b: 200 · first a: 429 x {tag}, Google said: [quota] (sic)"
    other.comment = "served by b: 200 · quota for a, dead key, network, google error"
    f = flowfilter.parse(f"~comment {tag}")
    assert f(tagged) and not f(other)


def test_the_log_line_is_one_line_and_the_json_keeps_its_fields() -> None:
    rec = record(quota("alpha"), ok("beta"), key="beta")
    text = str(RequestLine(rec, as_json=False))
    assert "\n" not in text and text.startswith("gemini request_id=")
    assert text.endswith(" | " + comment(rec))
    doc = json.loads(str(RequestLine(rec, as_json=True)))
    assert doc["detail"] == "served by beta: 200 · first alpha: 429 per-minute quota " + (
        "gemini-2.5-flash #quota · then beta: 200"
    )
    assert doc["upstream_errors"] == [f"alpha: Google said 429: {QUOTA_MSG}"]
    assert {"request_id", "key", "status", "attempts", "latency_ms", "outcome"} <= set(doc)
