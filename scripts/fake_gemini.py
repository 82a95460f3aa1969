#!/usr/bin/env python3
"""A loopback stand-in for generativelanguage.googleapis.com, for tests, the demo and the benchmark.

It checks credentials as Google does (exactly one of x-goog-api-key / ?key= / Authorization),
answers native unary, SSE and JSON-array streams and the OpenAI-compatible API, and plays
scripted faults with Gemini's real error bodies. It logs which key served each request. It is
as harsh as Google where a key-pool proxy can trip: gzip answers, 404 for models it does not
serve, resources bound to the project of the key that created them, and errors that are the
caller's fault rather than the key's.

Control API (JSON, under /_fake/, never compressed):
  POST /_fake/config  {"keys": {"<secret>": "<behaviour>"}, "models": {"<secret>": {"<model>": "<behaviour>"}},
                       "projects": {"<secret>": "<project>"}, "script": ["<behaviour>", ...],
                       "random": {"<behaviour>": weight, ...}, "seed": 1,   (for keys whose behaviour is "random")
                       "served_models": ["<model id>", ...], "gzip": true,
                       "quota": {"<project>": {"<model>": {"rpm": n, "tpm": n, "rpd": n}}},
                       "quota_delay": "1s"}
      "keys" replaces the key table when present; "models" and "projects" persist when absent;
      "script", "random", "seed", "served_models" and "gzip" return to their defaults when absent.
      "projects" maps a secret to its project (default: each key is its own project).
      "served_models" replaces DEFAULT_MODELS (ids with or without "models/").
      "gzip": false answers identity even when Accept-Encoding allows gzip.
      "quota" (default none, reset when absent) gives projects Google's per-model limits: the
      fake counts requests and input tokens per project x model (generations, embeddings, OpenAI
      chat/embeddings; the tokens it reports in usageMetadata) over a rolling 60 s and the Pacific
      day, and answers a request over a limit with Google's 429 (quotaId ...PerMinute... /
      ...PerDay..., quotaValue the limit), not counting it. retryDelay: per minute, until the
      window has room; per day, "23s" (Google's trap); "quota_delay" overrides both.
  GET  /_fake/spent   {"<project>": {"<model>": {"requests_today", "tokens_today",
                        "requests_minute", "tokens_minute", "refused": {"rpm": n, "tpm": n, "rpd": n}}}}
  GET  /_fake/log     [{"key", "method", "path", "query", "model", "status", "stream", "body",
                        "behaviour", "t"}]  (upload-byte requests: {"key", "method", "path",
                        "query", "model", "stream", "status", "upload": true, "t"}); status 0 =
                        dropped
  GET  /_fake/counts  {"create:files": 0, "finalize:files": 0, "delete:files": 0,
                       "create:cachedContents": 0, "update:cachedContents": 0,
                       "delete:cachedContents": 0, "create:batches": 0, "cancel:batches": 0,
                       "delete:batches": 0, "create:tunedModels": 0}: how many times each
                      state-changing call reached the fake, whatever it answered (counted on
                      arrival, so a `drop`ped create counts too)
  POST /_fake/reset   clear the log and the counts (keeps the config and the resources)

Behaviours (per key, per key × model, or scripted): ok, dead (400 API_KEY_INVALID),
expired (400 "API key expired", API_KEY_INVALID), unauth (401 ACCESS_TOKEN_TYPE_UNSUPPORTED),
leaked, suspended (CONSUMER_SUSPENDED), blocked (API_KEY_SERVICE_BLOCKED),
service_disabled (403 SERVICE_DISABLED), referrer (403 API_KEY_HTTP_REFERRER_BLOCKED),
minute[:secs], day, limit0, cap, 429bare, 500, 503, 504, drop (read the body, then close
without answer), slow:<ms>, cut:<events> (stream cut mid-way), error_event (in-band error
event in a 200 stream). Behaviours apply to every endpoint below, resources included.
Unknown keys answer API_KEY_INVALID.

Per-request knobs (headers): x-fake-events (stream events, default 3), x-fake-delay-ms (between
events), x-fake-latency-ms (before answering), x-fake-event-bytes (padding per stream event),
x-fake-poison: close | garbage (answer this request normally, then spoil its kept-alive
connection: the next request on it gets no answer, the connection closed as in a keep-alive race
(`close`), or bytes that are no status line (`garbage`); logged with status 0 and "poisoned"),
x-fake-prompt-tokens (the input tokens it counts and reports, default 5).

Google's wrong-ways, on purpose: HEAD (any path) is answered with a body, as some upstreams and
middleboxes do; a client that reuses that connection reads the body as its next status line.
Credentials as Google takes them: `key` and `$key` (percent-encoded names decoded) both count.
Every log entry has "headers" (lower-case names) beside "query".

Compression: when Accept-Encoding allows gzip (and "gzip" is on), every answer with a body
(unary JSON, errors, uploads) has Content-Encoding: gzip; streams (SSE, JSON array,
OpenAI-compat SSE) are one gzip member flushed with Z_SYNC_FLUSH after each event, so each
event decodes as it arrives; cuts and in-band error events work the same under gzip.

JSON mode: a generateContent / streamGenerateContent body whose generationConfig has
responseMimeType "application/json" gets text that is valid JSON: with responseSchema (Gemini's
Schema: "OBJECT", required, items, enum, anyOf, minItems, ...) or responseJsonSchema (JSON Schema:
$ref/$defs, const, oneOf/allOf, type lists, prefixItems, bounds), camelCase or snake_case, the
smallest value that satisfies it (required properties only; numbers 1 where allowed, else 0;
strings "fake"); without a schema {"text": "Hello from fake Gemini."}. Odd schemas never make it
fail. "text/x.enum" answers the first enum value. Streams split that text over the events (their
concatenation parses; x-fake-event-bytes pads only non-JSON streams). OpenAI-compatible chat
does the same for response_format {"type": "json_object"} and {"type": "json_schema",
"json_schema": {"schema": ...}}.

Endpoints (native ones under both /v1/ and /v1beta/; {v} is either):
  POST {v}/models/{m}:generateContent, :streamGenerateContent[?alt=sse], :countTokens,
       :embedContent, :batchEmbedContents ({"embeddings": [one per request]})
  POST {v}/models/{m}:batchGenerateContent  creates batches/{id} (long-running operation doc)
  GET  {v}/models (exactly the served models), GET {v}/models/{m}
       any model not served (path, OpenAI body "model", cachedContents body "model"):
       404 NOT_FOUND "models/X is not found for API version {v}, ..."
  {v}/tunedModels/{id}...  403 "You do not have permission to access tuned model tunedModels/X."
  POST {v}/tunedModels     401 UNAUTHENTICATED CREDENTIALS_MISSING (API keys are not supported)
  GET  {v}/tunedModels     {} (none)
  POST /upload/{v}/files (resumable start; X-Goog-Upload-URL points back here, no key needed)
  GET  {v}/files, GET|DELETE {v}/files/{id}
  POST|GET {v}/cachedContents, GET|PATCH|DELETE {v}/cachedContents/{id}
  GET  {v}/batches, GET|DELETE {v}/batches/{id}, POST {v}/batches/{id}:cancel
  GET  [/download]{v}/files/{id}:download?alt=media  a file's bytes, made as they are sent:
       x-fake-download-bytes of them (default 1 MiB, see download_blocks), with a
       Content-Length unless the request has x-fake-chunked
  /v1beta/openai/chat/completions (stream or not), /embeddings (one vector per input),
       GET /models, GET /models/{id}
Served models: DEFAULT_MODELS (current Gemini, Gemma and embedding ids, and those the Gemini CLI
asks for by default: its router's flash-lite and its main pro/flash models).
Files, cached contents and batches belong to the project of the key that created them: another
project's key (or an unknown id) gets Google's 403 PERMISSION_DENIED without a key reason, also
when a generateContent / streamGenerateContent / countTokens / cachedContents /
batchGenerateContent body names the resource (fileData.fileUri, file_data.file_uri, fileName,
cachedContent, cached_content). A cached content past its expireTime (ttl, default 1 h; PATCH
sets a new ttl) is gone: 403 too. Empty lists answer {} as Google does (empty fields are omitted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import random
import re
import time
import uuid
import warnings
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from multidict import CIMultiDict

# Every model id the tests and the benchmark use, plus common real ones.
DEFAULT_MODELS: tuple[str, ...] = (
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    "gemini-2.5-flash-lite",
    "gemini-2.0-flash",
    "gemini-2.0-flash-001",
    "gemini-2.0-flash-lite",
    "gemini-flash-latest",
    "gemini-flash-lite-latest",
    "gemini-pro-latest",
    "gemini-2.5-flash-image",
    "gemini-2.5-flash-preview-tts",
    "gemini-3-pro-preview",
    "gemini-3-flash-preview",
    # what the Gemini CLI (0.61) asks for: its main model, fallbacks and its routing classifier
    "gemini-3.1-pro-preview",
    "gemini-3.1-pro-preview-customtools",
    "gemini-3-flash",
    "gemini-3.5-flash",
    "gemini-3.8-flash",
    "gemini-3.1-flash-lite",
    "gemini-3.5-flash-lite",
    "gemma-3-27b-it",
    "gemini-embedding-001",
    "text-embedding-004",
    "embedding-001",
    "imagen-4.0-generate-001",
    "m",
)

# State-changing calls, counted on arrival (GET /_fake/counts).
COUNTED: tuple[str, ...] = (
    "create:files",
    "finalize:files",
    "delete:files",
    "create:cachedContents",
    "update:cachedContents",
    "delete:cachedContents",
    "create:batches",
    "cancel:batches",
    "delete:batches",
    "create:tunedModels",
)

HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [
        {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
        }
    ],
}


def _status(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        err["details"] = details
    return {"error": err}


def _error_info(reason: str, **meta: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com", **meta},
    }


def _quota(model: str, quota_id: str, metric: str, delay: str, limit: str = "10") -> dict[str, Any]:
    msg = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n"
        f"* Quota exceeded for metric: generativelanguage.googleapis.com/{metric}, limit: {limit}, "
        f"model: {model}\nPlease retry in {delay}."
    )
    return _status(
        429,
        "RESOURCE_EXHAUSTED",
        msg,
        [
            HELP,
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": f"generativelanguage.googleapis.com/{metric}",
                        "quotaId": quota_id,
                        "quotaDimensions": {"location": "global", "model": model},
                        "quotaValue": limit,
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
        ],
    )


_KEY_INVALID_MESSAGES = {
    "dead": "API key not valid. Please pass a valid API key.",
    "invalid": "API key not valid. Please pass a valid API key.",
    "expired": "API key expired. Please renew the API key.",
}


def _localized(msg: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
        "locale": "en-US",
        "message": msg,
    }


def error_for(
    behaviour: str, key: str, model: str, referer: str | None = None
) -> tuple[int, dict[str, Any]] | None:
    """Gemini's real error body for a behaviour, or None if it is not an error behaviour.

    `referer` is what the `referrer` behaviour's message echoes (Google says `<empty>`).
    """
    name, _, arg = behaviour.partition(":")
    if name in _KEY_INVALID_MESSAGES:
        msg = _KEY_INVALID_MESSAGES[name]
        return 400, _status(
            400, "INVALID_ARGUMENT", msg, [_error_info("API_KEY_INVALID"), _localized(msg)]
        )
    if name == "service_disabled":
        url = (
            "https://console.developers.google.com/apis/api/generativelanguage.googleapis.com/"
            "overview?project=123456"
        )
        msg = (
            "Generative Language API has not been used in project 123456 before or it is "
            f"disabled. Enable it by visiting {url} then retry. If you enabled this API recently, "
            "wait a few minutes for the action to propagate to our systems and retry."
        )
        return 403, _status(
            403,
            "PERMISSION_DENIED",
            msg,
            [
                _error_info(
                    "SERVICE_DISABLED",
                    consumer="projects/123456",
                    activationUrl=url,
                    containerInfo="123456",
                    serviceTitle="Generative Language API",
                ),
                _localized(msg),
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {"description": "Google developers console API activation", "url": url}
                    ],
                },
            ],
        )
    if name == "referrer":
        return 403, _status(
            403,
            "PERMISSION_DENIED",
            f"Requests from referer {referer or '<empty>'} are blocked.",
            [_error_info("API_KEY_HTTP_REFERRER_BLOCKED", consumer="projects/123456")],
        )
    if name == "unauth":
        return 401, _status(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential.",
            [_error_info("ACCESS_TOKEN_TYPE_UNSUPPORTED")],
        )
    if name == "leaked":
        return 403, _status(
            403,
            "PERMISSION_DENIED",
            "Your API key was reported as leaked. Please use another API key.",
        )
    if name == "suspended":
        return 403, _status(
            403,
            "PERMISSION_DENIED",
            f"Permission denied: Consumer 'api_key:{key}' has been suspended.",
            [_error_info("CONSUMER_SUSPENDED", consumer=f"projects/{key}")],
        )
    if name == "blocked":
        return 403, _status(
            403,
            "PERMISSION_DENIED",
            "Requests to this API generativelanguage.googleapis.com method "
            "google.ai.generativelanguage.v1beta.GenerativeService.GenerateContent are blocked.",
            [_error_info("API_KEY_SERVICE_BLOCKED")],
        )
    if name == "minute":
        return 429, _quota(
            model,
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "generate_content_free_tier_requests",
            f"{arg or 37}s",
        )
    if name == "day":
        return 429, _quota(
            model,
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "generate_content_free_tier_requests",
            "23s",
            "250",
        )
    if name == "limit0":
        return 429, _quota(
            model,
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "generate_content_free_tier_requests",
            "23s",
            "0",
        )
    if name == "cap":
        return 429, _status(
            429,
            "RESOURCE_EXHAUSTED",
            "Your project has exceeded its monthly spending cap. Please go to AI Studio "
            "at https://ai.studio/spend to manage your project spend cap.",
        )
    if name == "429bare":
        return 429, _status(
            429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."
        )
    if name == "500":
        return 500, _status(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
        )
    if name == "503":
        return 503, _status(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
    if name == "504":
        return 504, _status(
            504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."
        )
    return None


def model_not_found(model: str, version: str) -> dict[str, Any]:
    return _status(
        404,
        "NOT_FOUND",
        f"models/{model} is not found for API version {version}, "
        "or is not supported for generateContent. Call ListModels to see the list "
        "of available models and their supported methods.",
    )


def credentials_missing(version: str, method: str) -> dict[str, Any]:
    """What any API key gets from a method that needs OAuth (e.g. creating a tuned model)."""
    return _status(
        401,
        "UNAUTHENTICATED",
        "API keys are not supported by this API. Expected OAuth2 access token or other "
        "authentication credentials that assert a principal. "
        "See https://cloud.google.com/docs/authentication",
        [
            _error_info(
                "CREDENTIALS_MISSING",
                method=f"google.ai.generativelanguage.{version}.{method}",
            )
        ],
    )


def denied(message: str) -> dict[str, Any]:
    """403 without a key reason: another project's resource, or no such resource."""
    return _status(403, "PERMISSION_DENIED", message)


