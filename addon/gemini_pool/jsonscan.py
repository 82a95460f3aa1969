"""A few top-level fields of a large JSON object, found without parsing the whole document.

An OpenAI-style request names its `model` and `stream` at the top level of a body that may hold
tens of megabytes of messages and inline data. `json.loads` of all of it, on the event loop, only
to read two fields, stalls every other request. `top_level` walks the object's top-level keys and
skips each value by its structure (a string in one regex match, containers by their brackets),
so a `"model"` key nested in a message, or the text `"model": "x"` inside a string, is never
taken for the top-level one. The values asked for come back as their raw JSON text.

It checks the structure it walks (brackets, quotes, separators), not every byte: a document it
accepts may still be invalid JSON deep inside (a bad escape or number), which Google refuses.
Pure logic, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_WS = re.compile(rb"[ \t\n\r]*")
# a string token, unrolled so a multi-megabyte string is one tight loop, not one branch per byte
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(
    rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity"
)
_STRUCTURAL = re.compile(rb'["\[\]{}]')
_CLOSE = {ord("{"): ord("}"), ord("["): ord("]")}


class ScanError(ValueError):
    pass


def top_level(body: bytes, names: frozenset[str]) -> dict[str, bytes]:
    """The raw JSON text of each top-level member of `body` named in `names` (the last one wins,
    as with json.loads). Raises ScanError if `body` is not one JSON object."""
    return {name: body[start:end] for name, (start, end) in spans(body, names).items()}


def every(body: bytes, names: frozenset[str]) -> list[tuple[str, bytes]]:
    """(name, raw JSON text) of every top-level member of `body` named in `names`, in order,
    repeated names included (a parser that keeps the first one sees it too)."""
    found: list[tuple[str, bytes]] = []
    spans(body, names, lambda key, start, end: found.append((key, body[start:end])))
    return found


def spans(
    body: bytes,
    names: frozenset[str],
    each: Callable[[str, int, int], None] | None = None,
) -> dict[str, tuple[int, int]]:
    """Where the value of each top-level member named in `names` starts and ends in `body` (the
    last one wins); a caller may replace one value and keep every other byte. `each` is told of
    every such member, repeats included."""
    pos = _WS.match(body, 0).end()  # type: ignore[union-attr]
    if body[pos : pos + 1] != b"{":
        raise ScanError("request body must be a JSON object")
    pos = _skip_ws(body, pos + 1)
    found: dict[str, tuple[int, int]] = {}
    if body[pos : pos + 1] == b"}":
        return _end(body, pos + 1, found)
    while True:
        m = _STRING.match(body, pos)
        if m is None:
            raise ScanError(f"expected a member name at byte {pos}")
        key = _key(m.group())
        pos = _skip_ws(body, m.end())
        if body[pos : pos + 1] != b":":
            raise ScanError(f"expected ':' at byte {pos}")
        pos = _skip_ws(body, pos + 1)
        end = _skip_value(body, pos)
        if key in names:
            found[key] = (pos, end)
            if each is not None:
                each(key, pos, end)
        pos = _skip_ws(body, end)
        sep = body[pos : pos + 1]
        if sep == b"}":
            return _end(body, pos + 1, found)
        if sep != b",":
            raise ScanError(f"expected ',' or '}}' at byte {pos}")
        pos = _skip_ws(body, pos + 1)


def _end(body: bytes, pos: int, found: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    if _skip_ws(body, pos) != len(body):
        raise ScanError(f"extra data after the object at byte {pos}")
    return found


def _skip_ws(body: bytes, pos: int) -> int:
    return _WS.match(body, pos).end()  # type: ignore[union-attr]


def _key(token: bytes) -> str:
    if b"\\" in token:
        key = json.loads(token)  # escapes: `"mod\u0065l"` is "model"
        assert isinstance(key, str)
        return key
    return token[1:-1].decode("utf-8")


def _skip_value(body: bytes, pos: int) -> int:
    """Where the value starting at `pos` ends."""
    first = body[pos : pos + 1]
    if first == b'"':
        m = _STRING.match(body, pos)
        if m is None:
            raise ScanError(f"unterminated string at byte {pos}")
        return m.end()
    if first in (b"{", b"["):
        return _skip_container(body, pos)
    m = _SCALAR.match(body, pos)
    if m is None:
        raise ScanError(f"expected a value at byte {pos}")
    return m.end()


def _skip_container(body: bytes, pos: int) -> int:
    """Past the bracket that closes the one at `pos`, strings skipped whole."""
    stack = [_CLOSE[body[pos]]]
    pos += 1
    while stack:
        m = _STRUCTURAL.search(body, pos)
        if m is None:
            raise ScanError("unterminated object or array")
        c = body[m.start()]
        if c == 0x22:  # '"'
            s = _STRING.match(body, m.start())
            if s is None:
                raise ScanError(f"unterminated string at byte {m.start()}")
            pos = s.end()
            continue
        pos = m.end()
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif c != stack.pop():
            raise ScanError(f"mismatched bracket at byte {m.start()}")
    return pos
