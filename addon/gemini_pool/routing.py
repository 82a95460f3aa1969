"""Request paths and credentials: which API a request speaks, where it goes upstream, which model.

Pure logic: works on plain strings and lists of header pairs, no mitmproxy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote, unquote_plus

from .jsonscan import top_level


class Api(StrEnum):
    NATIVE = "native"
    OPENAI = "openai"


OPENAI_PREFIX = "/v1beta/openai/"
# Paths the OpenAI SDK uses with base_url=http://proxy/v1, mapped onto Gemini's compat API.
OPENAI_SDK_PATHS = ("chat/completions", "embeddings", "models", "images/generations")
NATIVE_PREFIXES = ("/v1/", "/v1beta/", "/v1alpha/", "/upload/", "/download/")
CREDENTIAL_HEADERS = ("x-goog-api-key", "authorization")

_MODEL_RE = re.compile(r"/(?:models|tunedModels)/([^/:?]+)(?::([A-Za-z]+))?")
# what a model id may look like (gemini-2.5-flash, text-embedding-004, a tuned model's id): it
# names cooldown buckets, usage rows and log fields, so nothing else gets that far
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# query parameters (Google's "system parameters") that carry a credential or name who is billed
# or counted: never forwarded (ours is injected). Google takes each plain or `$`-prefixed, and
# camelCase or snake_case; names are compared as `param_name` folds them.
CREDENTIAL_PARAMS = frozenset(
    {"key", "access_token", "oauth_token", "bearer_token", "quotaUser", "userProject"}
)
_FOLDED_PARAMS = frozenset(n.lower().replace("_", "") for n in CREDENTIAL_PARAMS)
# native methods that change nothing at Google (repeating one costs quota, nothing else)
REPEATABLE_RPCS = frozenset(
    {
        "generateContent",
        "streamGenerateContent",
        "countTokens",
        "embedContent",
        "batchEmbedContents",
        "predict",
        "generateText",
        "generateMessage",
        "generateAnswer",
        "embedText",
        "batchEmbedText",
        "countMessageTokens",
        "countTextTokens",
    }
)
REPEATABLE_OPENAI = ("chat/completions", "embeddings", "completions", "images/generations")


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
    repeatable: bool = True  # False: creates, changes or deletes something at Google

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def model_or_default(self) -> str:
        return self.model or "*"

    @property
    def download(self) -> bool:
        """A file's bytes (`/download/`, `:download`, `alt=media`): relayed as they arrive."""
        return (
            self.path.startswith("/download/")
            or self.path.endswith(":download")
            or query_param(self.query, "alt") == "media"
        )


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


@dataclass(frozen=True)
class QueryCredentials:
    query: str  # the query without credential parameters, other parameters byte for byte
    keys: tuple[str, ...]  # every `key=` value, decoded
    malformed: bool  # a credential parameter that does not decode


def param_name(raw: str) -> str:
    """A parameter's name folded the way every spelling Google might take folds alike.

    Percent-decoded until it stops changing (`%2524key`), `+` as a space, stripped, lower case,
    without leading `$` and without `_`/`-`: `$Key`, `%24key`, `ACCESS_TOKEN`, `quota_user` and
    `$userProject` fold to `key`, `accesstoken`, `quotauser`, `userproject`.
    """
    name = raw
    for _ in range(8):
        decoded = unquote_plus(name, errors="replace")
        if decoded == name:
            break
        name = decoded
    return name.strip().lower().lstrip("$").replace("_", "").replace("-", "")


def is_credential_param(raw_name: str) -> bool:
    """Does a query parameter of this (raw, still encoded) name carry a credential or a billing
    or quota identity?"""
    return param_name(raw_name) in _FOLDED_PARAMS


def query_credentials(query: str) -> QueryCredentials:
    """Take every credential parameter out of a query string, however its name is spelled."""
    if not query:
        return QueryCredentials(query, (), False)
    kept: list[str] = []
    keys: list[str] = []
    malformed = False
    for part in query.split("&"):
        raw_name, _, raw_value = part.partition("=")
        name = param_name(raw_name)
        if name not in _FOLDED_PARAMS:
            if ";" in part and any(
                is_credential_param(p.partition("=")[0]) for p in part.split(";")[1:]
            ):
                malformed = True  # `x=1;key=T`: servers that split on ';' see a credential
                continue
            kept.append(part)
            continue
        try:
            value = unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            malformed = True
            continue
        if name == "key":
            keys.append(value)
    return QueryCredentials("&".join(kept), tuple(keys), malformed)


