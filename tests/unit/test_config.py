"""Key file validation: errors name the file, the line and the field; bad YAML never loads."""

from __future__ import annotations

import pytest

from gemini_pool.config import ConfigError, keys_from_env, load_config, mask_secret, parse_config


def parse(text: str, env: dict[str, str] | None = None):
    return parse_config(text.encode(), "keys.yaml", env or {})


def test_full_file_parses_with_defaults() -> None:
    cfg = parse(
        """
keys:
  - name: alpha
    key: AIzaAAAA
    project: proj-a
    weight: 2
  - name: beta
    key_env: BETA_KEY
    enabled: false
clients:
  - name: web-app
    token: sk-123
""",
        {"BETA_KEY": "AQ.secret-beta"},
    )
    assert [(k.name, k.project, k.weight, k.enabled) for k in cfg.keys] == [
        ("alpha", "proj-a", 2, True),
        ("beta", "beta", 1, False),
    ]
    assert cfg.keys[1].secret == "AQ.secret-beta"  # keys are opaque: AQ. keys are fine
    assert cfg.clients[0].name == "web-app"
    assert "AIzaAAAA" not in repr(cfg)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            "keys:\n  - name: a\n    key: k1\n  - name: a\n    key: k2\n",
            4,
            "duplicate key name 'a'",
        ),
        (
            "keys:\n  - name: a\n    key: k1\n  - name: b\n    key: k1\n",
            5,
            "same secret as key 'a'",
        ),
        ("keys:\n  - name: a\n    key: k1\n    weight: 0\n", 4, "field 'weight'"),
        ("keys:\n  - name: a\n    key: k1\n    weight: '2'\n", 4, "integer from 1"),
        ("keys:\n  - name: a\n    key: k1\n    enabled: yes please\n", 4, "field 'enabled'"),
        ("keys:\n  - name: a\n    key: k1\n    colour: red\n", 2, "unknown field(s) colour"),
        ("keys:\n  - name: a\n", 2, "one of 'key' or 'key_env' is required"),
        ("keys:\n  - name: a\n    key: k\n    key_env: X\n", 2, "not both"),
        ("keys:\n  - name: a\n    key_env: MISSING\n", 3, "MISSING is not set"),
        ("keys:\n  - name: 'bad name!'\n    key: k\n", 2, "field 'name'"),
        ("keys:\n  - key: k\n", 2, "field 'name': is required"),
        ("keys: {a: 1}\n", 1, "must be a list"),
        ("keys:\n  - name: a\n    key: k\n    key: k2\n", 4, "duplicate key 'key'"),
        ("keys:\n  - name: a\n    key: [unclosed\n", 4, "YAML error"),
        ("a: &x [1]\nb: *x\n", 2, "aliases"),
        ("- just\n- a list\n", 1, "must be a mapping"),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: k1\n",
            6,
            "must not be one of the API keys",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits: {rpm: -1}\n",
            7,
            "field 'rpm': must be a whole number",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits: {rpm: 1.5}\n",
            7,
            "field 'rpm'",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits: {concurrent: true}\n",
            7,
            "field 'concurrent'",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits: {rmp: 60}\n",
            7,
            "unknown field(s) rmp",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits:\n      models: ['gemini/*']\n",
            8,
            "matches no model name",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits:\n      models: ['']\n",
            8,
            "matches no model name",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    limits:\n      models: gemini-2.5-flash\n",
            8,
            "must be a list",
        ),
        (
            "keys:\n  - name: a\n    key: k1\nclients:\n  - name: c\n    token: t1\n    group: 'team a'\n",
            7,
            "field 'group'",
        ),
    ],
)
def test_errors_name_file_line_and_field(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.line == line, str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"keys.yaml:{line}: ")


def test_billion_laughs_is_refused_fast() -> None:
    bomb = "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(ConfigError, match="aliases"):
        parse(bomb)


