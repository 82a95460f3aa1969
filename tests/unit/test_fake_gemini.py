"""The fake Gemini upstream is as harsh as Google: gzip, unknown models, project-bound resources."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fake_gemini import (
    DEFAULT_MODELS,
    NO_SCHEMA_REPLY,
    REPLY,
    FakeGemini,
    example_of,
    make_app,
    structured_text,
)

A, B, C = "AIzaSyKEY-A", "AIzaSyKEY-B", "AQ.KEY-C"
FLASH = "gemini-2.5-flash"
GEN = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
GZ = {"Accept-Encoding": "gzip, deflate"}

Scenario = Callable[[aiohttp.ClientSession, FakeGemini], Awaitable[None]]


def run(scenario: Scenario, config: dict[str, Any] | None = None, **session: Any) -> FakeGemini:
    """Serve a fresh fake on 127.0.0.1, configure it, and run `scenario` against it (≤ 4 s)."""
    fake = FakeGemini()

    async def main() -> None:
        runner = web.AppRunner(make_app(fake), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession(
                f"http://{host}:{port}", timeout=aiohttp.ClientTimeout(total=4), **session
            ) as s:
                doc = config or {"keys": {A: "ok", B: "ok", C: "ok"}}
                async with s.post("/_fake/config", json=doc) as r:
                    assert r.status == 200
                await asyncio.wait_for(scenario(s, fake), 4)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return fake


async def fetch(
    s: aiohttp.ClientSession, method: str, path: str, key: str | None = A, **kw: Any
) -> tuple[aiohttp.ClientResponse, Any]:
    """(response, decoded JSON) whatever the session's auto_decompress."""
    headers = {**GZ, **kw.pop("headers", {})}
    if key is not None:
        headers["x-goog-api-key"] = key
    async with s.request(method, path, headers=headers, **kw) as r:
        raw = await r.read()
    if r.headers.get("Content-Encoding") == "gzip" and raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return r, json.loads(raw) if raw else None


async def counts(s: aiohttp.ClientSession) -> dict[str, int]:
    async with s.get("/_fake/counts") as r:
        return dict(await r.json())


def reason(doc: Any) -> str | None:
    details = doc["error"].get("details", [])
    return next((d["reason"] for d in details if "reason" in d), None)


# --- compression


def test_unary_answers_and_errors_are_gzipped() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        async with s.post(
            f"/v1beta/models/{FLASH}:generateContent", json=GEN, headers={**GZ, "x-goog-api-key": A}
        ) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            raw = await r.read()
        doc = json.loads(gzip.decompress(raw))
        assert doc["candidates"][0]["content"]["parts"][0]["text"] == "Hello from fake Gemini."
        async with s.post(
            f"/v1beta/models/{FLASH}:generateContent",
            json=GEN,
            headers={**GZ, "x-goog-api-key": "AIzaSyUNKNOWN"},
        ) as r:
            assert r.status == 400 and r.headers["Content-Encoding"] == "gzip"
            assert reason(json.loads(gzip.decompress(await r.read()))) == "API_KEY_INVALID"

    run(scenario, auto_decompress=False)


def test_sse_is_gzipped_and_the_first_event_decodes_before_the_stream_ends() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        headers = {**GZ, "x-goog-api-key": A, "x-fake-events": "3", "x-fake-delay-ms": "400"}
        async with s.post(
            f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse", json=GEN, headers=headers
        ) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            z = zlib.decompressobj(wbits=47)
            text = b""
            while b"\r\n\r\n" not in text:  # the first event, well before the next (400 ms)
                text += z.decompress(await asyncio.wait_for(r.content.readany(), 0.3))
            assert not r.content.at_eof()
            first, _, _ = text.partition(b"\r\n\r\n")
            assert first.startswith(b"data: {")
            assert json.loads(first[6:])["candidates"][0]["content"]["parts"][0]["text"]
            text += z.decompress(await r.read())
        assert z.eof and text.count(b"data: ") == 3

    run(scenario, auto_decompress=False)


