"""Project-bound resources (resumable uploads, files) and script reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google import genai
from google.genai import types

from ..conftest import ROOT, Fake, key_entry, new_secret, wait_for
from .test_proxy import gen


def test_uploads_go_through_the_proxy_and_files_stay_with_their_project(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    proxy = make_proxy([key_entry("a", a, project="p1"), key_entry("b", b, project="p2")])
    client = genai.Client(
        api_key="u", http_options=types.HttpOptions(base_url=proxy.url, api_version="v1beta")
    )
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    uploaded = client.files.upload(file=str(doc))
    assert uploaded.name and uploaded.name.startswith("files/")
    owner = fake.log()[0]["key"]
    for _ in range(4):  # round robin would send half of these to the other project: 403
        assert client.files.get(name=uploaded.name).name == uploaded.name
    part = types.Part.from_uri(file_uri=uploaded.uri or "", mime_type="text/plain")
    assert client.models.generate_content(
        model="gemini-2.5-flash", contents=[part, "describe"]
    ).text
    log = fake.log()
    assert [e["path"] for e in log[:2]] == ["/upload/v1beta/files", "/upload/v1beta/files"]
    assert log[1].get("upload") and log[1]["status"] == 200  # the bytes went through the proxy
    assert {e["key"] for e in log} == {owner}
    assert all(e["status"] == 200 for e in log)


def test_a_script_reload_keeps_state_and_servers(
    fake: Fake, make_proxy: Any, tmp_path: Path
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "dead", b: "ok"})
    proxy = make_proxy([key_entry("a", a), key_entry("b", b)])
    gen(proxy)
    proxy.wait_key("a", "dead")
    entry = ROOT / "addon" / "gemini_proxy.py"
    entry.touch()  # mitmproxy re-imports the entry script
    wait_for(lambda: proxy.logs().count("Loading script") >= 2, timeout=10)
    assert gen(proxy).status_code == 200
    proxy.wait_key("a", "dead")  # the pool survived the reload
    assert "duplicated timeseries" not in proxy.logs() and "Traceback" not in proxy.logs()
    assert proxy.metrics().count("gemini_proxy_requests_total{") >= 1
