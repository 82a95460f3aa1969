"""Caller authentication and the operator actions shared by the admin API and the commands."""

from __future__ import annotations

import pytest

from gemini_pool.config import ClientSpec, Config, KeySpec
from gemini_pool.service import AuthError, ProxyService


def service(*clients: ClientSpec) -> ProxyService:
    s = ProxyService()
    s.apply_config(Config((KeySpec("a", "secret-a", "p"),), clients, "test"))
    return s


def test_without_clients_only_loopback_callers_are_served() -> None:
    s = service()
    assert s.authenticate(None, "127.0.0.1") == "local"
    assert s.authenticate("anything", "::1") == "local"
    with pytest.raises(AuthError) as e:
        s.authenticate("anything", "10.1.2.3")
    assert e.value.status == 403 and "clients:" in e.value.message


def test_with_clients_every_caller_needs_a_known_token() -> None:
    s = service(ClientSpec("web", "tok-web"), ClientSpec("batch", "tok-batch"))
    assert s.authenticate("tok-batch", "10.1.2.3") == "batch"
    for token, reason in ((None, "missing_token"), ("nope", "invalid_token")):
        with pytest.raises(AuthError) as e:
            s.authenticate(token, "127.0.0.1")  # loopback is no exception once clients exist
        assert (e.value.status, e.value.reason) == (401, reason)


def test_operator_actions_and_unknown_keys() -> None:
    s = service()
    assert s.operator("a", "disable")["enabled"] is False
    assert s.operator("a", "weight", 7)["weight"] == 7
    assert s.operator("a", "reset")["weight"] == 1
    with pytest.raises(KeyError):
        s.operator("zz", "enable")