def test_json_array_and_openai_streams_are_gzipped() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        async with s.post(
            f"/v1/models/{FLASH}:streamGenerateContent",
            json=GEN,
            headers={**GZ, "x-goog-api-key": A},
        ) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert len(json.loads(gzip.decompress(await r.read()))) == 3
        body = {"model": FLASH, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with s.post(
            "/v1beta/openai/chat/completions",
            json=body,
            headers={**GZ, "Authorization": f"Bearer {A}"},
        ) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()).endswith(b"data: [DONE]\n\n")

    run(scenario, auto_decompress=False)


def test_a_cut_and_an_error_event_still_work_under_gzip() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        z = zlib.decompressobj(wbits=47)
        text = b""
        headers = {**GZ, "x-goog-api-key": A, "x-fake-events": "5"}
        try:
            async with s.post(
                f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse", json=GEN, headers=headers
            ) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                async for chunk in r.content.iter_any():
                    text += z.decompress(chunk)
        except aiohttp.ClientError:
            pass
        assert text.count(b"data: ") == 2 and not z.eof  # two events, then a reset
        headers["x-goog-api-key"] = B
        async with s.post(
            f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse", json=GEN, headers=headers
        ) as r:
            events = gzip.decompress(await r.read()).split(b"\r\n\r\n")
        assert json.loads(events[-2][6:])["error"]["status"] == "INTERNAL"

    run(scenario, {"keys": {A: "cut:2", B: "error_event"}}, auto_decompress=False)


