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
        assert listing[0].startswith("a (AIz…) disabled project=a weight=1 breaker=closed")
        assert "AIzaSy-unit-a" not in "\n".join(listing)
        said = tctx.command(proxy.enable_cmd, "a")
        assert said == "enable: a was disabled, weight 1, now active, weight 1"
        assert proxy.rt.service.pool.keys["a"].enabled
        with pytest.raises(exceptions.CommandError, match="no key named"):
            tctx.command(proxy.reset_cmd, "zzz")
        keys_file.write_text("keys:\n  - {name: c, key: AIzaSy-unit-c}\n")
        said = tctx.command(proxy.reload_cmd)
        assert said.endswith("1 keys; added: c; removed: a, b")
        assert list(proxy.rt.service.pool.keys) == ["c"]
        keys_file.write_text("keys: [")
        with pytest.raises(exceptions.CommandError, match="reload failed"):
            tctx.command(proxy.reload_cmd)
        assert list(proxy.rt.service.pool.keys) == ["c"]


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
