"""Methods the Gemini API does not have get 405 from the gate, with an Allow header."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gemini_pool.gate import API_METHODS, Admit, Refuse
from gemini_pool.routing import Api

from .test_gate import GEN, arrive, gate


def test_the_api_methods_pass_and_put_only_on_upload_paths() -> None:
    for method in API_METHODS:
        assert isinstance(gate().decide(arrive(method=method), 0), Admit), method
    assert isinstance(gate().decide(arrive(method="PUT", path="/upload/v1beta/files"), 0), Admit)
    d = gate().decide(arrive(method="PUT"), 0)
    assert isinstance(d, Refuse) and d.status == 405 and d.allow == "GET, POST, PATCH, DELETE"


def test_other_methods_get_405_in_the_callers_api_shape() -> None:
    for method in ["HEAD", "TRACE", "OPTIONS", "CONNECT", "PROPFIND", "get", "BREW", "X" * 300]:
        d = gate().decide(arrive(method=method), 0)
        assert isinstance(d, Refuse) and d.status == 405, (method, d)
        assert d.reason == "method_not_allowed" and d.api is Api.NATIVE and d.allow
        assert len(d.message) < 200  # a long method is not echoed whole
        o = gate().decide(arrive(method=method, path="/v1beta/openai/chat/completions"), 0)
        assert isinstance(o, Refuse) and o.status == 405 and o.api is Api.OPENAI


def test_authentication_comes_first() -> None:
    """With client tokens, a caller without one learns nothing about methods."""
    d = gate({"tok-web": "web"}).decide(arrive(method="TRACE"), 0)
    assert isinstance(d, Refuse) and d.status == 401


@given(st.text(min_size=1, max_size=30))
def test_any_method_is_admitted_only_if_the_api_has_it(method: str) -> None:
    for path in (GEN, "/upload/v1beta/files"):
        d = gate().decide(arrive(method=method, path=path), 0)
        if isinstance(d, Admit):
            assert method in API_METHODS or (method == "PUT" and path.startswith("/upload/"))
        else:
            assert d.status == 405 and d.allow is not None
