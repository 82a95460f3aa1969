"""Properties over the pure layers: routing, classify, config, pins, usage, errors, watcher.

Each test states what must hold for every input, hostile ones included (arbitrary bytes, odd
encodings, wrong JSON types, surrogates). The gate has its own properties in test_gate.py.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import tempfile
import zlib
from datetime import datetime, time
from typing import Any
from urllib.parse import unquote, unquote_plus

from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool import resources, routing
from gemini_pool.classify import (
    KEY_REASONS,
    PACIFIC,
    Outcome,
    Verdict,
    classify,
    next_pacific_midnight,
)
from gemini_pool.codings import decoded
from gemini_pool.config import MAX_WEIGHT, NAME_RE, Config, ConfigError, parse_config
from gemini_pool.errors import error_body
from gemini_pool.pins import (
    KIND_RESOURCE,
    MAX_MATCHES,
    Pin,
    ResourcePins,
    body_resource_names,
    parse_rfc3339,
    resource_names,
)
from gemini_pool.routing import CREDENTIAL_PARAMS, Api, RouteError, query_credentials, route
from gemini_pool.usage import UsageTap
from gemini_pool.watcher import FileWatcher

# every character, lone surrogates included (st.text() leaves them out)
ANY_CHAR = st.characters(exclude_categories=[])
SURROGATE = st.characters(categories=["Cs"])
any_text = st.text(ANY_CHAR, max_size=24)
NOW = st.floats(min_value=0, max_value=4_102_444_800)  # 1970 .. 2100

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_any = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


# --- 1, 2: routing and query credentials ---------------------------------------------------------

TRICKY_NAMES = [
    "key",
    "%6Bey",
    "%6b%65%79",
    "KEY",
    "Key",
    "ke%79",
    "key%00",
    "+key",
    "key+",
    "%20key",
    "access_token",
    "ACCESS%5FTOKEN",
    "oauth_token",
    "%6F%61uth_token",
    "alt",
    "pageSize",
    "upload_id",
    "%",
    "%ZZ",
    "k%FFey",
    "key%FF",
    "",
]
TRICKY_VALUES = ["", "sse", "%FF", "%", "&", "=", "a=b", "%26", "+", "%2B", "AIzaSy0", "%C3%A9"]

query_value = st.one_of(
    st.sampled_from(TRICKY_VALUES),
    st.text(SURROGATE, min_size=1, max_size=2),
    any_text,
)
query_name = st.one_of(st.sampled_from(TRICKY_NAMES), any_text)
query_part = st.one_of(
    st.builds(lambda n, v: f"{n}={v}", query_name, query_value),
    query_name,  # a parameter without "="
)
queries = st.one_of(st.lists(query_part, max_size=6).map("&".join), any_text)

PATH_SEGMENTS = [
    "models",
    "tunedModels",
    "gemini-2.5-flash",
    "gemini-2.5-flash:generateContent",
    "gemini-2.5-flash:streamGenerateContent",
    "m:countTokens",
    "files",
    "cachedContents",
    "batches",
    "chat",
    "completions",
    "embeddings",
    "images",
    "generations",
    "abc",
    "",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "%252e",
    "a\\b",
    "%5c",
    "%5C..",
    "%00",
    "%2F..",
    "-x",
    "a" * 130,
    "gemini%2D2.5",
    "é",
]
path_prefix = st.sampled_from(
    ["/v1/", "/v1beta/", "/v1alpha/", "/upload/v1beta/", "/download/", "/v1beta/openai/", "/", ""]
)
paths = st.one_of(
    st.builds(
        lambda prefix, segs: prefix + "/".join(segs),
        path_prefix,
        st.lists(st.one_of(st.sampled_from(PATH_SEGMENTS), any_text), max_size=6),
    ),
    any_text,
)
methods = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "post"]),
    st.text(max_size=8),
)
MODELS = ["gemini-2.5-flash", "models/gemini-2.5-flash", "../x", "a" * 129, "", ".x", "a b", "é"]
openai_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(MODELS), json_any),
        "stream": json_any,
        "messages": json_any,
    },
).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    st.binary(max_size=64), openai_bodies, json_any.map(lambda v: json.dumps(v).encode())
)


def remember(pins: ResourcePins, body: bytes, project: str, now: float | None = None) -> None:
    """What the pipeline pins from an answer: its own names and the names it lists."""
    names = dict(resources.created(body))
    for kind in resources.LISTS:
        names.update(resources.listed(body, kind))
    pins.remember(names, project, now)


def _segments(path: str) -> set[str]:
    return set(path.split("/")) | set(unquote(path).split("/"))


@settings(max_examples=400, deadline=None)
@given(methods, paths, queries, st.booleans(), bodies)
def test_route_is_a_clean_route_or_a_route_error(
    method: str, path: str, query: str, bearer_only: bool, body: bytes
) -> None:
    try:
        r = route(method, path, query, bearer_only, body)
    except RouteError as e:
        assert e.status in (400, 404)
        return
    assert r.model is None or routing.MODEL_ID.fullmatch(r.model)
    again = query_credentials(r.query)
    assert again.keys == () and again.query == r.query and not again.malformed
    assert not {".", ".."} & _segments(r.path)
    assert "\\" not in unquote(r.path)
    assert r.path.startswith((routing.OPENAI_PREFIX, *routing.NATIVE_PREFIXES))
    assert r.path_and_query.startswith("/")
    assert r.api is Api.OPENAI or not r.path.startswith(routing.OPENAI_PREFIX)


def _parts(query: str) -> list[str]:
    return query.split("&") if query else []


def _param_name(part: str) -> str:
    return unquote_plus(part.partition("=")[0], errors="replace").strip().lower()


@settings(max_examples=600, deadline=None)
@given(queries)
def test_query_credentials_removes_every_credential_and_keeps_the_rest_verbatim(query: str) -> None:
    out = query_credentials(query)
    # idempotent: its own output has nothing left to remove
    again = query_credentials(out.query)
    assert again.query == out.query and again.keys == () and not again.malformed
    # what is kept is kept verbatim and in order: a subsequence of the original parameters
    original = iter(query.split("&"))
    assert all(any(kept == part for part in original) for kept in _parts(out.query))
    assert len(out.keys) <= len(query.split("&"))
    # and no kept parameter is a credential, however its name was written
    for part in _parts(out.query):
        assert _param_name(part) not in CREDENTIAL_PARAMS, (query, part)


# --- 3: classify ---------------------------------------------------------------------------------

REASONS = [
    *sorted(KEY_REASONS),
    "CREDENTIALS_MISSING",
    "ACCESS_TOKEN_TYPE_UNSUPPORTED",
    "RATE_LIMIT_EXCEEDED",
    "api_key_invalid",
    "",
]
QUOTA_IDS = [
    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    "GenerateContentInputTokensPerModelPerMinute-FreeTier",
    "PerDay",
    "PerMinute",
    "perday",
    "SomethingElse",
    "",
]
RETRY_DELAYS = [
    "37s",
    "0s",
    "0.5s",
    " 12s ",
    "37",
    "s",
    "-3s",
    "1e3s",
    "37 s",
    "37ms",
    "",
    "9" * 400 + "s",
]
MESSAGES = [
    "API key not valid. Please pass a valid API key.",
    "API Key not found. Please pass a valid API key.",
    "API key expired. Please renew the API key.",
    "Your API key was reported as leaked. Please use another API key.",
    "Permission denied: Consumer 'api_key:AIzaSy0' has been suspended.",
    "You exceeded your current quota. Quota exceeded for metric: x, limit: 0, model: gemini",
    "Your project has exceeded its monthly spending cap.",
    "You do not have permission to access the File abc or it may not exist.",
    "CachedContent not found (or permission denied)",
    "Resource has been exhausted (e.g. check quota).",
    "The model is overloaded. Please try again later.",
    "API keys are not supported by this API.",
    "",
]
STATUSES = ["INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", ""]

error_info = st.fixed_dictionaries(
    {"@type": st.just("type.googleapis.com/google.rpc.ErrorInfo")},
    optional={
        "reason": st.one_of(st.sampled_from(REASONS), st.text(max_size=10), json_any),
        "domain": st.just("googleapis.com"),
        "metadata": json_any,
    },
)
violation = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "quotaId": st.one_of(st.sampled_from(QUOTA_IDS), st.text(max_size=10), json_any),
            "quotaMetric": st.text(max_size=10),
            "quotaValue": json_any,
        },
    ),
    json_any,
)
quota_failure = st.fixed_dictionaries(
    {"@type": st.sampled_from(["type.googleapis.com/google.rpc.QuotaFailure", "QuotaFailure"])},
    optional={"violations": st.one_of(st.lists(violation, max_size=3), json_any)},
)
retry_info = st.fixed_dictionaries(
    {"@type": st.sampled_from(["type.googleapis.com/google.rpc.RetryInfo", "RetryInfo", "x"])},
    optional={
        "retryDelay": st.one_of(
            st.sampled_from(RETRY_DELAYS),
            st.floats(0, 1e6).map(lambda f: f"{f}s"),
            st.text(max_size=8),
            json_any,
        )
    },
)
detail = st.one_of(error_info, quota_failure, retry_info, json_any)
error_obj = st.fixed_dictionaries(
    {},
    optional={
        "code": st.one_of(st.integers(100, 599), json_any),
        "message": st.one_of(st.sampled_from(MESSAGES), st.text(max_size=20), json_any),
        "status": st.one_of(st.sampled_from(STATUSES), json_any),
        "details": st.one_of(st.lists(detail, max_size=4), json_any),
    },
)
error_docs = st.one_of(
    st.fixed_dictionaries({"error": error_obj}),
    st.fixed_dictionaries({"error": json_any}),
    json_any,
)
http_status = st.one_of(
    st.sampled_from([200, 400, 401, 403, 404, 429, 500, 503, 504]), st.integers(100, 599)
)
QUOTA_OUTCOMES = {
    Outcome.QUOTA_MINUTE,
    Outcome.QUOTA_DAY,
    Outcome.MODEL_UNAVAILABLE,
    Outcome.PROJECT_CAPPED,
    Outcome.QUOTA_UNKNOWN,
}
DEAD_PHRASES = ("not valid", "not found", "expired", "leaked", "suspended")


def _error_of(doc: Any) -> dict[str, Any]:
    if isinstance(doc, list) and doc:
        doc = doc[0]
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else {}


def _details(err: dict[str, Any]) -> list[dict[str, Any]]:
    details = err.get("details")
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _key_evidence(err: dict[str, Any]) -> tuple[bool, bool]:
    """(an ErrorInfo reason in KEY_REASONS, a leaked/suspended/expired/not-valid message)."""
    reason = any(
        isinstance(d.get("reason"), str) and d["reason"] in KEY_REASONS for d in _details(err)
    )
    message = str(err.get("message", "")).lower()
    return reason, any(p in message for p in DEAD_PHRASES)


def _day_quota(err: dict[str, Any]) -> bool:
    return any(
        isinstance(v, dict) and isinstance(v.get("quotaId"), str) and "PerDay" in v["quotaId"]
        for d in _details(err)
        for v in (d.get("violations") if isinstance(d.get("violations"), list) else [])
    )


def _check_verdict(status: int, body: bytes, now: float) -> Verdict:
    v = classify(status, body, "gemini-2.5-flash", now)
    assert isinstance(v, Verdict) and isinstance(v.outcome, Outcome)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    err = _error_of(doc)
    by_reason, by_message = _key_evidence(err)
    if v.outcome is Outcome.DEAD_KEY:
        assert status in (400, 401, 403) and (by_reason or by_message), (status, err)
    if status in (400, 401, 403) and by_reason:
        assert v.outcome is Outcome.DEAD_KEY
    if status == 404:
        assert v.outcome is not Outcome.DEAD_KEY
    if 200 <= status < 300:
        assert v.outcome is Outcome.OK
    if status >= 500:
        assert v.outcome is Outcome.TRANSIENT
    if v.outcome in QUOTA_OUTCOMES:
        assert status == 429
        assert v.cooldown_until is not None or v.outcome is Outcome.QUOTA_UNKNOWN
        assert v.cooldown_until is None or v.cooldown_until >= now
    if v.outcome is Outcome.QUOTA_DAY:
        assert v.cooldown_until == next_pacific_midnight(now)
    message = str(err.get("message", ""))
    if (
        status == 429
        and _day_quota(err)
        and "spending cap" not in message.lower()
        and not re.search(r"\blimit: 0\b", message)
    ):
        assert v.outcome is Outcome.QUOTA_DAY
    return v


@settings(max_examples=300, deadline=None)
@given(st.integers(100, 599), st.binary(max_size=128), NOW)
def test_classify_any_bytes_gives_a_verdict(status: int, body: bytes, now: float) -> None:
    _check_verdict(status, body, now)


@settings(max_examples=500, deadline=None)
@given(http_status, error_docs, NOW)
def test_classify_google_rpc_status_shapes(status: int, doc: Any, now: float) -> None:
    body = json.dumps(doc).encode()
    v = _check_verdict(status, body, now)
    if isinstance(doc, dict):
        # /openai/ paths wrap the same object in a one-element list: same verdict
        wrapped = json.dumps([doc]).encode()
        assert _check_verdict(status, wrapped, now) == v


@settings(max_examples=300, deadline=None)
@given(NOW)
def test_next_pacific_midnight_is_the_coming_midnight_in_los_angeles(now: float) -> None:
    midnight = next_pacific_midnight(now)
    assert now < midnight <= now + 25 * 3600
    local = datetime.fromtimestamp(midnight, PACIFIC)
    assert local.time() == time(0)
    assert local.date() > datetime.fromtimestamp(now, PACIFIC).date()


# --- 4: config -----------------------------------------------------------------------------------

SOURCES = st.sampled_from(["keys.yaml", "/etc/gemini-proxy/keys.yaml", "k:1.yaml", "é.yaml"])
ENV = {"K1": "k1", "K2": "tok", "K3": "AIzaSy0", "BLANK": "  ", "SPACE": "a b"}
TRICKY_SCALARS = [
    "a",
    "1",
    "0",
    "-1",
    "1000",
    "1001",
    "true",
    "false",
    "yes",
    "null",
    "~",
    "1.5",
    "1e3",
    "0x10",
    "0o17",
    ".inf",
    ".nan",
    "2001-12-14",
    "2001-13-45",
    "2001-02-30 25:61:61",
    "'quoted'",
    '"dq"',
    "''",
    "'  '",
    "!!int 12",
    "!!int x",
    "!!float abc",
    "!!binary aGk=",
    "!!binary ***",
    "!!str 5",
    "!!set {a}",
    "!!timestamp nope",
    "!!python/name:os.system",
    "[a, b]",
    "{a: 1}",
    "&anchor x",
    "*alias",
    "a b",
    "é",
    "12345678901234567890",
    "9" * 5000,
]
NAME_TOKENS = ["a", "b", "alpha", "web", "x" * 64, "x" * 65, "-a", "a/b", "'a '", "a.b_c-d", "1"]
SECRET_TOKENS = ["k1", "k2", "AIzaSy0", "AQ.Ab8RN", "tok", "'tok'", "' k1 '", "has space", "é"]
WEIGHT_TOKENS = ["1", "0", "1000", "1001", "-1", "1.0", "true", "'3'", "null", "0x10", "[1]"]
ENV_TOKENS = ["K1", "K2", "K3", "BLANK", "SPACE", "MISSING"]
yaml_word = st.from_regex(r"[A-Za-z0-9 _.'\":,\-\[\]{}#&*!|>%@`]{0,10}", fullmatch=True)


def _field_value(field: str) -> st.SearchStrategy[str]:
    own = {
        "name": NAME_TOKENS,
        "key": SECRET_TOKENS,
        "token": SECRET_TOKENS,
        "weight": WEIGHT_TOKENS,
        "key_env": ENV_TOKENS,
        "token_env": ENV_TOKENS,
        "project": ["p1", "p2"],
        "enabled": ["true", "false", "yes"],
    }.get(field, [])
    parts = [st.sampled_from(TRICKY_SCALARS), yaml_word]
    if own:
        parts.insert(0, st.sampled_from(own))
    return st.one_of(*parts)


def _entry(fields: list[str]) -> st.SearchStrategy[str]:
    field = st.one_of(st.sampled_from(fields), st.sampled_from(["Name", "extra", "weight"]))
    pair = field.flatmap(lambda f: _field_value(f).map(lambda v: f"{f}: {v}"))

    def render(pairs: list[str]) -> str:
        if not pairs:
            return "  - {}"
        return "\n".join(("  - " if i == 0 else "    ") + p for i, p in enumerate(pairs))

    return st.lists(pair, max_size=5).map(render)


key_entries = st.lists(
    _entry(["name", "key", "key_env", "project", "weight", "enabled"]), max_size=4
)
client_entries = st.lists(_entry(["name", "token", "token_env"]), max_size=3)
yaml_docs = st.builds(
    lambda keys, clients, extra: "\n".join(
        [
            "keys:" if keys else "keys: []",
            *keys,
            "clients:" if clients else "clients: []",
            *clients,
            *extra,
        ]
    ),
    key_entries,
    client_entries,
    st.lists(st.sampled_from(["other: 1", "keys: 2", "- a", "---", "# c", "..."]), max_size=1),
).map(lambda text: text.encode())
# documents PyYAML itself writes: field values of every type
dumped_docs = st.fixed_dictionaries(
    {},
    optional={
        "keys": st.one_of(
            st.lists(
                st.dictionaries(
                    st.sampled_from(
                        ["name", "key", "key_env", "project", "weight", "enabled", "x"]
                    ),
                    st.one_of(st.sampled_from(["a", "b", "k1", "K1", "tok"]), json_any),
                    max_size=6,
                ),
                max_size=4,
            ),
            json_any,
        ),
        "clients": st.one_of(
            st.lists(
                st.dictionaries(
                    st.sampled_from(["name", "token", "token_env"]),
                    st.one_of(st.sampled_from(["c", "k1", "tok", "K2"]), json_any),
                    max_size=3,
                ),
                max_size=3,
            ),
            json_any,
        ),
    },
).map(lambda d: json.dumps(d).encode())  # JSON is YAML


def _check_config(data: bytes, source: str) -> None:
    try:
        cfg = parse_config(data, source, ENV)
    except ConfigError as e:
        assert str(e).startswith(source)
        return
    assert isinstance(cfg, Config) and cfg.source == source
    names = [k.name for k in cfg.keys]
    assert len(set(names)) == len(names)
    secrets = [k.secret for k in cfg.keys]
    assert len(set(secrets)) == len(secrets)
    for k in cfg.keys:
        assert NAME_RE.fullmatch(k.name)
        assert type(k.weight) is int and 1 <= k.weight <= MAX_WEIGHT
        assert isinstance(k.enabled, bool)
        assert k.secret and k.secret == k.secret.strip()
    client_names = [c.name for c in cfg.clients]
    assert len(set(client_names)) == len(client_names)
    tokens = [c.token for c in cfg.clients]
    assert len(set(tokens)) == len(tokens)
    for c in cfg.clients:
        assert NAME_RE.fullmatch(c.name)
        assert c.token not in secrets
        assert c.token and all("!" <= ch <= "~" for ch in c.token)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256), SOURCES)
def test_config_any_bytes_is_a_config_or_a_config_error(data: bytes, source: str) -> None:
    _check_config(data, source)


@settings(max_examples=400, deadline=None)
@given(st.one_of(yaml_docs, dumped_docs), SOURCES)
def test_config_any_key_file_is_a_valid_config_or_a_config_error(data: bytes, source: str) -> None:
    _check_config(data, source)


# --- 5: pins -------------------------------------------------------------------------------------

RESOURCE_NAME = re.compile(r"(files|cachedContents|batches|operations)/[A-Za-z0-9_-]{1,128}")
BODY_NAME = re.compile(r"(files|cachedContents)/[A-Za-z0-9_-]{1,128}")
resource_ids = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
resource_kinds = st.sampled_from(["files/", "cachedContents/", "batches/", "operations/"])
resource_name = st.builds(lambda k, i: k + i, resource_kinds, resource_ids)
rfc3339 = st.one_of(
    st.builds(
        lambda y, mo, d, h, mi, sec, frac, zone: (
            f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}{frac}{zone}"
        ),
        st.one_of(st.sampled_from([0, 1, 1970, 2026, 9999]), st.integers(0, 9999)),
        st.one_of(st.sampled_from([1, 12]), st.integers(0, 13)),
        st.one_of(st.sampled_from([1, 28, 31]), st.integers(0, 32)),
        st.integers(0, 24),
        st.integers(0, 60),
        st.integers(0, 61),
        st.sampled_from(["", ".5", ".123456789"]),
        st.sampled_from(["Z", "z", "+00:00", "-08:00", "+14:00", "+99:99"]),
    ),
    st.from_regex(
        r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,12})?([Zz]|[+-]\d\d:\d\d)", fullmatch=True
    ),
)
BODY_FRAGMENTS = [
    '"fileUri"',
    '"file_uri"',
    '"cachedContent"',
    '"cached_content"',
    '"name"',
    '"expireTime"',
    '"expirationTime"',
    ":",
    " ",
    '"',
    "\\",
    "\\/",
    "\\u002f",
    "\\ud800",
    "\\x",
    "https://generativelanguage.googleapis.com/v1beta/",
    "files/",
    "cachedContents/",
    "/",
    "{",
    "}",
    "[",
    "]",
    ",",
]
fragment_bodies = st.lists(
    st.one_of(
        st.sampled_from(BODY_FRAGMENTS),
        resource_name,
        rfc3339.map(lambda t: f'"{t}"'),
        st.text(ANY_CHAR, max_size=4),
    ),
    max_size=16,
).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))
answer_objects = st.fixed_dictionaries(
    {"name": resource_name},
    optional={
        "expireTime": st.one_of(rfc3339, json_any),
        "expirationTime": st.one_of(rfc3339, json_any),
        "uri": resource_name.map(lambda n: "https://generativelanguage.googleapis.com/v1beta/" + n),
    },
)
answers = st.one_of(
    answer_objects,
    st.fixed_dictionaries({"files": st.lists(answer_objects, max_size=4)}),
    st.fixed_dictionaries({"file": answer_objects}),
).map(lambda d: json.dumps(d).encode())
hostile_bodies = st.one_of(st.binary(max_size=256), fragment_bodies, answers)


@settings(max_examples=300, deadline=None)
@given(st.one_of(rfc3339, any_text))
def test_parse_rfc3339_is_a_time_or_none_for_any_text(text: str) -> None:
    t = parse_rfc3339(text)
    assert t is None or isinstance(t, float | int)


@settings(max_examples=300, deadline=None)
@given(hostile_bodies)
def test_name_scanners_never_raise_and_yield_only_resource_names(body: bytes) -> None:
    found = list(body_resource_names(body))
    assert len(found) <= MAX_MATCHES
    assert all(BODY_NAME.fullmatch(n) for n in found)
    assert all(RESOURCE_NAME.fullmatch(n) for n in resource_names(body))


@settings(max_examples=300, deadline=None)
@given(hostile_bodies, st.text(max_size=8), NOW)
def test_remember_resources_never_raises_and_pins_only_names(
    body: bytes, project: str, now: float
) -> None:
    emitted: list[Pin] = []
    pins = ResourcePins(on_pin=emitted.append)
    remember(pins, body, project, now)
    assert all(RESOURCE_NAME.fullmatch(n) for n in pins.resources)
    assert set(pins.resources) <= set(resource_names(body))
    for pin in emitted:
        assert pin.kind == KIND_RESOURCE and pin.owner == project and pin.path == ""
        assert RESOURCE_NAME.fullmatch(pin.name)


@settings(max_examples=300, deadline=None)
@given(st.lists(resource_name, min_size=1, max_size=4), any_text, hostile_bodies, NOW)
def test_project_for_never_raises_and_names_only_a_pinned_project(
    names: list[str], path: str, body: bytes, now: float
) -> None:
    pins = ResourcePins()
    remember(pins, json.dumps({"files": [{"name": n} for n in names]}).encode(), "p", now)
    assert set(names) <= set(pins.resources)
    assert pins.project_for(path, body, now + 1) in (None, "p")
    # each pinned name is found again by path and in a body, escaped or not
    for name in names:
        assert pins.project_for(f"/v1beta/{name}:download", b"", now + 1) == "p"
        if name.startswith(("files/", "cachedContents/")):
            field = "fileUri" if name.startswith("files/") else "cachedContent"
            uri = "https://generativelanguage.googleapis.com/v1beta/" + name
            plain = json.dumps({"contents": [{"parts": [{field: uri}]}]})
            assert pins.project_for("/v1beta/models/m:generateContent", plain.encode(), now) == "p"
            escaped = plain.replace("/", "\\/").encode()
            assert pins.project_for("/v1beta/models/m:generateContent", escaped, now) == "p"


# --- 6: usage ------------------------------------------------------------------------------------

ENCODINGS = ["", "gzip", "x-gzip", "deflate", "identity", "br", "gzip, deflate", "GZIP", " gzip "]


def _encode(data: bytes, coding: str, members: int) -> bytes:
    """`data` as a server sends it: gzip (maybe in several members), zlib or raw deflate."""
    if coding == "gzip":
        step = max(1, len(data) // members)
        starts = range(0, len(data), step) if data else [0]
        return b"".join(gzip.compress(data[i : i + step]) for i in starts)
    if coding == "deflate":
        return zlib.compress(data)
    raw = zlib.compressobj(wbits=-15)
    return raw.compress(data) + raw.flush()  # "deflate" as some servers send it


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=10)),
    st.lists(st.binary(max_size=64), max_size=8),
    st.sampled_from([b"", gzip.compress(b'{"a": 1}')[:12], zlib.compress(b"x" * 100)[:5]]),
)
def test_usage_tap_never_raises(encoding: str, chunks: list[bytes], head: bytes) -> None:
    tap = UsageTap(encoding)
    for chunk in [head, *chunks]:
        tap.feed(chunk)
    tap.finish()
    assert tap.bytes == len(head) + sum(map(len, chunks))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.text(ANY_CHAR, max_size=300),
    st.sampled_from(["gzip", "deflate", "raw"]),
    st.integers(1, 4),
    st.lists(st.integers(0, 10**6), max_size=12),
)
def test_usage_tap_reads_tokens_of_a_compressed_answer_split_anywhere(
    n: int, m: int, text: str, coding: str, members: int, cuts: list[int]
) -> None:
    answer = json.dumps(
        {
            "candidates": [{"content": {"parts": [{"text": text}]}}],
            "usageMetadata": {"promptTokenCount": n, "candidatesTokenCount": m},
        }
    ).encode()
    wire = _encode(answer, coding, members)
    tap = UsageTap("deflate" if coding == "raw" else coding)
    for chunk in _split(wire, cuts):
        tap.feed(chunk)
    tap.finish()
    assert (tap.tokens_in, tap.tokens_out, tap.bytes) == (n, m, len(wire))
    assert not tap.stream_error


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200),
    st.sampled_from(["gzip", "deflate", "raw"]),
    st.integers(1, 3),
    st.binary(max_size=3),
)
def test_decoded_round_trips_and_never_raises_on_trailing_bytes(
    data: bytes, coding: str, members: int, trailing: bytes
) -> None:
    encoding = "deflate" if coding == "raw" else coding
    wire = _encode(data, coding, members)
    assert decoded(wire, encoding, 1 << 20) == data
    assert decoded(wire + trailing, encoding, 1 << 20) in (None, data)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=10)),
    st.binary(max_size=128),
    st.integers(0, 300),
)
def test_decoded_never_raises_on_any_bytes(encoding: str, body: bytes, limit: int) -> None:
    out = decoded(body, encoding, limit)
    assert out is None or len(out) <= limit


# --- 7: errors -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(Api)),
    st.integers(100, 599),
    st.one_of(any_text, st.text(st.characters(max_codepoint=0x1F), max_size=8)),
    any_text,
)
def test_error_body_is_json_of_the_sdks_shape_for_any_message(
    api: Api, status: int, message: str, reason: str
) -> None:
    body = error_body(api, status, message, reason)
    body.decode("ascii")  # valid UTF-8 on the wire whatever the message holds
    doc = json.loads(body)
    assert list(doc) == ["error"]
    err = doc["error"]
    assert err["message"] == message
    if api is Api.OPENAI:
        assert err["code"] == reason and err["param"] is None
        assert isinstance(err["type"], str) and err["type"]
    else:
        assert err["code"] == status
        assert isinstance(err["status"], str) and err["status"]
        assert [d["reason"] for d in err["details"]] == [reason]


# --- watcher -------------------------------------------------------------------------------------

watch_steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 3)),  # new content (size 0..3)
        st.tuples(st.just("delete"), st.just(0)),
        st.tuples(st.just("wait"), st.integers(0, 3)),  # tenths of a second
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(watch_steps)
def test_file_watcher_reports_a_change_only_once_it_has_settled(
    steps: list[tuple[str, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "keys.yaml")
        mtime = 1_000_000_000
        watcher = FileWatcher(path, settle=0.5)
        now = 100.0
        seen = watcher.seen
        history: list[tuple[float, Any]] = []  # (poll time, signature) since the last report

        def poll() -> None:
            nonlocal seen, history
            sig = _signature(path)
            history.append((now, sig))
            if watcher.poll(now):
                # a report: changed, and the same since a poll at least `settle` ago
                assert sig != seen
                same_since = now
                for t, s in reversed(history):
                    if s != sig:
                        break
                    same_since = t
                assert now - same_since >= 0.5
                seen, history = sig, []

        for op, arg in steps:
            if op == "write":
                mtime += 1
                with open(path, "wb") as f:
                    f.write(b"x" * arg)
                os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
            elif op == "delete" and os.path.exists(path):
                os.remove(path)
            else:
                now += arg / 10
            poll()
        # left alone, a change is reported once it has settled, and only once
        poll()
        now += 0.6
        poll()
        assert _signature(path) == seen == watcher.seen
        assert not watcher.poll(now + 10)


def _signature(path: str) -> tuple[float, int, int] | None:
    try:
        st_ = os.stat(path)
    except OSError:
        return None
    return (st_.st_mtime, st_.st_size, st_.st_ino)
