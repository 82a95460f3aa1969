"""Project-bound resources: upload URLs point back at the proxy; files stay with their project."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from gemini_pool import resources
from gemini_pool.pins import (
    HOUR,
    KIND_RESOURCE,
    KIND_UPLOAD,
    MAX_ANSWER_SCAN,
    Pin,
    ResourcePins,
    body_resource_names,
    parse_rfc3339,
    upload_digest,
)

GOOGLE = "generativelanguage.googleapis.com"
GEN = "/v1beta/models/m:generateContent"
NOW = 1_800_000_000.0


def remember(pins: ResourcePins, body: bytes, project: str, now: float | None = None) -> None:
    """What the pipeline pins from an answer: its own names and the names it lists."""
    names = dict(resources.created(body))
    for kind in resources.LISTS:
        names.update(resources.listed(body, kind))
    pins.remember(names, project, now)


def test_resources_are_pinned_to_the_project_that_made_them() -> None:
    pins = ResourcePins()
    remember(pins, b'{"file": {"name": "files/abc123", "uri": "..."}}', "proj-a", NOW)
    assert pins.project_for("/v1beta/files/abc123", b"", NOW) == "proj-a"
    body = (
        b'{"contents": [{"parts": [{"fileData": {"fileUri": "https://x/v1beta/files/abc123"}}]}]}'
    )
    assert pins.project_for(GEN, body, NOW) == "proj-a"
    assert pins.project_for("/v1beta/files/other", b"", NOW) is None
    remember(pins, b'{"name": "batches/b-1", "metadata": {}}', "proj-b", NOW)
    assert pins.project_for("/v1beta/batches/b-1:cancel", b"", NOW) == "proj-b"
    # the old call forms still work (they read the clock)
    remember(pins, b'{"name": "operations/op1"}', "proj-c")
    assert pins.project_for("/v1beta/operations/op1", b"") == "proj-c"


def test_request_bodies_are_read_only_where_gemini_names_resources() -> None:
    pins = ResourcePins()
    remember(
        pins,
        b'{"files": [{"name": "files/abc123"}], "cachedContents": [{"name": "cachedContents/c-9"}]}',
        "proj-a",
        NOW,
    )
    full = (
        b'{"contents": [{"parts": [{"fileData": {"fileUri": "https://x/v1beta/files/abc123"}}]}]}'
    )
    assert pins.project_for(GEN, full, NOW) == "proj-a"
    assert pins.project_for(GEN, b'{"file_data": {"file_uri": "files/abc123"}}', NOW) == "proj-a"
    assert pins.project_for(GEN, b'{"cachedContent": "cachedContents/c-9"}', NOW) == "proj-a"
    assert pins.project_for(GEN, b'{"cached_content" :\n "cachedContents/c-9"}', NOW) == "proj-a"
    escaped = b'{"fileUri": "https:\\/\\/x\\/v1beta\\/files\\/abc123"}'
    assert pins.project_for(GEN, escaped, NOW) == "proj-a"
    # named in plain text, under another key, or as a lookalike: not a reference
    for body in (
        b'{"contents": [{"parts": [{"text": "see files/abc123 and cachedContents/c-9"}]}]}',
        b'{"c": "cachedContents/c-9"}',
        b'{"t": "myfiles/abc123"}',
        b'{"fileUri": "https://x/v1beta/myfiles/abc123"}',
        b'{"fileUri": "https://x/v1beta/files/abc123/extra"}',
        b'{"text": "\\"fileUri\\": \\"files/abc123\\""}',  # a key inside a string value
        b'{"fileUri": 42}',
    ):
        assert pins.project_for(GEN, body, NOW) is None, body
    assert list(
        body_resource_names(b'{"fileUri": "files/a", "cachedContent": "cachedContents/b"}')
    ) == [
        "files/a",
        "cachedContents/b",
    ]


def test_a_large_body_is_scanned_fast_and_a_late_reference_is_found() -> None:
    pins = ResourcePins()
    remember(pins, b'{"name": "files/abc123"}', "proj-a", NOW)
    inline = b"files/abc123 x " * 700_000  # 10.5 MB of inline text naming the file in prose
    head = b'{"contents": [{"parts": [{"text": "' + inline + b'"}'
    t0 = time.perf_counter()
    assert pins.project_for(GEN, head + b"]}]}", NOW) is None
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"{elapsed * 1000:.0f} ms to scan a 10 MB body with no reference"
    late = head + b', {"fileData": {"fileUri": "https://x/v1beta/files/abc123"}}]}]}'
    t0 = time.perf_counter()
    assert pins.project_for(GEN, late, NOW) == "proj-a"
    assert time.perf_counter() - t0 < 0.5


def test_hostile_request_bodies_cost_bounded_work() -> None:
    pins = ResourcePins()
    remember(pins, b'{"name": "files/zz"}', "proj-a", NOW)
    bodies = [
        b'"fileUri": "' + b"a" * 10_000_000,  # unterminated, huge value
        b'"fileUri": "' + b"\\" * 5_000_000,  # all escapes
        b'"fileUri"' * 1_000_000,  # a million keys (only MAX_MATCHES examined)
        b'"fileUri": "files/x", ' * 500_000 + b'"fileUri": "files/zz"',  # past the cap: ignored
        b'"cachedContent":' + b" " * 5_000_000 + b'"cachedContents/zz"',
    ]
    for body in bodies:
        t0 = time.perf_counter()
        pins.project_for(GEN, body, NOW)
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, f"{elapsed * 1000:.0f} ms on {body[:30]!r}..."


_FRAGMENTS = [
    b'"fileUri"',
    b'"file_uri"',
    b'"cachedContent"',
    b'"cached_content"',
    b":",
    b" ",
    b'"',
    b"\\",
    b"\\u00",
    b"\\ud800",
    b"files/",
    b"cachedContents/",
    b"zz",
    b"https://x/v1beta/",
    b"\xff\xfe",
    b"\x00",
    b"{",
    b"}",
    b"myfiles/",
    b"/",
]


def _fuzz_body(rng: random.Random) -> bytes:
    return b"".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(0, 40)))


def _check_never_raises(pins: ResourcePins, body: bytes) -> None:
    pins.project_for(GEN, body, NOW)
    list(body_resource_names(body))
    remember(pins, body, "proj-x", NOW)
    pins.project_for(body.decode("utf-8", "surrogateescape"), body, NOW)


def test_hostile_bodies_never_raise_seeded_fuzz() -> None:
    rng = random.Random(20261129)
    pins = ResourcePins()
    remember(
        pins,
        b'{"files": [{"name": "files/zz"}], "cachedContents": [{"name": "cachedContents/zz"}]}',
        "p",
        NOW,
    )
    for _ in range(3000):
        _check_never_raises(pins, _fuzz_body(rng))
    for _ in range(300):
        _check_never_raises(pins, rng.randbytes(rng.randrange(0, 200)))


def test_hostile_bodies_never_raise_hypothesis() -> None:
    hypothesis = pytest.importorskip("hypothesis")  # not a dependency yet: skipped without it
    st = pytest.importorskip("hypothesis.strategies")
    pins = ResourcePins()
    remember(pins, b'{"name": "files/zz"}', "p", NOW)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(
        st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(_FRAGMENTS)).map(b"".join))
    )
    def prop(body: bytes) -> None:
        _check_never_raises(pins, body)

    prop()


def test_resources_expire() -> None:
    pins = ResourcePins()
    remember(pins, b'{"name": "files/f1"}', "proj-a", NOW)
    assert pins.project_for("/v1beta/files/f1", b"", NOW + 47 * HOUR) == "proj-a"
    # seeing it again does not extend its life (Google keeps a file 48 h from its creation)
    remember(pins, b'{"name": "files/f1"}', "proj-a", NOW + 47 * HOUR)
    assert pins.project_for("/v1beta/files/f1", b"", NOW + 49 * HOUR) is None
    # a file's own expirationTime and a cached content's expireTime win
    remember(
        pins,
        b'{"file": {"name": "files/f2", "expirationTime": "2027-01-17T08:00:00Z"},'
        b' "cachedContents": [{"name": "cachedContents/c1", "model": "m",'
        b' "expireTime": "2027-01-15T08:00:00.123456789Z"}, {"name": "cachedContents/c2"}]}',
        "proj-b",
        NOW,
    )
    exp = pins.resources
    assert exp["files/f2"] == ("proj-b", parse_rfc3339("2027-01-17T08:00:00Z"))
    assert exp["cachedContents/c1"][1] == pytest.approx(1_800_000_000.123, abs=1e-3)
    assert exp["cachedContents/c2"][1] == NOW + 48 * HOUR  # no expireTime: 48 h
    assert pins.project_for(GEN, b'{"cachedContent": "cachedContents/c1"}', NOW + 0.1) == "proj-b"
    assert pins.project_for(GEN, b'{"cachedContent": "cachedContents/c1"}', NOW + 1) is None
    # a PATCH answer extending the TTL moves the expiry
    remember(
        pins,
        b'{"name": "cachedContents/c1", "expireTime": "2027-01-16T08:00:00+01:00"}',
        "proj-b",
        NOW,
    )
    assert pins.resources["cachedContents/c1"][1] == NOW + 23 * HOUR
    # answers too large to scan are skipped
    remember(pins, b'{"name": "files/big"}' + b" " * MAX_ANSWER_SCAN, "proj-a", NOW)
    assert "files/big" not in pins.resources


def test_rfc3339() -> None:
    assert parse_rfc3339("2027-01-15T08:00:00Z") == 1_800_000_000.0
    assert parse_rfc3339("2027-01-15T08:00:00.5z") == 1_800_000_000.5
    assert parse_rfc3339("2027-01-15T09:30:00+01:30") == 1_800_000_000.0
    for bad in ("", "2027-01-15", "2027-13-15T08:00:00Z", "2027-01-15T08:00:00", "x" * 100):
        assert parse_rfc3339(bad) is None, bad


def test_upload_sessions_are_bound_to_their_path_method_and_lifetime() -> None:
    pins = ResourcePins()
    pins.remember_upload("up-1", "alpha", "/upload/v1beta/files", NOW)
    pin = pins.upload_session("up-1", "POST", "/upload/v1beta/files", NOW + 1)
    assert pin is not None and pin.key == "alpha" and pin.path == "/upload/v1beta/files"
    assert pins.upload_session("up-1", "put", "/upload/v1beta/files", NOW + 1) is not None
    assert pins.upload_session("up-1", "GET", "/upload/v1beta/files", NOW + 1) is None
    assert pins.upload_session("up-1", "DELETE", "/upload/v1beta/files", NOW + 1) is None
    assert pins.upload_session("up-1", "POST", "/v1beta/files", NOW + 1) is None
    assert pins.upload_session("up-1", "POST", "/v1beta/models/m:generateContent", NOW) is None
    assert pins.upload_session("up-2", "POST", "/upload/v1beta/files", NOW) is None
    assert pins.upload_session("", "POST", "/upload/v1beta/files", NOW) is None
    assert pins.upload_session("up-1", "POST", "/upload/v1beta/files", NOW + 24 * HOUR) is None
    assert "up-1" not in pins.uploads  # kept under a digest, never the upload_id itself
    # a session remembered without its path (the old call) opens nothing
    pins.remember_upload("up-3", "beta")
    assert pins.upload_session("up-3", "POST", "/upload/v1beta/files", time.time()) is None
    # an ended session is refused at once
    pins.remember_upload("up-5", "alpha", "/upload/v1beta/files", NOW)
    pins.forget_upload("up-5", NOW + 5)
    assert pins.upload_session("up-5", "POST", "/upload/v1beta/files", NOW + 6) is None


def test_pins_are_reported_and_restored() -> None:
    saved: list[Pin] = []
    pins = ResourcePins(on_pin=saved.append)
    pins.remember_upload("up-1", "alpha", "/upload/v1beta/files", NOW)
    remember(pins, b'{"name": "files/f1", "uri": "https://x/v1beta/files/f1"}', "p", NOW)
    remember(pins, b'{"name": "files/f1"}', "p", NOW + 10)  # nothing new: not reported
    pins.forget_upload("up-1", NOW + 20)
    assert saved == [
        Pin(KIND_UPLOAD, upload_digest("up-1"), "alpha", "/upload/v1beta/files", NOW + 24 * HOUR),
        Pin(KIND_RESOURCE, "files/f1", "p", "", NOW + 48 * HOUR),
        Pin(KIND_UPLOAD, upload_digest("up-1"), "alpha", "/upload/v1beta/files", NOW + 20),
    ]
    assert all("up-1" not in repr(p) for p in saved)  # no upload_id reaches the store
    rows = [
        Pin(KIND_UPLOAD, upload_digest("up-9"), "beta", "/upload/v1beta/files", NOW + 100),
        Pin(KIND_RESOURCE, "cachedContents/c", "q", "", NOW + 100),
        Pin(KIND_RESOURCE, "files/old", "q", "", NOW - 1),  # expired: skipped
        Pin("unknown", "x", "q", "", NOW + 100),
    ]
    fresh = ResourcePins(on_pin=saved.append)
    n_saved = len(saved)
    assert fresh.restore(rows, NOW) == 2
    assert len(saved) == n_saved  # restoring reports nothing back
    session = fresh.upload_session("up-9", "PUT", "/upload/v1beta/files", NOW + 1)
    assert session is not None and session.key == "beta"
    assert fresh.project_for(GEN, b'{"cachedContent": "cachedContents/c"}', NOW) == "q"
    assert fresh.project_for("/v1beta/files/old", b"", NOW) is None
    fresh.prune(NOW + 200)
    assert not fresh.uploads and not fresh.resources


def test_maps_stay_bounded(monkeypatch: Any) -> None:
    import gemini_pool.pins as pins_mod

    monkeypatch.setattr(pins_mod, "MAX_ENTRIES", 3)
    pins = ResourcePins()
    for i in range(5):
        pins.remember_upload(f"u{i}", "k", "/upload/v1beta/files", NOW)
        remember(pins, b'{"name": "files/f%d"}' % i, "p", NOW)
    assert len(pins.uploads) == 3 and list(pins.resources) == ["files/f2", "files/f3", "files/f4"]
