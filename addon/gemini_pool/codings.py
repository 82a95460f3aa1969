"""Content-Encoding: what the proxy can undo (gzip, deflate), and undoing it within a bound.

Google gzips answers whenever the caller accepts it; whatever the proxy reads from an answer (token
counts, the names of created resources) is read after decoding. Pure: no mitmproxy.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

_GZIP_OR_ZLIB = 47  # wbits: auto-detect a gzip or zlib header
_RAW_DEFLATE = -15


def coding_of(encoding: str) -> str | None:
    """The one coding to undo: "" for none, None for what the proxy cannot decode."""
    codings = [c for c in (t.strip().lower() for t in encoding.split(",")) if c and c != "identity"]
    if not codings:
        return ""
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return codings[0]
    return None  # br, zstd, layered codings, nonsense


def wbits(coding: str, head: bytes) -> int:
    """gzip is gzip (or a mislabelled zlib stream); "deflate" is zlib, or raw deflate in the wild."""
    if coding != "deflate" or head[:2] == b"\x1f\x8b" or len(head) < 2:
        return _GZIP_OR_ZLIB
    cmf, flg = head[0], head[1]
    if cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0:
        return _GZIP_OR_ZLIB  # a valid zlib header
    return _RAW_DEFLATE


def decoded(body: bytes, encoding: str, limit: int) -> bytes | None:
    """A whole answer body with its Content-Encoding undone.

    None when it cannot be decoded (unknown coding, corrupt or truncated data) or when the result
    would be longer than `limit` (never more than `limit` + 1 bytes are inflated).
    """
    coding = coding_of(encoding)
    if coding is None:
        return None
    if not coding:
        return body if len(body) <= limit else None
    if len(body) < 2:
        return None
    out: list[bytes] = []
    room = limit
    rest = body
    try:
        while rest:  # concatenated gzip members decode to the concatenation
            inflate = zlib.decompressobj(wbits(coding, rest))
            piece = inflate.decompress(rest, room + 1)
            if len(piece) > room:
                return None
            if not inflate.eof:
                return None  # truncated
            out.append(piece)
            room -= len(piece)
            rest = inflate.unused_data
            if rest and rest[:2] != b"\x1f\x8b":
                return None  # only gzip members may follow one another; anything else is junk
    except zlib.error:
        return None
    return b"".join(out)


def plain_request(
    headers: Sequence[tuple[str, str]], body: bytes, limit: int
) -> tuple[Sequence[tuple[str, str]], bytes] | None:
    """A request's headers and body as every check reads them and as they go upstream (the same
    objects when there is no Content-Encoding): its Content-Encoding undone (gzip, deflate; at most `limit` bytes decoded) and the header dropped. A compressed
    body must never slip past a check that reads bytes (whose resource it names, which model).
    None: an encoding the proxy cannot undo, a corrupt body, or one over `limit` decoded."""
    encodings = [v for k, v in headers if k.lower() == "content-encoding"]
    if not encodings:
        return headers, body  # the common case: nothing to undo, nothing copied
    if not body:
        return [(k, v) for k, v in headers if k.lower() != "content-encoding"], body
    plain = decoded(body, ",".join(encodings), limit)
    if plain is None:
        return None
    return [(k, v) for k, v in headers if k.lower() != "content-encoding"], plain


def json_not_utf8(headers: Sequence[tuple[str, str]], body: bytes) -> bool:
    """A JSON body in UTF-16 or UTF-32 (which json.loads, and maybe Google, would read, but no
    scan of its bytes would): refused, so that every check reads what Google reads."""
    ctype = next((v for k, v in headers if k.lower() == "content-type"), "application/json")
    if "json" not in ctype.lower() or len(body) < 2:
        return False
    return json.detect_encoding(body) not in ("utf-8", "utf-8-sig")