def file_denied(file_id: str) -> dict[str, Any]:
    return denied(f"You do not have permission to access the File {file_id} or it may not exist.")


CACHE_DENIED = "CachedContent not found (or permission denied)"
BATCH_DENIED = "Batch not found (or permission denied)"


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (an explicit gzip entry beats `*`)."""
    weights: dict[str, float] = {}
    for item in header.split(","):
        coding, *params = item.split(";")
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[coding.strip().lower()] = q
    for coding in ("gzip", "x-gzip", "*"):
        if coding in weights:
            return weights[coding] > 0
    return False


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seconds(duration: Any, default: float) -> float:
    """A google.protobuf.Duration in JSON ("300s", "1.5s"), or `default`."""
    if isinstance(duration, str) and duration.endswith("s"):
        with contextlib.suppress(ValueError):
            return float(duration[:-1])
    return default


def page_of(query: Mapping[str, str] | None, kind: str, items: list[Any]) -> web.Response:
    """One page of a list, as Google pages them: pageSize (default 10, at most 100) and an
    opaque nextPageToken; an empty list is an empty object."""
    query = query or {}
    try:
        size = min(100, max(1, int(query.get("pageSize", "10"))))
        token = query.get("pageToken", "")
        start = int(token, 36) if token else 0
    except ValueError:
        return web.json_response(
            _status(400, "INVALID_ARGUMENT", "Invalid page token."), status=400
        )
    chunk = items[start : start + size]
    doc: dict[str, Any] = {kind: chunk} if chunk else {}
    if start + size < len(items):
        doc["nextPageToken"] = _base36(start + size)
    return web.json_response(doc)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def field(doc: Any, camel: str) -> Any:
    """A field by its JSON (camelCase) or proto (snake_case) name: Google accepts both."""
    if not isinstance(doc, dict):
        return None
    if camel in doc:
        return doc[camel]
    return doc.get(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel))


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or None."""
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def references(doc: Any) -> tuple[list[str], list[str]]:
    """(file ids, cached-content ids) a request body names, anywhere in it."""
    files: list[str] = []
    caches: list[str] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        for k, v in node.items():
            if k in ("fileUri", "file_uri", "fileName", "file_name") and isinstance(v, str):
                found = re.search(r"(?:^|/)files/([^/?#:]+)$", v)
                if found:
                    files.append(found.group(1))
            elif k in ("cachedContent", "cached_content") and isinstance(v, str):
                found = re.search(r"cachedContents/([^/?#:]+)$", v)
                caches.append(found.group(1) if found else v)
            else:
                stack.append(v)
    return files, caches


