from __future__ import annotations

import json

import pytest

from gemini_pool.errors import error_body
from gemini_pool.routing import (
    Api,
    RouteError,
    query_credentials,
    route,
    split_query,
)


def r(
    path: str,
    query: str = "",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    method: str = "POST",
):
    h = headers or {}
    bearer_only = (
        h.get("authorization", "").lower().startswith("bearer ")
        and "x-goog-api-key" not in h
        and split_query(query)[1] is None
    )
    return route(method, path, query, bearer_only, body)


def test_native_paths_pass_through_with_model_and_method() -> None:
    x = r("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "alt=sse&key=tok")
    assert (x.api, x.path, x.query, x.model, x.method, x.streaming) == (
        Api.NATIVE,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        "alt=sse",
        "gemini-2.5-flash",
        "streamGenerateContent",
        True,
    )
    assert r("/v1/models/gemini-2.5-pro:generateContent").model == "gemini-2.5-pro"
    assert r("/upload/v1beta/files").api is Api.NATIVE


def test_openai_sdk_paths_map_to_the_compat_api() -> None:
    x = r("/v1/chat/completions", body=b'{"model": "models/gemini-2.5-flash", "stream": true}')
    assert (x.api, x.path, x.model, x.streaming) == (
        Api.OPENAI,
        "/v1beta/openai/chat/completions",
        "gemini-2.5-flash",
        True,
    )
    assert r("/v1beta/openai/embeddings", body=b'{"model":"e"}').path == "/v1beta/openai/embeddings"
    assert r("/v1/images/generations", body=b"{}").api is Api.OPENAI


def test_v1_models_belongs_to_whoever_authenticates_that_way() -> None:
    bearer = {"authorization": "Bearer t"}
    assert r("/v1/models", headers=bearer, method="GET").path == "/v1beta/openai/models"
    assert r("/v1/models", headers={"x-goog-api-key": "t"}, method="GET").path == "/v1/models"
    assert (
        r("/v1/models/gemini-2.5-flash", headers={"x-goog-api-key": "t"}, method="GET").api
        is Api.NATIVE
    )


@pytest.mark.parametrize(
    ("path", "status"), [("/admin", 404), ("/v2/x", 404), ("/v1beta/../etc/passwd", 400)]
)
def test_unknown_and_hostile_paths(path: str, status: int) -> None:
    with pytest.raises(RouteError) as e:
        r(path)
    assert e.value.status == status


def test_invalid_openai_json_is_a_400() -> None:
    with pytest.raises(RouteError, match="not valid JSON"):
        r("/v1/chat/completions", body=b"{nope")


def test_credentials_leave_the_query_however_they_are_spelled() -> None:
    assert split_query("a=1&key=s&b=2") == ("a=1&b=2", "s")
    assert split_query("%6Bey=s&alt=sse") == ("alt=sse", "s")  # an encoded name is still `key`
    assert split_query("KEY=s&access_token=t&x=%2F") == ("x=%2F", "s")  # others kept verbatim
    assert split_query("alt=sse") == ("alt=sse", None)
    found = query_credentials("key=a&key=b&key=%FF")
    assert found.keys == ("a", "b") and found.malformed and found.query == ""


@pytest.mark.parametrize(
    ("method", "path", "repeatable"),
    [
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", True),
        ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", True),
        ("POST", "/v1beta/models/text-embedding-004:batchEmbedContents", True),
        ("GET", "/v1beta/files/abc", True),
        ("POST", "/v1beta/cachedContents", False),
        ("DELETE", "/v1beta/files/abc", False),
        ("PATCH", "/v1beta/cachedContents/abc", False),
        ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", False),
        ("POST", "/v1beta/tunedModels", False),
        ("POST", "/upload/v1beta/files", False),
        ("POST", "/v1beta/batches/abc:cancel", False),
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1beta/openai/files", False),
    ],
)
def test_what_may_be_sent_twice(method: str, path: str, repeatable: bool) -> None:
    body = b'{"model": "gemini-2.5-flash"}' if "openai" in path or "/v1/chat" in path else b""
    assert r(path, body=body, method=method).repeatable is repeatable


@pytest.mark.parametrize(
    "model", ["x" * 129, "gemini 2.5", "a/b", "../x", "%2e%2e", "gemini\u2028", "-lead", "ü"]
)
def test_made_up_model_names_are_refused(model: str) -> None:
    with pytest.raises(RouteError) as e:
        r("/v1/chat/completions", body=json.dumps({"model": model}).encode())
    assert e.value.status == 400 and e.value.reason == "invalid_model"
    if "/" not in model:
        with pytest.raises(RouteError):
            r(f"/v1beta/models/{model}:generateContent")


def test_error_shapes() -> None:
    import json

    g = json.loads(error_body(Api.NATIVE, 429, "all cooling", "all_keys_cooling"))
    assert g["error"]["code"] == 429 and g["error"]["status"] == "RESOURCE_EXHAUSTED"
    o = json.loads(error_body(Api.OPENAI, 401, "bad token", "invalid_token"))
    assert o["error"] == {
        "message": "bad token",
        "type": "authentication_error",
        "code": "invalid_token",
        "param": None,
    }
