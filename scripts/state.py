#!/usr/bin/env python3
"""Export / import gemini-proxy key state between a SQLite file and JSON (see scripts/state)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemini_pool.store import Store, StoreError, read_state_document, state_document


def export(db: str) -> dict[str, object]:
    store = Store(db)
    try:
        keys, cooldowns = store.load_state()
    finally:
        store.close()
    return state_document(keys, cooldowns)


def import_(db: str, doc: object) -> int:
    keys, cooldowns = read_state_document(doc)
    for name, state in keys.items():
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
            raise ValueError(f"key {name!r}: every key needs its fingerprint")
    store = Store(db)
    try:
        store.save_state(keys, cooldowns)
        if not store.flush() or store.write_errors:
            raise StoreError(f"{db}: the state could not be written (database locked or failing)")
    finally:
        store.close()
    return len(keys)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the key state of DB as JSON to stdout")
    ex.add_argument("db")
    im = sub.add_parser(
        "import",
        help="write the key state of a JSON export into DB (proxy stopped); rows of keys"
        " missing from the export are kept (pruned 7 days after their key left the key file)",
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
