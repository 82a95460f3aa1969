"""Properties of the owner checks (issue 19): any path or body naming a resource resolves to its
owner or is refused, and never raises.

Group A owns files/abc and cachedContents/c1. Whatever spelling of them a caller of group B
sends (percent-encoding, upper case, doubled or trailing slashes, escaped JSON, full URLs,
duplicate keys, names buried deep or behind many other keys), the request is either refused by
routing (nothing goes upstream) or reported foreign for B by `Ownership.foreign`: the pipeline
then answers 404 and sends nothing upstream.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemini_pool import resources
from gemini_pool.owners import Owners
from gemini_pool.ownership import Ownership
from gemini_pool.pins import ResourcePins
from gemini_pool.routing import Api, Route, RouteError, route

NOW = 1_800_000_000.0
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
A_NAMES = ("files/abc", "cachedContents/c1")
ANY_CHAR = st.characters(exclude_categories=[])
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def checks() -> Ownership:
    owners = Owners(ResourcePins())
    for name in A_NAMES:
        owners.set(name, "A", NOW + 3600)
    owners.set("files/bee", "B", NOW + 3600)
    return Ownership(cast(Any, SimpleNamespace(owners=owners)))


def routed(method: str, path: str, body: bytes) -> Route | None:
    """The route a request takes upstream, None when routing refuses it (nothing upstream)."""
    path, _, query = path.partition("?")
    try:
        return route(method, path, query, False, body)
    except RouteError:
        return None


def refused_for_b(method: str, path: str, body: bytes) -> bool:
    r = routed(method, path, body)
    return r is None or checks().foreign(r, body, "B", NOW) is not None


# ------------------------------------------------------------------ never raises


@PROPS
@given(st.text(ANY_CHAR, max_size=300), st.binary(max_size=600))
def test_named_and_foreign_never_raise_on_anything(path: str, body: bytes) -> None:
    names = resources.named(path, body)
    assert len(names) <= resources.MAX_NAMED + 1
    assert all(n == resources.UNREADABLE or resources.root(n) == n for n in names)
    resources.path_name(path)
    resources.list_kind("GET", path)
    resources.root(path)
    r = Route(Api.NATIVE, path, "", None, None, False)
    for group in ("A", "B", ""):
        checks().foreign(r, body, group, NOW)


@PROPS
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(ANY_CHAR, max_size=40),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "name",
                        "file",
                        "metadata",
                        "tunedModel",
                        "expireTime",
                        "files",
                        "fileUri",
                        "x",
                    ]
                )
                | st.text(max_size=8),
                inner,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
def test_answers_of_any_shape_yield_canonical_names_only(doc: Any) -> None:
    try:
        raw = json.dumps(doc).encode()
    except ValueError:  # lone surrogates in keys and the like
        return
    for got in (resources.created(raw), resources.listed(raw, "files")):
        assert all(resources.root(n) == n for n in got)


# ------------------------------------------------------------------ a name resolves to its owner


@PROPS
@given(
    st.lists(st.sampled_from([*A_NAMES, "files/bee", "files/nobody", "batches/x"]), max_size=5),
    st.sampled_from(["A", "B", ""]),
)
def test_not_foreign_means_every_name_is_the_groups(names: list[str], group: str) -> None:
    parts = [{"fileData": {"fileUri": n}} if n.startswith("files/") else {"text": n} for n in names]
    body = json.dumps({"contents": [{"parts": parts}], "cachedContent": "cachedContents/c1"})
    r = routed("POST", GEN, body.encode())
    assert r is not None
    o = checks()
    if o.foreign(r, body.encode(), group, NOW) is None:
        for n in resources.named(r.path, body.encode()):
            assert o.service.owners.group_of(n, NOW) == group


# ------------------------------------------------------------------ every spelling of A's names


def _encode_some(text: str, picks: list[bool], twice: bool) -> str:
    out = []
    for ch, pick in zip(text, picks + [False] * len(text), strict=False):
        if pick:
            enc = f"%{ord(ch):02X}"
            out.append(quote(enc, safe="") if twice else enc)
        else:
            out.append(ch)
    return "".join(out)


PREFIXES = ["/v1beta/", "/v1/", "/v1alpha/", "/download/v1beta/", "/upload/v1beta/"]
SUFFIXES = ["", "/", "//", ":download", ":download?alt=media", "?alt=media", "/.", ":x", ";x"]


@st.composite
def path_spellings(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(A_NAMES))
    kind, _, ident = name.partition("/")
    if draw(st.booleans()):
        kind = "".join(c.upper() if draw(st.booleans()) else c for c in kind)
    sep = draw(st.sampled_from(["/", "//", "/./", "%2F", "%2f", "%252F", "/x/../"]))
    text = kind + sep + ident
    picks = draw(st.lists(st.booleans(), max_size=len(text)))
    text = _encode_some(text, picks, draw(st.booleans()))
    lead = draw(st.sampled_from(["", "/", "./", "%2F"]))
    return draw(st.sampled_from(PREFIXES)) + lead + text + draw(st.sampled_from(SUFFIXES))


@PROPS
@given(path_spellings(), st.sampled_from(["GET", "DELETE", "PATCH", "POST"]))
def test_any_path_spelling_of_a_resource_of_a_is_refused_for_b(path: str, method: str) -> None:
    assert refused_for_b(method, path, b""), path


# how a value may point at Google's own resource (a URL of another host is that host's business)
URL_HEADS = [
    "",
    "/",
    "https://generativelanguage.googleapis.com/v1beta/",
    "https://generativelanguage.googleapis.com/v1/",
    "HTTPS://GENERATIVELANGUAGE.GOOGLEAPIS.COM/v1beta/",
    "https://generativelanguage.googleapis.com/upload/v1beta/",
    " ",
]
URL_TAILS = ["", "/", "?alt=media", "#x", ":download", " ", "\n", "%20"]
KEYS = {
    "files": ["fileUri", "file_uri", "fileName", "file_name"],
    "cachedContents": ["cachedContent", "cached_content"],
}


def _escape_json_letters(raw: str, picks: list[bool]) -> str:
    """Write some ASCII letters of a JSON string as \\u escapes (as any JSON encoder may)."""
    out = []
    for ch, pick in zip(raw, picks + [False] * len(raw), strict=False):
        out.append(f"\\u{ord(ch):04x}" if pick and ch.isalpha() else ch)
    return "".join(out)


@st.composite
def body_spellings(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(A_NAMES))
    kind = name.partition("/")[0]
    key = draw(st.sampled_from(KEYS[kind]))
    value = draw(st.sampled_from(URL_HEADS)) + name + draw(st.sampled_from(URL_TAILS))
    if draw(st.booleans()):
        value = value.replace("/", "\\/")
    if draw(st.booleans()):
        value = _escape_json_letters(value, draw(st.lists(st.booleans(), max_size=len(value))))
    if draw(st.booleans()):
        key = _escape_json_letters(key, draw(st.lists(st.booleans(), max_size=len(key))))
    ws = draw(st.sampled_from(["", " ", "\n\t", "  "]))
    item = f'"{key}"{ws}:{ws}"{value}"'
    # before it: nothing, the caller's own file, or many other resource keys
    pad = draw(st.sampled_from([0, 1, 5, 70, 200]))
    own = ", ".join('{"fileData": {"fileUri": "files/bee"}}' for _ in range(pad))
    where = draw(st.sampled_from(["part", "top", "deep", "duplicate"]))
    if where == "part":
        body = (
            f'{{"contents": [{{"parts": [{own}{", " if own else ""}{{"fileData": {{{item}}}}}]}}]}}'
        )
    elif where == "top":
        body = f'{{"contents": [{{"parts": [{own}]}}], {item}}}'
    elif where == "deep":
        body = '{"a": ' * 30 + f"{{{item}}}" + "}" * 30
    else:  # the caller's own name first, A's under the same key after it
        body = f'{{"{key}": "files/bee", {item}}}'
    return body.encode()


@PROPS
@given(body_spellings(), st.sampled_from([GEN, "/v1beta/cachedContents", "/v1beta/batches"]))
def test_any_body_spelling_of_a_resource_of_a_is_refused_for_b(body: bytes, path: str) -> None:
    assert refused_for_b("POST", path, body), body


@PROPS
@given(st.sampled_from(A_NAMES), st.sampled_from(PREFIXES[:3]), st.sampled_from(["", ":download"]))
def test_the_owner_still_gets_its_own_in_the_canonical_spelling(
    name: str, prefix: str, suffix: str
) -> None:
    o = checks()
    r = routed("GET", prefix + name + suffix, b"")
    assert r is not None and o.foreign(r, b"", "A", NOW) is None
    kind = name.split("/")[0]
    body = json.dumps({KEYS[kind][0]: "https://generativelanguage.googleapis.com/v1beta/" + name})
    r = routed("POST", GEN, body.encode())
    assert r is not None and o.foreign(r, body.encode(), "A", NOW) is None


# ------------------------------------------------------------------ what callers send every day


def test_plain_requests_are_read_not_refused() -> None:
    plain_paths = [
        "/v1beta/files",
        "/v1beta/files/",
        "/v1beta/files/abc",
        "/v1beta/files/abc:download",
        "/download/v1beta/files/abc:download",
        "/upload/v1beta/files",
        "/v1beta/cachedContents/c1",
        "/v1beta/batches/b1:cancel",
        "/v1beta/operations/o1",
        "/v1beta/tunedModels/t1:generateContent",
        "/v1beta/tunedModels/t1/operations/o1",
        "/v1beta/models/veo-3.0-generate-preview/operations/op1",  # a video's long-running op
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "/v1beta/openai/chat/completions",
        "/v1beta/openai/models",
    ]
    for path in plain_paths:
        assert resources.UNREADABLE not in resources.named(path, b""), path
    plain_bodies = [
        {"contents": [{"parts": [{"text": "caf\u00e9 \u65e5\u672c"}]}]},  # json.dumps escapes these
        {"contents": [{"parts": [{"text": 'say "\\u0041" literally'}]}]},
        {"contents": [{"parts": [{"fileData": {"fileUri": "https://youtu.be/x"}}]}]},
        {"contents": [{"parts": [{"fileData": {"fileUri": "files/abc"}}] * 10}]},
        {"contents": [{"parts": [{"functionCall": {"args": {"file_name": "docs/files/a.md"}}}]}]},
        {"cachedContent": "cachedContents/c1", "contents": []},
        {"batch": {"inputConfig": {"fileName": "files/abc"}}},
    ]
    for doc in plain_bodies:
        raw = json.dumps(doc).encode()
        assert resources.UNREADABLE not in resources.named(GEN, raw), raw


def test_odd_spellings_name_unreadable() -> None:
    for path in [
        "/v1beta/Files/abc",
        "/v1beta/%66iles/abc",
        "/v1beta/files%2Fabc",
        "/v1beta//files/abc",
        "/v1beta/FILES",
        "/v1beta/models/%252e%252e/files/abc",
        "/v1beta/openai/files/abc",
        "/v1beta/openai/batches",
    ]:
        assert resources.named(path, b"") == [resources.UNREADABLE], path
    # an escaped key is read as the key it spells
    assert resources.named(GEN, b'{"file\\u0055ri": "files/abc"}') == ["files/abc"]
    for raw in [
        b'{"fileUri": "files/abc?alt=media"}',
        b'{"fileUri": "https://generativelanguage.googleapis.com/v1beta/FILES/abc"}',
        b'{"cachedContent": "cachedContents%2Fc1"}',
        b'{"fileUri": "' + b"x" * 5000 + b'"}',
        b'{"parts": [' + b'{"fileUri": "https://youtu.be/x"},' * 70 + b"{}]}",
        b'{"file\\u0055ri": ',  # escaped key, then no JSON at all
    ]:
        assert resources.UNREADABLE in resources.named(GEN, raw), raw
