"""Model fallback (`fallbacks:` in the key file): when every project is out for the model asked,
serve a generation with the first configured fallback model that has a usable key.

Pure logic: no mitmproxy, no I/O. Opt-in (no `fallbacks:`, no fallback), one level only (the
fallbacks of a fallback are not followed), and only for requests that can be rewritten safely:
native `generateContent` / `streamGenerateContent` on `models/<id>` and OpenAI-compatible chat
completions. Never for a request bound to a model-specific resource: a body that names a cached
content (`cachedContent` / `cached_content`, anywhere) stays with its model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Any

from .jsonscan import ScanError, spans
from .routing import Api, Route, valid_model

MODEL_HEADER = "x-gemini-proxy-model"  # on an answer served by a fallback model: which one
MAX_FALLBACKS = 8  # models one model may fall back to
GENERATION_METHODS = frozenset({"generateContent", "streamGenerateContent"})
OPENAI_GENERATION = "/chat/completions"
BOUND_MARKERS = (b"cachedContent", b"cached_content")  # a model-specific resource
_NATIVE_MODEL = re.compile(r"/models/([^/:?]+):")

Fallbacks = tuple[tuple[str, tuple[str, ...]], ...]  # (model, its fallbacks in order)


class FallbackError(ValueError):
    """A `fallbacks:` entry that cannot be used; `line` is where in the key file."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def parse_fallbacks(raw: Any, line: int | None) -> Fallbacks:
    """`fallbacks: {model: [model, ...]}`. Model ids as routing takes them (a `models/` prefix is
    dropped); unknown models are fine, a model falling back to itself or twice to one is not."""
    if raw is None:
        return ()
    lines: Mapping[Any, int] = getattr(raw, "lines", {})
    if not isinstance(raw, dict):
        raise FallbackError(
            "fallbacks: must be a mapping of model to a list of models "
            "(gemini-2.5-pro: [gemini-2.5-flash])",
            line,
        )
    out: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for name, targets in raw.items():
        where = lines.get(name, line)
        model = _model_id(name, where, "fallbacks")
        if model in seen:
            raise FallbackError(f"fallbacks: {model!r} is listed twice", where)
        seen.add(model)
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            raise FallbackError(
                f"fallbacks, '{model}': must be a non-empty list of model ids", where
            )
        if len(targets) > MAX_FALLBACKS:
            raise FallbackError(
                f"fallbacks, '{model}': at most {MAX_FALLBACKS} fallback models", where
            )
        chosen: list[str] = []
        for t in targets:
            target = _model_id(t, where, f"fallbacks, '{model}'")
            if target == model:
                raise FallbackError(
                    f"fallbacks, '{model}': a model may not fall back to itself", where
                )
            if target in chosen:
                raise FallbackError(f"fallbacks, '{model}': {target!r} is listed twice", where)
            chosen.append(target)
        out.append((model, tuple(chosen)))
    return tuple(out)


def _model_id(value: Any, line: int | None, what: str) -> str:
    model = value.strip().removeprefix("models/") if isinstance(value, str) else None
    if model is None or not valid_model(model):
        raise FallbackError(
            f"{what}: {value!r} is not a model id (1-128 letters, digits, '.', '_', '-', e.g."
            " gemini-2.5-flash)",
            line,
        )
    return model


def targets_of(fallbacks: Fallbacks, model: str | None) -> tuple[str, ...]:
    return next((t for m, t in fallbacks if m == model), ())


def eligible(http_method: str, route: Route, body: bytes) -> bool:
    """Can this request be served by another model? A generation the proxy can rewrite, not
    bound to a model-specific resource."""
    if http_method != "POST" or route.model is None:
        return False
    if route.api is Api.OPENAI:
        if not route.path.endswith(OPENAI_GENERATION):
            return False
    else:
        m = _NATIVE_MODEL.search(route.path)
        if route.method not in GENERATION_METHODS or m is None or m.group(1) != route.model:
            return False
    return not any(marker in body for marker in BOUND_MARKERS)


def choose(
    targets: Collection[str],
    allowed: Collection[str],
    usable: Callable[[str], bool],
) -> str | None:
    """The first fallback model the client may use (`allowed`: its model globs; empty: any) and
    some key can serve now."""
    for model in targets:
        if allowed and not any(fnmatchcase(model, g) for g in allowed):
            continue
        if usable(model):
            return model
    return None


def rewrite(route: Route, body: bytes, model: str) -> tuple[Route, bytes]:
    """The request for `model`: the native path's model, or the OpenAI body's `model`.

    Raises ValueError if the request cannot be rewritten (callers check `eligible` first)."""
    if route.api is Api.OPENAI:
        return replace(route, model=model), _openai_body(body, model)
    m = _NATIVE_MODEL.search(route.path)
    if m is None:
        raise ValueError("no models/<id>: in the path")
    path = route.path[: m.start(1)] + model + route.path[m.end(1) :]
    return replace(route, path=path, model=model), body


def _openai_body(body: bytes, model: str) -> bytes:
    """The body with its top-level `model` replaced, every other byte kept."""
    try:
        found = spans(body, frozenset({"model"}))
    except ScanError as e:
        raise ValueError(str(e)) from None
    if "model" not in found:
        raise ValueError("no top-level 'model'")
    start, end = found["model"]
    return body[:start] + json.dumps(model).encode() + body[end:]
