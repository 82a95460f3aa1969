"""The gate: who the caller is and whether a flow may go upstream. Examples, then properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool.gate import Admit, Arrival, Gate, Refuse, Target, digest
from gemini_pool.routing import Api, query_credentials

GOOGLE = Target("https", "generativelanguage.googleapis.com", 443)
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
TOKENS = {"tok-web": "web", "tok-batch": "batch"}


def gate(clients: dict[str, str] | None = None, uploads: dict[str, str] | None = None) -> Gate:
    ups = uploads or {}

    def lookup(upload_id: str, method: str, path: str, now: float) -> str | None:
        return (
            ups.get(upload_id)
            if method in ("POST", "PUT") and path.startswith("/upload/")
            else None
        )

    return Gate({digest(t): n for t, n in (clients or {}).items()}, 1000, lookup)


def arrive(
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str = GEN,
    query: str = "",
    peer: str = "127.0.0.1",
    listener: Target | None = GOOGLE,
    destination: Target = GOOGLE,
    method: str = "POST",
    **kw: Any,
) -> Arrival:
    fields = tuple(headers if headers is not None else [(b"host", b"127.0.0.1:8080")])
    return Arrival(method, path, query, fields, peer, listener, destination, **kw)


def refused(d: Admit | Refuse, status: int, reason: str) -> bool:
    return isinstance(d, Refuse) and (d.status, d.reason) == (status, reason)


# ---------------------------------------------------------------- with client tokens


@pytest.mark.parametrize(
    ("headers", "query", "reason"),
    [
        ([(b"x-goog-api-key", b"\xff")], "", "invalid_token"),
        ([(b"authorization", b"Bearer \xfe\xff")], "", "invalid_token"),
        ([(b"x-goog-api-key", b"tok-web\xff")], "", "invalid_token"),
        ([(b"x-goog-api-key", b"tok-web")], "key=%FF", "invalid_token"),
        ([(b"authorization", b"Basic dG9rLXdlYg==")], "", "invalid_token"),
        (
            [(b"x-goog-api-key", b"tok-web"), (b"x-goog-api-key", b"tok-batch")],
            "",
            "conflicting_tokens",
        ),
        ([(b"x-goog-api-key", b"tok-web")], "key=tok-batch", "conflicting_tokens"),
        ([(b"authorization", b"Bearer tok-web")], "%6Bey=tok-batch", "conflicting_tokens"),
        ([], "", "missing_token"),
        ([(b"x-goog-api-key", b"")], "", "invalid_token"),
        ([(b"x-goog-api-key", b"nope")], "", "invalid_token"),
        ([(b"x-goog-api-key", b"x" * 5000)], "", "invalid_token"),
    ],
)
def test_odd_or_conflicting_credentials_are_refused(
    headers: list[tuple[bytes, bytes]], query: str, reason: str
) -> None:
    d = gate(TOKENS).decide(arrive(headers, query=query), 0)
    assert refused(d, 401, reason), d


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([(b"x-goog-api-key", b"tok-web")], ""),
        ([(b"X-Goog-Api-Key", b"  tok-web ")], ""),
        ([(b"authorization", b"bearer tok-web")], ""),
        ([], "key=tok-web&alt=sse"),
        ([], "%6Bey=tok-web"),
        ([(b"x-goog-api-key", b"tok-web"), (b"authorization", b"Bearer tok-web")], "key=tok-web"),
    ],
)
def test_a_known_token_in_any_slot_is_admitted(
    headers: list[tuple[bytes, bytes]], query: str
) -> None:
    d = gate(TOKENS).decide(arrive(headers, query=query, peer="10.1.2.3"), 0)
    assert isinstance(d, Admit) and d.client == "web" and "tok-web" not in d.query


def test_the_query_loses_every_credential_and_keeps_the_rest_verbatim() -> None:
    d = gate(TOKENS).decide(arrive([], query="alt=sse&%6Bey=tok-web&access_token=x&p=%2F"), 0)
    assert isinstance(d, Admit) and d.query == "alt=sse&p=%2F"


def test_bearer_only_decides_what_v1_models_means() -> None:
    openai = gate(TOKENS).decide(arrive([(b"authorization", b"Bearer tok-web")], "/v1/models"), 0)
    native = gate(TOKENS).decide(arrive([(b"x-goog-api-key", b"tok-web")], "/v1/models"), 0)
    assert isinstance(openai, Admit) and openai.api is Api.OPENAI and openai.bearer_only
    assert isinstance(native, Admit) and native.api is Api.NATIVE


def test_an_upload_id_is_a_credential_only_for_its_own_session() -> None:
    g = gate(TOKENS, uploads={"up1": "alpha"})
    ok = g.decide(arrive([], "/upload/v1beta/files", "upload_id=up1&upload_protocol=resumable"), 0)
    assert isinstance(ok, Admit) and ok.client == "upload" and ok.upload_key == "alpha"
    d = g.decide(arrive([], GEN, "upload_id=up1"), 0)  # not an upload: a caller without a token
    assert refused(d, 401, "missing_token")
    d = g.decide(arrive([], "/upload/v1beta/files", "upload_id=up1", method="GET"), 0)
    assert refused(d, 404, "upload_not_found")  # the session's own path, but not its method
    assert refused(
        g.decide(arrive([], "/upload/v1beta/files", "upload_id=zz"), 0), 404, "upload_not_found"
    )


def test_unknown_paths_and_huge_bodies_are_refused_at_the_head() -> None:
    auth = (b"x-goog-api-key", b"tok-web")
    assert refused(gate(TOKENS).decide(arrive([auth], "/admin/keys"), 0), 404, "unknown_path")
    big = gate(TOKENS).decide(arrive([auth, (b"content-length", b"1001")]), 0)
    assert refused(big, 413, "request_too_large") and isinstance(big, Refuse) and big.body_expected
    two = [auth, (b"content-length", b"5"), (b"content-length", b"6")]
    assert refused(gate(TOKENS).decide(arrive(two), 0), 400, "bad_request")
    # the unauthenticated are refused before anything about the path or the body is said
    assert refused(gate(TOKENS).decide(arrive([], "/admin/keys"), 0), 401, "missing_token")


# ---------------------------------------------------------------- destinations


def test_keys_go_only_to_the_listeners_upstream() -> None:
    auth = [(b"x-goog-api-key", b"tok-web")]
    evil = Target("https", "evil.example", 443)
    assert refused(
        gate(TOKENS).decide(arrive(auth, listener=None, destination=evil), 0),
        403,
        "destination_not_allowed",
    )
    assert refused(
        gate(TOKENS).decide(arrive(auth, destination=evil), 0), 403, "destination_not_allowed"
    )
    assert refused(gate().decide(arrive(listener=None), 0), 403, "destination_not_allowed")


# ---------------------------------------------------------------- loopback-only mode


@pytest.mark.parametrize(
    ("headers", "peer", "reason"),
    [
        ([(b"host", b"127.0.0.1:8080")], "10.0.0.5", "no_clients_configured"),
        ([(b"host", b"evil.example:8080")], "127.0.0.1", "foreign_host"),
        ([(b"host", b"127.0.0.1.evil.example")], "127.0.0.1", "foreign_host"),
        ([(b"host", b"localhost"), (b"host", b"evil.example")], "127.0.0.1", "foreign_host"),
        (
            [(b"host", b"localhost"), (b"origin", b"https://evil.example")],
            "127.0.0.1",
            "cross_site_request",
        ),
        ([(b"host", b"localhost"), (b"origin", b"null")], "127.0.0.1", "cross_site_request"),
        (
            [(b"host", b"localhost"), (b"sec-fetch-site", b"cross-site")],
            "::1",
            "cross_site_request",
        ),
    ],
)
def test_without_clients_only_this_machine_and_no_web_page(
    headers: list[tuple[bytes, bytes]], peer: str, reason: str
) -> None:
    d = gate().decide(arrive(headers, peer=peer), 0)
    assert refused(d, 403, reason), d


@pytest.mark.parametrize(
    ("headers", "peer"),
    [
        ([(b"host", b"127.0.0.1:8080")], "127.0.0.1"),
        ([(b"host", b"localhost:8080"), (b"x-goog-api-key", b"\xff anything")], "::1"),
        ([(b"host", b"[::1]:8080"), (b"origin", b"http://localhost:3000")], "::ffff:127.0.0.1"),
        ([(b"host", b"LOCALHOST.")], "127.0.0.2"),
        ([], "127.0.0.1"),  # HTTP/1.0 without Host
    ],
)
def test_without_clients_loopback_callers_are_served(
    headers: list[tuple[bytes, bytes]], peer: str
) -> None:
    d = gate().decide(arrive(headers, peer=peer), 0)
    assert isinstance(d, Admit) and d.client == "local"


def test_an_http2_authority_counts_as_the_host() -> None:
    d = gate().decide(arrive([], authority="evil.example"), 0)
    assert refused(d, 403, "foreign_host")


# ---------------------------------------------------------------- properties

header_names = st.sampled_from(
    [
        b"x-goog-api-key",
        b"authorization",
        b"host",
        b"origin",
        b"content-length",
        b"transfer-encoding",
        b"sec-fetch-site",
        b"X-Goog-Api-Key",
        b"cookie",
        b"x-other",
    ]
)
header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"tok-web", b"Bearer tok-web", b"bearer  tok-batch", b"localhost", b"5", b"-1"]
    ),
)
queries = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.tuples(
            st.sampled_from(["key", "%6Bey", "KEY", "upload_id", "alt", "access_token", "k%65y"]),
            st.sampled_from(["tok-web", "tok-batch", "%FF", "", "up1", "sse", "a%00b"]),
        ),
        max_size=4,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)),
)
paths = st.one_of(
    st.sampled_from([GEN, "/v1/chat/completions", "/v1/models", "/upload/v1beta/files", "/x"]),
    st.text(max_size=40),
)
peers = st.sampled_from(
    ["127.0.0.1", "::1", "10.0.0.1", "", "not-an-ip", "::ffff:127.0.0.1", "fe80::1%eth0"]
)
arrivals = st.builds(
    arrive,
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    path=paths,
    query=queries,
    peer=peers,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "\udcff"]),
    authority=st.one_of(st.just(""), st.text(max_size=20)),
)


@settings(max_examples=400, deadline=None)
@given(arrivals, st.booleans())
def test_any_request_gets_a_verdict_never_an_exception(a: Arrival, with_clients: bool) -> None:
    d = gate(TOKENS if with_clients else None, uploads={"up1": "alpha"}).decide(a, 0)
    assert isinstance(d, Admit | Refuse)
    if isinstance(d, Refuse):
        assert 400 <= d.status < 500 and d.message
    else:
        assert d.client  # never an admitted flow without a client
        assert d.upstream == GOOGLE


@settings(max_examples=400, deadline=None)
@given(arrivals)
def test_with_clients_an_admitted_caller_presented_exactly_one_known_token_or_its_upload(
    a: Arrival,
) -> None:
    d = gate(TOKENS, uploads={"up1": "alpha"}).decide(a, 0)
    if isinstance(d, Admit):
        assert d.client in ("web", "batch") or (d.client == "upload" and d.upload_key == "alpha")
        left = query_credentials(d.query)  # no credential parameter goes further
        assert left.keys == () and not left.malformed and left.query == d.query


@settings(max_examples=300, deadline=None)
@given(arrivals)
def test_without_clients_only_loopback_is_ever_admitted(a: Arrival) -> None:
    d = gate().decide(a, 0)
    if isinstance(d, Admit):
        assert a.peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        arrive,
        destination=st.builds(
            Target, st.sampled_from(["http", "https"]), st.text(max_size=12), st.integers(0, 70000)
        ),
    )
)
def test_no_destination_but_the_upstream_is_ever_admitted(a: Arrival) -> None:
    d = gate(TOKENS).decide(a, 0)
    assert isinstance(d, Refuse) or a.destination == GOOGLE


def test_what_raises_inside_is_a_refusal() -> None:
    g = gate(TOKENS)

    def boom(*_: Any) -> str | None:
        raise RuntimeError("lookup failed")

    g.upload_lookup = boom
    d = g.decide(arrive([(b"x-goog-api-key", b"tok-web")], query="upload_id=x"), 0)
    assert (
        refused(d, 401, "invalid_token")
        and isinstance(d, Refuse)
        and "lookup failed" in (d.error or "")
    )


@pytest.mark.parametrize(
    "name", [b"x-goog-api-key ", b" x-goog-api-key", b"x-goog-api-key\x00", b"", b"a b", b"\xff"]
)
def test_a_header_name_that_is_no_http_token_is_refused(name: bytes) -> None:
    """mitmproxy keeps `x-goog-api-key : tok`; guessing what it means would be failing open."""
    for clients in (TOKENS, None):
        d = gate(clients).decide(arrive([(b"host", b"localhost"), (name, b"tok-web")]), 0)
        assert refused(d, 400, "bad_request"), (name, d)


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("/models/gemini-2.5-flash:generateContent", "add /v1beta to the base URL"),
        ("/chat/completions", "base_url=http://HOST:PORT/v1"),
        ("/admin", "the proxy serves Gemini's"),
    ],
)
def test_an_unknown_path_says_what_to_add(path: str, hint: str) -> None:
    d = gate().decide(arrive(path=path), 0)
    assert refused(d, 404, "unknown_path") and isinstance(d, Refuse) and hint in d.message


def test_folded_or_smuggled_header_values_are_refused() -> None:
    for value in (b"a\r\n  x-goog-api-key: tok-web", b"tok-web\x00", b"a\nb"):
        d = gate(TOKENS).decide(arrive([(b"x-goog-api-key", b"tok-web"), (b"x-other", value)]), 0)
        assert refused(d, 400, "bad_request"), value


def test_a_credential_hidden_behind_a_semicolon_is_not_passed_on() -> None:
    d = gate(TOKENS).decide(arrive([(b"x-goog-api-key", b"tok-web")], query="x=1;key=tok-web"), 0)
    assert refused(d, 401, "invalid_token")
    d = gate().decide(arrive(query="alt=sse&x=1;KEY=zz"), 0)
    assert isinstance(d, Admit) and d.query == "alt=sse"


def test_a_page_on_another_localhost_port_is_same_site() -> None:
    h = [(b"host", b"localhost:8080"), (b"origin", b"http://localhost:3000")]
    assert isinstance(gate().decide(arrive([*h, (b"sec-fetch-site", b"same-site")]), 0), Admit)


def test_a_flow_replayed_from_mitmweb_carries_the_upstreams_host_and_is_served() -> None:
    host = [(b"host", b"generativelanguage.googleapis.com")]
    assert isinstance(gate().decide(arrive(host), 0), Admit)
    assert refused(gate().decide(arrive([(b"host", b"googleapis.com")]), 0), 403, "foreign_host")