def test_non_utf8_and_huge_files_are_refused() -> None:
    with pytest.raises(ConfigError, match="UTF-8") as e:
        parse_config(b"keys:\n  - name: a\n    key: \xff\xfe\n", "k.yaml", {})
    assert e.value.line == 3
    with pytest.raises(ConfigError, match="limit"):
        parse_config(b"#" * (2 << 20), "k.yaml", {})


def test_empty_file_is_an_empty_pool() -> None:
    assert parse("").keys == ()


def test_env_keys_and_missing_file(tmp_path) -> None:
    cfg = keys_from_env("k1, k2 ,")
    assert [(k.name, k.secret) for k in cfg.keys] == [("env-1", "k1"), ("env-2", "k2")]
    assert load_config(tmp_path / "nope.yaml", {"GEMINI_API_KEYS": "k1"}).keys[0].name == "env-1"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="twice"):
        keys_from_env("k1,k1")


def test_a_mask_tells_keys_apart_by_their_last_4_characters_and_shows_no_more() -> None:
    # every Google key starts AIza (new ones AQ.): the prefix is public, the tail tells them apart
    assert mask_secret("AIzaSyABCDEFGHIJKLMNOPQRSTUVWXYZ0wXyZ") == "AIza…wXyZ"
    assert mask_secret("AIzaSyABCDEFGHIJKLMNOPQRSTUVWXYZ01234") != mask_secret(
        "AIzaSyABCDEFGHIJKLMNOPQRSTUVWXYZ01235"
    )
    assert mask_secret("AQ.Ab8RN6LongerSecretPart1234") == "AQ.…1234"
    # never more than 4 secret characters, never more than a quarter of what is not the prefix
    assert mask_secret("a-client-token-of-some-length") == "…ngth"
    assert mask_secret("short") == "…t"
    assert mask_secret("abc") == "…"
    assert mask_secret("AIzaSy0") == "AIza…"


def test_the_documented_example_file_is_valid() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "keys.yaml.example"
    env = {"GEMINI_KEY_BETA": "b-secret", "GEMINI_KEY_GAMMA": "g-secret", "BATCH_JOBS_TOKEN": "t"}
    cfg = parse_config(example.read_bytes(), str(example), env)
    assert [(k.name, k.project, k.weight) for k in cfg.keys] == [
        ("alpha", "proj-a", 2),
        ("beta", "proj-a", 1),
        ("gamma", "proj-b", 1),
    ]
    assert [c.name for c in cfg.clients] == ["web-app", "batch-jobs"]
    assert [(p.name, [m.pattern for m in p.limits]) for p in cfg.projects] == [
        ("proj-a", ["gemini-2.5-flash", "gemini-2.5-pro*"])
    ]


def test_a_field_error_names_the_fields_own_line() -> None:
    data = b"keys:\n  - name: a\n    key: k1\n  - name: beta\n    key: k2\n    project: p\n    weight: 0\n"
    with pytest.raises(ConfigError) as e:
        parse_config(data, "keys.yaml", {})
    assert str(e.value).startswith("keys.yaml:7: keys[1] (beta), field 'weight'")


def test_clients_groups_and_limits() -> None:
    c = parse(
        "keys:\n  - {name: a, key: k1}\nclients:\n"
        "  - name: alice\n    token: t1\n    group: team-a\n"
        "    limits: {rpm: 60, concurrent: 4, requests_per_day: 5000, tokens_per_day: 2000000,"
        " models: ['gemini-2.5-flash*', 'models/text-embedding-*']}\n"
        "  - {name: bob, token: t2, group: team-a}\n"
        "  - {name: carol, token: t3}\n"
    )
    alice, bob, carol = c.clients
    assert alice.group_name == bob.group_name == "team-a"
    assert carol.group_name == "client:carol" and not carol.limits.any
    assert alice.limits.rpm == 60 and alice.limits.concurrent == 4
    assert alice.limits.requests_per_day == 5000 and alice.limits.tokens_per_day == 2_000_000
    assert alice.limits.models == ("gemini-2.5-flash*", "text-embedding-*")
