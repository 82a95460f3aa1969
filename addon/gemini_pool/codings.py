"""Content-Encoding: what the proxy can undo (gzip, deflate), and undoing it within a bound.

Google gzips answers whenever the caller accepts it; whatever the proxy reads from an answer (token
counts, the names of created resources) is read after decoding. Pure: no mitmproxy.
"""

from __future__ import annotations

import zlib

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
