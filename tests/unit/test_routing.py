from __future__ import annotations

import pytest

from gemini_pool.errors import error_body
from gemini_pool.routing import (
    Api,
    RouteError,
    client_credential,
    is_bearer_only,
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
    return route(method, path, query, is_bearer_only(headers or {}, split_query(query)[1]), body)


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


def test_credentials() -> None:
    assert client_credential({"x-goog-api-key": "a", "authorization": "Bearer b"}, "c") == "a"
    assert client_credential({"authorization": "Bearer b"}, "c") == "c"
    assert client_credential({"authorization": "Bearer b"}, None) == "b"
    assert client_credential({"authorization": "Basic zz"}, None) is None
    assert split_query("a=1&key=s&b=2") == ("a=1&b=2", "s")


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