def operation_of(method: str, path: str) -> str | None:
    """The COUNTED name of a state-changing call, or None."""
    if path.startswith("/upload/"):
        return "create:files" if method == "POST" else None
    found = re.fullmatch(r"/(?:v1|v1beta)/(.+)", path)
    if not found:
        return None
    rest = found.group(1)
    table: list[tuple[str, str, str]] = [
        ("DELETE", r"files/[^/:]+", "delete:files"),
        ("POST", r"cachedContents", "create:cachedContents"),
        ("PATCH", r"cachedContents/[^/:]+", "update:cachedContents"),
        ("DELETE", r"cachedContents/[^/:]+", "delete:cachedContents"),
        ("POST", r"models/[^/:]+:batchGenerateContent", "create:batches"),
        ("POST", r"batches/[^/:]+:cancel", "cancel:batches"),
        ("DELETE", r"batches/[^/:]+", "delete:batches"),
        ("POST", r"tunedModels", "create:tunedModels"),
    ]
    for m, pattern, name in table:
        if method == m and re.fullmatch(pattern, rest):
            return name
    return None


# --- JSON mode: an answer that parses, and satisfies the caller's schema where one is given

REPLY = "Hello from fake Gemini."
# What JSON mode answers without a schema (any JSON object would do).
NO_SCHEMA_REPLY: dict[str, Any] = {"text": REPLY}
_SCHEMA_DEPTH = 12  # deeper than this (or a $ref cycle), the smallest value of the type
_MAX_ITEMS = 50  # minItems/minProperties above this are not honoured (a fake, not a validator)


def _schema_type(schema: dict[str, Any]) -> str | None:
    """The one type to produce: Gemini's Schema says "OBJECT", JSON Schema "object" or a list."""
    kind = schema.get("type")
    if isinstance(kind, list):
        names = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in names if k.lower() != "null"), names[0] if names else None)
    if isinstance(kind, str):
        return kind.lower()
    if isinstance(schema.get("properties"), dict) or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema or "prefix_items" in schema:
        return "array"
    return None


