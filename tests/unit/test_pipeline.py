"""The request pipeline without mitmproxy: a plain request in, a decision out, the fake upstream
behind it (in process, with Google's error bodies)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from gemini_pool.breaker import BreakerState
from gemini_pool.config import ClientSpec, Config, KeySpec
from gemini_pool.gate import Admit, Target
from gemini_pool.pipeline import Incoming, Pipeline, ProxyAnswer, Stream, Unary
from gemini_pool.records import RequestRecord
from gemini_pool.routing import Api, Route
from gemini_pool.service import ProxyService
from gemini_pool.upload_tokens import is_token, new_token
from gemini_pool.uploads import Where

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fake_gemini import FakeGemini, download_blocks, make_app

A, B = "AIzaSyPIPE-A", "AIzaSyPIPE-B"
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
JSON = [("content-type", "application/json")]

Scenario = Callable[[Pipeline, Target, FakeGemini], Awaitable[None]]


def run(scenario: Scenario, keys: dict[str, str], projects: dict[str, str] | None = None) -> None:
    """A fresh fake on 127.0.0.1 and a service with keys a (A) and b (B); `scenario` ≤ 5 s."""
    fake = FakeGemini()
    fake.keys = dict(keys)
    fake.projects = dict(projects or {})

    async def main() -> None:
        runner = web.AppRunner(make_app(fake), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        service = ProxyService()
        service.apply_config(
            Config(
                (
                    KeySpec("a", A, (projects or {}).get(A, "a")),
                    KeySpec("b", B, (projects or {}).get(B, "b")),
                ),
                (),
                "test",
            )
        )
        try:
            await asyncio.wait_for(scenario(Pipeline(service), Target("http", host, port), fake), 5)
        finally:
            await service.upstream.close()
            await runner.cleanup()

    asyncio.run(main())


def admit(upstream: Target, **kw: Any) -> Admit:
    return Admit("alice", Api.NATIVE, False, "", upstream, **kw)


def request(
    upstream: Target | None,
    path: str = GEN,
    body: bytes = BODY,
    method: str = "POST",
    query: str = "",
    headers: list[tuple[str, str]] = JSON,
    where: Callable[[], Where] = Where,
) -> Incoming:
    return Incoming(
        method, path, query, headers, body, admit(upstream) if upstream else None, where
    )


def upstream_keys(fake: FakeGemini) -> list[str | None]:
    return [e.get("key") for e in fake.log]


def test_a_request_the_gate_never_admitted_is_refused_and_nothing_goes_upstream() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        rec = RequestRecord()
        d = await p.handle(request(None), rec)
        assert isinstance(d, ProxyAnswer) and (d.status, d.reason) == (401, "invalid_token")
        assert rec.status == 401 and rec.proxy_reason == "invalid_token"
        assert fake.log == []

    run(scenario, {A: "ok", B: "ok"})


def test_a_body_over_the_limit_is_answered_413_and_the_connection_closed() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        p.service.settings = type(p.service.settings)(max_body=10)
        d = await p.handle(request(up), RequestRecord())
        assert isinstance(d, ProxyAnswer) and d.status == 413 and d.close
        assert "at most 10" in d.message and fake.log == []

    run(scenario, {A: "ok", B: "ok"})


def test_a_request_that_cannot_be_routed_is_the_callers_mistake() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        for path in ("/v1beta/files/../models", "/elsewhere/x"):
            rec = RequestRecord()
            d = await p.handle(request(up, path=path), rec)
            assert isinstance(d, ProxyAnswer) and d.status in (400, 404), path
            assert rec.upstream_path is None
        assert fake.log == []

    run(scenario, {A: "ok", B: "ok"})


def test_a_dead_key_is_retried_on_the_other_and_the_answer_names_the_key_that_served() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        rec = RequestRecord()
        for _ in range(2):  # whichever key is picked first, both requests end on b
            rec = RequestRecord()
            d = await p.handle(request(up), rec)
            assert isinstance(d, Unary) and d.answer.status == 200
            assert ("x-gemini-proxy-key", "b") in d.headers
            assert rec.key == "b" and rec.status == 200 and rec.model == "gemini-2.5-flash"
        assert A in upstream_keys(fake) and upstream_keys(fake)[-1] == B
        assert [a.key for a in rec.attempts] in (["b"], ["a", "b"])

    run(scenario, {A: "dead", B: "ok"})


def test_a_stream_is_handed_back_open() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        rec = RequestRecord()
        d = await p.handle(request(up, path=STREAM, query="alt=sse"), rec)
        assert isinstance(d, Stream) and d.answer.stream is not None
        rest = await d.answer.stream.read()
        d.answer.stream.release()
        assert b"data: " in d.answer.body + rest and rec.streaming

    run(scenario, {A: "ok", B: "ok"})


def test_a_check_answers_before_any_upstream_call() -> None:
    def only_flash_lite(req: Incoming, route: Route, rec: RequestRecord) -> ProxyAnswer | None:
        if route.model != "gemini-2.5-flash-lite":
            return ProxyAnswer(403, f"model {route.model} is not allowed", "model_not_allowed")
        return None

    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        p.checks.append(only_flash_lite)
        rec = RequestRecord()
        d = await p.handle(request(up), rec)
        assert isinstance(d, ProxyAnswer) and d.status == 403
        assert rec.proxy_reason == "model_not_allowed" and rec.attempts == []
        assert fake.log == []

    run(scenario, {A: "ok", B: "ok"})


def test_an_upload_url_points_back_at_the_proxy_and_its_session_at_its_key() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        start = [
            *JSON,
            ("x-goog-upload-protocol", "resumable"),
            ("x-goog-upload-command", "start"),
            ("x-goog-upload-header-content-length", "5"),
        ]
        asked: list[bool] = []

        def where() -> Where:
            asked.append(True)
            return Where(host="proxy.example:8443", tls=True)

        meta = json.dumps({"file": {"display_name": "d"}}).encode()
        d = await p.handle(
            request(up, path="/upload/v1beta/files", body=meta, headers=start, where=where),
            RequestRecord(),
        )
        assert isinstance(d, Unary) and asked == [True]
        url = d.answer.header("x-goog-upload-url")
        assert url.startswith("https://proxy.example:8443/upload/v1beta/files?")
        token = url.split("upload_id=")[1].split("&")[0]
        (google_id,) = fake.uploads  # the id Google (the fake) gave the session
        assert is_token(token) and google_id not in repr(d.answer.headers)
        session = p.service.pins.upload_session(token, "PUT", "/upload/v1beta/files", 0)
        assert session is not None
        assert session.key == {A: "a", B: "b"}[fake.log[0]["key"]]
        assert google_id not in repr(session) and token not in repr(session)

        # the bytes: the token opens Google's id, which goes upstream; the record keeps the token
        query = f"upload_id={token}&upload_protocol=resumable"
        follow = Incoming(
            "POST",
            "/upload/v1beta/files",
            query,
            [("x-goog-upload-command", "upload, finalize"), ("x-goog-upload-offset", "0")],
            b"hello",
            admit(up, upload_id=token, upload_key=session.key),
        )
        rec = RequestRecord()
        d = await p.handle(follow, rec)
        assert isinstance(d, Unary) and d.answer.status == 200, d
        assert fake.uploads[google_id]["data"] == b"hello"
        assert rec.upstream_path == f"/upload/v1beta/files?{query}"
        assert google_id not in repr(d.answer.headers) + repr(d.answer.body)
        # finalized: the token lets nothing through any more
        assert p.service.pins.upload_session(token, "PUT", "/upload/v1beta/files", 0) is None

        # Google's own id, or a token the proxy never handed out: 404, nothing upstream
        seen = len(fake.log)
        for forged, key in ((google_id, None), (new_token(), None), (token, session.key)):
            q = f"upload_id={forged}"
            bad = replace(follow, query=q, admit=admit(up, upload_id=forged, upload_key=key))
            d = await p.handle(bad, RequestRecord())
            assert isinstance(d, ProxyAnswer) and (d.status, d.reason) == (404, "upload_not_found")
        no_id = replace(follow, query="uploadId=" + google_id, admit=admit(up))
        d = await p.handle(no_id, RequestRecord())
        assert isinstance(d, ProxyAnswer) and d.status == 404
        assert len(fake.log) == seen

    run(scenario, {A: "ok", B: "ok"})


def test_a_created_file_is_remembered_and_follow_ups_go_to_its_project() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        p.service.pins.remember({"files/abc": None}, "p2", time.time())
        for _ in range(4):  # round robin alone would send half of these to p1
            d = await p.handle(
                request(up, path="/v1beta/files/abc", method="GET", body=b""), RequestRecord()
            )
            assert isinstance(d, Unary)
        assert set(upstream_keys(fake)) == {B}

    run(scenario, {A: "ok", B: "ok"}, {A: "p1", B: "p2"})


def tenant_run(scenario: Scenario) -> None:
    """Keys a (project p1) and b (p2); clients alice and carol in group team-a, bob alone."""

    async def wrapped(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        keys = p.service.config.keys
        clients = (
            ClientSpec("alice", "tok-a", "team-a"),
            ClientSpec("carol", "tok-c", "team-a"),
            ClientSpec("bob", "tok-b"),
        )
        p.service.apply_config(Config(keys, clients, "test"))
        await scenario(p, up, fake)

    run(wrapped, {A: "ok", B: "ok"}, {A: "p1", B: "p2"})


def as_client(up: Target, client: str, **kw: Any) -> Incoming:
    kw.setdefault("body", b"")
    kw.setdefault("method", "GET")
    req = request(up, **kw)
    return Incoming(
        req.method,
        req.path,
        req.query,
        req.headers,
        req.body,
        Admit(client, Api.NATIVE, False, req.query, up),
        req.where,
    )


def test_tenants_see_and_use_only_their_groups_resources() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        cache = json.dumps({"model": "models/gemini-2.5-flash", "displayName": "files/x"})
        made = await p.handle(
            as_client(
                up, "alice", path="/v1beta/cachedContents", method="POST", body=cache.encode()
            ),
            RequestRecord(),
        )
        assert isinstance(made, Unary) and made.answer.status == 200
        name = json.loads(made.answer.body)["name"]
        creator = fake.log[-1]["key"]
        seen = len(fake.log)
        # bob: another group. Get, delete, use in a body, and list: as if it did not exist
        for req in (
            as_client(up, "bob", path=f"/v1beta/{name}"),
            as_client(up, "bob", path=f"/v1beta/{name}", method="DELETE"),
            as_client(
                up,
                "bob",
                path=GEN,
                method="POST",
                body=json.dumps(
                    {"cachedContent": name, "contents": [{"parts": [{"text": "hi"}]}]}
                ).encode(),
            ),
        ):
            rec = RequestRecord()
            d = await p.handle(req, rec)
            assert isinstance(d, ProxyAnswer) and (d.status, d.reason) == (404, "not_found")
        listed = await p.handle(
            as_client(up, "bob", path="/v1beta/cachedContents"), RequestRecord()
        )
        assert isinstance(listed, Unary) and json.loads(listed.answer.body) == {}
        assert len(fake.log) == seen  # nothing of bob's reached Google
        # carol shares alice's group: she gets, lists and uses it, always on its own project
        got = await p.handle(as_client(up, "carol", path=f"/v1beta/{name}"), RequestRecord())
        assert isinstance(got, Unary) and got.answer.status == 200
        mine = await p.handle(
            as_client(up, "carol", path="/v1beta/cachedContents"), RequestRecord()
        )
        assert isinstance(mine, Unary)
        assert [c["name"] for c in json.loads(mine.answer.body)["cachedContents"]] == [name]
        assert {e["key"] for e in fake.log[seen:]} == {creator}
        # a deletion forgets it: nobody can name it any more
        gone = await p.handle(
            as_client(up, "alice", path=f"/v1beta/{name}", method="DELETE"), RequestRecord()
        )
        assert isinstance(gone, Unary) and gone.answer.status == 200
        again = await p.handle(as_client(up, "alice", path=f"/v1beta/{name}"), RequestRecord())
        assert isinstance(again, ProxyAnswer) and again.status == 404

    tenant_run(scenario)


def test_a_display_name_that_looks_like_a_resource_re_homes_nothing() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        made = await p.handle(
            as_client(
                up,
                "alice",
                path="/v1beta/cachedContents",
                method="POST",
                body=b'{"model": "models/gemini-2.5-flash"}',
            ),
            RequestRecord(),
        )
        assert isinstance(made, Unary)
        victim = json.loads(made.answer.body)["name"]
        project = p.service.pins.project_of(victim, time.time())
        # bob creates his own cache whose displayName is alice's cache's name
        trick = json.dumps({"model": "models/gemini-2.5-flash", "displayName": victim}).encode()
        for _ in range(4):  # whichever project serves bob, alice's pin stays
            await p.handle(
                as_client(up, "bob", path="/v1beta/cachedContents", method="POST", body=trick),
                RequestRecord(),
            )
        assert p.service.pins.project_of(victim, time.time()) == project
        assert p.service.owners.group_of(victim, time.time()) == "team-a"

    tenant_run(scenario)


def test_a_tenant_is_not_told_which_keys_were_tried() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        rec = RequestRecord()
        d = await p.handle(as_client(up, "bob", path=GEN, method="POST", body=BODY), rec)
        assert isinstance(d, ProxyAnswer) and d.status == 503
        assert "a" not in d.message.split() and "tried" not in d.message
        assert d.message.startswith("the proxy has no usable API key")
        assert rec.proxy_message and "tried" in rec.proxy_message  # the log and mitmweb know

    async def with_dead_pool(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        await scenario(p, up, fake)

    def run_dead() -> None:
        async def wrapped(p: Pipeline, up: Target, fake: FakeGemini) -> None:
            p.service.apply_config(
                Config(p.service.config.keys, (ClientSpec("bob", "tok-b"),), "test")
            )
            await with_dead_pool(p, up, fake)

        run(wrapped, {A: "dead", B: "dead"})

    run_dead()


def test_a_download_is_handed_back_open_never_read_whole() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        size = 3 * (1 << 20) + 5
        for path, query in (
            ("/download/v1beta/files/abc:download", "alt=media"),
            ("/v1beta/files/abc:download", "alt=media"),
        ):
            rec = RequestRecord()
            headers = [("x-fake-download-bytes", str(size))]
            d = await p.handle(request(up, path, b"", "GET", query, headers), rec)
            assert isinstance(d, Stream) and d.answer.stream is not None, path
            assert len(d.answer.body) < size  # only what came first
            rest = await d.answer.stream.read()
            d.answer.stream.release()
            assert d.answer.body + rest == b"".join(download_blocks(size))
            assert rec.status == 200 and rec.key in ("a", "b")

    run(scenario, {A: "ok", B: "ok"})


def test_a_half_open_probe_is_given_back_when_its_request_is_cancelled() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        pool = p.service.pool
        for state in pool.keys.values():  # both breakers open, their cooldown over: probe next
            state.breaker.state, state.breaker.open_until = BreakerState.OPEN, 0.0
        task = asyncio.create_task(p.handle(request(up, headers=SLOW), RequestRecord()))
        while not fake.log:  # the probe is at Google
            await asyncio.sleep(0.01)
        probing = [s for s in pool.keys.values() if s.breaker.probe_started is not None]
        assert len(probing) == 1 and not probing[0].breaker.available(time.time())
        task.cancel()  # the caller went away, the proxy shuts down
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert probing[0].breaker.probe_started is None
        assert probing[0].breaker.available(time.time())  # the next request may probe at once
        d = await p.handle(request(up), RequestRecord())
        assert isinstance(d, Unary) and d.answer.status == 200

    run(scenario, {A: "ok", B: "ok"})


SLOW = [*JSON, ("x-fake-latency-ms", "3000")]


def test_a_spent_budget_is_answered_429_here_and_the_usage_corrects_the_estimate() -> None:
    from gemini_pool.config import ModelLimits, ProjectSpec

    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        budgets = p.service.budgets
        budgets.configure(
            [
                ProjectSpec("a", (ModelLimits("gemini-2.5-*", rpd=1),)),
                ProjectSpec("b", (ModelLimits("gemini-2.5-flash", rpd=1),)),
            ]
        )
        for _ in range(2):
            rec = RequestRecord()
            d = await p.handle(request(up), rec)
            assert isinstance(d, Unary) and d.answer.status == 200
            assert rec.spend is not None and rec.spend.note.endswith(" 1/1 today")
            assert rec.spend.estimate == len(BODY) // 4 + 1
            rec.tap.tokens_in = 5  # what the answer's usageMetadata said
            p.service.finish(rec)
        assert budgets.describe(time.time())[0]["input_tokens_today"] == 5
        rec = RequestRecord()
        d = await p.handle(request(up), rec)
        assert isinstance(d, ProxyAnswer) and (d.status, d.reason) == (429, "all_keys_cooling")
        assert d.retry_after is not None and d.retry_after > 0 and rec.attempts == []
        assert "out of budget" in d.message and len(fake.log) == 2
        # countTokens spends no generation quota: not held back
        d = await p.handle(request(up, path=GEN.replace("generateContent", "countTokens")), rec)
        assert isinstance(d, Unary) and d.answer.status == 200

    run(scenario, {A: "ok", B: "ok"})