def test_identity_without_accept_encoding_or_with_gzip_off() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        path = f"/v1beta/models/{FLASH}:generateContent"
        async with s.post(path, json=GEN, headers={"x-goog-api-key": A}) as r:
            assert "Content-Encoding" not in r.headers
            assert (await r.json())["candidates"]
        async with s.post(
            path, json=GEN, headers={"x-goog-api-key": A, "Accept-Encoding": "gzip;q=0"}
        ) as r:
            assert "Content-Encoding" not in r.headers
        async with s.post("/_fake/config", json={"keys": {A: "ok"}, "gzip": False}) as r:
            assert r.status == 200
        for p in (path, f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"):
            async with s.post(p, json=GEN, headers={**GZ, "x-goog-api-key": A}) as r:
                assert "Content-Encoding" not in r.headers
                assert (await r.read()).count(b'"candidates"') >= 1

    run(scenario, auto_decompress=False, skip_auto_headers=["Accept-Encoding"])


# --- models


def test_unknown_models_get_googles_404_and_the_list_is_the_served_set() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        r, doc = await fetch(s, "POST", "/v1beta/models/gemini-9-ultra:generateContent", json=GEN)
        assert r.status == 404 and doc["error"]["status"] == "NOT_FOUND"
        assert doc["error"]["message"].startswith(
            "models/gemini-9-ultra is not found for API version v1beta, or is not supported "
            "for generateContent. Call ListModels"
        )
        r, doc = await fetch(s, "GET", "/v1/models/gemini-9-ultra")
        assert r.status == 404 and "API version v1," in doc["error"]["message"]
        body = {"model": "gemini-9-ultra", "messages": [{"role": "user", "content": "hi"}]}
        r, doc = await fetch(
            s,
            "POST",
            "/v1beta/openai/chat/completions",
            key=None,
            json=body,
            headers={"Authorization": f"Bearer {A}"},
        )
        assert r.status == 404 and doc[0]["error"]["code"] == 404
        r, doc = await fetch(s, "GET", "/v1beta/models")
        assert [m["name"] for m in doc["models"]] == [f"models/{m}" for m in DEFAULT_MODELS]
        r, doc = await fetch(
            s,
            "GET",
            "/v1beta/openai/models/gemini-2.5-pro",
            key=None,
            headers={"Authorization": f"Bearer {A}"},
        )
        assert r.status == 200 and doc["id"] == "models/gemini-2.5-pro" and doc["object"] == "model"
        async with s.post(
            "/_fake/config", json={"keys": {A: "ok"}, "served_models": ["models/x-1"]}
        ):
            pass
        r, doc = await fetch(s, "GET", "/v1beta/models")
        assert [m["name"] for m in doc["models"]] == ["models/x-1"]
        r, _ = await fetch(s, "POST", f"/v1beta/models/{FLASH}:generateContent", json=GEN)
        assert r.status == 404

    run(scenario)


def test_tuned_models_are_the_callers_problem_not_the_keys() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        r, doc = await fetch(s, "POST", "/v1beta/tunedModels", json={"baseModel": "models/x"})
        assert r.status == 401 and doc["error"]["status"] == "UNAUTHENTICATED"
        assert doc["error"]["message"].startswith("API keys are not supported by this API.")
        info = doc["error"]["details"][0]
        assert info["reason"] == "CREDENTIALS_MISSING" and info["domain"] == "googleapis.com"
        assert info["metadata"]["method"].endswith("CreateTunedModel")
        r, doc = await fetch(s, "POST", "/v1/tunedModels/my-tune:generateContent", json=GEN)
        assert r.status == 403 and reason(doc) is None
        assert doc["error"]["message"] == (
            "You do not have permission to access tuned model tunedModels/my-tune."
        )
        assert (await counts(s))["create:tunedModels"] == 1

    run(scenario)


def test_new_key_behaviours_carry_their_reasons() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        path = f"/v1beta/models/{FLASH}:generateContent"
        r, doc = await fetch(s, "POST", path, key=A, json=GEN)
        assert r.status == 400 and reason(doc) == "API_KEY_INVALID"
        assert doc["error"]["message"] == "API key expired. Please renew the API key."
        r, doc = await fetch(s, "POST", path, key=B, json=GEN)
        assert r.status == 403 and reason(doc) == "SERVICE_DISABLED"
        assert doc["error"]["details"][0]["metadata"]["consumer"] == "projects/123456"
        r, doc = await fetch(s, "POST", path, key=C, json=GEN)
        assert r.status == 403 and reason(doc) == "API_KEY_HTTP_REFERRER_BLOCKED"
        assert doc["error"]["message"] == "Requests from referer <empty> are blocked."

    run(scenario, {"keys": {A: "expired", B: "service_disabled", C: "referrer"}})


# --- project-bound resources


def test_cached_contents_belong_to_the_creating_project() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        create = {"model": f"models/{FLASH}", "contents": GEN["contents"], "ttl": "600s"}
        r, cache = await fetch(s, "POST", "/v1beta/cachedContents", key=A, json=create)
        assert r.status == 200 and cache["name"].startswith("cachedContents/")
        assert cache["model"] == f"models/{FLASH}" and cache["usageMetadata"]["totalTokenCount"]
        assert cache["expireTime"] > cache["createTime"]
        name = cache["name"]
        r, doc = await fetch(s, "GET", f"/v1beta/{name}", key=B)  # project p2
        assert r.status == 403 and reason(doc) is None
        assert doc["error"]["message"] == "CachedContent not found (or permission denied)"
        r, doc = await fetch(s, "GET", f"/v1/{name}", key=C)  # p1, another key of the owner
        assert r.status == 200 and doc["name"] == name
        use = {**GEN, "cachedContent": name}
        r, _ = await fetch(s, "POST", f"/v1beta/models/{FLASH}:generateContent", key=B, json=use)
        assert r.status == 403
        r, _ = await fetch(s, "POST", f"/v1beta/models/{FLASH}:countTokens", key=C, json=use)
        assert r.status == 200
        r, doc = await fetch(s, "GET", "/v1beta/cachedContents", key=B)
        assert r.status == 200 and doc == {}
        r, doc = await fetch(s, "PATCH", f"/v1beta/{name}", key=A, json={"ttl": "60s"})
        assert r.status == 200 and doc["expireTime"] < cache["expireTime"]
        r, _ = await fetch(s, "DELETE", f"/v1beta/{name}", key=B)
        assert r.status == 403
        r, doc = await fetch(s, "DELETE", f"/v1beta/{name}", key=A)
        assert r.status == 200 and doc == {}
        r, _ = await fetch(s, "GET", f"/v1beta/{name}", key=A)
        assert r.status == 403
        c = await counts(s)
        assert c["create:cachedContents"] == 1 and c["update:cachedContents"] == 1
        assert c["delete:cachedContents"] == 2 and c["create:batches"] == 0
        assert [e["method"] for e in fake.log[:2]] == ["POST", "GET"]
        async with s.post("/_fake/reset"):
            pass
        assert set((await counts(s)).values()) == {0}

    run(scenario, {"keys": {A: "ok", B: "ok", C: "ok"}, "projects": {A: "p1", B: "p2", C: "p1"}})


def test_files_are_listed_and_deleted_per_project() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        async with s.post(
            "/upload/v1beta/files",
            json={"file": {"display_name": "doc"}},
            headers={"x-goog-api-key": A, "X-Goog-Upload-Command": "start"},
        ) as r:
            url = r.headers["X-Goog-Upload-URL"]
        async with s.post(
            url, data=b"hello", headers={"X-Goog-Upload-Command": "upload, finalize"}
        ) as r:
            name = (await r.json())["file"]["name"]
        file_id = name.removeprefix("files/")
        r, doc = await fetch(s, "GET", "/v1beta/files", key=A)
        assert [f["name"] for f in doc["files"]] == [name]
        r, doc = await fetch(s, "GET", "/v1beta/files", key=B)
        assert doc == {}
        part = {"fileData": {"mimeType": "text/plain", "fileUri": f"https://x/v1beta/{name}"}}
        other = {"contents": [{"role": "user", "parts": [part]}]}
        r, doc = await fetch(
            s, "POST", f"/v1beta/models/{FLASH}:generateContent", key=B, json=other
        )
        assert r.status == 403 and file_id in doc["error"]["message"]
        snake = {"contents": [{"parts": [{"file_data": {"file_uri": name}}]}]}
        r, _ = await fetch(s, "POST", f"/v1beta/models/{FLASH}:generateContent", key=A, json=snake)
        assert r.status == 200
        r, doc = await fetch(s, "DELETE", f"/v1beta/{name}", key=B)
        assert r.status == 403 and doc["error"]["message"] == (
            f"You do not have permission to access the File {file_id} or it may not exist."
        )
        r, _ = await fetch(s, "DELETE", f"/v1beta/{name}", key=A)
        assert r.status == 200
        r, _ = await fetch(s, "GET", f"/v1beta/{name}", key=A)
        assert r.status == 403
        c = await counts(s)
        assert (c["create:files"], c["finalize:files"], c["delete:files"]) == (1, 1, 2)

    run(scenario)


def test_batches_and_batch_embeddings() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        reqs = [{"request": GEN, "metadata": {"key": str(i)}} for i in range(2)]
        body = {"batch": {"display_name": "b", "input_config": {"requests": {"requests": reqs}}}}
        r, op = await fetch(s, "POST", f"/v1beta/models/{FLASH}:batchGenerateContent", json=body)
        assert r.status == 200 and op["name"].startswith("batches/")
        assert op["metadata"]["batchStats"]["requestCount"] == "2"
        r, _ = await fetch(s, "GET", f"/v1beta/{op['name']}", key=B)
        assert r.status == 403
        r, _ = await fetch(s, "POST", f"/v1beta/{op['name']}:cancel", key=A)
        assert r.status == 200
        r, doc = await fetch(s, "GET", f"/v1beta/{op['name']}", key=A)
        assert doc["metadata"]["state"] == "BATCH_STATE_CANCELLED"
        r, _ = await fetch(s, "DELETE", f"/v1beta/{op['name']}", key=A)
        assert r.status == 200
        c = await counts(s)
        assert (c["create:batches"], c["cancel:batches"], c["delete:batches"]) == (1, 1, 1)
        embed = {"requests": [{"content": {"parts": [{"text": t}]}} for t in "abc"]}
        r, doc = await fetch(
            s, "POST", "/v1beta/models/gemini-embedding-001:batchEmbedContents", json=embed
        )
        assert r.status == 200 and len(doc["embeddings"]) == 3 and doc["embeddings"][0]["values"]

    run(scenario)


def test_a_dropped_create_still_counts_once() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        create = {"model": f"models/{FLASH}", "contents": GEN["contents"]}
        try:
            await fetch(s, "POST", "/v1beta/cachedContents", key=A, json=create)
        except aiohttp.ClientError:
            pass
        else:
            raise AssertionError("drop must close the connection without an answer")
        assert (await counts(s))["create:cachedContents"] == 1
        assert fake.log[-1]["status"] == 0 and fake.log[-1]["method"] == "POST"
        assert fake.caches == {}

    run(scenario, {"keys": {A: "drop"}})


# --- JSON mode (what LiteLLM, LangChain and the Gemini CLI's router ask for)

# The Gemini CLI's routing classifier (0.61): Gemini Schema types, in responseJsonSchema.
ROUTER_SCHEMA = {
    "type": "OBJECT",
    "properties": {
        "complexity_reasoning": {"type": "STRING", "description": "Brief explanation."},
        "complexity_score": {"type": "INTEGER", "description": "Complexity score from 1-100."},
    },
    "required": ["complexity_reasoning", "complexity_score"],
}
# What pydantic makes of `class Person(BaseModel): name: str; age: int; tags: list[str];
# nick: str | None = None` (LiteLLM's response_format=Person), with a $ref for good measure.
PERSON_SCHEMA = {
    "$defs": {"Tag": {"type": "string", "enum": ["a", "b"]}},
    "properties": {
        "name": {"title": "Name", "type": "string"},
        "age": {"title": "Age", "type": "integer"},
        "tags": {"items": {"$ref": "#/$defs/Tag"}, "type": "array", "minItems": 1},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    },
    "required": ["name", "age", "tags"],
    "title": "Person",
    "type": "object",
}


def generate(config: dict[str, Any]) -> dict[str, Any]:
    return {**GEN, "generationConfig": config}


def answer_text(doc: Any) -> str:
    return str(doc["candidates"][0]["content"]["parts"][0]["text"])


def test_json_mode_answers_json_that_satisfies_the_schema() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        path = f"/v1beta/models/{FLASH}:generateContent"
        mime = {"responseMimeType": "application/json"}
        cases: list[tuple[dict[str, Any], Any]] = [
            ({**mime, "responseJsonSchema": ROUTER_SCHEMA, "temperature": 1},
             {"complexity_reasoning": "fake", "complexity_score": 1}),
            ({**mime, "responseSchema": ROUTER_SCHEMA}, {"complexity_reasoning": "fake", "complexity_score": 1}),
            # LiteLLM writes snake_case; Google accepts both
            ({"response_mime_type": "application/json", "response_json_schema": PERSON_SCHEMA},
             {"name": "fake", "age": 1, "tags": ["a"]}),
            (mime, NO_SCHEMA_REPLY),
            ({"responseMimeType": "application/json; charset=utf-8",
              "responseSchema": {"type": "ARRAY", "items": {"type": "NUMBER"}, "minItems": 2}}, [1, 1]),
            ({"responseMimeType": "text/x.enum", "responseSchema": {"type": "STRING", "enum": ["x", "y"]}}, "x"),
        ]  # fmt: skip
        for config, expected in cases:
            r, doc = await fetch(s, "POST", path, json=generate(config))
            assert r.status == 200, config
            text = answer_text(doc)
            assert (text if expected == "x" else json.loads(text)) == expected, config
        # a schema without a JSON mime type is not JSON mode, and neither is a plain request
        for body in (generate({"responseSchema": ROUTER_SCHEMA}), GEN):
            r, doc = await fetch(s, "POST", path, json=body)
            assert answer_text(doc) == REPLY

    run(scenario)


def test_json_mode_streams_the_json_in_pieces() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        body = generate({"responseMimeType": "application/json", "responseSchema": ROUTER_SCHEMA})
        headers = {"x-fake-events": "4"}
        stream = f"/v1beta/models/{FLASH}:streamGenerateContent"
        async with s.post(
            f"{stream}?alt=sse", json=body, headers={**headers, "x-goog-api-key": A}
        ) as r:
            raw = await r.read()
        events = [json.loads(b[6:]) for b in raw.split(b"\r\n\r\n") if b.startswith(b"data: ")]
        assert len(events) == 4 and all(answer_text(e) for e in events)
        assert events[-1]["candidates"][0]["finishReason"] == "STOP"
        assert json.loads("".join(answer_text(e) for e in events))["complexity_score"] == 1
        r, array = await fetch(s, "POST", stream, json=body, headers=headers)
        assert json.loads("".join(answer_text(e) for e in array)) == json.loads(
            "".join(answer_text(e) for e in events)
        )

    run(scenario)


def test_openai_response_format_json_object_and_json_schema() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        chat = {"model": FLASH, "messages": [{"role": "user", "content": "hi"}]}
        schema_format = {
            "type": "json_schema",
            "json_schema": {"name": "Person", "schema": PERSON_SCHEMA, "strict": True},
        }
        auth = {"Authorization": f"Bearer {A}"}
        for fmt, expected in (
            ({"type": "json_object"}, NO_SCHEMA_REPLY),
            (schema_format, {"name": "fake", "age": 1, "tags": ["a"]}),
            ({"type": "json_schema", "json_schema": {"name": "no-schema"}}, NO_SCHEMA_REPLY),
        ):
            _, doc = await fetch(
                s, "POST", "/v1beta/openai/chat/completions", key=None, headers=auth,
                json={**chat, "response_format": fmt},
            )  # fmt: skip
            assert json.loads(doc["choices"][0]["message"]["content"]) == expected
        _, doc = await fetch(
            s, "POST", "/v1beta/openai/chat/completions", key=None, headers=auth,
            json={**chat, "response_format": {"type": "text"}},
        )  # fmt: skip
        assert doc["choices"][0]["message"]["content"] == REPLY
        async with s.post(
            "/v1beta/openai/chat/completions",
            json={**chat, "stream": True, "response_format": schema_format},
            headers={**auth, "x-fake-events": "5"},
        ) as r:
            raw = await r.read()
        chunks = [
            json.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")
        ]
        assert len(chunks) == 5
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
        assert json.loads(text) == {"name": "fake", "age": 1, "tags": ["a"]}

    run(scenario)


def test_openai_embeddings_answer_one_vector_per_input() -> None:
    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        auth = {"Authorization": f"Bearer {A}"}
        for inputs, n in ((["a", "b", "c"], 3), ("a", 1), ([1, 2, 3], 1), ([[1, 2], [3]], 2)):
            r, doc = await fetch(
                s, "POST", "/v1beta/openai/embeddings", key=None, headers=auth,
                json={"model": "gemini-embedding-001", "input": inputs},
            )  # fmt: skip
            assert r.status == 200
            assert [d["index"] for d in doc["data"]] == list(range(n)), inputs

    run(scenario)


def test_the_gemini_clis_models_are_served() -> None:
    for model in ("gemini-3.1-pro-preview", "gemini-3.5-flash-lite", "gemini-3.8-flash"):
        assert model in DEFAULT_MODELS


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "integer", "minimum": 5, "maximum": 10}, 5),
        ({"type": "integer", "exclusiveMinimum": 3}, 4),
        ({"type": "integer", "maximum": -2}, -2),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5}, 0.25),
        ({"type": "number", "minimum": -1, "maximum": 0}, 0),
        ({"type": ["null", "string"], "format": "date"}, "2025-01-01"),
        ({"type": "string", "minLength": 6}, "fakexx"),
        ({"type": "STRING", "maxLength": 2}, "fa"),
        ({"type": "BOOLEAN"}, True),
        ({"type": "null"}, None),
        ({"const": {"a": 1}}, {"a": 1}),
        ({"oneOf": [{"type": "null"}, {"type": "boolean"}]}, True),
        ({"allOf": [{"properties": {"a": {"type": "boolean"}}, "required": ["a"]},
                    {"properties": {"b": {"const": 3}}, "required": ["b"]}]}, {"a": True, "b": 3}),
        ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, [1, "fake"]),
        ({"type": "object", "minProperties": 2}, {"p0": "", "p1": ""}),
        ({"required": ["x"]}, {"x": "fake"}),  # no type, no properties: still an object
        ({"type": "OBJECT", "properties": {"a": {"type": "STRING"}}}, {}),  # nothing required
    ],
)  # fmt: skip
def test_example_of_picks_the_smallest_valid_value(schema: Any, expected: Any) -> None:
    assert example_of(schema) == expected