def _bound(schema: dict[str, Any], *names: str) -> float | None:
    for name in names:
        value = field(schema, name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _resolve(ref: Any, root: dict[str, Any]) -> Any:
    """A local JSON pointer ("#/$defs/X", "#/definitions/X"), or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def example_of(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """The smallest value that satisfies `schema`: Gemini's Schema (responseSchema: OBJECT,
    properties, required, items, enum, nullable, anyOf, minItems, format) or a JSON Schema
    (responseJsonSchema, OpenAI json_schema: $ref/$defs, const, enum, anyOf/oneOf/allOf, type
    lists, prefixItems, minItems/minLength/minimum). Required properties only. Whatever the
    schema (odd, recursive, not a dict), this returns a JSON-serialisable value and never raises.
    """
    try:
        return _example(schema, schema if root is None else root, depth, 0)
    except Exception:  # a fake must answer; an odd schema gets the reply without one
        return dict(NO_SCHEMA_REPLY)


def _example(schema: Any, root: Any, depth: int, refs: int) -> Any:
    if not isinstance(schema, dict):
        return None if schema is False else {}
    if depth > _SCHEMA_DEPTH:
        return None
    target = _resolve(schema.get("$ref"), root) if "$ref" in schema else None
    if isinstance(target, dict) and refs < _SCHEMA_DEPTH:
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _example(merged, root, depth, refs + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for combo in ("anyOf", "any_of", "oneOf", "one_of"):
        options = schema.get(combo)
        if isinstance(options, list) and options:
            dicts = [o for o in options if isinstance(o, dict)]
            pick = next((o for o in dicts if _schema_type(o) != "null"), options[0])
            rest = {k: v for k, v in schema.items() if k != combo}
            if isinstance(pick, dict):
                return _example({**rest, **pick}, root, depth + 1, refs)
            return _example(rest, root, depth + 1, refs)
    parts = schema.get("allOf", schema.get("all_of"))
    if isinstance(parts, list) and parts:
        merged = {k: v for k, v in schema.items() if k not in ("allOf", "all_of")}
        own_props, own_required = merged.get("properties"), merged.get("required")
        props: dict[str, Any] = dict(own_props) if isinstance(own_props, dict) else {}
        required: list[Any] = list(own_required) if isinstance(own_required, list) else []
        for part in parts:
            if isinstance(part, dict):
                part = _resolve(part["$ref"], root) if "$ref" in part else part
            if isinstance(part, dict):
                merged = {**part, **merged}
                if isinstance(part.get("properties"), dict):
                    props.update(part["properties"])
                if isinstance(part.get("required"), list):
                    required += part["required"]
        merged.update(properties=props, required=required)
        return _example(merged, root, depth + 1, refs)
    kind = _schema_type(schema)
    if kind == "object":
        declared = schema.get("properties")
        shapes = declared if isinstance(declared, dict) else {}
        wanted = schema.get("required")
        names = [n for n in wanted if isinstance(n, str)] if isinstance(wanted, list) else []
        out: dict[str, Any] = {}
        for name in names:
            out[name] = _example(shapes.get(name, {"type": "string"}), root, depth + 1, refs)
        extra = _bound(schema, "minProperties")
        i = 0
        while extra is not None and len(out) < min(extra, _MAX_ITEMS):
            out.setdefault(f"p{i}", "")
            i += 1
        return out
    if kind == "array":
        prefix = schema.get("prefixItems", schema.get("prefix_items"))
        items = [
            _example(s, root, depth + 1, refs) for s in (prefix if isinstance(prefix, list) else [])
        ]
        want = int(min(_bound(schema, "minItems") or 0, _MAX_ITEMS))
        item = schema.get("items")
        while len(items) < want:
            items.append(_example(item if isinstance(item, dict) else {}, root, depth + 1, refs))
        return items
    if kind == "string":
        fmt = str(schema.get("format") or "").lower()
        text = {
            "date-time": "2025-01-01T00:00:00Z",
            "date": "2025-01-01",
            "time": "00:00:00Z",
            "email": "fake@example.com",
            "uri": "https://example.com/",
            "uuid": "00000000-0000-4000-8000-000000000000",
        }.get(fmt, "fake")
        shortest = int(min(_bound(schema, "minLength") or 0, 10_000))
        longest = _bound(schema, "maxLength")
        text = text.ljust(shortest, "x")
        return text[: int(longest)] if longest is not None and longest >= shortest else text
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "" if depth else {}


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    """1 if the bounds allow it (scores, counts and ratings often start at 1: the Gemini CLI's
    router rejects a complexity score of 0 its schema does not forbid), else 0, else the first
    bound-derived candidate they allow."""
    low, high = _bound(schema, "minimum"), _bound(schema, "maximum")
    x_low, x_high = _bound(schema, "exclusiveMinimum"), _bound(schema, "exclusiveMaximum")

    def allowed(v: float) -> bool:
        return (
            (low is None or v >= low)
            and (high is None or v <= high)
            and (x_low is None or v > x_low)
            and (x_high is None or v < x_high)
        )

    floor = max((b for b in (low, x_low) if b is not None), default=None)
    ceiling = min((b for b in (high, x_high) if b is not None), default=None)
    candidates: list[float] = [1.0, 0.0]
    for b in (low, x_low):
        if b is not None:
            candidates += [math.ceil(b), math.floor(b) + 1] if integer else [b, b + 1]
    for b in (high, x_high):
        if b is not None:
            candidates += [math.floor(b), math.ceil(b) - 1] if integer else [b, b - 1]
    if floor is not None and ceiling is not None:
        middle = (floor + ceiling) / 2
        candidates.append(math.floor(middle) if integer else middle)
    value = next((v for v in candidates if allowed(v)), 0.0)
    return int(value) if integer or value == int(value) else value


def _json_mime(mime: Any) -> bool:
    return isinstance(mime, str) and mime.split(";")[0].strip().lower() == "application/json"


def structured_text(doc: Any) -> str | None:
    """The text a native generate request in JSON mode (or enum mode) gets, or None.

    `generationConfig.responseMimeType: application/json` answers JSON: with `responseSchema` or
    `responseJsonSchema` (snake_case too) the smallest value that satisfies it, without one
    `NO_SCHEMA_REPLY`. `text/x.enum` answers the schema's first enum value.
    """
    config = field(doc, "generationConfig")
    if not isinstance(config, dict):
        return None
    mime = field(config, "responseMimeType")
    schema = field(config, "responseJsonSchema")
    if schema is None:
        schema = field(config, "responseSchema")
    if isinstance(mime, str) and mime.strip().lower() == "text/x.enum":
        enum = schema.get("enum") if isinstance(schema, dict) else None
        return str(enum[0]) if isinstance(enum, list) and enum else REPLY
    if not _json_mime(mime):
        return None
    value = NO_SCHEMA_REPLY if schema is None else example_of(schema)
    return json.dumps(value)


def openai_structured_text(doc: Any) -> str | None:
    """The content an OpenAI-compatible chat request with `response_format` json_object /
    json_schema gets (like `structured_text`), or None."""
    fmt = doc.get("response_format") if isinstance(doc, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return json.dumps(NO_SCHEMA_REPLY)
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return json.dumps(NO_SCHEMA_REPLY if schema is None else example_of(schema))
    return None


DOWNLOAD_BLOCK = 1 << 20
_DOWNLOAD_PATTERN = bytes(range(256)) * (DOWNLOAD_BLOCK // 256)


def download_blocks(size: int) -> Iterator[bytes]:
    """The bytes of a fake download of `size` bytes, a block at a time: block i starts with i
    (8 bytes, big-endian), so a lost, repeated or reordered block changes the file's hash."""
    for i, at in enumerate(range(0, size, DOWNLOAD_BLOCK)):
        block = i.to_bytes(8, "big") + _DOWNLOAD_PATTERN[8:]
        yield block[: min(DOWNLOAD_BLOCK, size - at)]


def split_text(text: str, parts: int) -> list[str]:
    """`text` in `parts` consecutive pieces (empty ones only if it is shorter than `parts`)."""
    parts = max(parts, 1)
    size, extra = divmod(len(text), parts)
    out: list[str] = []
    start = 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def cut_after(behaviour: str) -> int | None:
    """`cut:N`: the stream breaks after N events."""
    return int(behaviour.partition(":")[2] or 1) if behaviour.startswith("cut") else None


async def cut_connection(request: web.Request) -> None:
    """Break the connection mid-stream (a reset, not a clean end of the body)."""
    await asyncio.sleep(0.05)  # let the events before the cut reach the peer
    assert request.transport is not None
    request.transport.abort()


