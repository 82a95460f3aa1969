"""Request paths and credentials: which API a request speaks, where it goes upstream, which model.

Pure logic: works on plain strings and lists of header pairs, no mitmproxy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qsl, unquote, urlencode


class Api(StrEnum):
    NATIVE = "native"
    OPENAI = "openai"


OPENAI_PREFIX = "/v1beta/openai/"
# Paths the OpenAI SDK uses with base_url=http://proxy/v1, mapped onto Gemini's compat API.
OPENAI_SDK_PATHS = ("chat/completions", "embeddings", "models", "images/generations")
NATIVE_PREFIXES = ("/v1/", "/v1beta/", "/v1alpha/", "/upload/", "/download/")
CREDENTIAL_HEADERS = ("x-goog-api-key", "authorization")

_MODEL_RE = re.compile(r"/(?:models|tunedModels)/([^/:?]+)(?::([A-Za-z]+))?")


class RouteError(Exception):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class Route:
    api: Api
    path: str  # upstream path, no query
    query: str  # upstream query string, client key removed
    model: str | None
    method: str | None  # native RPC method, e.g. generateContent
    streaming: bool

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def model_or_default(self) -> str:
        return self.model or "*"


def api_for_path(path: str, bearer_only: bool) -> tuple[Api, str] | None:
    """(api, upstream path) or None for a path the proxy does not serve.

    `/v1/models[/id]` is both OpenAI's and Gemini's model listing: it is OpenAI's when the caller
    authenticates the OpenAI way (Authorization: Bearer, no x-goog-api-key / ?key=).
    """
    if path.startswith(OPENAI_PREFIX):
        return Api.OPENAI, path
    if path.startswith("/v1/"):
        rest = path[len("/v1/") :]
        is_models = rest == "models" or (rest.startswith("models/") and ":" not in rest)
        for p in OPENAI_SDK_PATHS:
            if rest == p or rest.startswith(p + "/"):
                if p == "models" and not (is_models and bearer_only):
                    break
                return Api.OPENAI, OPENAI_PREFIX + rest
    if path.startswith(NATIVE_PREFIXES):
        return Api.NATIVE, path
    return None


def split_query(query: str) -> tuple[str, str | None]:
    """Remove `key=` from a query string: (clean query, the key value if any)."""
    if "key=" not in query:
        return query, None
    pairs = parse_qsl(query, keep_blank_values=True)
    key = next((v for k, v in pairs if k == "key"), None)
    return urlencode([(k, v) for k, v in pairs if k != "key"]), key


def client_credential(headers: dict[str, str], query_key: str | None) -> str | None:
    """The token the caller sent where its SDK puts an API key. `headers` keys are lower-case."""
    if headers.get("x-goog-api-key"):
        return headers["x-goog-api-key"].strip()
    if query_key:
        return query_key
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


def openai_body_fields(body: bytes) -> tuple[str | None, bool]:
    """(model, stream) from an OpenAI-compat JSON body. Raises RouteError on invalid JSON."""
    if not body:
        return None, False
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RouteError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise RouteError(400, "request body must be a JSON object", "invalid_json")
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise RouteError(400, "'model' must be a string", "invalid_model")
    if isinstance(model, str) and model.startswith("models/"):
        model = model[len("models/") :]
    return model, doc.get("stream") is True


def is_bearer_only(headers: dict[str, str], query_key: str | None) -> bool:
    """Did the caller authenticate the OpenAI way? `headers` keys are lower-case."""
    return (
        headers.get("authorization", "").lower().startswith("bearer ")
        and not headers.get("x-goog-api-key")
        and not query_key
    )


def route(method: str, path: str, query: str, bearer_only: bool, body: bytes) -> Route:
    """Route one request (see api_for_path for `bearer_only`). Raises RouteError."""
    query, _ = split_query(query)
    found = api_for_path(path, bearer_only)
    if found is None:
        raise RouteError(
            404,
            f"unknown path {path!r}: the proxy serves Gemini's /v1/, /v1beta/ "
            "and /v1beta/openai/ APIs",
            "unknown_path",
        )
    api, upstream = found
    if {".", ".."} & set(unquote(upstream).split("/")) or "\\" in unquote(upstream):
        raise RouteError(400, "path traversal is not allowed", "bad_path")
    if api is Api.OPENAI:
        model, streaming = openai_body_fields(body) if method == "POST" else (None, False)
        return Route(api, upstream, query, model, None, streaming)
    m = _MODEL_RE.search(upstream)
    model, rpc = (m.group(1), m.group(2)) if m else (None, None)
    streaming = rpc == "streamGenerateContent"
    return Route(api, upstream, query, model, rpc, streaming)
