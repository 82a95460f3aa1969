"""Resource names from requests and answers, owners, and a tenant's listing across projects."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool import listing, resources
from gemini_pool.owners import KIND_OWNER, Owners
from gemini_pool.pins import KIND_RESOURCE, Pin, ResourcePins

NOW = 1_800_000_000.0
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"


def test_a_path_names_its_resource() -> None:
    assert resources.path_name("/v1beta/files/abc") == "files/abc"
    assert resources.path_name("/v1/files/abc:download") == "files/abc"
    assert resources.path_name("/download/v1beta/files/abc:download") == "files/abc"
    assert resources.path_name("/v1beta/batches/b1:cancel") == "batches/b1"
    assert resources.path_name("/v1beta/tunedModels/t1/operations/o1") == "tunedModels/t1"
    assert resources.path_name("/v1beta/cachedContents/c1") == "cachedContents/c1"
    for path in ("/v1beta/files", "/v1beta/models/gemini-2.5-flash", "/x/v1beta/files/a", GEN):
        assert resources.path_name(path) is None
    assert resources.path_name("/v1beta/files/a.b") is None  # not a name the API has


def test_list_calls() -> None:
    assert resources.list_kind("GET", "/v1beta/files") == "files"
    assert resources.list_kind("GET", "/v1/cachedContents/") == "cachedContents"
    assert resources.list_kind("GET", "/v1beta/batches") == "batches"
    assert resources.list_kind("POST", "/v1beta/files") is None
    assert resources.list_kind("GET", "/v1beta/files/abc") is None
    assert resources.list_kind("GET", "/upload/v1beta/files") is None


def test_a_request_names_resources_in_its_path_and_where_gemini_reads_the_body() -> None:
    body = json.dumps(
        {
            "contents": [{"parts": [{"fileData": {"fileUri": "https://x/v1beta/files/f2"}}]}],
            "cachedContent": "cachedContents/c1",
            "batch": {"inputConfig": {"fileName": "files/f3"}},
            "note": "files/not-a-reference",
        }
    ).encode()
    assert resources.named("/v1beta/files/f1", body) == [
        "files/f1",  # the path first, then the body in order
        "files/f2",
        "cachedContents/c1",
        "files/f3",
    ]


def test_an_answer_names_what_it_created_by_its_own_names_only() -> None:
    upload = b'{"file": {"name": "files/new", "displayName": "files/victim", "uri": "files/x"}}'
    assert resources.created(upload) == {"files/new": None}
    cache = b'{"name": "cachedContents/c9", "displayName": "cachedContents/other",'
    cache += b' "expireTime": "2027-01-15T08:00:00Z"}'
    assert list(resources.created(cache)) == ["cachedContents/c9"]
    batch = b'{"name": "batches/b1", "metadata": {"name": "batches/b1", "displayName": "files/v"}}'
    assert resources.created(batch) == {"batches/b1": None}
    tuned = (
        b'{"name": "tunedModels/t1/operations/o1", "metadata": {"tunedModel": "tunedModels/t1"}}'
    )
    assert resources.created(tuned) == {"tunedModels/t1": None}
    assert resources.created(b"not json") == {} and resources.created(b"[1]") == {}
    listed = (
        b'{"files": [{"name": "files/a", "displayName": "files/victim"}, {"name": 3}, "files/b"]}'
    )
    assert resources.listed(listed, "files") == {"files/a": None}
    assert resources.listed(b'{"operations": [{"name": "batches/b"}]}', "batches") == {
        "batches/b": None
    }


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_hostile_answers_never_raise_and_yield_only_names(body: bytes) -> None:
    for names in (resources.created(body), resources.listed(body, "files")):
        assert all(resources.root(n) == n for n in names)


def test_owners_expire_persist_as_pins_and_are_forgotten_everywhere() -> None:
    emitted: list[Pin] = []
    pins = ResourcePins(on_pin=emitted.append)
    owners = Owners(pins)
    owners.set("files/a", "team-a", NOW + 10)
    assert owners.group_of("files/a", NOW) == "team-a"
    assert owners.group_of("files/a", NOW + 11) is None  # expired with the resource
    owners.set("files/b", "team-a", NOW + 100)
    assert owners.names_of("team-a", "files/", NOW) == ["files/b"]
    assert emitted[-1] == Pin(KIND_OWNER, "files/b", "team-a", "", NOW + 100)
    # another worker (or the store) hears of it through the pins
    other = Owners(ResourcePins())
    assert other.resource_pins.restore(pins.all_pins(NOW), NOW) == 1
    assert other.group_of("files/b", NOW) == "team-a"
    owners.forget("files/b", NOW + 1)
    assert emitted[-1].expires == NOW + 1  # an ended pin: the store and Redis drop it
    other.resource_pins.restore([emitted[-1]], NOW + 2)
    assert other.group_of("files/b", NOW + 2) is None
    # uploads: the group that started one owns what it creates
    owners.upload_started("up-1", "team-b", NOW + 50)
    assert owners.upload_group("up-1", NOW) == "team-b"
    assert not any("up-1" in p.name for p in emitted)  # the upload_id itself is never kept


def test_a_deleted_resource_is_forgotten_by_other_workers_too() -> None:
    emitted: list[Pin] = []
    pins = ResourcePins(on_pin=emitted.append)
    pins.remember({"files/a": None}, "p1", NOW)
    other = ResourcePins()
    other.restore(pins.all_pins(NOW), NOW)
    pins.forget("files/a", NOW + 1)
    assert emitted[-1] == Pin(KIND_RESOURCE, "files/a", "p1", "", NOW + 1)
    other.restore([emitted[-1]], NOW + 2)
    assert other.project_of("files/a", NOW + 2) is None


def test_a_tenants_listing_walks_its_projects_with_its_own_page_tokens() -> None:
    projects = {"p1": 2, "p2": 1}  # how many of the group's items each project holds
    first = listing.decode("", projects)
    assert first == listing.Page("p1", "")
    answer = b'{"files": [{"name": "files/a"}, {"name": "files/theirs"}], "nextPageToken": "g2"}'
    found = listing.owned_items(answer, "files", {"files/a", "files/b", "files/c"})
    assert found == ([{"name": "files/a"}], "g2")
    page2 = listing.next_page(first, found[1], len(found[0]), projects)
    assert page2 == listing.Page("p1", "g2", 1)
    doc = json.loads(listing.render("files", found[0], page2))
    assert doc["files"] == [{"name": "files/a"}]
    assert listing.decode(doc["nextPageToken"], projects) == page2
    assert listing.upstream_query("pageSize=5&pageToken=x", page2) == "pageSize=5&pageToken=g2"
    # p1's second item found: on to p2 even though Google has more pages of p1 (others' items)
    assert listing.next_page(page2, "g3", 1, projects) == listing.Page("p2", "")
    assert listing.next_page(listing.Page("p2", ""), "g9", 1, projects) is None
    assert json.loads(listing.render("files", [], None)) == {}  # no items, no next page
    assert listing.owned_items(b"[1]", "files", set()) is None
    # tokens naming a project outside the caller's own, or not ours at all, are refused
    assert listing.decode(listing.encode(listing.Page("p9", "")), projects) is None
    for bad in ("gp1.!!!", "gp1." + "A" * 5000, "abc", "gp1.W10", "gp1.WyJwMSIsIiIsdHJ1ZV0"):
        assert listing.decode(bad, projects) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_page_token_decodes_to_a_project_of_the_caller_or_nothing(token: str) -> None:
    page = listing.decode(token, {"p1": 1, "p2": 3})
    assert page is None or page.project in ("p1", "p2")


def test_a_models_long_running_operation_is_a_resource_of_its_own() -> None:
    """A video generation (predictLongRunning) answers with models/X/operations/Y: created, owned,
    named by a path like any other resource; the model's list of operations is every group's."""
    op = "models/veo-3.0-generate-001/operations/abc123"
    assert resources.created(json.dumps({"name": op, "done": False}).encode()) == {op: None}
    assert resources.path_name(f"/v1beta/{op}") == op
    assert resources.named(f"/v1beta/{op}", b"") == [op]
    assert resources.root(op) == op
    for method, path in (
        ("GET", "/v1beta/models/veo-3.0-generate-001/operations"),
        ("GET", "/v1beta/models/veo-3.0-generate-001/operations:list"),
    ):
        assert resources.collection_refused(method, path), path
    assert not resources.collection_refused("GET", f"/v1beta/{op}")  # the owner check's
    assert not resources.collection_refused(
        "POST", "/v1beta/models/veo-3.0-generate-001:predictLongRunning"
    )
