"""The startup guard: every flow refused until the proxy configured with its keys."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from gemini_pool.mitm.startup_guard import StartupGuard


class Proxy:
    """Stands in for GeminiProxy: a configure that fails while `error` is set."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.keys = False

    def configure(self, updated: set[str]) -> None:
        if self.error:
            raise exceptions.OptionsError(self.error)
        self.keys = True


def refused(guard: StartupGuard) -> bool:
    flow = tflow.tflow()
    try:
        guard.requestheaders(flow)
    except exceptions.AddonHalt:
        assert flow.response is not None and flow.response.status_code == 503
        assert b"not configured" in flow.response.content
        with pytest.raises(exceptions.AddonHalt):  # the `request` hook keeps the refusal
            guard.request(flow)
        return True
    assert flow.response is None
    return False


def test_flows_are_refused_until_the_proxy_configured_with_its_keys() -> None:
    proxy = Proxy()
    guard = StartupGuard(lambda: proxy.keys)
    addons = guard.around([proxy], proxy)
    assert addons[0] is guard and addons[-1] is guard.options_check
    assert refused(guard)
    with taddons.context():
        proxy.error = "gemini_keys: keys.yaml:3: YAML error"
        proxy.configure(set())  # at start: no raise (no traceback), one error line, not ready
        assert guard.failed == "gemini_keys: keys.yaml:3: YAML error"
        assert refused(guard)


def test_once_ready_a_failing_configure_is_mitmproxys_to_roll_back() -> None:
    proxy = Proxy()
    guard = StartupGuard(lambda: proxy.keys)
    guard.around([proxy], proxy)
    with taddons.context():
        proxy.configure(set())
        assert guard.ready and not refused(guard)
        proxy.error = "gemini_keys: bad"
        with pytest.raises(exceptions.OptionsError):
            proxy.configure(set())
        assert guard.ready and guard.failed is None  # the running proxy keeps its old keys


def test_a_proxy_without_keys_never_becomes_ready() -> None:
    proxy = Proxy()
    guard = StartupGuard(lambda: False)
    guard.around([proxy], proxy)
    with taddons.context():
        proxy.configure(set())
        assert refused(guard)
        guard.running()
        assert guard.failed == "the key file was never loaded" and refused(guard)
