"""Content-Encoding undone within a bound: gzip, zlib and raw deflate; anything else is None."""

from __future__ import annotations

import gzip
import json
import zlib

from gemini_pool.codings import coding_of, decoded


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def test_decoded() -> None:
    body = json.dumps({"name": "files/abc"}).encode()
    assert decoded(gzip.compress(body), "gzip", 1000) == body
    assert decoded(zlib.compress(body), "deflate", 1000) == body
    assert decoded(raw_deflate(body), "deflate", 1000) == body
    assert decoded(body, "", 1000) == body and decoded(body, "identity", 1000) == body
    assert decoded(gzip.compress(body), "gzip", len(body)) == body
    assert decoded(gzip.compress(body), "gzip", len(body) - 1) is None  # over the limit
    assert decoded(body, "", len(body) - 1) is None
    assert decoded(gzip.compress(body)[:-5], "gzip", 1000) is None  # truncated
    assert decoded(body, "gzip", 1000) is None  # not gzip
    assert decoded(body, "br", 1000) is None
    assert decoded(b"", "gzip", 1000) is None
    assert decoded(gzip.compress(b"a") + gzip.compress(b"b"), "gzip", 10) == b"ab"  # members


def test_codings_the_proxy_can_undo() -> None:
    assert coding_of("") == "" and coding_of("identity") == ""
    assert coding_of(" GZIP ") == "gzip" and coding_of("deflate") == "deflate"
    assert coding_of("br") is None and coding_of("gzip, gzip") is None
