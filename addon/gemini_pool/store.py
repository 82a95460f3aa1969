"""SQLite persistence: key state, pins, per-request outcomes, daily usage. Never holds a secret.

All writes go through a queue to one writer thread that commits in batches (WAL,
synchronous=NORMAL), so the request path never waits on the disk. The schema is versioned with
PRAGMA user_version and upgraded forward; a database from a newer version is refused untouched.

Key state is upserted, never replaced: a key missing from a snapshot (a half-written key file)
keeps its row, marked retired, for RETIRED_TTL, so its operator state is there when it returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .pins import Pin

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
RETIRED_TTL = 7 * 86400  # rows of keys no longer configured are kept this long
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
        # key name, an upload session's name is a digest of its upload_id: never a secret
        """CREATE TABLE pins (
            kind TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL, path TEXT NOT NULL,
            expires REAL NOT NULL, PRIMARY KEY (kind, name))""",
        "CREATE INDEX pins_expires ON pins (expires)",
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
    """(keys, cooldowns) of a key-state document. Raises ValueError saying what is wrong."""
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


class Store:
    def __init__(
        self,
        path: str,
        *,
        flush_interval: float = 0.25,
        retention_days: int = 30,
        retention_rows: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock  # wall time of updates, retirement, pruning (tests inject one)
        self.flush_interval = flush_interval
        self.retention_days = retention_days
        self.retention_rows = retention_rows
        self.write_errors = 0
        self._q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._conn = connect(path)
            migrate(self._conn, path)
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
            Pin(kind, name, owner, path, expires)
            for kind, name, owner, path, expires in self._conn.execute(
                "SELECT kind, name, owner, path, expires FROM pins WHERE expires > ?"
                " ORDER BY expires",
                (now,),
            )
        ]

    # --- the writer
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gemini-store", daemon=True)
            self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._q.qsize()

    def record(self, row: OutcomeRow, usage: list[UsageDelta]) -> None:
        self._q.put(("outcome", (row, usage)))

    def save_state(self, keys: dict[str, dict[str, Any]], cooldowns: list[dict[str, Any]]) -> None:
        """Queue a snapshot: `keys` are the configured keys (name -> state with fingerprint).

        Their rows are upserted; rows of keys not in it are kept, marked retired, and pruned
        RETIRED_TTL after they left. The cooldowns replace the stored ones."""
        self._q.put(("state", (keys, cooldowns)))

    def save_pin(self, pin: Pin) -> None:
        """Queue one pin (added, changed, or ended with an expiry in the past). Never blocks:
        point ResourcePins.on_pin at it."""
        self._q.put(("pin", pin))

    def kick(self) -> None:
        """Have the writer commit what is queued now rather than at the end of its interval."""
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is committed."""
        if self._thread is None or not self._thread.is_alive():
            self._drain_now()
            return True
        done = threading.Event()
        self._q.put(("flush", done))
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(("stop", None))
            self._wake.set()
            self._thread.join(10)
        else:
            self._drain_now()
        self._thread = None
        self._conn.close()

    def _drain_now(self) -> None:
        items = []
        while True:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                break
        self._write(items)

    def _run(self) -> None:
        last_prune = time.monotonic()
        while True:
            # Sleep, then take everything queued in one go: one transaction per interval, and
            # as little Python work (GIL time taken from the event loop) per row as possible.
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            items: list[tuple[str, Any]] = []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._q.get_nowait())
            self._write(items)
            for kind, arg in items:
                if kind == "flush":
                    arg.set()
            if any(kind == "stop" for kind, _ in items):
                return
            if time.monotonic() - last_prune > 60:
                last_prune = time.monotonic()
                self.prune()

    def _write(self, items: list[tuple[str, Any]]) -> None:
        outcomes = [arg for kind, arg in items if kind == "outcome"]
        states = [arg for kind, arg in items if kind == "state"]
        pins: dict[tuple[str, str], Pin] = {}
        for kind, arg in items:
            if kind == "pin":
                pins[(arg.kind, arg.name)] = arg  # the newest of each pin wins
        if not outcomes and not states and not pins:
            return
        usage: dict[tuple[str, str, str], list[Any]] = {}
        for _row, deltas in outcomes:
            for u in deltas:
                acc = usage.setdefault((u.day, u.key, u.model), [u.project, 0, 0, 0, 0])
                acc[1] += u.requests
                acc[2] += u.errors
                acc[3] += u.tokens_in
                acc[4] += u.tokens_out
        try:
            self._conn.execute("BEGIN")
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
                    for r, _ in outcomes
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
            if pins:
                self._conn.executemany(
                    "INSERT INTO pins (kind, name, owner, path, expires) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner,"
                    " path = excluded.path, expires = excluded.expires",
                    [(p.kind, p.name, p.owner, p.path, p.expires) for p in pins.values()],
                )
            if states:
                self._write_states(states)
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            self.write_errors += 1
            log.error("gemini-proxy database write failed (%d rows lost): %s", len(outcomes), e)
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _write_states(self, states: list[tuple[dict[str, dict[str, Any]], Any]]) -> None:
        # Every snapshot of the batch counts, in order: a key that an earlier snapshot had and
        # the newest lacks keeps its latest state (an operator action just before it left).
        latest: dict[str, dict[str, Any]] = {}
        for keys, _ in states:
            latest.update(keys)
        keys, cooldowns = states[-1]  # the newest snapshot says which keys are configured
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
        """Drop old outcomes, past cooldowns, expired pins and keys retired over RETIRED_TTL ago.
        Runs on the writer thread every minute; call it directly only when the writer is not
        running."""
        try:
            now = self.clock()
            cutoff = now - self.retention_days * 86400
            self._conn.execute("DELETE FROM outcomes WHERE t < ?", (cutoff,))
            self._conn.execute(
                "DELETE FROM outcomes WHERE id <= (SELECT MAX(id) FROM outcomes) - ?",
                (self.retention_rows,),
            )
            self._conn.execute("DELETE FROM cooldowns WHERE until < ?", (now,))
            self._conn.execute("DELETE FROM pins WHERE expires <= ?", (now,))
            self._conn.execute(
                "DELETE FROM key_state WHERE retired IS NOT NULL AND retired < ?",
                (now - RETIRED_TTL,),
            )
        except sqlite3.Error as e:
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