def split_query(query: str) -> tuple[str, str | None]:
    """Remove credential parameters from a query string: (clean query, the first `key=` value)."""
    found = query_credentials(query)
    return found.query, found.keys[0] if found.keys else None


def query_param(query: str, name: str) -> str | None:
    """The first value of a parameter, decoded (None if absent or undecodable)."""
    if name not in query:
        return None
    for part in query.split("&"):
        raw_name, sep, raw_value = part.partition("=")
        if sep and unquote_plus(raw_name, errors="replace") == name:
            try:
                return unquote_plus(raw_value, errors="strict")
            except UnicodeDecodeError:
                return None
    return None


def valid_model(model: str) -> bool:
    return MODEL_ID.fullmatch(model) is not None


SCAN_OVER = 64 * 1024  # larger OpenAI bodies are scanned for their fields, not parsed whole
_OPENAI_FIELDS = frozenset({"model", "stream"})


def openai_body_fields(body: bytes) -> tuple[str | None, bool]:
    """(model, stream) from an OpenAI-compat JSON body. Raises RouteError on invalid JSON.

    A body over SCAN_OVER is not parsed whole on the event loop: its top-level `model` and
    `stream` are found by a structural scan (`jsonscan`), with json.loads's answer."""
    if not body:
        return None, False
    if len(body) > SCAN_OVER:
        return _scanned_fields(body)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RouteError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise RouteError(400, "request body must be a JSON object", "invalid_json")
    return _model_and_stream(doc.get("model"), doc.get("stream") is True)


def _scanned_fields(body: bytes) -> tuple[str | None, bool]:
    try:
        raw = top_level(body, _OPENAI_FIELDS)
        model = json.loads(raw["model"]) if raw.get("model", b"").startswith(b'"') else None
    except ValueError as e:  # ScanError, and a bad escape or UTF-8 in a name or the model
        raise RouteError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if "model" in raw and model is None and raw["model"] != b"null":
        raise RouteError(400, "'model' must be a string", "invalid_model")
    return _model_and_stream(model, raw.get("stream") == b"true")


def _model_and_stream(model: object, streaming: bool) -> tuple[str | None, bool]:
    if model is not None and not isinstance(model, str):
        raise RouteError(400, "'model' must be a string", "invalid_model")
    if isinstance(model, str) and model.startswith("models/"):
        model = model[len("models/") :]
    return model, streaming


def route(method: str, path: str, query: str, bearer_only: bool, body: bytes) -> Route:
    """Route one request (see api_for_path for `bearer_only`). Raises RouteError."""
    query, _ = split_query(query)
    found = api_for_path(path, bearer_only)
    if found is None:
        raise RouteError(
            404,
            f"unknown path {path[:200]!r}: the proxy serves Gemini's /v1/, /v1beta/ "
            "and /v1beta/openai/ APIs",
            "unknown_path",
        )
    api, upstream = found
    if {".", ".."} & set(unquote(upstream).split("/")) or "\\" in unquote(upstream):
        raise RouteError(400, "path traversal is not allowed", "bad_path")
    if api is Api.OPENAI:
        model, streaming = openai_body_fields(body) if method == "POST" else (None, False)
        rpc = None
        rest = upstream[len(OPENAI_PREFIX) :]
        repeatable = method in ("GET", "HEAD") or (method == "POST" and rest in REPEATABLE_OPENAI)
    else:
        m = _MODEL_RE.search(upstream)
        model, rpc = (m.group(1), m.group(2)) if m else (None, None)
        streaming = rpc == "streamGenerateContent"
        repeatable = method in ("GET", "HEAD") or (
            method == "POST" and rpc in REPEATABLE_RPCS and not upstream.startswith("/upload/")
        )
    if model is not None and not valid_model(model):
        raise RouteError(
            400,
            f"invalid model name {model[:80]!r}: a model id is 1-128 letters, digits, '.', '_' "
            "or '-' (e.g. gemini-2.5-flash)",
            "invalid_model",
        )
    return Route(api, upstream, query, model, rpc, streaming, repeatable)
