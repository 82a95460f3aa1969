"""Credential- and billing-bearing system parameters, in every spelling, never survive the query.

Google takes its system parameters plain or `$`-prefixed, camelCase or snake_case, and decodes
percent-encoded names. Whatever spelling a caller picks for `key`, `access_token`,
`oauth_token`, `bearer_token`, `quotaUser` or `userProject`, `query_credentials` drops it; every
other parameter comes out byte for byte, in order.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool.gate import STRIPPED_FIELDS
from gemini_pool.routing import CREDENTIAL_PARAMS, param_name, query_credentials

# every listed name, in both of Google's spellings
BASE_NAMES = sorted(
    {
        *CREDENTIAL_PARAMS,
        "access_token",
        "accessToken",
        "oauth_token",
        "oauthToken",
        "quota_user",
        "user_project",
    }
)


def _encode(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode())


@st.composite
def spellings(draw: st.DrawFn) -> str:
    """One listed name as a caller could spell it: any case, a `$` or `%24` before it, any
    character percent-encoded (once or twice)."""
    name = draw(st.sampled_from(BASE_NAMES))
    out = []
    for c in name:
        c = c.upper() if draw(st.booleans()) else c.lower()
        how = draw(st.sampled_from(["plain", "plain", "once", "twice"]))
        if how == "once":
            c = _encode(c)
        elif how == "twice":
            c = _encode(c).replace("%", "%25")
        out.append(c)
    prefix = draw(st.sampled_from(["", "", "$", "%24", "%2524"]))
    return prefix + "".join(out)


# other parameters: names and values that are not credentials (no `;`, no `&`)
_SAFE = st.text(
    st.characters(codec="ascii", exclude_characters="&;#", min_codepoint=33), max_size=12
)
other_params = st.lists(
    st.tuples(_SAFE, st.one_of(st.none(), _SAFE)).filter(
        lambda p: param_name(p[0]) not in {param_name(n) for n in CREDENTIAL_PARAMS}
    ),
    max_size=5,
).map(lambda ps: [n if v is None else f"{n}={v}" for n, v in ps])


@settings(max_examples=800, deadline=None)
@given(other_params, st.lists(st.tuples(spellings(), _SAFE), min_size=1, max_size=3), st.data())
def test_any_spelling_in_any_position_never_survives_and_the_rest_is_kept_verbatim(
    others: list[str], secrets: list[tuple[str, str]], data: st.DataObject
) -> None:
    parts = list(others)
    for name, value in secrets:
        parts.insert(data.draw(st.integers(0, len(parts))), f"{name}={value}")
    out = query_credentials("&".join(parts))
    assert out.query == "&".join(others)
    kept = out.query.split("&") if out.query else []
    assert not any(
        param_name(p.partition("=")[0]) == param_name(n) for p in kept for n in BASE_NAMES
    )


@given(spellings())
def test_every_spelling_folds_to_a_listed_name(name: str) -> None:
    assert param_name(name) in {param_name(n) for n in CREDENTIAL_PARAMS}


def test_spellings_named_in_the_issue() -> None:
    for name in [
        "key",
        "$key",
        "%24key",
        "%24KEY",
        "$Key",
        "access_token",
        "$access_token",
        "oauth_token",
        "%24oauth_token",
        "$userProject",
        "userProject",
        "%24userproject",
        "quotaUser",
        "$quotaUser",
        "quota_user",
        "%2524key",
        "%6Bey",
    ]:
        out = query_credentials(f"alt=sse&{name}=secret&x=%2F")
        assert out.query == "alt=sse&x=%2F", name
    # `$key` is a key to Google, so it is a client-token slot like `key`
    assert query_credentials("$key=a").keys == ("a",)
    assert query_credentials("%24key=a&key=b").keys == ("a", "b")
    # not a credential: kept
    assert (
        query_credentials("keys=1&monkey=2&userProjects=3").query
        == "keys=1&monkey=2&userProjects=3"
    )


def test_billing_headers_are_stripped() -> None:
    assert {b"x-goog-user-project", b"x-goog-quota-user", b"x-goog-api-key"} <= STRIPPED_FIELDS
