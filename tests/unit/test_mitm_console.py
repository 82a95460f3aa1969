"""The Console addon under mitmproxy's taddons: the gemini.* commands."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from gemini_pool import runtime
from gemini_pool.mitm.console import Console
from gemini_pool.mitm.options import Options


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "keys.yaml"
    p.write_text(
        "keys:\n  - {name: a, key: AIzaSy-unit-a}\n  - {name: b, key: AIzaSy-unit-b, weight: 2}\n"
    )
    return p


@pytest.fixture
def addons() -> Iterator[tuple[Options, Console]]:
    runtime.forget()
    rt = runtime.current()
    yield Options(rt), Console(rt)
    runtime.forget()


def test_commands(addons: tuple[Options, Console], keys_file: Path) -> None:
    options, proxy = addons
    with taddons.context(options, proxy) as tctx:
        tctx.configure(options, gemini_keys=str(keys_file), gemini_db="", gemini_admin="")
        said = tctx.command(proxy.disable_cmd, "a")
        assert said == "disable: a was active, weight 1, now disabled, weight 1"
        assert not proxy.rt.service.pool.keys["a"].enabled
        listing = tctx.command(proxy.keys_cmd)
        assert listing[0].startswith("a (AIza…-a) disabled project=a weight=1 breaker=closed")
        assert "AIzaSy-unit-a" not in "\n".join(listing)
        said = tctx.command(proxy.enable_cmd, "a")
        assert said == "enable: a was disabled, weight 1, now active, weight 1"
        assert proxy.rt.service.pool.keys["a"].enabled
        with pytest.raises(exceptions.CommandError, match=r"^error: no key named .zzz."):
            tctx.command(proxy.reset_cmd, "zzz")
        keys_file.write_text("keys:\n  - {name: c, key: AIzaSy-unit-c}\n")
        said = tctx.command(proxy.reload_cmd)
        assert said.endswith("1 keys; added: c; removed: a, b")
        assert list(proxy.rt.service.pool.keys) == ["c"]
        keys_file.write_text("keys: [")
        with pytest.raises(exceptions.CommandError, match="reload failed"):
            tctx.command(proxy.reload_cmd)
        assert list(proxy.rt.service.pool.keys) == ["c"]


def test_a_running_stream_refreshes_its_comment_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from collections.abc import Sequence

    from mitmproxy import flow as mflow
    from mitmproxy.test import tflow

    from gemini_pool.mitm import console
    from gemini_pool.records import RequestRecord

    class Spy:
        """Any addon (mitmweb's view among them) hears of the change."""

        def __init__(self) -> None:
            self.updated: list[str] = []

        def update(self, flows: Sequence[mflow.Flow]) -> None:
            self.updated += [f.comment for f in flows]

    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    spy, f = Spy(), tflow.tflow(resp=True)
    rec = RequestRecord(key="beta", status=200, relay_ticket="t")
    with taddons.context(spy):
        progress = console.Progress(f, rec)
        rec.tap.feed(b"data: 1\n\n")
        clock[0] += 0.5
        progress()
        assert spy.updated == []  # too soon
        clock[0] += 0.6
        progress()
        assert spy.updated == ["served by beta: 200 · streaming: 9 B, 1 event so far"]
        rec.tap.feed(b"data: 2\n\n")
        clock[0] += 0.2
        progress()
        clock[0] += 1.0
        progress()
        assert spy.updated[-1] == "served by beta: 200 · streaming: 18 B, 2 events so far"
        assert len(spy.updated) == 2 and f.comment == spy.updated[-1]
        rec.ended = True  # the response hook writes the final comment
        clock[0] += 5
        progress()
        assert len(spy.updated) == 2


def test_budgets_command(addons: tuple[Options, Console], tmp_path: Path) -> None:
    options, proxy = addons
    keys = tmp_path / "budgets.yaml"
    keys.write_text(
        "keys:\n  - {name: a, key: AIzaSy-unit-a, project: proj-a}\n"
        "projects:\n  - {name: proj-a, limits: {gemini-2.5-flash: {rpd: 20, rpm: 5}}}\n"
    )
    with taddons.context(options, proxy) as tctx:
        tctx.configure(options, gemini_keys=str(keys), gemini_db="", gemini_admin="")
        service = proxy.rt.service
        service.budgets.charge("proj-a", "gemini-2.5-flash", 10, time.time())
        (line,) = tctx.command(proxy.budgets_cmd)
        assert line.startswith("proj-a gemini-2.5-flash: 1 requests today; rpm 1/5 (configured)")
        assert "rpd 1/20 (configured), 19 left, resets in " in line
