"""The Options addon under mitmproxy's taddons: typed options validated in configure, reloads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from gemini_pool import runtime
from gemini_pool.mitm.options import Options
from gemini_pool.runtime import Runtime


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "keys.yaml"
    p.write_text(
        "keys:\n  - {name: a, key: AIzaSy-unit-a}\n  - {name: b, key: AIzaSy-unit-b, weight: 2}\n"
    )
    return p


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime.forget()
    yield runtime.current()
    runtime.forget()


@pytest.fixture
def options(rt: Runtime) -> Options:
    return Options(rt)


def test_options_are_validated(options: Options, keys_file: Path) -> None:
    with taddons.context(options) as tctx:
        tctx.configure(options, gemini_keys=str(keys_file), gemini_db="", gemini_admin="")
        assert [k.name for k in options.rt.service.config.keys] == ["a", "b"]
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
                tctx.configure(options, **bad)
        tctx.configure(options, gemini_max_attempts=5, gemini_breaker_failures=7)
        assert options.rt.service.settings.dispatch.max_attempts == 5
        assert options.rt.service.pool.keys["a"].breaker.policy.failure_threshold == 7


def test_a_broken_key_file_is_refused_and_the_old_config_stays(
    options: Options, keys_file: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("keys:\n  - {name: c, key: k, weight: lots}\n")
    with taddons.context(options) as tctx:
        tctx.configure(options, gemini_keys=str(keys_file), gemini_db="", gemini_admin="")
        with pytest.raises(
            exceptions.OptionsError, match=r"broken.yaml:2: keys\[0\] \(c\), field 'weight'"
        ):
            tctx.configure(options, gemini_keys=str(broken))
        assert [k.name for k in options.rt.service.config.keys] == ["a", "b"]
        assert tctx.options.gemini_keys == str(keys_file)  # mitmproxy rolled the option back
