"""SQLite persistence: key state, pins, per-request outcomes, daily usage. Never holds a secret.

Writes are queued (a list append) and committed in one transaction per housekeeping tick on the
event loop's thread, with no fsync on commit (WAL, synchronous=NORMAL) and no waiting for a lock
(busy_timeout 0: a locked database keeps the batch for the next tick). The slow parts, copying the
WAL into the database with its fsync and pruning, run on a maintenance thread with a connection of
its own. A writer thread was measured to cost the event loop about 0.2 ms of CPU per request
(the GIL passing back and forth while it committed), more than the commits themselves. The schema
is versioned with PRAGMA user_version and upgraded forward; a database from a newer version is
refused untouched.

This module stays whole (about 730 lines) on purpose: the schema, its migrations, the batched
writer and the queries share one connection discipline (which thread, which lock, which
transaction), and that discipline is the hard part to get right; split, it would be checked
nowhere as a whole.

Key state is upserted, never replaced: a key missing from a snapshot (a half-written key file)
keeps its row, marked retired, for RETIRED_TTL, so its operator state is there when it returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .answer_cache import Entry
from .pins import Pin
from .statecheck import check_state

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
RETIRED_TTL = 7 * 86400  # rows of keys no longer configured are kept this long
MAINTENANCE_INTERVAL = 2.0  # seconds between WAL checkpoints
PRUNE_INTERVAL = 60.0
PRUNE_CHUNK = 2000  # outcome rows deleted per transaction
MAX_PENDING = 200_000  # queued writes kept while the database is locked by someone else
MAX_BATCH = 5_000  # queued writes committed per call: a backlog drains over ticks, not in one stall
MIGRATIONS: dict[int, list[str]] = {
    # version reached -> statements that bring version-1 to it
    1: [
        """CREATE TABLE key_state (
            name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, state TEXT NOT NULL, updated REAL NOT NULL)""",
        """CREATE TABLE cooldowns (
            project TEXT NOT NULL, model TEXT NOT NULL, until REAL NOT NULL, reason TEXT NOT NULL,
            PRIMARY KEY (project, model))""",
        """CREATE TABLE outcomes (
            id INTEGER PRIMARY KEY, t REAL NOT NULL, request_id TEXT NOT NULL, client TEXT,
            key TEXT, model TEXT, api TEXT, stream INTEGER NOT NULL, status INTEGER NOT NULL,
            outcome TEXT NOT NULL, attempts TEXT NOT NULL, latency_ms REAL, ttfb_ms REAL,
            bytes INTEGER, tokens_in INTEGER, tokens_out INTEGER, proxy_reason TEXT)""",
        "CREATE INDEX outcomes_t ON outcomes (t)",
        "CREATE INDEX outcomes_key_t ON outcomes (key, t)",
        """CREATE TABLE usage_daily (
            day TEXT NOT NULL, key TEXT NOT NULL, project TEXT NOT NULL, model TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
            tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, key, model))""",
    ],
    2: [
        # when the key left the configuration (NULL while it is configured)
        "ALTER TABLE key_state ADD COLUMN retired REAL",
        # project-bound resources and upload sessions (see pins.Pin); owner is a project or a
        # key name, an upload session's name is a digest of its upload token: never a secret
        """CREATE TABLE pins (
            kind TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL, path TEXT NOT NULL,
            expires REAL NOT NULL, PRIMARY KEY (kind, name))""",
        "CREATE INDEX pins_expires ON pins (expires)",
    ],
    3: [
        # the answer cache (answer_cache.py): key is a hash of group, path, model and body
        """CREATE TABLE answer_cache (
            key TEXT PRIMARY KEY, grp TEXT NOT NULL, status INTEGER NOT NULL,
            content_type TEXT NOT NULL, body BLOB NOT NULL, stored REAL NOT NULL,
            expires REAL NOT NULL)""",
        "CREATE INDEX answer_cache_expires ON answer_cache (expires)",
    ],
    4: [
        # accounting per client (a configured client's name, `local` or `unknown`), model label
        # and Pacific day; `limited`: requests refused by the client's limits
        """CREATE TABLE client_usage (
            day TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0, limited INTEGER NOT NULL DEFAULT 0,
            tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, client, model))""",
    ],
    5: [
        # limits Google named in its 429s (budgets.py): kind rpm | tpm | rpd, learned at `at`
        """CREATE TABLE learned_limits (
            project TEXT NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL, value INTEGER NOT NULL,
            at REAL NOT NULL, PRIMARY KEY (project, model, kind))""",
    ],
    6: [
        # an upload session's Google upload_id, sealed under the proxy's token (upload_tokens.py):
        # a ciphertext only the caller's token opens ('' for every other pin)
        "ALTER TABLE pins ADD COLUMN sealed TEXT NOT NULL DEFAULT ''",
    ],
}


class StoreError(Exception):
    pass


STATE_FORMAT = 1  # the JSON key-state document of GET/POST /admin/state and scripts/state


def state_document(
    keys: dict[str, dict[str, Any]], cooldowns: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "version": STATE_FORMAT,
        "exported_at": time.time(),
        "keys": keys,
        "cooldowns": cooldowns,
    }


def read_state_document(doc: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(keys, cooldowns) of a key-state document, every field checked (`statecheck`). Raises
    ValueError saying what is wrong."""
    if (
        not isinstance(doc, dict)
        or doc.get("version") != STATE_FORMAT
        or not isinstance(doc.get("keys"), dict)
    ):
        raise ValueError(
            f"not a gemini-proxy state export (version {STATE_FORMAT} with a 'keys' object)"
        )
    cooldowns = doc.get("cooldowns") or []
    if not isinstance(cooldowns, list) or not all(
        isinstance(c, dict) and {"project", "model", "until", "reason"} <= c.keys()
        for c in cooldowns
    ):
        raise ValueError("'cooldowns' must be a list of {project, model, until, reason}")
    check_state(doc["keys"], cooldowns)  # every field, before anything is applied
    return doc["keys"], cooldowns


