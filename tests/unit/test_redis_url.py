"""`gemini_redis` refuses a password anywhere in the URL, and never repeats it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemini_pool.redis_url import redis_url_problem, shown

SECRET = "s3cr3t-PW"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "redis://127.0.0.1:6379/0",
        "rediss://cache.internal:6380/2",
        "unix:///run/redis.sock?db=1",
        "redis://h/0?socket_timeout=2&health_check_interval=5",
        "redis://h/0?passwords_are_elsewhere",  # not a credential parameter
    ],
)
def test_urls_without_a_credential_pass(url: str) -> None:
    assert redis_url_problem(url) is None


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@h:6379/0",
        f"redis://user:{SECRET}@h/0",
        f"redis://h/0?password={SECRET}",
        f"redis://h/0?PASSWORD={SECRET}",
        f"redis://h/0?Password={SECRET}",
        f"redis://h/0?db=0&password={SECRET}",
        f"redis://h/0?%70assword={SECRET}",
        f"redis://h/0?%2570assword={SECRET}",
        f"redis://h/0?pass%77ord={SECRET}",
        f"redis://h/0?x=1;password={SECRET}",
        "redis://h/0?username=admin&db=0",
        f"unix:///run/redis.sock?password={SECRET}",
        f"rediss://h/0?password={SECRET}#frag",
        f"redis://h/0 ?password={SECRET}",
        "http://h:6379/0",
        "redis://h/0\x01",
    ],
)
def test_a_credential_anywhere_is_refused_without_repeating_it(url: str) -> None:
    problem = redis_url_problem(url)
    assert problem is not None and SECRET not in problem and "GEMINI_REDIS_PASSWORD" in problem


@st.composite
def password_names(draw: st.DrawFn) -> str:
    out = []
    for c in "password":
        c = c.upper() if draw(st.booleans()) else c
        if draw(st.booleans()):
            c = f"%{ord(c):02X}"
        out.append(c)
    return "".join(out)


@given(
    password_names(),
    st.lists(st.sampled_from(["db=0", "socket_timeout=1", "x", "ssl_cert_reqs=none"]), max_size=3),
    st.integers(0, 3),
    st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=20),
)
def test_any_spelling_of_password_in_any_position_is_refused(
    name: str, others: list[str], at: int, value: str
) -> None:
    params = list(others)
    params.insert(min(at, len(params)), f"{name}={value}")
    problem = redis_url_problem("redis://127.0.0.1:6379/0?" + "&".join(params))
    assert problem is not None
    assert f"={value}" not in problem


@given(st.text(max_size=80))
def test_never_raises_and_never_shows_a_query(url: str) -> None:
    problem = redis_url_problem(url)
    assert problem is None or "?" not in problem.partition("got ")[2]
    assert "?" not in shown(url) and "@" not in shown(url)
