"""Opaque upload URLs: Google's upload_id never leaves the proxy, except on its way to Google.

Real mitmdump in front of the fake (which hands out its own upload ids), the google-genai SDK and
raw HTTP. Google's ids must show nowhere the caller, mitmweb (the flow dump), the access log or
the database can see; the proxy's tokens carry the uploads, across workers too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from google import genai
from google.genai import types
from mitmproxy import http, io

from gemini_pool.pins import upload_digest
from gemini_pool.upload_tokens import is_token, unseal

from ..conftest import Fake, Proxy, key_entry, new_secret, wait_for
from .test_workers import RedisServer, redis_server, workers  # noqa: F401 - the fixture

UPLOAD = "/upload/v1beta/files"
START = {"x-goog-upload-protocol": "resumable", "x-goog-upload-command": "start"}
CLIENTS = [{"name": "app", "token": "tok-app-1"}]


def google_ids(fake: Fake) -> set[str]:
    """Every upload_id the fake (Google) saw on an upload's bytes: its own, never a token."""
    ids = set()
    for e in fake.log():
        if e.get("upload"):
            ids.update(parse_qs(e.get("query", "")).get("upload_id", []))
    return ids


def token_of(url: str) -> str:
    (token,) = parse_qs(url.split("?", 1)[1])["upload_id"]
    return token


def start(proxy: Proxy, headers: dict[str, str]) -> tuple[str, str]:
    """A resumable upload's start through `proxy`: (the path and query to send bytes to, token)."""
    r = proxy.http.post(UPLOAD, headers={**headers, **START}, json={"file": {"display_name": "d"}})
    assert r.status_code == 200, r.text
    url = r.headers["x-goog-upload-url"]
    assert url == r.headers["x-goog-upload-control-url"]
    assert url.startswith(f"{proxy.url}{UPLOAD}?upload_id=gp1.")
    assert "x-guploader-uploadid" not in r.headers
    return url.removeprefix(proxy.url), token_of(url)


