"""The gate as the service configures it, and the operator actions shared by the admin API and the commands."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gemini_pool.config import ClientSpec, Config, KeySpec
from gemini_pool.gate import Admit, Arrival, Refuse, Target
from gemini_pool.service import ProxyService
from gemini_pool.upload_tokens import new_token, seal
from gemini_pool.websession import constant_time_equal

GOOGLE = Target("https", "generativelanguage.googleapis.com", 443)


def service(*clients: ClientSpec) -> ProxyService:
    s = ProxyService()
    s.apply_config(Config((KeySpec("a", "secret-a", "p"),), clients, "test"))
    return s


def test_the_service_gate_follows_the_key_file() -> None:
    s = service()
    a = Arrival("POST", "/v1beta/models/m:generateContent", "", (), "127.0.0.1", GOOGLE, GOOGLE)
    assert isinstance(d := s.gate.decide(a, 0), Admit) and d.client == "local"
    s.apply_config(
        Config((KeySpec("a", "secret-a", "p"),), (ClientSpec("web", "tok-web"),), "test")
    )
    assert isinstance(d := s.gate.decide(a, 0), Refuse) and d.reason == "missing_token"
    with_token = replace(a, fields=((b"x-goog-api-key", b"tok-web"),))
    assert isinstance(d := s.gate.decide(with_token, 0), Admit) and d.client == "web"


def test_upload_sessions_open_the_gate_only_for_their_own_requests() -> None:
    s = service(ClientSpec("web", "tok-web"))
    token = new_token()
    s.pins.remember_upload(token, "a", "/upload/v1beta/files", 0, seal(token, "google-id"))
    follow = Arrival(
        "PUT", "/upload/v1beta/files", f"upload_id={token}", (), "10.0.0.1", GOOGLE, GOOGLE
    )
    assert isinstance(d := s.gate.decide(follow, 1), Admit) and d.upload_key == "a"
    assert isinstance(s.gate.decide(replace(follow, path="/v1beta/files"), 1), Refuse)
    assert isinstance(s.gate.decide(follow, 2 * 86400), Refuse)  # sessions expire
    # a session kept under a raw id (as before tokens), or without its sealed id: refused
    s.pins.remember_upload("raw-google-id", "a", "/upload/v1beta/files", 0, "x")
    raw = replace(follow, query="upload_id=raw-google-id")
    assert isinstance(s.gate.decide(raw, 1), Refuse)
    other = new_token()
    s.pins.remember_upload(other, "a", "/upload/v1beta/files", 0)
    assert isinstance(s.gate.decide(replace(follow, query=f"upload_id={other}"), 1), Refuse)


def test_operator_actions_and_unknown_keys() -> None:
    s = service()
    assert s.operator("a", "disable")["enabled"] is False
    assert s.operator("a", "weight", 7)["weight"] == 7
    assert s.operator("a", "reset")["weight"] == 1
    with pytest.raises(KeyError):
        s.operator("zz", "enable")


def test_secrets_compare_whatever_bytes_arrive() -> None:
    assert constant_time_equal("tok", "tok") and not constant_time_equal("tok", "tok\udcff")
    assert not constant_time_equal("\udcff\udcfe", "tok")


def test_a_pool_without_usable_keys_says_so(caplog: pytest.LogCaptureFixture) -> None:
    s = ProxyService()
    with caplog.at_level("WARNING", logger="gemini_pool.service"):
        s.apply_config(Config((), (), "keys.yaml"))
    assert "keys.yaml has no keys: every request is answered 503" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gemini_pool.service"):
        s.apply_config(Config((KeySpec("a", "secret-a", "p", enabled=False),), (), "keys.yaml"))
    assert "keys.yaml has no enabled keys" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gemini_pool.service"):
        s.apply_config(Config((KeySpec("a", "secret-a", "p"),), (), "keys.yaml"))
    assert "has no" not in caplog.text
