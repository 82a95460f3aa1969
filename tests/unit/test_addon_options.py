"""The addon under mitmproxy's taddons: typed options validated in configure, commands, reloads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import gemini_pool.addon as addon_module
from gemini_pool.addon import GeminiProxy


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "keys.yaml"
    p.write_text(
        "keys:\n  - {name: a, key: AIzaSy-unit-a}\n  - {name: b, key: AIzaSy-unit-b, weight: 2}\n"
    )
    return p


@pytest.fixture
def proxy() -> Iterator[GeminiProxy]:
    addon_module._RUNTIME = None
    yield GeminiProxy()
    addon_module._RUNTIME = None


def test_options_are_validated(proxy: GeminiProxy, keys_file: Path) -> None:
    with taddons.context(proxy) as tctx:
        tctx.configure(proxy, gemini_keys=str(keys_file), gemini_db="", gemini_admin="")
        assert [k.name for k in proxy.service.config.keys] == ["a", "b"]
        for bad in (
            {"gemini_max_attempts": 0},
            {"gemini_max_attempts": 11},
            {"gemini_max_body": 0},
            {"gemini_admin": "nonsense"},
            {"gemini_admin": "127.0.0.1:99999"},
            {"gemini_health_threshold": 101},
            {"gemini_breaker_max_cooldown_ms": 1},
        ):
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(proxy, **bad)
        tctx.configure(proxy, gemini_max_attempts=5, gemini_breaker_failures=7)
        assert proxy.service.settings.dispatch.max_attempts == 5
        assert proxy.service.pool.keys["a"].breaker.policy.failure_threshold == 7


def test_a_broken_key_file_is_refused_and_the_old_config_stays(
    proxy: GeminiProxy, keys_file: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("keys:\n  - {name: c, key: k, weight: lots}\n")
    with taddons.context(proxy) as tctx:
        tctx.configure(proxy, gemini_keys=str(keys_file), gemini_db="", gemini_admin="")
        with pytest.raises(
            exceptions.OptionsError, match=r"broken.yaml:2: keys\[0\] \(c\), field 'weight'"
        ):
            tctx.configure(proxy, gemini_keys=str(broken))
        assert [k.name for k in proxy.service.config.keys] == ["a", "b"]
        assert tctx.options.gemini_keys == str(keys_file)  # mitmproxy rolled the option back


def test_commands(proxy: GeminiProxy, keys_file: Path) -> None:
    with taddons.context(proxy) as tctx:
        tctx.configure(proxy, gemini_keys=str(keys_file), gemini_db="", gemini_admin="")
        said = tctx.command(proxy.disable_cmd, "a")
        assert said == "disable: a was active, weight 1, now disabled, weight 1"
        assert not proxy.service.pool.keys["a"].enabled
        listing = tctx.command(proxy.keys_cmd)
        assert listing[0].startswith("a (AIz…) disabled project=a weight=1 breaker=closed")
        assert "AIzaSy-unit-a" not in "\n".join(listing)
        said = tctx.command(proxy.enable_cmd, "a")
        assert said == "enable: a was disabled, weight 1, now active, weight 1"
        assert proxy.service.pool.keys["a"].enabled
        with pytest.raises(exceptions.CommandError, match="no key named"):
            tctx.command(proxy.reset_cmd, "zzz")
        keys_file.write_text("keys:\n  - {name: c, key: AIzaSy-unit-c}\n")
        said = tctx.command(proxy.reload_cmd)
        assert said.endswith("1 keys; added: c; removed: a, b")
        assert list(proxy.service.pool.keys) == ["c"]
        keys_file.write_text("keys: [")
        with pytest.raises(exceptions.CommandError, match="reload failed"):
            tctx.command(proxy.reload_cmd)
        assert list(proxy.service.pool.keys) == ["c"]