class EventStream:
    """A streamed answer, gzipped as Google does: each event is flushed (Z_SYNC_FLUSH) so the
    client can decode it as it arrives; aiohttp's own compression would buffer."""

    def __init__(self, resp: web.StreamResponse, compress: bool) -> None:
        self.resp = resp
        self.z = zlib.compressobj(wbits=31) if compress else None

    @classmethod
    async def open(cls, request: web.Request, content_type: str, compress: bool) -> EventStream:
        headers = {"Content-Type": content_type}
        if compress:
            headers["Content-Encoding"] = "gzip"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        return cls(resp, compress)

    async def write(self, data: bytes) -> None:
        if self.z is not None:
            data = self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)
        await self.resp.write(data)

    async def close(self) -> web.StreamResponse:
        if self.z is not None:
            await self.resp.write(self.z.flush())
        await self.resp.write_eof()
        return self.resp


PACIFIC = ZoneInfo("America/Los_Angeles")  # Google's days end at midnight here
QUOTA_IDS = {
    "rpm": (
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        "generate_content_free_tier_requests",
    ),
    "tpm": (
        "GenerateContentInputTokensPerModelPerMinute-FreeTier",
        "generate_content_free_tier_input_token_count",
    ),
    "rpd": (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        "generate_content_free_tier_requests",
    ),
}
QUOTA_METHODS = (
    ":generateContent",
    ":streamGenerateContent",
    ":embedContent",
    ":batchEmbedContents",
)


def quota_counted(method: str, path: str) -> bool:
    """Requests that spend a project's per-model quota (countTokens does not)."""
    return method == "POST" and (
        path.endswith(QUOTA_METHODS)
        or path.endswith(("/openai/chat/completions", "/openai/embeddings"))
    )


