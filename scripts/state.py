#!/usr/bin/env python3
"""Export / import gemini-proxy key state between a SQLite file and JSON (see scripts/state)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gemini_pool.store import Store, StoreError

FORMAT_VERSION = 1  # the same document as GET /admin/state


def export(db: str) -> dict[str, object]:
    store = Store(db)
    try:
        keys, cooldowns = store.load_state()
    finally:
        store.close()
    return {
        "version": FORMAT_VERSION,
        "exported_at": time.time(),
        "keys": keys,
        "cooldowns": cooldowns,
    }


def import_(db: str, doc: object) -> int:
    if (
        not isinstance(doc, dict)
        or doc.get("version") != FORMAT_VERSION
        or not isinstance(doc.get("keys"), dict)
    ):
        raise ValueError("not a gemini-proxy state export (version 1 with a 'keys' object)")
    keys = doc["keys"]
    for name, state in keys.items():
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
            raise ValueError(f"key {name!r}: every key needs its fingerprint")
    store = Store(db)
    try:
        store.save_state(keys, list(doc.get("cooldowns") or []))
        store.flush()
    finally:
        store.close()
    return len(keys)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the key state of DB as JSON to stdout")
    ex.add_argument("db")
    im = sub.add_parser(
        "import", help="replace the key state of DB with a JSON export (proxy stopped)"
    )
    im.add_argument("db")
    im.add_argument("file", help="the JSON export, or - for stdin")
    args = ap.parse_args()
    try:
        if args.cmd == "export":
            if not Path(args.db).exists():
                raise StoreError(f"{args.db}: no such database")
            json.dump(export(args.db), sys.stdout, indent=2)
            print()
        else:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            n = import_(args.db, json.loads(text))
            print(
                f"imported the state of {n} keys into {args.db}; keys are matched by name and fingerprint at start"
            )
    except (StoreError, ValueError, OSError) as e:
        print(f"state: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