def test_googles_upload_id_shows_nowhere_and_forged_ones_go_nowhere(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    proxy = make_proxy([key_entry("a", a, project="p1"), key_entry("b", b, project="p2")])
    proxy.write_keys([key_entry("a", a, project="p1"), key_entry("b", b, project="p2")], CLIENTS)
    wait_for(lambda: proxy.http.post("/v1beta/models", headers={}).status_code == 401, 5)
    seen: list[str] = []  # everything the callers got: status lines, headers, bodies

    def keep(r: Any) -> Any:
        seen.append(f"{r.status_code} {r.headers} {r.text}")
        return r

    # the SDK's resumable upload, end to end
    client = genai.Client(
        api_key="tok-app-1",
        http_options=types.HttpOptions(base_url=proxy.url, api_version="v1beta"),
    )
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    uploaded = client.files.upload(file=str(doc))
    assert uploaded.name and uploaded.name.startswith("files/")
    seen.append(repr(uploaded))
    assert client.files.get(name=uploaded.name).name == uploaded.name

    # raw HTTP, in two chunks: the token carries every step, with nothing else
    path, token = start(proxy, {"x-goog-api-key": "tok-app-1"})
    assert is_token(token)
    chunk = keep(
        proxy.http.post(
            path,
            headers={"x-goog-upload-command": "upload", "x-goog-upload-offset": "0"},
            content=b"hel",
        )
    )
    assert chunk.status_code == 200 and chunk.headers["x-goog-upload-status"] == "active"
    done = keep(
        proxy.http.post(
            path,
            headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "3"},
            content=b"lo",
        )
    )
    assert done.status_code == 200 and done.headers["x-goog-upload-status"] == "final"
    assert done.json()["file"]["name"].startswith("files/")

    # an upload left open: the database holds its digest and a ciphertext only its token opens
    open_path, open_token = start(proxy, {"x-goog-api-key": "tok-app-1"})
    first = proxy.http.post(
        open_path,
        headers={"x-goog-upload-command": "upload", "x-goog-upload-offset": "0"},
        content=b"open",
    )
    assert first.status_code == 200
    ids = google_ids(fake)
    assert len(ids) == 3 and not any(is_token(i) for i in ids)  # the fake's own, one per upload
    before = len(fake.log())

    # what the proxy did not hand out, or no longer honours, goes nowhere
    google_id = sorted(ids)[0]
    refused = {
        "Google's own id": f"{UPLOAD}?upload_id={google_id}&upload_protocol=resumable",
        "a token never handed out": f"{UPLOAD}?upload_id=gp1.{'A' * 43}",
        "a finalized upload's token": path,
        "Google's id in another spelling": f"{UPLOAD}?uploadId={google_id}",
    }
    for what, target in refused.items():
        bare = keep(proxy.http.post(target, content=b"x"))
        # no client token and no session: an upload URL that opens nothing (a parameter that is
        # no upload_id leaves a caller without a token)
        assert bare.status_code == (404 if "upload_id=" in target else 401), (what, bare.text)
        r = keep(proxy.http.post(target, headers={"x-goog-api-key": "tok-app-1"}, content=b"x"))
        assert r.status_code == 404 and "upload session not found" in r.text, (what, r.text)
    assert len(fake.log()) == before  # nothing went upstream

    requests = proxy.admin.get("/admin/requests", params={"limit": 100}).text
    assert "upload_not_found" in requests
    proxy.stop()

    # nowhere: the callers' answers, the log, the flow dump, the database, the admin API
    places = {
        "answers": "\n".join(seen).encode(),
        "log": proxy.log_file.read_bytes(),
        "flow dump": proxy.dump.read_bytes(),
        "admin API": requests.encode(),
    }
    for suffix in ("", "-wal"):
        if (db := Path(f"{proxy.db}{suffix}")).exists():
            places[db.name] = db.read_bytes()
    for gid in ids:
        for where, data in places.items():
            assert gid.encode() not in data, f"Google's upload_id shows in the {where}"

    # mitmweb's view: the flows carry the proxy's tokens in their URLs and upload headers
    with open(proxy.dump, "rb") as f:
        flows = [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    uploads = [fl for fl in flows if fl.request.path.startswith(UPLOAD)]
    starts = [fl for fl in uploads if fl.response and "x-goog-upload-url" in fl.response.headers]
    assert len(starts) == 3
    for fl in starts:
        assert fl.response is not None
        assert is_token(token_of(fl.response.headers["x-goog-upload-url"]))
    follow_ups = [fl for fl in uploads if "?" in fl.request.path]
    served = [fl for fl in follow_ups if fl.response and fl.response.status_code == 200]
    assert len(served) == 4  # the SDK's bytes, two chunks, the open upload's first
    assert all(is_token(token_of(fl.request.path)) for fl in served)
    assert token in {token_of(fl.request.path) for fl in served}
    # the refused ones show the proxy's tokens, or `redacted` for anything else
    shown = [
        value
        for fl in follow_ups
        for name, values in parse_qs(fl.request.path.split("?", 1)[1]).items()
        if name.lower().replace("_", "") == "uploadid"
        for value in values
    ]
    assert len(shown) == len(follow_ups) == 4 + 2 * len(refused)
    assert all(is_token(v) or v == "redacted" for v in shown)
    assert shown.count("redacted") == 4  # Google's id, twice in each of two spellings

    # the open session's row: its token's digest and a ciphertext only that token opens; the
    # finalized sessions kept nothing
    with sqlite3.connect(proxy.db) as db:
        rows = db.execute("SELECT name, sealed FROM pins WHERE kind = 'upload' AND sealed != ''")
        live = rows.fetchall()
    db.close()
    assert [name for name, _ in live] == [upload_digest(open_token)]
    assert unseal(open_token, live[0][1]) in ids
    assert unseal(token, live[0][1]) is None


def test_a_token_started_on_one_worker_opens_googles_id_on_another(
    fake: Fake,
    make_proxy: Any,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    keys = [key_entry("a", a, project="p1"), key_entry("b", b, project="p2")]
    w1, w2 = workers(make_proxy, redis_server, keys, n=2)
    for w in (w1, w2):
        w.write_keys(keys, CLIENTS)
    wait_for(lambda: all(w.admin.get("/readyz").json()["shared_state"]["up"] for w in (w1, w2)))
    for w in (w1, w2):
        wait_for(lambda w=w: w.http.post("/v1beta/models", headers={}).status_code == 401, 5)
    path, token = start(w1, {"x-goog-api-key": "tok-app-1"})
    shared = redis_server.client()

    def redis_dump() -> str:
        return "\n".join(
            f"{k} {shared.type(k)} {shared.hgetall(k) if shared.type(k) == 'hash' else ''}"
            for k in shared.keys("*")
        )

    # while the upload is open, Redis holds its session: a digest and a ciphertext, never
    # Google's id (checked below, once known), never the token
    open_dump = redis_dump()
    assert upload_digest(token) in open_dump  # written before the start's answer left
    assert token not in open_dump
    # the bytes go to the other worker with nothing but the token: it learns the session from
    # Redis and opens Google's id with the token
    done = w2.http.post(
        path,
        headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
        content=b"hello",
    )
    assert done.status_code == 200, done.text
    (gid,) = google_ids(fake)
    assert not is_token(gid) and gid not in done.text and gid not in str(done.headers)
    dump = redis_dump()  # after it ended: still neither
    assert gid not in open_dump and gid not in dump and token not in dump

    # finalized on w2: the token is spent on w1 as well (which must not take the session back
    # from Redis when it catches up)
    def spent() -> bool:
        r = w1.http.post(path, headers={"x-goog-api-key": "tok-app-1"}, content=b"x")
        return r.status_code == 404 and "upload session not found" in r.text

    wait_for(spent, timeout=5)
