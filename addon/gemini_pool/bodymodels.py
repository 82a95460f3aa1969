"""The models a native request body names besides the one in its path (for `limits.models`).

Two native requests use a model the path does not name: creating (or changing) a cached content
(`POST /v1beta/cachedContents` with a top-level `"model": "models/gemini-2.5-pro"`) and
`models/X:countTokens` with `generateContentRequest.model`. A client's model globs must hold for
those too. The body may be megabytes (a cache is for long content), so it is not parsed whole on
the event loop: `jsonscan` finds the top-level members and then the `model` inside
`generateContentRequest`; every spelling Google reads (camelCase, snake_case, a repeated member)
is taken. Pure logic, no I/O.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

from .jsonscan import every
from .routing import Api, Route, RouteError

_CACHES = re.compile(r"/v1(?:beta|alpha)?/cachedContents(?:/[^/:]+)?/?")
_TOP = frozenset({"model", "generateContentRequest", "generate_content_request"})
_MODEL = frozenset({"model"})
_PREFIXES = ("models/", "tunedModels/")


def reads_body_model(method: str, route: Route) -> bool:
    """Whether Google takes a model from this request's body."""
    if route.api is not Api.NATIVE or method not in ("POST", "PATCH"):
        return False
    path = re.sub(r"/{2,}", "/", unquote(route.path))  # as lenient as a server might be
    return route.method == "countTokens" or _CACHES.fullmatch(path) is not None


def body_models(method: str, route: Route, body: bytes) -> list[str]:
    """Every model the body names for Google to use, "models/" taken off (as routing does).
    Raises RouteError (400) for a body that cannot be read: it might name any model."""
    if not reads_body_model(method, route) or not body or body.isspace():
        return []
    try:
        raws: list[bytes] = []
        for name, raw in every(body, _TOP):
            if name == "model":
                raws.append(raw)
            elif raw != b"null":  # generateContentRequest: its own model
                raws += [inner for _model_name, inner in every(raw, _MODEL)]
        models = [_model(raw) for raw in raws if raw != b"null"]
    except ValueError as e:  # ScanError, a bad escape in the model
        raise RouteError(
            400,
            f"request body is not readable JSON ({e}): a client limited to some models must "
            "send the body it means plainly (no Content-Encoding)",
            "invalid_json",
        ) from None
    return models


def _model(raw: bytes) -> str:
    value = json.loads(raw) if raw.startswith(b'"') else None
    if not isinstance(value, str):
        raise RouteError(400, "'model' must be a string", "invalid_model")
    for prefix in _PREFIXES:
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value
