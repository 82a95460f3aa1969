"""Attack: naming another group's file in a spelling the owner check did not read (real mitmdump,
the fake Gemini, raw bytes on the wire). Each is 404 NOT_FOUND and nothing reaches the fake;
the owner's plain requests still go through."""

from __future__ import annotations

import json
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
