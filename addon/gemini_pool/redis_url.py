"""The `gemini_redis` option checked before anything connects. Pure logic: a string in, a reason out.

The password never comes from the URL (mitmweb shows options to its users, and the URL is logged
as "shared state on …"): neither before `@` nor in the query, where redis-py would also take it
(`redis://h/0?password=…`, any letter case, the name percent-encoded or not). It comes from
$GEMINI_REDIS_PASSWORD.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

_SHAPE = re.compile(r"(rediss?|unix)://[^\s@]+")
# query parameters that carry a credential to redis-py (it turns every parameter into a
# connection argument)
_SECRET_PARAMS = frozenset({"password", "username", "user", "auth", "pass", "credential"})


def shown(url: str) -> str:
    """The URL as it may be shown: no userinfo, no query."""
    return url.split("@")[-1].split("?")[0].split("#")[0]


def _folded(name: str) -> str:
    for _ in range(8):  # decoded until it stops changing (`%2570assword`)
        decoded = unquote_plus(name, errors="replace")
        if decoded == name:
            break
        name = decoded
    return name.strip().lower().replace("_", "").replace("-", "")


def redis_url_problem(url: str) -> str | None:
    """Why `url` cannot be `gemini_redis` (None: it can). The answer never repeats a secret."""
    url = url.strip()
    if not url:
        return None
    if not _SHAPE.fullmatch(url) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return (
            "gemini_redis must be redis://HOST:PORT/DB or rediss://... without a password "
            f"(give it in $GEMINI_REDIS_PASSWORD), got {shown(url)!r}"
        )
    _, _, query = url.partition("?")
    query = query.partition("#")[0]
    for part in re.split(r"[&;]", query):
        name = _folded(part.partition("=")[0])
        if name in _SECRET_PARAMS:
            return (
                f"gemini_redis must not carry a credential in its query ({name}=…): give the "
                f"password in $GEMINI_REDIS_PASSWORD, got {shown(url)!r}"
            )
    return None