class QuotaBook:
    """Google's per-project, per-model limits: requests and input tokens over a rolling 60 s and
    the Pacific day. A request over a limit gets Google's 429 and is not counted."""

    def __init__(self) -> None:
        self.limits: dict[str, dict[str, dict[str, int]]] = {}
        self.delay: str | None = None
        self.spent: dict[tuple[str, str], dict[str, Any]] = {}

    def configure(self, limits: dict[str, Any], delay: Any) -> None:
        self.limits = {p: {m: dict(v) for m, v in ms.items()} for p, ms in limits.items()}
        self.delay = str(delay) if delay else None
        self.spent.clear()

    def _book(self, project: str, model: str, now: float) -> dict[str, Any]:
        day = datetime.fromtimestamp(now, PACIFIC).date().isoformat()
        book = self.spent.setdefault(
            (project, model),
            {"day": day, "requests": 0, "tokens": 0, "minute": [], "refused": {}},
        )
        if book["day"] != day:
            book.update(day=day, requests=0, tokens=0)
        book["minute"] = [e for e in book["minute"] if e[0] > now - 60]
        return book

    def spend(self, project: str, model: str, tokens: int, now: float) -> tuple[int, Any] | None:
        book = self._book(project, model, now)
        limits = self.limits.get(project, {}).get(model, {})
        minute = book["minute"]
        over = None
        if "rpd" in limits and book["requests"] + 1 > limits["rpd"]:
            over = ("rpd", "23s")
        elif "rpm" in limits and len(minute) + 1 > limits["rpm"]:
            over = ("rpm", f"{max(1, math.ceil(minute[-limits['rpm']][0] + 60 - now))}s")
        elif "tpm" in limits and sum(e[1] for e in minute) + tokens > limits["tpm"]:
            over = ("tpm", f"{max(1, math.ceil(minute[0][0] + 60 - now)) if minute else 60}s")
        if over is not None:
            kind, delay = over
            book["refused"][kind] = book["refused"].get(kind, 0) + 1
            quota_id, metric = QUOTA_IDS[kind]
            return 429, _quota(model, quota_id, metric, self.delay or delay, str(limits[kind]))
        minute.append((now, tokens))
        book["requests"] += 1
        book["tokens"] += tokens
        return None

    def report(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for project, model in list(self.spent):
            book = self._book(project, model, now)
            out.setdefault(project, {})[model] = {
                "requests_today": book["requests"],
                "tokens_today": book["tokens"],
                "requests_minute": len(book["minute"]),
                "tokens_minute": sum(e[1] for e in book["minute"]),
                "refused": book["refused"],
            }
        return out


class FakeGemini:
    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.models: dict[str, dict[str, str]] = {}
        self.projects: dict[str, str] = {}
        self.script: list[str] = []
        self.random: list[tuple[str, float]] = []
        self.rng = random.Random(1)
        self.served: list[str] = list(DEFAULT_MODELS)
        self.gzip = True
        self.log: list[dict[str, Any]] = []
        self.counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self.files: dict[str, str] = {}  # file id -> project
        self.file_names: dict[str, str] = {}  # file id -> displayName (echoed as Google does)
        self.uploads: dict[str, dict[str, Any]] = {}
        self.caches: dict[str, dict[str, Any]] = {}  # id -> {"project", "expires", "doc"}
        self.batches: dict[str, dict[str, Any]] = {}  # id -> {"project", "doc"}
        self.poisoned: dict[Any, str] = {}  # transport -> how its next request goes wrong
        self.quota = QuotaBook()

    # --- control
    async def set_config(self, request: web.Request) -> web.Response:
        doc = await request.json()
        if "keys" in doc:
            self.keys = dict(doc["keys"])
        self.models = dict(doc.get("models", self.models))
        self.projects = dict(doc.get("projects", self.projects))
        self.script = list(doc.get("script", []))
        self.random = list((doc.get("random") or {}).items())
        self.rng = random.Random(doc.get("seed", 1))
        served = doc.get("served_models")
        self.served = (
            list(DEFAULT_MODELS)
            if served is None
            else [str(m).removeprefix("models/") for m in served]
        )
        self.gzip = bool(doc.get("gzip", True))
        self.quota.configure(doc.get("quota") or {}, doc.get("quota_delay"))
        return web.json_response({"ok": True})

    async def get_spent(self, request: web.Request) -> web.Response:
        return web.json_response(self.quota.report(time.time()))

    async def get_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def get_counts(self, request: web.Request) -> web.Response:
        return web.json_response(self.counts)

    async def reset(self, request: web.Request) -> web.Response:
        self.log.clear()
        self.counts = dict.fromkeys(COUNTED, 0)
        self.quota.spent.clear()
        return web.json_response({"ok": True})

    def count(self, name: str | None) -> None:
        if name is not None:
            self.counts[name] = self.counts.get(name, 0) + 1

    def project(self, key: str) -> str:
        return self.projects.get(key, key)

    # --- Google's front door
    def credential(
        self, request: web.Request, openai: bool
    ) -> tuple[str | None, web.Response | None]:
        found = []
        if request.headers.get("x-goog-api-key"):
            found.append(request.headers["x-goog-api-key"])
        for name in ("key", "$key"):
            found += [v for v in request.query.getall(name, []) if v]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            found.append(auth[7:])
        if len(found) > 1:
            return None, self.error(
                400,
                _status(
                    400,
                    "INVALID_ARGUMENT",
                    "Multiple authentication credentials received. Please pass only one.",
                ),
                openai,
            )
        if not found:
            return None, self.error(
                403,
                _status(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to call this API.",
                ),
                openai,
            )
        return found[0], None

    @staticmethod
    def error(status: int, body: dict[str, Any], openai: bool) -> web.Response:
        return web.json_response([body] if openai else body, status=status)

    def behaviour(self, key: str, model: str) -> str:
        if key not in self.keys:
            return "invalid"
        per_model = self.models.get(key, {}).get(model)
        if per_model:
            return str(per_model)
        if self.script:
            return self.script.pop(0)
        if self.keys[key] == "random" and self.random:
            names, weights = zip(*self.random, strict=True)
            return str(self.rng.choices(names, weights)[0])
        return self.keys[key]

    def compress(self, request: web.Request) -> bool:
        return self.gzip and accepts_gzip(request.headers.get("Accept-Encoding", ""))

    def spoilt(self, request: web.Request) -> web.StreamResponse | None:
        """A request on a connection an earlier answer spoilt: no answer, or garbage."""
        how = self.poisoned.pop(request.transport, None)
        if how is None or request.transport is None:
            return None
        self.log.append(
            {
                "key": request.headers.get("x-goog-api-key"),
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "model": None,
                "stream": False,
                "t": time.time(),
                "status": 0,
                "poisoned": how,
            }
        )
        if how == "garbage":
            request.transport.write(b"\x00\x01not a status line\r\n\r\n")
        request.transport.abort()
        return web.Response()

    @staticmethod
    def head_with_body(request: web.Request) -> web.Response:
        """HEAD answered the wrong way: a body follows the head (written past aiohttp)."""
        body = b'{"wrong": "a HEAD answer has no body"}'
        assert request.transport is not None
        request.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        return web.Response(status=200)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        openai = path.startswith("/v1beta/openai/")
        spoilt = self.spoilt(request)
        if spoilt is not None:
            return spoilt
        if path.startswith("/upload/") and "upload_id" in request.query:
            return await self.upload_chunk(request)
        key, err = self.credential(request, openai)
        body = await request.read()
        model = self.model_of(path, body, openai)
        stream = path.endswith(":streamGenerateContent") or (
            openai and b'"stream": true' in body.replace(b'"stream":true', b'"stream": true')
        )
        entry: dict[str, Any] = {
            "key": key,
            "method": request.method,
            "path": path,
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "model": model,
            "stream": stream,
            "body": body[:4096].decode("utf-8", "replace"),  # what arrived (tests compare it)
            "t": time.time(),
            "status": None,
        }
        self.log.append(entry)
        self.count(operation_of(request.method, path))
        if request.method == "HEAD":
            entry["status"] = 200
            return self.head_with_body(request)
        if err is not None:
            entry["status"] = err.status
            return err
        assert key is not None
        behaviour = self.behaviour(key, model or "*")
        entry["behaviour"] = behaviour
        latency = float(request.headers.get("x-fake-latency-ms", "0")) / 1000
        name, _, arg = behaviour.partition(":")
        if name == "slow":
            latency += float(arg or 1000) / 1000
        if latency:
            await asyncio.sleep(latency)
        if name == "drop":
            entry["status"] = 0
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        fault = error_for(behaviour, key, model or "unknown", request.headers.get("Referer"))
        if fault is None and model is not None and quota_counted(request.method, path):
            tokens = int(request.headers.get("x-fake-prompt-tokens", "5"))
            fault = self.quota.spend(self.project(key), model, tokens, time.time())
        if fault is not None:
            entry["status"] = fault[0]
            return self.error(fault[0], fault[1], openai)
        resp = await self.answer(request, path, body, key, model, stream, behaviour, openai)
        entry["status"] = resp.status
        poison = request.headers.get("x-fake-poison", "")
        if poison in ("close", "garbage") and request.transport is not None:
            self.poisoned[request.transport] = poison
        return resp

    async def answer(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        key: str,
        model: str | None,
        stream: bool,
        behaviour: str,
        openai: bool,
    ) -> web.StreamResponse:
        """What a valid key that is not playing a fault gets."""
        version = "v1" if path.startswith("/v1/") else "v1beta"
        tuned = re.fullmatch(r"/(?:v1|v1beta)/tunedModels(?:/([^/:]+).*)?", path)
        if tuned:
            if tuned.group(1):
                return self.error(
                    403,
                    denied(
                        f"You do not have permission to access tuned model tunedModels/{tuned.group(1)}."
                    ),
                    False,
                )
            if request.method == "POST":
                return self.error(
                    401, credentials_missing(version, "ModelService.CreateTunedModel"), False
                )
            return web.json_response({})
        if request.method == "GET" and (
            path.startswith("/download/") or path.endswith(":download")
        ):
            return await self.download(request)
        if model is not None and model not in self.served:
            return self.error(404, model_not_found(model, version), openai)
        doc: Any = None
        if body and request.method in ("POST", "PATCH") and not path.startswith("/upload/"):
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
                problem = "Invalid JSON payload received. Unexpected token."
            else:
                problem = "Invalid JSON payload received. Expected an object."
            if not isinstance(doc, dict):
                return self.error(400, _status(400, "INVALID_ARGUMENT", problem), openai)
        if not openai and re.search(
            r"(:generateContent|:streamGenerateContent|:countTokens|:batchGenerateContent"
            r"|/cachedContents)$",
            path,
        ):
            refused = self.foreign_reference(doc, key)
            if refused is not None:
                return refused
        if path.startswith("/upload/"):
            return await self.upload_start(request, key, body)
        if openai:
            return await self.openai_answer(request, path, model, stream, behaviour, doc)
        resource = self.resource_answer(request.method, path, doc, key, model, request.query)
        if resource is not None:
            return resource
        return await self.native_answer(request, path, model, stream, behaviour, body)

    @staticmethod
    def model_of(path: str, body: bytes, openai: bool) -> str | None:
        if openai:
            one = re.search(r"/openai/models/(.+)$", path)
            if one:
                return one.group(1).removeprefix("models/")
            try:
                m = json.loads(body).get("model") if body else None
            except (ValueError, AttributeError):
                return None
            return m.removeprefix("models/") if isinstance(m, str) else None
        tuned = re.search(r"/(tunedModels/[^/:]+)", path)
        if tuned:
            return tuned.group(1)
        if re.fullmatch(r"/(?:v1|v1beta)/cachedContents", path) and body:
            try:
                m = json.loads(body).get("model")
            except (ValueError, AttributeError):
                return None
            return m.removeprefix("models/") if isinstance(m, str) else None
        found = re.search(r"/models/([^/:]+)", path)
        return found.group(1) if found else None

    # --- project-bound resources
    def live_cache(self, cache_id: str, project: str) -> dict[str, Any] | None:
        cache = self.caches.get(cache_id)
        if cache is not None and cache["expires"] <= time.time():
            del self.caches[cache_id]
            cache = None
        return cache if cache is not None and cache["project"] == project else None

    def foreign_reference(self, doc: Any, key: str) -> web.Response | None:
        """Google's 403 when a body names a file or cache that the key's project cannot see."""
        files, caches = references(doc)
        project = self.project(key)
        for file_id in files:
            if self.files.get(file_id) != project:
                return self.error(403, file_denied(file_id), False)
        for cache_id in caches:
            if self.live_cache(cache_id, project) is None:
                return self.error(403, denied(CACHE_DENIED), False)
        return None

    def resource_answer(
        self,
        method: str,
        path: str,
        doc: Any,
        key: str,
        model: str | None,
        request_query: Mapping[str, str] | None = None,
    ) -> web.Response | None:
        """Files, cached contents and batches, or None if the path is none of them."""
        found = re.fullmatch(
            r"/(?:v1|v1beta)/(files|cachedContents|batches)(?:/([^/:]+))?(:\w+)?", path
        )
        if not found:
            if path.endswith(":batchGenerateContent") and method == "POST":
                return self.create_batch(doc, key, model)
            return None
        kind, rid, verb = found.groups()
        project = self.project(key)
        now = time.time()
        if kind == "files":
            if rid is None:
                mine = [self.file_doc(f) for f, p in self.files.items() if p == project]
                return page_of(request_query, "files", mine)
            if self.files.get(rid) != project:
                return self.error(403, file_denied(rid), False)
            if method == "DELETE":
                del self.files[rid]
                return web.json_response({})
            return web.json_response(self.file_doc(rid))
        if kind == "cachedContents":
            if rid is None:
                if method == "POST":
                    return self.create_cache(doc, project, model, now)
                mine = [
                    c["doc"]
                    for i, c in list(self.caches.items())
                    if self.live_cache(i, project) is not None
                ]
                return page_of(request_query, "cachedContents", mine)
            cache = self.live_cache(rid, project)
            if cache is None:
                return self.error(403, denied(CACHE_DENIED), False)
            if method == "DELETE":
                del self.caches[rid]
                return web.json_response({})
            if method == "PATCH":
                expires = now + seconds(field(doc, "ttl"), cache["expires"] - now)
                cache["expires"] = expires
                cache["doc"].update(updateTime=rfc3339(now), expireTime=rfc3339(expires))
            return web.json_response(cache["doc"])
        # batches
        if rid is None:
            mine = [b["doc"] for b in self.batches.values() if b["project"] == project]
            return page_of(request_query, "operations", mine)
        batch = self.batches.get(rid)
        if batch is None or batch["project"] != project:
            return self.error(403, denied(BATCH_DENIED), False)
        if method == "DELETE":
            del self.batches[rid]
            return web.json_response({})
        if verb == ":cancel" and method == "POST":
            batch["doc"]["metadata"].update(state="BATCH_STATE_CANCELLED", updateTime=rfc3339(now))
            batch["doc"]["done"] = True
            return web.json_response({})
        return web.json_response(batch["doc"])

    def create_cache(self, doc: Any, project: str, model: str | None, now: float) -> web.Response:
        cache_id = uuid.uuid4().hex[:16]
        expires = now + seconds(field(doc, "ttl"), 3600.0)
        answer: dict[str, Any] = {"name": f"cachedContents/{cache_id}"}
        if model:
            answer["model"] = f"models/{model}"
        display = field(doc, "displayName")
        if isinstance(display, str):
            answer["displayName"] = display
        answer.update(
            createTime=rfc3339(now),
            updateTime=rfc3339(now),
            expireTime=rfc3339(expires),
            usageMetadata={"totalTokenCount": max(1, len(json.dumps(doc)) // 4)},
        )
        self.caches[cache_id] = {"project": project, "expires": expires, "doc": answer}
        return web.json_response(answer)

    def create_batch(self, doc: Any, key: str, model: str | None) -> web.Response:
        batch_id = uuid.uuid4().hex[:16]
        now = rfc3339(time.time())
        spec = field(doc, "batch")
        inline = field(field(field(spec, "inputConfig"), "requests"), "requests")
        count = len(inline) if isinstance(inline, list) else 0
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{model}",
            "displayName": field(spec, "displayName") or "",
            "createTime": now,
            "updateTime": now,
            "batchStats": {"requestCount": str(count), "pendingRequestCount": str(count)},
            "state": "BATCH_STATE_PENDING",
            "name": f"batches/{batch_id}",
        }
        answer = {"name": f"batches/{batch_id}", "metadata": meta}
        self.batches[batch_id] = {"project": self.project(key), "doc": answer}
        return web.json_response(answer)

    # --- native answers
    @staticmethod
    def candidate(
        model: str | None, text: str, final: bool, prompt: int, out: int
    ) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if final:
            cand["finishReason"] = "STOP"
        return {
            "candidates": [cand],
            "usageMetadata": {
                "promptTokenCount": prompt,
                "candidatesTokenCount": out,
                "totalTokenCount": prompt + out,
            },
            "modelVersion": model or "",
            "responseId": uuid.uuid4().hex[:16],
        }

    def model_doc(self, model: str) -> dict[str, Any]:
        embed = "embedding" in model
        return {
            "name": f"models/{model}",
            "displayName": model.replace("-", " ").title(),
            "supportedGenerationMethods": (
                ["embedContent", "batchEmbedContents"]
                if embed
                else [
                    "generateContent",
                    "countTokens",
                    "createCachedContent",
                    "batchGenerateContent",
                ]
            ),
        }

    async def native_answer(
        self,
        request: web.Request,
        path: str,
        model: str | None,
        stream: bool,
        behaviour: str,
        body: bytes,
    ) -> web.StreamResponse:
        if path.endswith(":countTokens"):
            return web.json_response({"totalTokens": 7})
        if path.endswith(":embedContent"):
            return web.json_response({"embedding": {"values": [0.1, 0.2, 0.3]}})
        if path.endswith(":batchEmbedContents"):
            try:
                requests = json.loads(body).get("requests") if body else None
            except (ValueError, AttributeError):
                requests = None
            n = len(requests) if isinstance(requests, list) else 0
            return web.json_response(
                {"embeddings": [{"values": [0.1, 0.2, 0.3]} for _ in range(n)]}
            )
        if re.search(r"/models/?$", path):
            return web.json_response({"models": [self.model_doc(m) for m in self.served]})
        if re.search(r"/models/[^/:]+$", path):
            return web.json_response(self.model_doc(model or ""))
        structured = structured_text(parse_json(body))
        if not stream:
            prompt = int(request.headers.get("x-fake-prompt-tokens", "5"))
            return web.json_response(self.candidate(model, structured or REPLY, True, prompt, 4))
        events = int(request.headers.get("x-fake-events", "3"))
        delay = float(request.headers.get("x-fake-delay-ms", "0")) / 1000
        pad = "x" * int(request.headers.get("x-fake-event-bytes", "0"))
        pieces = split_text(structured, events) if structured is not None else None
        sse = request.query.get("alt") == "sse"
        out = await EventStream.open(
            request, "text/event-stream" if sse else "application/json", self.compress(request)
        )
        cut = cut_after(behaviour)
        if not sse:
            await out.write(b"[")
        for i in range(events):
            if i == cut:
                await cut_connection(request)
                return out.resp
            if behaviour == "error_event" and i == events - 1:
                await out.write(
                    b"data: "
                    + json.dumps(_status(500, "INTERNAL", "stream failed")).encode()
                    + b"\r\n\r\n"
                )
                break
            text = pieces[i] if pieces is not None else f"chunk {i} " + pad
            doc = self.candidate(model, text, i == events - 1, 5, i + 1)
            data = json.dumps(doc).encode()
            if sse:
                await out.write(b"data: " + data + b"\r\n\r\n")
            else:
                await out.write((b"," if i else b"") + b"\r\n" + data)
            if delay:
                await asyncio.sleep(delay)
        if not sse:
            await out.write(b"]")
        return await out.close()

    # --- uploads (resumable protocol), files are bound to the uploading key's project
    def file_doc(self, file_id: str) -> dict[str, Any]:
        display = self.file_names.get(file_id)
        return {
            "name": f"files/{file_id}",
            **({"displayName": display} if display is not None else {}),
            "mimeType": "text/plain",
            "sizeBytes": "5",
            "state": "ACTIVE",
            "uri": f"https://generativelanguage.googleapis.com/v1beta/files/{file_id}",
        }

    @staticmethod
    async def download(request: web.Request) -> web.StreamResponse:
        """A file's bytes, made as they are sent (never held whole, so gigabytes cost the fake
        nothing): `download_blocks(x-fake-download-bytes)`, with a Content-Length unless
        x-fake-chunked is set."""
        size = int(request.headers.get("x-fake-download-bytes", str(DOWNLOAD_BLOCK)))
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        if not request.headers.get("x-fake-chunked"):
            resp.content_length = size
        await resp.prepare(request)
        for block in download_blocks(size):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def upload_start(self, request: web.Request, key: str, body: bytes) -> web.Response:
        upload_id = uuid.uuid4().hex
        try:
            meta = field(json.loads(body), "file") if body else None
        except ValueError:
            meta = None
        display = field(meta, "displayName")
        self.uploads[upload_id] = {
            "project": self.project(key),
            "data": b"",
            "display": display if isinstance(display, str) else None,
        }
        host = request.headers.get("host", request.host)
        url = f"http://{host}{request.path}?upload_id={upload_id}&upload_protocol=resumable"
        return web.Response(
            headers={
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Control-URL": url,
            }
        )

    async def upload_chunk(self, request: web.Request) -> web.Response:
        up = self.uploads.get(request.query["upload_id"])
        finalize = "finalize" in request.headers.get("X-Goog-Upload-Command", "")
        if finalize:
            self.count("finalize:files")
        self.log.append(
            {
                "key": request.headers.get("x-goog-api-key"),
                "method": request.method,
                "path": request.path,
                "query": request.query_string,  # the upload_id the fake handed out, if it is one
                "model": None,
                "stream": False,
                "t": time.time(),
                "status": 200 if up else 404,
                "upload": True,
            }
        )
        if up is None:
            return web.json_response(_status(404, "NOT_FOUND", "upload not found"), status=404)
        up["data"] += await request.read()
        if not finalize:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        file_id = uuid.uuid4().hex[:12]
        self.files[file_id] = up["project"]
        if up.get("display") is not None:
            self.file_names[file_id] = up["display"]
        return web.json_response(
            {"file": self.file_doc(file_id)}, headers={"X-Goog-Upload-Status": "final"}
        )

    # --- OpenAI-compatible answers
    async def openai_answer(
        self,
        request: web.Request,
        path: str,
        model: str | None,
        stream: bool,
        behaviour: str,
        doc: Any = None,
    ) -> web.StreamResponse:
        now = int(time.time())

        def model_object(m: str) -> dict[str, Any]:
            return {"id": f"models/{m}", "object": "model", "created": now, "owned_by": "google"}

        if re.search(r"/openai/models/.+$", path):
            return web.json_response(model_object(model or ""))
        if path.endswith("/models"):
            return web.json_response(
                {"object": "list", "data": [model_object(m) for m in self.served]}
            )
        if path.endswith("/embeddings"):
            inputs = doc.get("input") if isinstance(doc, dict) else None
            many = isinstance(inputs, list) and not all(isinstance(x, int) for x in inputs)
            n = len(inputs) if many and isinstance(inputs, list) else 1
            return web.json_response(
                {
                    "object": "list",
                    "model": model,
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                        for i in range(n)
                    ],
                    "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n},
                }
            )
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
        structured = openai_structured_text(doc)
        if not stream:
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": now,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": structured or REPLY},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                }
            )
        events = int(request.headers.get("x-fake-events", "3"))
        delay = float(request.headers.get("x-fake-delay-ms", "0")) / 1000
        out = await EventStream.open(request, "text/event-stream", self.compress(request))
        cut = cut_after(behaviour)
        pieces = split_text(structured, events) if structured is not None else None
        for i in range(events):
            if i == cut:
                await cut_connection(request)
                return out.resp
            last = i == events - 1
            chunk: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "content": pieces[i] if pieces is not None else f"chunk {i} ",
                        },
                        "finish_reason": "stop" if last else None,
                    }
                ],
            }
            if last:
                chunk["usage"] = {
                    "prompt_tokens": 5,
                    "completion_tokens": events,
                    "total_tokens": 5 + events,
                }
            await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if delay:
                await asyncio.sleep(delay)
        await out.write(b"data: [DONE]\n\n")
        return await out.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FAKE = web.AppKey("fake", FakeGemini)