@dataclass
class OutcomeRow:
    t: float
    request_id: str
    client: str | None
    key: str | None
    model: str | None
    api: str
    stream: bool
    status: int
    outcome: str
    attempts: list[dict[str, Any]]
    latency_ms: float
    ttfb_ms: float | None
    bytes: int
    tokens_in: int | None
    tokens_out: int | None
    proxy_reason: str | None


@dataclass
class UsageDelta:
    day: str
    key: str
    project: str
    model: str
    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


def _write_answers(conn: sqlite3.Connection, changes: list[Entry | str | None]) -> None:
    """Answer cache changes in queue order (an entry kept, a key dropped, everything dropped)."""
    for change in changes:
        if change is None:
            conn.execute("DELETE FROM answer_cache")
        elif isinstance(change, str):
            conn.execute("DELETE FROM answer_cache WHERE key = ?", (change,))
        else:
            e = change
            conn.execute(
                "INSERT OR REPLACE INTO answer_cache (key, grp, status, content_type, body,"
                " stored, expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.key, e.group, e.status, e.content_type, e.body, e.stored, e.expires),
            )


@dataclass
class ClientDelta:
    day: str
    client: str
    model: str
    requests: int = 0
    limited: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


def _locked(e: Exception) -> bool:
    """Another connection holds the lock (SQLITE_BUSY / SQLITE_LOCKED, extended codes too)."""
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def migrate(conn: sqlite3.Connection, path: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: database schema version {version} is newer than this gemini-proxy "
            f"understands ({SCHEMA_VERSION}); refusing to touch it. Upgrade gemini-proxy or "
            "point gemini_db at another file."
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[target]:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        log.info("gemini-proxy database %s upgraded to schema %d", path, target)


@dataclass
class _Snapshot:
    latest: dict[str, dict[str, Any]]  # every key's newest state, leavers included
    configured: set[str]  # the keys of the newest snapshot
    cooldowns: list[dict[str, Any]]  # the newest


class Store:
    """The proxy's database. Not thread-safe: one thread (the event loop's) queues and writes;
    `start` adds the maintenance thread, which works on a connection of its own."""

    def __init__(
        self,
        path: str,
        *,
        retention_days: int = 30,
        retention_rows: int = 1_000_000,
        clock: Callable[[], float] = time.time,
        maintenance_interval: float = MAINTENANCE_INTERVAL,
    ) -> None:
        self.path = path
        self.clock = clock  # wall time of updates, retirement, pruning (tests inject one)
        self.retention_days = retention_days
        self.retention_rows = retention_rows
        self.maintenance_interval = maintenance_interval
        self.write_errors = 0  # writes lost: rows, pins, snapshots (logged); read by the metrics
        self.busy_retries = 0  # batches kept for later because the database was locked
        self._pending: list[tuple[str, Any]] = []
        self._snapshot: _Snapshot | None = None  # key state not yet written, merged
        self._dropping = False
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._conn = connect(path)
            migrate(self._conn, path)
            # the WAL is copied into the database (and fsynced) by the maintenance thread,
            # never inside a commit made on the event loop
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._conn.execute("PRAGMA busy_timeout=0")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: cannot open database: {e}") from None

    # --- reads at start
    def load_state(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """name -> state (with its fingerprint) of every key row, retired ones included (match
        a returning key by fingerprint), and the cooldowns."""
        keys = {
            name: {**json.loads(state), "fingerprint": fp}
            for name, fp, state in self._conn.execute(
                "SELECT name, fingerprint, state FROM key_state"
            )
        }
        cooldowns = [
            {"project": p, "model": m, "until": u, "reason": r}
            for p, m, u, r in self._conn.execute(
                "SELECT project, model, until, reason FROM cooldowns"
            )
        ]
        return keys, cooldowns

    def load_pins(self, now: float) -> list[Pin]:
        """The pins not yet expired at `now`, the soonest to expire first."""
        return [
            Pin(kind, name, owner, path, expires, sealed)
            for kind, name, owner, path, expires, sealed in self._conn.execute(
                "SELECT kind, name, owner, path, expires, sealed FROM pins WHERE expires > ?"
                " ORDER BY expires",
                (now,),
            )
        ]

    def load_answers(self, now: float) -> list[Entry]:
        """The answer cache's entries not yet expired, the oldest first."""
        return [
            Entry(*row)
            for row in self._conn.execute(
                "SELECT key, grp, status, content_type, body, stored, expires FROM answer_cache"
                " WHERE expires > ? ORDER BY stored",
                (now,),
            )
        ]

    def load_client_usage(self, day: str) -> dict[str, Any]:
        """Accounting per client of `day`, at start (on the writing connection)."""
        return self.client_usage(day, self._conn)

    def load_learned(self) -> list[dict[str, Any]]:
        """The limits learned from Google's 429s (budgets.Budgets.restore_learned)."""
        return [
            {"project": p, "model": m, "kind": k, "value": v, "at": at}
            for p, m, k, v, at in self._conn.execute(
                "SELECT project, model, kind, value, at FROM learned_limits"
            )
        ]

    # --- queueing (costs a list append) and writing
    def start(self) -> None:
        """Start the maintenance thread: checkpoints and pruning, on its own connection."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._maintain, name="gemini-store", daemon=True)
            self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + (self._snapshot is not None)

    def record(
        self, row: OutcomeRow, usage: list[UsageDelta], client: ClientDelta | None = None
    ) -> None:
        self._pending.append(("outcome", (row, usage, client)))

    def save_state(self, keys: dict[str, dict[str, Any]], cooldowns: list[dict[str, Any]]) -> None:
        """Queue a snapshot: `keys` are the configured keys (name -> state with fingerprint).

        Their rows are upserted; rows of keys not in it are kept, marked retired, and pruned
        RETIRED_TTL after they left. The cooldowns replace the stored ones.

        Snapshots not yet written merge into one, in order: a key that an earlier one had and the
        newest lacks keeps its latest state (an operator action just before it left)."""
        if self._snapshot is None:
            self._snapshot = _Snapshot(dict(keys), set(keys), cooldowns)
        else:
            self._snapshot.latest.update(keys)
            self._snapshot.configured, self._snapshot.cooldowns = set(keys), cooldowns

    def save_pin(self, pin: Pin) -> None:
        """Queue one pin (added, changed, or ended with an expiry in the past)."""
        self._pending.append(("pin", pin))

    def save_answer(self, entry: Entry | str | None) -> None:
        """Queue an answer cache change: an entry to keep, a key to drop, None: drop them all."""
        self._pending.append(("answer", entry))

    def save_learned(self, project: str, model: str, kind: str, value: int, at: float) -> None:
        """Queue one learned limit (the newest per project, model and kind is kept)."""
        self._pending.append(("learned", (project, model, kind, value, at)))

    def write_pending(self, wait: float = 0.0) -> bool:
        """Commit everything queued, in one transaction. Waits at most `wait` seconds for a lock
        another connection holds; if it is still held, keeps the batch for the next call and
        returns False. Called every housekeeping tick on the event loop: with no fsync on commit
        (WAL, synchronous=NORMAL) a batch costs a few hundred microseconds of appends to the WAL.
        """
        if not self._pending and self._snapshot is None:
            return True
        items, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        snapshot, self._snapshot = self._snapshot, None
        if wait:
            self._conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
        try:
            written = self._write(items, snapshot)
        finally:
            if wait:
                self._conn.execute("PRAGMA busy_timeout=0")
        if written:
            self._dropping = False
        else:
            self.busy_retries += 1
            self._pending[:0] = items
            self._snapshot = snapshot  # nothing newer can have come: this call is synchronous
            self._bound_pending()
        return written

    def flush(self, timeout: float = 10.0) -> bool:
        """Commit everything queued so far, waiting up to `timeout` for a lock."""
        deadline = time.monotonic() + timeout
        while self._pending or self._snapshot is not None:
            if not self.write_pending(wait=max(0.001, deadline - time.monotonic())):
                return False
        return True

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(30)
            self._thread = None
        if not self.flush(5.0):
            log.error(
                "gemini-proxy database %s stayed locked: %d queued writes lost",
                self.path,
                self.queue_depth,
            )
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _bound_pending(self) -> None:
        """Keep at most MAX_PENDING queued writes while the database stays locked: the oldest
        outcome rows go first (counted and logged); pins are kept (key state is one merged
        snapshot)."""
        excess = len(self._pending) - MAX_PENDING
        if excess <= 0:
            return
        kept: list[tuple[str, Any]] = []
        dropped = 0
        for item in self._pending:
            if dropped < excess and item[0] in ("outcome", "answer"):
                dropped += 1
            else:
                kept.append(item)
        self._pending = kept
        self.write_errors += dropped
        if not self._dropping:  # once per spell, not every tick
            self._dropping = True
            log.error(
                "gemini-proxy database %s locked for long: dropping the oldest queued rows"
                " (%d queued writes kept; gemini_proxy_db_write_errors_total counts the rest)",
                self.path,
                MAX_PENDING,
            )

    def _maintain(self) -> None:
        """Every interval: copy the WAL into the database (the only fsync); every minute, prune.
        Both on a connection of this thread's own, so the event loop never waits for them."""
        try:
            conn = connect(self.path)
        except sqlite3.Error as e:
            log.error("gemini-proxy database maintenance cannot open %s: %s", self.path, e)
            return
        last_prune = time.monotonic()
        try:
            while not self._stop.wait(self.maintenance_interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as e:
                    log.warning("gemini-proxy database checkpoint failed: %s", e)
                if time.monotonic() - last_prune > PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    self._prune(conn)
        finally:
            conn.close()

    def _write(self, items: list[tuple[str, Any]], snapshot: _Snapshot | None) -> bool:
        """One transaction. False: the database was locked, nothing written (retry later).

        A batch that fails for another reason (one row SQLite will not take) is written again
        one item at a time: only the rows that fail themselves are lost."""
        written = self._write_batch(items, snapshot, alone=len(items) + (snapshot is not None) < 2)
        if written is not None:
            return written
        for item in items:
            if self._write_batch([item], None, alone=True) is False:
                self._pending.append(item)  # locked meanwhile: the next tick writes it
        if snapshot is not None and self._write_batch([], snapshot, alone=True) is False:
            self._snapshot = snapshot
        return True

    def _write_batch(
        self, items: list[tuple[str, Any]], snapshot: _Snapshot | None, alone: bool
    ) -> bool | None:
        """One transaction: True written (or lost, when `alone`), False locked, None failed."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")  # the lock before any per-row work
            outcomes = [arg for kind, arg in items if kind == "outcome"]
            pins: dict[tuple[str, str], Pin] = {}
            for kind, arg in items:
                if kind == "pin":
                    pins[(arg.kind, arg.name)] = arg  # the newest of each pin wins
            usage: dict[tuple[str, str, str], list[Any]] = {}
            per_client: dict[tuple[str, str, str], list[int]] = {}
            for _row, deltas, cd in outcomes:
                if cd is not None:
                    acc_c = per_client.setdefault((cd.day, cd.client, cd.model), [0, 0, 0, 0])
                    acc_c[0] += cd.requests
                    acc_c[1] += cd.limited
                    acc_c[2] += cd.tokens_in
                    acc_c[3] += cd.tokens_out
                for u in deltas:
                    acc = usage.setdefault((u.day, u.key, u.model), [u.project, 0, 0, 0, 0])
                    acc[1] += u.requests
                    acc[2] += u.errors
                    acc[3] += u.tokens_in
                    acc[4] += u.tokens_out
            self._conn.executemany(
                "INSERT INTO outcomes (t, request_id, client, key, model, api, stream, status,"
                " outcome, attempts, latency_ms, ttfb_ms, bytes, tokens_in, tokens_out,"
                " proxy_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.t,
                        r.request_id,
                        r.client,
                        r.key,
                        r.model,
                        r.api,
                        int(r.stream),
                        r.status,
                        r.outcome,
                        json.dumps(r.attempts),
                        r.latency_ms,
                        r.ttfb_ms,
                        r.bytes,
                        r.tokens_in,
                        r.tokens_out,
                        r.proxy_reason,
                    )
                    for r, _, _ in outcomes
                ],
            )
            self._conn.executemany(
                "INSERT INTO usage_daily (day, key, project, model, requests, errors,"
                " tokens_in, tokens_out) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (day, key, model) DO UPDATE SET"
                " requests = requests + excluded.requests, errors = errors + excluded.errors,"
                " tokens_in = tokens_in + excluded.tokens_in,"
                " tokens_out = tokens_out + excluded.tokens_out, project = excluded.project",
                [(d, k, a[0], m, a[1], a[2], a[3], a[4]) for (d, k, m), a in usage.items()],
            )
            self._conn.executemany(
                "INSERT INTO client_usage (day, client, model, requests, limited, tokens_in,"
                " tokens_out) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, client, model)"
                " DO UPDATE SET requests = requests + excluded.requests,"
                " limited = limited + excluded.limited,"
                " tokens_in = tokens_in + excluded.tokens_in,"
                " tokens_out = tokens_out + excluded.tokens_out",
                [(d, c, m, *a) for (d, c, m), a in per_client.items()],
            )
            if pins:
                self._conn.executemany(
                    "INSERT INTO pins (kind, name, owner, path, expires, sealed)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, name) DO UPDATE SET"
                    " owner = excluded.owner, path = excluded.path, expires = excluded.expires,"
                    " sealed = excluded.sealed",
                    [(p.kind, p.name, p.owner, p.path, p.expires, p.sealed) for p in pins.values()],
                )
            _write_answers(self._conn, [arg for kind, arg in items if kind == "answer"])
            learned = [arg for kind, arg in items if kind == "learned"]
            if learned:
                self._conn.executemany(
                    "INSERT INTO learned_limits (project, model, kind, value, at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (project, model, kind) DO UPDATE SET"
                    " value = excluded.value, at = excluded.at WHERE excluded.at >= at",
                    learned,
                )
            if snapshot is not None:
                self._write_snapshot(snapshot)
            self._conn.execute("COMMIT")
        except Exception as e:  # any failure: roll back, never leave the write lock held
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if _locked(e):
                return False
            if not alone:
                return None  # the caller retries item by item
            lost = len(items) + (snapshot is not None)
            self.write_errors += lost
            if not self._failing:  # once per spell, not every tick
                log.error("gemini-proxy database write failed (%d writes lost): %s", lost, e)
            self._failing = True
            return True
        self._failing = False
        return True

    def _write_snapshot(self, snapshot: _Snapshot) -> None:
        latest, keys, cooldowns = snapshot.latest, snapshot.configured, snapshot.cooldowns
        now = self.clock()
        self._conn.executemany(
            "INSERT INTO key_state (name, fingerprint, state, updated, retired)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " fingerprint = excluded.fingerprint, state = excluded.state,"
            " updated = excluded.updated, retired = excluded.retired",
            [
                (
                    name,
                    s["fingerprint"],
                    json.dumps({k: v for k, v in s.items() if k != "fingerprint"}),
                    now,
                    None if name in keys else now,
                )
                for name, s in latest.items()
            ],
        )
        leaving = [
            (now, name)
            for (name,) in self._conn.execute("SELECT name FROM key_state WHERE retired IS NULL")
            if name not in keys
        ]
        self._conn.executemany("UPDATE key_state SET retired = ? WHERE name = ?", leaving)
        self._conn.execute("DELETE FROM cooldowns")
        self._conn.executemany(
            "INSERT INTO cooldowns (project, model, until, reason) VALUES (?, ?, ?, ?)",
            [(c["project"], c["model"], c["until"], c["reason"]) for c in cooldowns],
        )

    def prune(self) -> None:
        """Prune now, on the writing connection (the maintenance thread does it every minute
        on its own)."""
        self._prune(self._conn)

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Drop old outcomes, past cooldowns, expired pins and keys retired over RETIRED_TTL ago.
        Outcomes go in small transactions, so the event loop's commits never wait long."""
        try:
            now = self.clock()
            cutoff = now - self.retention_days * 86400
            (last,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM outcomes").fetchone()
            keep_from = last - self.retention_rows
            while True:
                gone = conn.execute(
                    "DELETE FROM outcomes WHERE id IN (SELECT id FROM outcomes"
                    " WHERE id <= ? OR t < ? LIMIT ?)",
                    (keep_from, cutoff, PRUNE_CHUNK),
                ).rowcount
                if gone < PRUNE_CHUNK:
                    break
            conn.execute("DELETE FROM cooldowns WHERE until < ?", (now,))
            conn.execute("DELETE FROM pins WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM answer_cache WHERE expires <= ?", (now,))
            conn.execute(
                "DELETE FROM key_state WHERE retired IS NOT NULL AND retired < ?",
                (now - RETIRED_TTL,),
            )
        except Exception as e:  # the thread must live on: it alone checkpoints
            self.write_errors += 1
            log.error("gemini-proxy database prune failed: %s", e)

    # --- reads for the admin API (own connection, call from a worker thread)
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def recent(
        self, limit: int, key: str | None, status: int | None, tried: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest outcomes: `key` served them, `tried` took part in them (any attempt)."""
        where: list[str] = []
        params: list[Any] = []
        if key:
            where.append("key = ?")
            params.append(key)
        if tried:  # key names are [A-Za-z0-9_.-]: no quote inside; `_` is escaped for LIKE
            where.append("attempts LIKE ? ESCAPE '\\'")
            params.append('%"key": "' + tried.replace("_", "\\_") + '"%')
        if status:
            where.append("status = ?")
            params.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.query(
            f"SELECT * FROM outcomes {clause} ORDER BY id DESC LIMIT ?", (*params, limit)
        )
        for r in rows:
            r["attempts"] = json.loads(r["attempts"])
            r["stream"] = bool(r["stream"])
        return rows

    def client_usage(self, day: str, conn: sqlite3.Connection | None = None) -> dict[str, Any]:
        """client -> {requests, limited, tokens_in, tokens_out, models: {model -> the same}}
        on the Pacific `day` (a read-only connection of its own unless `conn` is given)."""
        sql = (
            "SELECT client, model, requests, limited, tokens_in, tokens_out FROM client_usage"
            " WHERE day = ? ORDER BY client, model"
        )
        if conn is None:
            rows = self.query(sql, (day,))
        else:
            names = ("client", "model", "requests", "limited", "tokens_in", "tokens_out")
            rows = [dict(zip(names, r, strict=True)) for r in conn.execute(sql, (day,))]
        out: dict[str, Any] = {}
        for r in rows:
            client, model = r.pop("client"), r.pop("model")
            total = out.setdefault(
                client, {"requests": 0, "limited": 0, "tokens_in": 0, "tokens_out": 0, "models": {}}
            )
            for k, v in r.items():
                total[k] += v
            total["models"][model] = r
        return out

    def usage(self, day: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.query(
            "SELECT key, SUM(requests) AS requests, SUM(errors) AS errors,"
            " SUM(tokens_in) AS tokens_in, SUM(tokens_out) AS tokens_out"
            " FROM usage_daily WHERE day = ? GROUP BY key",
            (day,),
        ):
            out[r.pop("key")] = r
        return out

    def usage_by_model(self, day: str) -> list[tuple[str, str, int, int]]:
        """(project, model, requests, input tokens) of `day`: the budgets' day counts at start."""
        return [
            (str(p), str(m), int(r or 0), int(t or 0))
            for p, m, r, t in self._conn.execute(
                "SELECT project, model, SUM(requests), SUM(tokens_in) FROM usage_daily"
                " WHERE day = ? GROUP BY project, model",
                (day,),
            )
        ]
