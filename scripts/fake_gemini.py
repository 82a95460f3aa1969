#!/usr/bin/env python3
"""A loopback stand-in for generativelanguage.googleapis.com, for tests, the demo and the benchmark.

It checks credentials as Google does (exactly one of x-goog-api-key / ?key= / Authorization),
answers native unary, SSE and JSON-array streams and the OpenAI-compatible API, and plays
scripted faults with Gemini's real error bodies. It logs which key served each request.

Control API (JSON, under /_fake/):
  POST /_fake/config  {"keys": {"<secret>": "<behaviour>"}, "models": {"<secret>": {"<model>": "<behaviour>"}},
                       "projects": {"<secret>": "<project>"}, "script": ["<behaviour>", ...],
                       "random": {"<behaviour>": weight, ...}, "seed": 1}   (for keys whose behaviour is "random")
  GET  /_fake/log     [{"key", "path", "model", "status", "stream", "t"}]
  POST /_fake/reset   clear the log (keeps the config)
Behaviours: ok, dead, unauth, leaked, suspended, blocked, minute[:secs], day, limit0, cap, 429bare,
500, 503, 504, drop (close without answer), slow:<ms>, cut:<events> (stream cut mid-way),
error_event (in-band error event in a 200 stream). Unknown keys answer API_KEY_INVALID.
Per-request knobs (headers): x-fake-events (stream events, default 3), x-fake-delay-ms (between
events), x-fake-latency-ms (before answering), x-fake-event-bytes (padding per stream event).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from typing import Any

from aiohttp import web

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


def error_for(behaviour: str, key: str, model: str) -> tuple[int, dict[str, Any]] | None:
    """Gemini's real error body for a behaviour, or None if it is not an error behaviour."""
    name, _, arg = behaviour.partition(":")
    if name == "dead" or name == "invalid":
        msg = "API key not valid. Please pass a valid API key."
        return 400, _status(
            400,
            "INVALID_ARGUMENT",
            msg,
            [
                _error_info("API_KEY_INVALID"),
                {
                    "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                    "locale": "en-US",
                    "message": msg,
                },
            ],
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


def cut_after(behaviour: str) -> int | None:
    """`cut:N`: the stream breaks after N events."""
    return int(behaviour.partition(":")[2] or 1) if behaviour.startswith("cut") else None


async def cut_connection(request: web.Request) -> None:
    """Break the connection mid-stream (a reset, not a clean end of the body)."""
    await asyncio.sleep(0.05)  # let the events before the cut reach the peer
    assert request.transport is not None
    request.transport.abort()


class FakeGemini:
    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.models: dict[str, dict[str, str]] = {}
        self.projects: dict[str, str] = {}
        self.script: list[str] = []
        self.random: list[tuple[str, float]] = []
        self.rng = random.Random(1)
        self.log: list[dict[str, Any]] = []
        self.files: dict[str, str] = {}  # file id -> project
        self.uploads: dict[str, dict[str, Any]] = {}

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
        return web.json_response({"ok": True})

    async def get_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def reset(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.json_response({"ok": True})

    # --- Google's front door
    def credential(
        self, request: web.Request, openai: bool
    ) -> tuple[str | None, web.Response | None]:
        found = []
        if request.headers.get("x-goog-api-key"):
            found.append(request.headers["x-goog-api-key"])
        if request.query.get("key"):
            found.append(request.query["key"])
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        openai = path.startswith("/v1beta/openai/")
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
            "path": path,
            "query": request.query_string,
            "model": model,
            "stream": stream,
            "body": body[:4096].decode("utf-8", "replace"),  # what arrived (tests compare it)
            "t": time.time(),
            "status": None,
        }
        self.log.append(entry)
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
        fault = error_for(behaviour, key, model or "unknown")
        if fault is not None:
            entry["status"] = fault[0]
            return self.error(fault[0], fault[1], openai)
        if model == "no-such-model":
            entry["status"] = 404
            return self.error(
                404,
                _status(
                    404,
                    "NOT_FOUND",
                    f"models/{model} is not found for API version v1beta, "
                    "or is not supported for generateContent. Call ListModels to see the list "
                    "of available models and their supported methods.",
                ),
                openai,
            )
        if body and request.method == "POST" and not path.startswith("/upload/"):
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
                problem = "Invalid JSON payload received. Unexpected token."
            else:
                problem = "Invalid JSON payload received. Expected an object."
            if not isinstance(doc, dict):
                entry["status"] = 400
                return self.error(400, _status(400, "INVALID_ARGUMENT", problem), openai)
        entry["status"] = 200
        if path.startswith("/upload/"):
            return await self.upload_start(request, key, body)
        if openai:
            return await self.openai_answer(request, path, model, stream, behaviour)
        return await self.native_answer(request, path, model, stream, behaviour, key)

    @staticmethod
    def model_of(path: str, body: bytes, openai: bool) -> str | None:
        if openai:
            try:
                m = json.loads(body).get("model") if body else None
            except (ValueError, AttributeError):
                return None
            return m.removeprefix("models/") if isinstance(m, str) else None
        found = re.search(r"/models/([^/:]+)", path)
        return found.group(1) if found else None

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

    async def native_answer(
        self,
        request: web.Request,
        path: str,
        model: str | None,
        stream: bool,
        behaviour: str,
        key: str,
    ) -> web.StreamResponse:
        if path.endswith(":countTokens"):
            return web.json_response({"totalTokens": 7})
        if path.endswith(":embedContent"):
            return web.json_response({"embedding": {"values": [0.1, 0.2, 0.3]}})
        if re.search(r"/models/?$", path):
            return web.json_response(
                {
                    "models": [
                        {
                            "name": "models/gemini-2.5-flash",
                            "displayName": "Gemini 2.5 Flash",
                            "supportedGenerationMethods": ["generateContent"],
                        }
                    ]
                }
            )
        if re.search(r"/models/[^/:]+$", path):
            return web.json_response(
                {
                    "name": f"models/{model}",
                    "displayName": model,
                    "supportedGenerationMethods": ["generateContent"],
                }
            )
        files = re.search(r"/files/([^/:]+)$", path)
        if files:
            owner = self.files.get(files.group(1))
            if owner is None or owner != self.projects.get(key, key):
                return self.error(
                    403,
                    _status(
                        403,
                        "PERMISSION_DENIED",
                        f"You do not have permission to access the File {files.group(1)} or it may not exist.",
                    ),
                    False,
                )
            return web.json_response(self.file_doc(files.group(1)))
        if not stream:
            return web.json_response(self.candidate(model, "Hello from fake Gemini.", True, 5, 4))
        events = int(request.headers.get("x-fake-events", "3"))
        delay = float(request.headers.get("x-fake-delay-ms", "0")) / 1000
        pad = "x" * int(request.headers.get("x-fake-event-bytes", "0"))
        sse = request.query.get("alt") == "sse"
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream" if sse else "application/json"}
        )
        await resp.prepare(request)
        cut = cut_after(behaviour)
        if not sse:
            await resp.write(b"[")
        for i in range(events):
            if i == cut:
                await cut_connection(request)
                return resp
            if behaviour == "error_event" and i == events - 1:
                await resp.write(
                    b"data: "
                    + json.dumps(_status(500, "INTERNAL", "stream failed")).encode()
                    + b"\r\n\r\n"
                )
                break
            doc = self.candidate(model, f"chunk {i} " + pad, i == events - 1, 5, i + 1)
            data = json.dumps(doc).encode()
            if sse:
                await resp.write(b"data: " + data + b"\r\n\r\n")
            else:
                await resp.write((b"," if i else b"") + b"\r\n" + data)
            if delay:
                await asyncio.sleep(delay)
        if not sse:
            await resp.write(b"]")
        await resp.write_eof()
        return resp

    # --- uploads (resumable protocol), files are bound to the uploading key's project
    def file_doc(self, file_id: str) -> dict[str, Any]:
        return {
            "name": f"files/{file_id}",
            "mimeType": "text/plain",
            "sizeBytes": "5",
            "state": "ACTIVE",
            "uri": f"https://generativelanguage.googleapis.com/v1beta/files/{file_id}",
        }

    async def upload_start(self, request: web.Request, key: str, body: bytes) -> web.Response:
        upload_id = uuid.uuid4().hex
        self.uploads[upload_id] = {"project": self.projects.get(key, key), "data": b""}
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
        self.log.append(
            {
                "key": request.headers.get("x-goog-api-key"),
                "path": request.path,
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
        if "finalize" not in request.headers.get("X-Goog-Upload-Command", ""):
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        file_id = uuid.uuid4().hex[:12]
        self.files[file_id] = up["project"]
        return web.json_response(
            {"file": self.file_doc(file_id)}, headers={"X-Goog-Upload-Status": "final"}
        )

    # --- OpenAI-compatible answers
    async def openai_answer(
        self, request: web.Request, path: str, model: str | None, stream: bool, behaviour: str
    ) -> web.StreamResponse:
        now = int(time.time())
        if path.endswith("/models"):
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "models/gemini-2.5-flash",
                            "object": "model",
                            "created": now,
                            "owned_by": "google",
                        }
                    ],
                }
            )
        if path.endswith("/embeddings"):
            return web.json_response(
                {
                    "object": "list",
                    "model": model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }
            )
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
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
                            "message": {"role": "assistant", "content": "Hello from fake Gemini."},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                }
            )
        events = int(request.headers.get("x-fake-events", "3"))
        delay = float(request.headers.get("x-fake-delay-ms", "0")) / 1000
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        cut = cut_after(behaviour)
        for i in range(events):
            if i == cut:
                await cut_connection(request)
                return resp
            last = i == events - 1
            chunk: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": f"chunk {i} "},
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
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if delay:
                await asyncio.sleep(delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def make_app(fake: FakeGemini | None = None) -> web.Application:
    fake = fake or FakeGemini()
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/_fake/config", fake.set_config)
    app.router.add_get("/_fake/log", fake.get_log)
    app.router.add_post("/_fake/reset", fake.reset)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
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