def make_app(fake: FakeGemini | None = None) -> web.Application:
    fake = fake or FakeGemini()

    @web.middleware
    async def gzip_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Gzip every buffered answer with a body, as Google does; streams gzip themselves."""
        resp = await handler(request)
        if (
            type(resp) is not web.Response
            or request.path.startswith("/_fake/")
            or not fake.compress(request)
            or "Content-Encoding" in resp.headers
            or not isinstance(resp.body, bytes)
            or not resp.body
        ):
            return resp
        headers = CIMultiDict(resp.headers)
        headers.pop("Content-Length", None)
        headers["Content-Encoding"] = "gzip"
        return web.Response(
            body=gzip.compress(resp.body), status=resp.status, reason=resp.reason, headers=headers
        )

    app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[gzip_answers])
    app.router.add_post("/_fake/config", fake.set_config)
    app.router.add_get("/_fake/log", fake.get_log)
    app.router.add_get("/_fake/counts", fake.get_counts)
    app.router.add_post("/_fake/reset", fake.reset)
    app.router.add_get("/_fake/spent", fake.get_spent)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    app[FAKE] = fake
    with warnings.catch_warnings():  # the string key stays for callers that used it
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["fake"] = fake
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--keys", default="", help="comma list of secret=behaviour (behaviour defaults to ok)"
    )
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args()
    fake = FakeGemini()
    for item in filter(None, args.keys.split(",")):
        secret, _, behaviour = item.partition("=")
        fake.keys[secret] = behaviour or "ok"

    async def serve() -> None:
        runner = web.AppRunner(make_app(fake), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if args.port_file:
            with open(args.port_file, "w") as f:
                f.write(str(port))
        print(f"fake Gemini listening on http://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
