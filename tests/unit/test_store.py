"""SQLite store: schema versions, batched writes that never wait for a lock, retention, never a secret."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gemini_pool import resources
from gemini_pool.pins import KIND_RESOURCE, KIND_UPLOAD, Pin, ResourcePins, upload_digest
from gemini_pool.store import (
    MIGRATIONS,
    RETIRED_TTL,
    SCHEMA_VERSION,
    ClientDelta,
    OutcomeRow,
    Store,
    StoreError,
    UsageDelta,
    read_state_document,
    state_document,
)


def remember(pins: ResourcePins, body: bytes, project: str, now: float | None = None) -> None:
    """What the pipeline pins from an answer: its own names and the names it lists."""
    names = dict(resources.created(body))
    for kind in resources.LISTS:
        names.update(resources.listed(body, kind))
    pins.remember(names, project, now)


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


def test_queueing_never_touches_the_disk_and_a_locked_database_never_blocks(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "locked.db")
    s = Store(path)
    files = [Path(path), Path(path + "-wal")]
    before = [(f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in files]
    statements: list[str] = []
    s._conn.set_trace_callback(statements.append)  # every statement the writing connection runs
    for i in range(2000):
        s.record(row(time.time(), f"r{i}"), [UsageDelta("2026-11-29", "a", "p", "m", 1, 0, 1, 1)])
        s.save_state({"a": {"fingerprint": "f"}}, [])
    # queueing ran no SQL and changed no file; the 2000 key-state snapshots merged into one
    assert statements == []
    assert [
        (f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in files
    ] == before
    assert s.queue_depth == 2001 and s.recent(10, None, None) == []
    # another process holds the write lock (scripts/state import, a long prune, sqlite3 CLI)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert s.write_pending() is False  # the event loop's tick: no waiting for the lock ...
    # ... one attempt at the lock, with SQLite's busy handler off (busy_timeout 0: no sleep, no
    # retry), and no row written before it
    assert statements[0] == "BEGIN IMMEDIATE" and statements.count("BEGIN IMMEDIATE") == 1
    assert not any("busy_timeout" in q or "INSERT" in q.upper() for q in statements)
    s._conn.set_trace_callback(None)
    assert s._conn.execute("PRAGMA busy_timeout").fetchone() == (0,)
    assert s.queue_depth == 2001 and s.busy_retries == 1  # ... and nothing lost
    other.execute("ROLLBACK")
    other.close()
    assert s.write_pending() is True and s.queue_depth == 0
    assert len(s.recent(3000, None, None)) == 2000
    assert s.usage("2026-11-29")["a"]["requests"] == 2000
    assert s.write_errors == 0
    s.close()


def test_a_database_locked_for_long_drops_only_the_oldest_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gemini_pool.store.MAX_PENDING", 10)
    path = str(tmp_path / "long.db")
    s = Store(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    s.save_state({"a": {"fingerprint": "f", "weight": 3}}, [])
    for i in range(15):
        s.record(row(time.time(), f"r{i}"), [])
        s.write_pending()
    assert s.queue_depth == 11 and s.write_errors == 5  # 15 rows, 10 kept, and the snapshot
    other.execute("ROLLBACK")
    other.close()
    assert s.write_pending()
    oldest_kept = s.recent(20, None, None)[-1]["request_id"]
    assert oldest_kept == "r5"  # r0..r4 dropped, r5..r14 kept
    assert s.load_state()[0]["a"]["weight"] == 3  # the state snapshot was kept
    s.close()


def test_one_bad_row_is_lost_alone_never_its_whole_batch(tmp_path: Path) -> None:
    path = str(tmp_path / "bad.db")
    s = Store(path)
    s.record(row(time.time(), "before"), [UsageDelta("2026-01-01", "a", "p", "m", requests=1)])
    bad = row(time.time(), "bad")
    bad.tokens_in = 10**20  # more than SQLite's INTEGER holds: OverflowError, not sqlite3.Error
    s.record(bad, [])
    odd = row(time.time(), "odd")
    odd.model = "gemini-\udc80"  # a lone surrogate (a header decoded with surrogateescape)
    s.record(odd, [])
    s.record(row(time.time(), "after"), [])
    s.save_pin(Pin(KIND_RESOURCE, "files/x", "p1", "/v1beta/files/x", time.time() + 60))
    s.save_state({"a": {"fingerprint": "fa", "weight": 2}}, [])
    assert s.write_pending() is True  # the bad rows are not retried: they would fail forever
    assert s.write_errors == 2 and s.queue_depth == 0
    ids = sorted(r["request_id"] for r in s.recent(10, None, None))
    assert ids == ["after", "before"]  # the rest of the batch was written
    assert s.usage("2026-01-01")["a"]["requests"] == 1
    assert [p.name for p in s.load_pins(time.time())] == ["files/x"]
    assert s.load_state()[0]["a"]["weight"] == 2
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # the failed writes left no lock behind
    other.execute("ROLLBACK")
    other.close()
    s.record(row(time.time(), "good"), [])
    assert s.write_pending() and s.recent(1, None, None)[0]["request_id"] == "good"
    s.close()


def test_a_backlog_drains_in_bounded_batches_and_snapshots_stay_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gemini_pool.store.MAX_BATCH", 100)
    s = Store(str(tmp_path / "b.db"))
    for i in range(250):
        s.record(row(time.time(), f"r{i}"), [])
        s.save_state({"a": {"fingerprint": "f", "n": i}}, [])
    s.save_state({"b": {"fingerprint": "g"}}, [])  # a left: its state stays, marked retired
    assert s.queue_depth == 251
    assert s.write_pending() and s.queue_depth == 150  # a tick: MAX_BATCH rows and the snapshot
    assert s.flush(5) and s.queue_depth == 0
    assert len(s.recent(1000, None, None)) == 250
    keys, _ = s.load_state()
    assert keys["a"]["n"] == 249 and keys["b"] == {"fingerprint": "g"}
    with sqlite3.connect(tmp_path / "b.db") as db:
        retired = dict(db.execute("SELECT name, retired IS NOT NULL FROM key_state"))
    assert retired == {"a": 1, "b": 0}
    s.close()


def test_the_maintenance_thread_checkpoints_and_prunes(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    s = Store(str(path), retention_rows=100, maintenance_interval=0.05)
    for i in range(300):
        s.record(row(time.time(), f"r{i}"), [])
    assert s.write_pending()
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0
    before = path.stat().st_size  # the loop's commits only append to the WAL ...
    time.sleep(0.2)
    assert path.stat().st_size == before
    s.start()  # ... the maintenance thread copies it into the database
    deadline = time.monotonic() + 10
    while path.stat().st_size == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.stat().st_size > before
    s.prune()
    assert len(s.recent(1000, None, None)) == 100
    s.close()
    assert not wal.exists() or wal.stat().st_size == 0  # close truncates the WAL


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


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_v1_database_upgrades_in_place_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        for stmt in MIGRATIONS[1]:
            db.execute(stmt)
        db.execute(
            "INSERT INTO key_state VALUES ('a', 'f1', ?, 1.0)", ('{"disabled_reason": "dead"}',)
        )
        db.execute("INSERT INTO cooldowns VALUES ('p', 'm', 9e9, 'minute quota')")
        db.execute(
            "INSERT INTO outcomes (t, request_id, stream, status, outcome, attempts)"
            " VALUES (5.0, 'r1', 0, 200, 'ok', '[]')"
        )
        db.execute("INSERT INTO usage_daily VALUES ('2026-11-29', 'a', 'p', 'm', 3, 1, 10, 20)")
        db.execute("PRAGMA user_version=1")
    db.close()
    s = Store(str(path))
    keys, cooldowns = s.load_state()
    assert keys == {"a": {"disabled_reason": "dead", "fingerprint": "f1"}}
    assert cooldowns == [{"project": "p", "model": "m", "until": 9e9, "reason": "minute quota"}]
    assert [r["request_id"] for r in s.recent(10, None, None)] == ["r1"]
    assert s.usage("2026-11-29")["a"]["requests"] == 3
    assert s.load_pins(0.0) == []
    assert s.load_answers(0.0) == []  # version 3: the answer cache's table
    assert s.load_client_usage("2026-11-29") == {}  # version 4: accounting per client
    s.save_pin(Pin(KIND_RESOURCE, "files/f", "p", "", 100.0))
    s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert db.execute("SELECT sealed FROM pins").fetchall() == [("",)]  # version 6
        assert db.execute("SELECT name, retired FROM key_state").fetchall() == [("a", None)]
        assert db.execute("SELECT COUNT(*) FROM client_usage").fetchone()[0] == 0
        assert db.execute("SELECT * FROM learned_limits").fetchall() == []
    db.close()


def test_usage_per_client_model_and_day_adds_up_in_one_row_each(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "c.db"))
    day = "2026-12-07"
    s.record(row(time.time(), "r1"), [], ClientDelta(day, "alice", "m1", 1, 0, 10, 5))
    s.record(row(time.time(), "r2"), [], ClientDelta(day, "alice", "m1", 1, 1, 0, 0))
    s.record(row(time.time(), "r3"), [], ClientDelta(day, "alice", "m2", 1, 0, 3, 4))
    s.record(row(time.time(), "r4"), [], ClientDelta("2026-12-06", "bob", "m1", 1, 0, 1, 1))
    s.record(row(time.time(), "r5"), [])
    assert s.write_pending()
    s.record(row(time.time(), "r6"), [], ClientDelta(day, "alice", "m1", 1, 0, 1, 1))
    s.close()
    s = Store(str(tmp_path / "c.db"))  # after a restart
    usage = s.load_client_usage(day)
    assert set(usage) == {"alice"}
    a = usage["alice"]
    assert (a["requests"], a["limited"], a["tokens_in"], a["tokens_out"]) == (4, 1, 14, 10)
    assert a["models"]["m1"] == {"requests": 3, "limited": 1, "tokens_in": 11, "tokens_out": 6}
    assert s.client_usage("2026-12-06")["bob"]["requests"] == 1
    s.close()


def test_a_v2_database_gains_learned_limits_which_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as db:
        for stmt in MIGRATIONS[1] + MIGRATIONS[2]:
            db.execute(stmt)
        db.execute("INSERT INTO cooldowns VALUES ('p', 'm', 9e9, 'minute quota')")
        db.execute("PRAGMA user_version=2")
    db.close()
    s = Store(str(path))
    assert s.load_state()[1][0]["project"] == "p"  # kept through the upgrade
    assert s.load_learned() == []
    s.save_learned("proj-a", "gemini-2.5-flash", "rpd", 20, 100.0)
    s.save_learned("proj-a", "gemini-2.5-flash", "rpd", 25, 200.0)
    s.save_learned("proj-a", "gemini-2.5-flash", "rpd", 30, 150.0)  # older: loses
    s.close()
    s = Store(str(path))
    assert s.load_learned() == [
        {"project": "proj-a", "model": "gemini-2.5-flash", "kind": "rpd", "value": 25, "at": 200.0}
    ]
    s.close()


def test_pins_survive_a_restart_and_expire(tmp_path: Path) -> None:
    path = str(tmp_path / "p.db")
    clock = Clock(1000.0)
    s = Store(path, clock=clock)
    s.start()
    pins = ResourcePins(on_pin=s.save_pin)
    pins.remember_upload("up-1", "alpha", "/upload/v1beta/files", 1000.0, "sealed-1")
    remember(
        pins,
        b'{"files": [{"name": "files/f1"}], "cachedContents": [{"name": "cachedContents/c1"}]}',
        "proj",
        1000.0,
    )
    pins.remember_upload("up-2", "beta", "/upload/v1beta/files", 1000.0)
    pins.forget_upload("up-2", 1001.0)  # ended: saved with an expiry in the past
    s.save_pin(Pin(KIND_RESOURCE, "files/short", "proj", "", 1500.0))
    assert s.flush(5)
    s.close()

    s = Store(path, clock=clock)
    rows = s.load_pins(1100.0)
    up1 = upload_digest("up-1")
    assert {(p.kind, p.name) for p in rows} == {
        (KIND_UPLOAD, up1),
        (KIND_RESOURCE, "files/short"),
        (KIND_RESOURCE, "files/f1"),
        (KIND_RESOURCE, "cachedContents/c1"),
    }
    assert [p.expires for p in rows] == sorted(p.expires for p in rows)  # soonest first
    assert not any("up-1" in repr(p) for p in rows)  # the upload_id itself is never stored
    fresh = ResourcePins()
    assert fresh.restore(rows, 1100.0) == 4
    session = fresh.upload_session("up-1", "PUT", "/upload/v1beta/files", 1100.0)
    assert session is not None and (session.key, session.sealed) == ("alpha", "sealed-1")
    assert fresh.upload_session("up-2", "PUT", "/upload/v1beta/files", 1100.0) is None
    assert fresh.project_for("/v1beta/files/f1", b"", 1100.0) == "proj"
    clock.t = 2000.0
    s.prune()
    assert {p.name for p in s.load_pins(0.0)} == {up1, "files/f1", "cachedContents/c1"}
    s.close()


def test_keys_that_leave_keep_their_state_for_a_while(tmp_path: Path) -> None:
    clock = Clock(1_000_000.0)
    s = Store(str(tmp_path / "k.db"), clock=clock)
    a = {"fingerprint": "fa", "disabled_reason": "operator", "weight": 3}
    b = {"fingerprint": "fb"}
    s.save_state({"a": a, "b": b}, [])
    s.flush()
    clock.t += 60
    s.save_state({"b": b}, [])  # the key file briefly lost "a"
    s.flush()
    keys, _ = s.load_state()
    assert keys == {"a": a, "b": b}  # a's operator state is still there
    clock.t += RETIRED_TTL - 1
    s.prune()
    assert set(s.load_state()[0]) == {"a", "b"}  # b is configured: kept however old
    clock.t += 2
    s.prune()
    assert s.load_state()[0] == {"b": b}
    # a key that comes back is configured again and not pruned
    s.save_state({"b": b, "a": a}, [])
    s.flush()
    clock.t += 10 * RETIRED_TTL
    s.prune()
    assert set(s.load_state()[0]) == {"a", "b"}
    s.close()


def test_a_state_change_just_before_a_key_leaves_is_kept(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "k.db"))
    s.save_state({"a": {"fingerprint": "fa"}, "b": {"fingerprint": "fb"}}, [])
    s.flush()
    # the operator disables a, then the key file loses it, in one writer batch
    s.save_state({"a": {"fingerprint": "fa", "enabled": False}, "b": {"fingerprint": "fb"}}, [])
    s.save_state({"b": {"fingerprint": "fb"}}, [])
    s.flush()
    assert s.load_state()[0]["a"] == {"fingerprint": "fa", "enabled": False}
    s.close()