def test_example_of_survives_recursive_and_odd_schemas() -> None:
    node = {"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}
    deep = example_of(node)
    depth = 0
    while isinstance(deep, dict):
        deep, depth = deep.get("next"), depth + 1
    assert 5 < depth < 40
    odd: Any
    for odd in (None, True, False, 3, "x", [], {"type": 7}, {"$ref": "#/nowhere"},
                {"anyOf": "x"}, {"anyOf": []}, {"allOf": [1, {"$ref": 2}]},
                {"required": "abc", "properties": []}, {"type": "number", "minimum": float("inf")},
                {"type": "integer", "minimum": float("nan")}, {"type": "array", "minItems": 10**9}):  # fmt: skip
        json.dumps(example_of(odd))


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
        | st.sampled_from(["object", "OBJECT", "array", "string", "integer", "number", "null",
                           "#", "#/$defs/a", "#/properties"]),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "properties", "required", "items", "enum", "const", "anyOf",
                             "oneOf", "allOf", "$ref", "$defs", "minItems", "minimum", "maximum",
                             "exclusiveMinimum", "minLength", "maxLength", "prefixItems",
                             "format", "a", "b"]),
            inner,
            max_size=6,
        ),
        max_leaves=30,
    )
)  # fmt: skip
def test_example_of_never_raises_and_always_serialises(schema: Any) -> None:
    json.dumps(example_of(schema), allow_nan=True)
    assert structured_text({"generationConfig": {"responseMimeType": "application/json",
                                                 "responseJsonSchema": schema}}) is not None  # fmt: skip


