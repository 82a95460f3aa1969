"""Egress per key in the key file: proxy URLs validated, credentials from the environment only."""

from __future__ import annotations

import pytest

from gemini_pool.config import ConfigError, parse_config
from gemini_pool.egress import Egress


def parse(text: str, env: dict[str, str] | None = None):
    return parse_config(text.encode(), "keys.yaml", env or {})


def test_http_and_socks5_proxies_with_credentials_from_the_environment() -> None:
    cfg = parse(
        """
keys:
  - name: a
    key: k1
    proxy: http://127.0.0.1:3128
  - name: b
    key: k2
    proxy: SOCKS5://proxy.example:1080/
    proxy_auth_env: EGRESS_B
  - name: c
    key: k3
""",
        {"EGRESS_B": "user:s3cret-pass"},
    )
    a, b, c = cfg.keys
    assert a.egress == Egress("http://127.0.0.1:3128")
    assert b.egress is not None and b.egress.url == "socks5://proxy.example:1080"
    assert b.egress.credentials == ("user", "s3cret-pass")
    assert c.egress is None
    assert "s3cret-pass" not in repr(cfg)  # the credentials never show in a repr (logs)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("proxy: ftp://h:21", "scheme must be one of"),
        ("proxy: http://h", "explicit port"),
        ("proxy: http://user:pw-in-file@h:3128", "must not hold credentials"),
        ("proxy: http://h:3128/path", "nothing after the port"),
        ("proxy: http://h:99999", "not a valid URL"),
        ("proxy_auth_env: EGRESS", "needs 'proxy' too"),
        ("proxy: http://h:1\n    proxy_auth_env: UNSET", "UNSET is not set"),
        ("proxy: http://h:1\n    proxy_auth_env: NOCOLON", "must hold user:password"),
    ],
)
def test_bad_egress_is_refused_naming_the_field(entry: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(f"keys:\n  - name: a\n    key: k1\n    {entry}\n", {"NOCOLON": "pw-alone"})
    assert fragment in str(e.value)
    assert "pw-in-file" not in str(e.value) and "pw-alone" not in str(e.value)
    assert str(e.value).startswith("keys.yaml:")


def test_changing_credentials_makes_another_egress() -> None:
    text = "keys:\n  - name: a\n    key: k1\n    proxy: http://h:1\n    proxy_auth_env: E\n"
    one = parse(text, {"E": "u:1"}).keys[0].egress
    two = parse(text, {"E": "u:2"}).keys[0].egress
    assert one is not None and two is not None
    assert one != two and one.url == two.url  # a session of its own: reload picks up new ones


def test_the_documented_example_names_an_egress() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "keys.yaml.example"
    env = {"GEMINI_KEY_BETA": "b", "GEMINI_KEY_GAMMA": "g", "BATCH_JOBS_TOKEN": "t"}
    cfg = parse_config(example.read_bytes(), str(example), env)
    assert [k.egress.url if k.egress else None for k in cfg.keys] == [
        None,
        None,
        "socks5://10.0.0.5:1080",
    ]


def test_sessions_of_egresses_gone_after_a_reload_are_closed() -> None:
    import asyncio

    from gemini_pool.upstream import UpstreamClient

    async def run() -> None:
        client = UpstreamClient()
        kept, gone = Egress("http://127.0.0.1:1"), Egress("socks5://127.0.0.1:2")
        old = client.session_for(gone)
        client.session_for(kept)
        assert client.egress_sessions == 2
        assert client.keep_egresses({kept}) == ["socks5://127.0.0.1:2"]
        assert client.egress_sessions == 1
        for _ in range(100):  # idle: closed at once, by its retirement task
            if old.closed:
                break
            await asyncio.sleep(0.01)
        assert old.closed
        assert client.session_for(kept) is client.session_for(kept)  # pooled, not one per call
        await client.close()

    asyncio.run(run())


def test_wrong_egress_credentials_are_the_egress_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward proxy refusing our credentials (407) is the egress failing, not Google's answer."""
    import asyncio

    from gemini_pool.upstream import UpstreamClient, UpstreamError

    from ..e2e.forward_proxy import ForwardProxy

    via = ForwardProxy("http", auth=("u", "right")).start()
    try:

        async def run() -> None:
            client = UpstreamClient()
            try:
                await client.send(
                    "GET",
                    "http://127.0.0.1:9/x",
                    [],
                    b"",
                    stream=False,
                    timeout=5,
                    egress=Egress(via.url, "u:wrong"),
                )
            except UpstreamError as e:
                assert "egress proxy unreachable" in str(e) and "407" in str(e)
                assert "wrong" not in str(e) and not e.sent
            else:
                raise AssertionError("a 407 from the egress proxy must fail the attempt")
            finally:
                await client.close()

        asyncio.run(run())
        assert via.refused == 1 and via.credentials == ["u:wrong"]
    finally:
        via.stop()
