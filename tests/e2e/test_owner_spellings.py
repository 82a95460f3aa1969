"""Attack: naming another group's file in a spelling the owner check did not read (real mitmdump,
the fake Gemini, raw bytes on the wire). Each is 404 NOT_FOUND and nothing reaches the fake;
the owner's plain requests still go through."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from ..conftest import Fake
from .test_attacks import Table, refused, req
from .test_tenants import CLIENTS, native, sdk, two_projects, upload

BOB = b"x-goog-api-key: tok-bob-1"
GEN = b"/v1beta/models/gemini-2.5-flash:generateContent"


def test_odd_spellings_of_another_groups_file_are_refused(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    mine = upload(sdk(proxy, "tok-alice-1"), tmp_path)
    assert mine.name and mine.uri
    ident = mine.name.split("/", 1)[1].encode()
    table = Table()
    paths = [
        ("upper-case kind", b"GET", b"/v1beta/Files/" + ident),
        ("percent-encoded letter", b"GET", b"/v1beta/%66iles/" + ident),
        ("percent-encoded slash", b"GET", b"/v1beta/files%2F" + ident),
        ("double-encoded slash", b"DELETE", b"/v1beta/files%252F" + ident),
        ("doubled slash", b"GET", b"/v1beta//files/" + ident),
        ("download, encoded", b"GET", b"/download/v1beta/%66iles/" + ident + b":download"),
        ("list, upper case", b"GET", b"/v1beta/FILES"),
        ("OpenAI-compatible files", b"GET", b"/v1beta/openai/files/" + ident),
    ]
    for name, method, target in paths:
        with table.row(name):
            api = "openai" if b"/openai/" in target else "native"
            data = req(target, BOB, method=method, body=b"")
            a = refused(proxy, fake, proxy.port, data, 404, "not_found", api=api)
            error = json.loads(a.body)["error"]
            assert "NOT_FOUND" in (error.get("status"), str(error.get("code")).upper()), a
    uri = mine.uri
    ident_s = ident.decode()
    bodies = [
        ("escaped key", '{"contents":[{"parts":[{"fileData":{"file\\u0055ri":"URI"}}]}]}'),
        ("query after the name", '{"contents":[{"parts":[{"fileData":{"fileUri":"URI?a=1"}}]}]}'),
        ("upper-case value", '{"contents":[{"parts":[{"fileData":{"fileUri":"FILES/ID"}}]}]}'),
        (
            "behind 70 other files",
            '{"contents":[{"parts":['
            + '{"text":"x","fileUri":"https://youtu.be/x"},' * 70
            + '{"fileData":{"fileUri":"URI"}}]}]}',
        ),
    ]
    bodies = [(n, b.replace("URI", uri).replace("ID", ident_s)) for n, b in bodies]
    for name, body in bodies:
        with table.row(name):
            a = refused(
                proxy, fake, proxy.port, req(GEN, BOB, body=body.encode()), 404, "not_found"
            )
            assert json.loads(a.body)["error"]["status"] == "NOT_FOUND", a
    table.verify()
    # the owner's plain spelling still goes through
    r = native(proxy, "tok-alice-1", "GET", f"/v1beta/{mine.name}")
    assert r.status_code == 200 and r.json()["name"] == mine.name


def test_bodies_that_hide_another_groups_names_are_refused(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    """Compressed, UTF-16, a bare cache id, a doubled slash, a key in another letter case, a
    name inside a list: each read the way Google (or a lenient parser) would, and refused."""
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    mine = upload(sdk(proxy, "tok-alice-1"), tmp_path)
    made = native(
        proxy,
        "tok-alice-1",
        "POST",
        "/v1beta/cachedContents",
        json={"model": "models/gemini-2.5-flash", "contents": [{"parts": [{"text": "x"}]}]},
    )
    assert made.status_code == 200, made.text
    cache = made.json()["name"]
    ident = mine.name.split("/", 1)[1]
    uses_file = json.dumps({"contents": [{"parts": [{"fileData": {"fileUri": mine.uri}}]}]})
    uses_cache = json.dumps({"cachedContent": cache, "contents": [{"parts": [{"text": "x"}]}]})
    table = Table()
    rows: list[tuple[str, bytes, tuple[bytes, ...], int, str]] = [
        (
            "gzip body, a file",
            gzip.compress(uses_file.encode()),
            (b"Content-Encoding: gzip",),
            404,
            "not_found",
        ),
        (
            "gzip body, a cache",
            gzip.compress(uses_cache.encode()),
            (b"Content-Encoding: gzip",),
            404,
            "not_found",
        ),
        (
            "deflate body",
            zlib.compress(uses_file.encode()),
            (b"Content-Encoding: deflate",),
            404,
            "not_found",
        ),
        ("brotli body", b"\x1b\x00\x00", (b"Content-Encoding: br",), 415, "unsupported_encoding"),
        (
            "UTF-16 body",
            uses_file.encode("utf-16"),
            (b"Content-Type: application/json",),
            400,
            "bad_request",
        ),
    ]
    plain = [
        ("bare cache id", {"cachedContent": cache.split("/", 1)[1]}),
        (
            "doubled slash",
            {"contents": [{"parts": [{"fileData": {"fileUri": f"files//{ident}"}}]}]},
        ),
        ("dot segment", {"contents": [{"parts": [{"fileData": {"fileUri": f"files/./{ident}"}}]}]}),
        ("key in other case", {"contents": [{"parts": [{"FileData": {"FileUri": mine.uri}}]}]}),
        ("cache in a list", {"cachedContent": [cache]}),
        ("cache in an object", {"cachedContent": {"name": cache}}),
    ]
    for name, doc in plain:
        rows.append((name, json.dumps(doc).encode(), (), 404, "not_found"))
    for name, body, lines, status, reason in rows:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(GEN, BOB, *lines, body=body), status, reason)
    table.verify()
    # the owner's own compressed request goes through, plain to Google
    r = proxy.http.post(
        GEN.decode(),
        headers={"x-goog-api-key": "tok-alice-1", "content-encoding": "gzip"},
        content=gzip.compress(uses_file.encode()),
    )
    assert r.status_code == 200, r.text
    assert "content-encoding" not in fake.log()[-1].get("headers", {})


def test_calls_on_a_whole_collection_are_refused_but_the_filtered_lists(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    """A verb on a collection, a list the proxy does not filter, a method override: each would
    act on, or show, every group's resources of the project."""
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    upload(sdk(proxy, "tok-alice-1"), tmp_path)
    table = Table()
    rows = [
        ("files:list", b"GET", b"/v1beta/files:list", (), 404, "not_found"),
        ("cachedContents:list", b"GET", b"/v1beta/cachedContents:list", (), 404, "not_found"),
        ("delete the collection", b"DELETE", b"/v1beta/files", (), 404, "not_found"),
        ("operations list", b"GET", b"/v1beta/operations", (), 404, "not_found"),
        ("tuned models list", b"GET", b"/v1beta/tunedModels", (), 404, "not_found"),
        (
            "method override",
            b"POST",
            b"/v1beta/files",
            (b"X-HTTP-Method-Override: GET",),
            400,
            "bad_request",
        ),
    ]
    for name, method, target, lines, status, reason in rows:
        with table.row(name):
            body = b"{}" if method == b"POST" else b""
            refused(
                proxy,
                fake,
                proxy.port,
                req(target, BOB, *lines, method=method, body=body),
                status,
                reason,
            )
    table.verify()
    # the lists the proxy filters still answer, with the caller's own items only
    mine = native(proxy, "tok-bob-1", "GET", "/v1beta/files")
    assert mine.status_code == 200 and mine.json().get("files", []) == []