def test_quota_per_project_and_model_answers_googles_429() -> None:
    """Per-project limits: counted per key-project x model, refused with Google's real 429
    (quotaId, quotaValue) and not counted; the per-day 429 says retry in 23s (the trap)."""
    gen = f"/v1beta/models/{FLASH}:generateContent"

    async def scenario(s: aiohttp.ClientSession, fake: FakeGemini) -> None:
        for _ in range(2):
            r, _doc = await fetch(s, "POST", gen, key=A, json=GEN)
            assert r.status == 200
        r, doc = await fetch(s, "POST", gen, key=C, json=GEN)  # same project as A
        assert r.status == 429
        violation = doc["error"]["details"][1]["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        assert violation["quotaValue"] == "2"
        assert doc["error"]["details"][2]["retryDelay"] == "23s"
        r, _doc = await fetch(s, "POST", gen, key=B, json=GEN)  # another project
        assert r.status == 200
        r, doc = await fetch(
            s, "POST", gen, key=B, json=GEN, headers={"x-fake-prompt-tokens": "90"}
        )
        assert r.status == 429 and "InputTokens" in json.dumps(doc)
        r, _doc = await fetch(s, "POST", "/v1beta/models/gemini-2.5-pro:generateContent", json=GEN)
        assert r.status == 200  # another model: its own bucket
        r, _doc = await fetch(s, "POST", f"/v1beta/models/{FLASH}:countTokens", json=GEN)
        assert r.status == 200  # countTokens spends no generation quota
        async with s.get("/_fake/spent") as resp:
            spent = await resp.json()
        assert spent["proj-a"][FLASH]["requests_today"] == 2
        assert spent["proj-a"][FLASH]["refused"] == {"rpd": 1}
        assert spent[B][FLASH] == {
            "requests_today": 1,
            "tokens_today": 5,
            "requests_minute": 1,
            "tokens_minute": 5,
            "refused": {"tpm": 1},
        }

    run(
        scenario,
        {
            "keys": {A: "ok", B: "ok", C: "ok"},
            "projects": {A: "proj-a", C: "proj-a"},
            "quota": {"proj-a": {FLASH: {"rpd": 2}}, B: {FLASH: {"tpm": 50, "rpm": 9}}},
        },
    )
