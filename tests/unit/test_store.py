"""SQLite store: schema versions, batching writer, retention, never a secret."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gemini_pool.store import (
    SCHEMA_VERSION,
    OutcomeRow,
    Store,
    StoreError,
    UsageDelta,
    read_state_document,
    state_document,
)


def row(t: float, rid: str = "r", key: str = "a", status: int = 200) -> OutcomeRow:
    return OutcomeRow(
        t,
        rid,
        "c",
        key,
        "m",
        "native",
        False,
        status,
        "ok",
        [{"key": key}],
        1.0,
        1.0,
        10,
        5,
        4,
        None,
    )


def test_fresh_and_old_databases_upgrade_newer_are_refused(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    sqlite3.connect(old).close()  # version 0: an empty file from before the schema
    s = Store(str(old))
    s.close()
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this gemini-proxy understands"):
        Store(str(newer))
    with pytest.raises(StoreError, match="cannot open"):
        (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
        Store(str(tmp_path / "junk.db"))


def test_writer_batches_and_flushes_rows_usage_and_state(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "s.db"))
    s.start()
    for i in range(50):
        s.record(row(time.time(), f"r{i}"), [UsageDelta("2026-11-29", "a", "p", "m", 1, 0, 5, 4)])
    s.save_state(
        {"a": {"fingerprint": "f1", "x": 1}},
        [{"project": "p", "model": "m", "until": 9e9, "reason": "r"}],
    )
    s.save_state({"a": {"fingerprint": "f1", "x": 2}}, [])
    assert s.flush(5)
    assert len(s.recent(100, None, None)) == 50
    assert s.usage("2026-11-29") == {
        "a": {"requests": 50, "errors": 0, "tokens_in": 250, "tokens_out": 200}
    }
    keys, cooldowns = s.load_state()
    assert keys == {"a": {"fingerprint": "f1", "x": 2}} and cooldowns == []  # newest snapshot wins
    s.close()


def test_retention_by_age_and_by_count(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "r.db"), retention_days=1, retention_rows=3)
    now = time.time()
    for i in range(3):
        s.record(row(now - 3 * 86400, f"old{i}"), [])
    for i in range(5):
        s.record(row(now, f"new{i}"), [])
    s.flush()
    s.prune()
    assert [r["request_id"] for r in s.recent(10, None, None)] == ["new4", "new3", "new2"]
    assert s.recent(10, "a", 500) == []
    s.close()


def test_a_slow_disk_never_blocks_the_request_path(tmp_path: Path) -> None:
    class SlowDisk(Store):
        def _write(self, items):  # type: ignore[no-untyped-def]
            time.sleep(0.5)  # every commit takes half a second
            super()._write(items)

    s = SlowDisk(str(tmp_path / "slow.db"), flush_interval=0.01)
    s.start()
    t0 = time.perf_counter()
    for i in range(2000):
        s.record(row(time.time(), f"r{i}"), [UsageDelta("2026-11-29", "a", "p", "m", 1, 0, 1, 1)])
        s.save_state({"a": {"fingerprint": "f"}}, [])
    per_call_us = (time.perf_counter() - t0) / 4000 * 1e6
    assert per_call_us < 200, f"{per_call_us:.0f} µs per call: the caller waited for the disk"
    assert s.queue_depth > 0  # the writer is still busy: nothing was written on the caller's time
    assert s.flush(10)
    assert len(s.recent(3000, None, None)) == 2000
    s.close()


def test_state_document_round_trip_and_bad_documents() -> None:
    keys = {"a": {"fingerprint": "f1", "disabled_reason": "dead"}}
    cooldowns = [{"project": "p", "model": "m", "until": 5.0, "reason": "minute quota"}]
    assert read_state_document(state_document(keys, cooldowns)) == (keys, cooldowns)
    assert read_state_document({"version": 1, "keys": {}}) == ({}, [])
    for doc in ([], {"version": 2, "keys": {}}, {"version": 1, "keys": []}):
        with pytest.raises(ValueError, match="not a gemini-proxy state export"):
            read_state_document(doc)
    for bad in ({"project": "p"}, "p", {"cooldowns": 1}):
        with pytest.raises(ValueError, match="'cooldowns' must be a list"):
            read_state_document({"version": 1, "keys": {}, "cooldowns": [bad]})
