"""Model fallback end to end: a real mitmdump, the fake Gemini counting what each model served.

With `fallbacks:` a request for a model every project is out of is served by the fallback model
(the path or the OpenAI body rewritten, the answer saying so); without it, or for a request bound
to a cached content, the proxy answers 429 and nothing more goes upstream.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from mitmproxy import io

from ..conftest import Fake, Proxy, gen_body, key_entry, new_secret
from .test_budgets import FLASH, PRO, gen, served

MODEL_HEADER = "x-gemini-proxy-model"


def pro_spent_proxy(fake: Fake, make_proxy: Any, fallbacks: dict[str, Any] | None) -> Proxy:
    """Two projects with one gemini-2.5-pro request a day each; flash unlimited."""
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "proj-a", b: "proj-b"})
    proxy: Proxy = make_proxy(
        [key_entry("a1", a, project="proj-a"), key_entry("b1", b, project="proj-b")], start=False
    )
    doc = yaml.safe_load(proxy.keys_file.read_text())
    doc["projects"] = [{"name": p, "limits": {PRO: {"rpd": 1}}} for p in ("proj-a", "proj-b")]
    if fallbacks is not None:
        doc["fallbacks"] = fallbacks
    proxy.keys_file.write_text(yaml.safe_dump(doc))
    proxy.start()
    for _ in range(2):
        r = gen(proxy, PRO)
        assert r.status_code == 200 and MODEL_HEADER not in r.headers
    assert [s for _, s in served(fake, PRO)] == [200, 200]
    return proxy


def chat(proxy: Proxy, body: dict[str, Any]) -> Any:
    r = proxy.http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"})
    proxy.remember(r.content)
    return r


def test_fallback_serves_native_and_openai_requests_and_says_so(
    fake: Fake, make_proxy: Any
) -> None:
    proxy = pro_spent_proxy(fake, make_proxy, {PRO: [FLASH]})
    r = gen(proxy, PRO)
    assert r.status_code == 200, r.text
    assert r.headers[MODEL_HEADER] == FLASH
    assert r.json()["modelVersion"] == FLASH
    last = fake.log()[-1]
    assert last["path"] == f"/v1beta/models/{FLASH}:generateContent"
    assert len(served(fake, PRO)) == 2  # nothing more for pro went upstream
    # the OpenAI path: the body's model is rewritten, the rest of it kept
    body = {"model": PRO, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    r = chat(proxy, body)
    assert r.status_code == 200, r.text
    assert r.headers[MODEL_HEADER] == FLASH
    sent = json.loads(fake.log()[-1]["body"])
    assert sent == {**body, "model": FLASH}
    # bound to a cached content (a model-specific resource): never another model
    upstream = len(fake.log())
    bound = {"cachedContent": "cachedContents/abc123", **gen_body()}
    r = gen(proxy, PRO, body=bound)
    assert r.status_code == 429 and MODEL_HEADER not in r.headers
    assert r.headers["x-gemini-proxy-reason"] == "all_keys_cooling"
    assert len(fake.log()) == upstream
    # a non-generation call of the spent model is not rewritten either (countTokens spends
    # nothing, so it is served by pro itself)
    count = proxy.http.post(
        f"/v1beta/models/{PRO}:countTokens", json=gen_body(), headers={"x-goog-api-key": "x"}
    )
    assert count.status_code == 200 and MODEL_HEADER not in count.headers
    # seen: the metric (configured names only), the access log, the comment
    metrics = proxy.metrics()
    assert f'gemini_proxy_fallbacks_total{{asked="{PRO}",served="{FLASH}"}} 2.0' in metrics
    assert f"model={FLASH}" in proxy.logs() and f"asked_model={PRO}" in proxy.logs()
    assert proxy.stop() == 0
    with proxy.dump.open("rb") as f:
        comments = [flow.comment for flow in io.FlowReader(f).stream()]
    fell = [c for c in comments if f"fell back to {FLASH}" in c]
    assert len(fell) == 2, comments
    assert all(c.startswith("served by ") for c in fell)


def test_without_fallbacks_a_spent_model_is_answered_429(fake: Fake, make_proxy: Any) -> None:
    proxy = pro_spent_proxy(fake, make_proxy, None)
    upstream = len(fake.log())
    r = gen(proxy, PRO)
    assert r.status_code == 429 and MODEL_HEADER not in r.headers
    assert "out of budget" in r.json()["error"]["message"]
    r = chat(proxy, {"model": PRO, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and MODEL_HEADER not in r.headers
    assert len(fake.log()) == upstream  # no flash, nothing upstream
    assert "gemini_proxy_fallbacks_total{" not in proxy.metrics()
