"""Clients are tenants: each sees and uses only its own group's files and caches (real mitmdump,
the fake Gemini keeping resources per project, the google-genai SDK and raw HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

from ..conftest import Fake, Proxy, key_entry, new_secret, wait_for
from .test_workers import RedisServer, workers

FLASH = "gemini-2.5-flash"
CLIENTS = [
    {"name": "alice", "token": "tok-alice-1", "group": "team-a"},
    {"name": "carol", "token": "tok-carol-1", "group": "team-a"},
    {"name": "bob", "token": "tok-bob-1"},
]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def sdk(proxy: Proxy, token: str) -> genai.Client:
    return genai.Client(
        api_key=token, http_options=types.HttpOptions(base_url=proxy.url, api_version="v1beta")
    )


def two_projects(fake: Fake) -> list[dict[str, Any]]:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    return [key_entry("a", a, project="p1"), key_entry("b", b, project="p2")]


def upload(client: genai.Client, tmp_path: Path, display: str = "doc") -> types.File:
    doc = tmp_path / f"{display.replace('/', '_')}.txt"
    doc.write_text("hello")
    return client.files.upload(file=str(doc), config=types.UploadFileConfig(display_name=display))


def native(proxy: Proxy, token: str, method: str, path: str, **kw: Any) -> Any:
    return proxy.http.request(method, path, headers={"x-goog-api-key": token}, **kw)


def test_a_client_cannot_get_use_list_or_delete_another_groups_file(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    alice, carol, bob = (sdk(proxy, c["token"]) for c in CLIENTS)
    mine = upload(alice, tmp_path)
    assert mine.name and mine.uri
    before = len(fake.log())
    # bob: get, delete, use in a generate body, download, list: as if it did not exist
    with pytest.raises(errors.ClientError) as e:
        bob.files.get(name=mine.name)
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"
    with pytest.raises(errors.ClientError) as e:
        bob.files.delete(name=mine.name)
    assert e.value.code == 404
    part = types.Part.from_uri(file_uri=mine.uri, mime_type="text/plain")
    with pytest.raises(errors.ClientError) as e:
        bob.models.generate_content(model=FLASH, contents=[part, "describe"])
    assert e.value.code == 404
    r = native(proxy, "tok-bob-1", "GET", f"/v1beta/{mine.name}:download", params={"alt": "media"})
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    assert list(bob.files.list()) == []
    assert len(fake.log()) == before  # nothing of bob's reached Google for alice's file
    # alice and carol (same group) go on: get, use, list, on the file's own project
    for client in (alice, carol):
        assert client.files.get(name=mine.name).name == mine.name
        assert client.models.generate_content(model=FLASH, contents=[part, "describe"]).text
        assert [f.name for f in client.files.list()] == [mine.name]
    assert all(e["status"] == 200 for e in fake.log()[before:])
    # a file the proxy never saw created is nobody's: refused until an operator hands it over
    r = native(proxy, "tok-alice-1", "GET", "/v1beta/files/neverseen")
    assert r.status_code == 404
    handed = proxy.admin.post("/admin/resources", json={"name": "files/neverseen", "client": "bob"})
    assert handed.status_code == 200 and handed.json()["group"] == "client:bob"
    r = native(proxy, "tok-bob-1", "GET", "/v1beta/files/neverseen")
    assert r.status_code == 403 and "x-gemini-proxy-key" in r.headers  # Google's own answer
    # the owner deletes it: gone for everyone
    alice.files.delete(name=mine.name)
    with pytest.raises(errors.ClientError) as e:
        carol.files.get(name=mine.name)
    assert e.value.code == 404
    proxy.assert_no_secrets()


def test_a_look_alike_display_name_moves_no_pin(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    alice, bob = sdk(proxy, "tok-alice-1"), sdk(proxy, "tok-bob-1")
    victim = upload(alice, tmp_path)
    assert victim.name
    for i in range(4):  # whichever project serves bob's uploads, alice's file stays where it is
        trick = upload(bob, tmp_path, display=victim.name)
        assert trick.display_name == victim.name and trick.name != victim.name, i
    for _ in range(4):
        assert alice.files.get(name=victim.name).name == victim.name
    assert [f.name for f in alice.files.list()] == [victim.name]


def test_listing_pages_across_projects(fake: Fake, make_proxy: Any, tmp_path: Path) -> None:
    proxy = make_proxy(two_projects(fake), clients=CLIENTS)
    alice, bob = sdk(proxy, "tok-alice-1"), sdk(proxy, "tok-bob-1")
    names = {upload(alice, tmp_path, display=f"a{i}").name for i in range(5)}
    theirs = {upload(bob, tmp_path, display=f"b{i}").name for i in range(3)}
    projects = {e["key"] for e in fake.log() if e.get("upload")}
    assert len(projects) == 2  # round robin spread them over both projects
    seen = [f.name for f in alice.files.list(config=types.ListFilesConfig(page_size=2))]
    assert sorted(seen) == sorted(names)  # every page, both projects, nothing of bob's
    assert {f.name for f in bob.files.list(config=types.ListFilesConfig(page_size=1))} == theirs
    r = native(proxy, "tok-alice-1", "GET", "/v1beta/files", params={"pageToken": "forged"})
    assert r.status_code == 400


def test_ownership_survives_a_restart_and_is_shared_by_workers(
    fake: Fake,
    make_proxy: Any,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    keys = two_projects(fake)
    w1, w2 = workers(make_proxy, redis, keys, n=2)
    for w in (w1, w2):
        w.write_keys(keys, CLIENTS)
    for w in (w1, w2):
        wait_for(lambda w=w: native(w, "nobody", "GET", "/v1beta/models").status_code == 401)
        wait_for(lambda w=w: w.admin.get("/readyz").json()["shared_state"]["up"])
    mine = upload(sdk(w1, "tok-alice-1"), tmp_path)
    assert mine.name
    # the other worker knows the owner (Redis): bob refused, carol served
    wait_for(lambda: native(w2, "tok-carol-1", "GET", f"/v1beta/{mine.name}").status_code == 200)
    assert native(w2, "tok-bob-1", "GET", f"/v1beta/{mine.name}").status_code == 404
    # and after a restart (SQLite) too, with Redis gone
    redis.stop()
    w1.restart()
    assert native(w1, "tok-carol-1", "GET", f"/v1beta/{mine.name}").status_code == 200
    assert native(w1, "tok-bob-1", "GET", f"/v1beta/{mine.name}").status_code == 404