def test_space_duplicates_untracked_stores_and_path_parameters(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    """From a second outside review: space past the byte scan's bound, duplicate keys beside an
    escaped letter, File Search stores (owned by no group), a token in a path parameter."""
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    alice = sdk(proxy, "tok-alice-1")
    mine = upload(alice, tmp_path)
    theirs = upload(sdk(proxy, "tok-bob-1"), tmp_path, display="bobs")
    ws = " " * 65
    file_part = '{"fileData":{"fileUri"' + ws + ':"' + str(mine.uri) + '"}}'
    rows = [
        ("65 spaces before the colon", '{"contents":[{"parts":[' + file_part + "]}]}", 404),
        (
            "duplicate fileUri beside an escaped letter",
            '{"contents":[{"parts":[{"text":"\\u0041"},{"fileData":{"fileUri":"'
            + str(mine.uri)
            + '","fileUri":"'
            + str(theirs.uri)
            + '"}}]}]}',
            404,
        ),
        (
            "a File Search store in a tool",
            '{"contents":[{"parts":[{"text":"x"}]}],"tools":[{"fileSearch":'
            '{"fileSearchStoreNames":["fileSearchStores/alicestore"]}}]}',
            404,
        ),
    ]
    table = Table()
    for name, body, status in rows:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(GEN, BOB, body=body.encode()), status, "not_found")
    for name, method, target in [
        ("File Search stores list", b"GET", b"/v1beta/fileSearchStores"),
        ("delete a store", b"DELETE", b"/v1beta/fileSearchStores/alicestore?force=true"),
        ("corpora", b"GET", b"/v1beta/corpora"),
        ("generated files", b"GET", b"/v1beta/generatedFiles"),
    ]:
        with table.row(name):
            refused(
                proxy, fake, proxy.port, req(target, BOB, method=method, body=b""), 404, "not_found"
            )
    with table.row("a token in a path parameter"):
        data = req(GEN + b";key=tok-alice-1", body=b"{}")
        refused(proxy, fake, proxy.port, data, 400, "bad_path")
    table.verify()
    # a file whose own bytes hold long space runs and resource-like text still uploads
    doc = tmp_path / "notes.txt"
    doc.write_text("x" + " " * 200 + "\ncorpora/abc tunedModels/zzz files/other\n")
    assert alice.files.upload(file=str(doc)).name
    proxy.stop()
    assert b"tok-alice-1" not in proxy.dump.read_bytes()
