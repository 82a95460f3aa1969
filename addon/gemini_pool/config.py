"""The key file (keys.yaml) and GEMINI_API_KEYS: parsed and validated into an immutable Config.

Pure logic: no mitmproxy. Every validation error names the file, the line and the field, and a
broken file raises ConfigError so the caller can keep the previous config running.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .answer_cache import CacheSpec
from .egress import Egress, EgressError, parse_proxy_auth, parse_proxy_url
from .fallback import FallbackError, Fallbacks, parse_fallbacks
from .key_file import NAME_RE, ConfigError, Entry, LinedDict, load_yaml

__all__ = ["NAME_RE", "Config", "ConfigError", "load_config", "parse_config"]

MAX_WEIGHT = 1000
ENV_KEYS_VAR = "GEMINI_API_KEYS"

KEY_FIELDS = {"name", "key", "key_env", "project", "weight", "enabled", "proxy", "proxy_auth_env"}
CLIENT_FIELDS = {"name", "token", "token_env", "group", "limits"}
LIMIT_FIELDS = {"rpm", "concurrent", "requests_per_day", "tokens_per_day", "models"}
MAX_LIMIT = 10**12
MODEL_GLOB = re.compile(r"[A-Za-z0-9._*?-]{1,128}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # routing.MODEL_ID
TOP_FIELDS = {"keys", "clients", "cache", "projects", "fallbacks"}
CACHE_FIELDS = {"ttl_s", "max_entries", "max_bytes"}


# how Google's keys start (every key, so no secret): shown in full, like Google's console does
PUBLIC_PREFIXES = ("AIza", "AQ.")
MASK_TAIL = 4  # the most secret characters a mask ever shows


def mask_secret(secret: str) -> str:
    """`AIza…wXyZ`: the public prefix and the last 4 characters, as Google's console shows keys.

    Never more than MASK_TAIL secret characters, and never more than a quarter of the rest."""
    prefix = next((p for p in PUBLIC_PREFIXES if secret.startswith(p)), "")
    rest = secret[len(prefix) :]
    shown = min(MASK_TAIL, len(rest) // 4)
    return f"{prefix}…{rest[len(rest) - shown :]}"


def fingerprint(secret: str) -> str:
    """A stable, non-reversible identifier of a secret (for the database and exports)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeySpec:
    name: str
    secret: str = field(repr=False)
    project: str
    weight: int = 1
    enabled: bool = True
    egress: Egress | None = None  # keys[].proxy: where this key's requests leave through

    @property
    def mask(self) -> str:
        return mask_secret(self.secret)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.secret)


@dataclass(frozen=True)
class ClientLimits:
    """A client's limits; None (or no models): no limit of that kind."""

    rpm: int | None = None  # requests per rolling minute
    concurrent: int | None = None  # requests in flight
    requests_per_day: int | None = None  # per Pacific day, as Google counts days
    tokens_per_day: int | None = None  # input + output tokens per Pacific day
    models: tuple[str, ...] = ()  # globs of the models it may use

    @property
    def any(self) -> bool:
        return self != NO_LIMITS


NO_LIMITS = ClientLimits()


@dataclass(frozen=True)
class ClientSpec:
    name: str
    token: str = field(repr=False)
    group: str = ""  # clients of one group share resources; default: a group of its own
    limits: ClientLimits = NO_LIMITS

    @property
    def group_name(self) -> str:
        """Who shares this client's resources: its `group`, else itself alone (a name no
        configured group can take: group names have no ':')."""
        return self.group or f"client:{self.name}"


@dataclass(frozen=True)
class Config:
    keys: tuple[KeySpec, ...]
    clients: tuple[ClientSpec, ...]
    source: str
    cache: CacheSpec | None = None  # the answer cache; None: off
    projects: tuple[ProjectSpec, ...] = ()  # budgets (`projects:`), see budgets.py
    fallbacks: Fallbacks = ()  # model fallback (`fallbacks:`), see fallback.py; (): off

    def key(self, name: str) -> KeySpec | None:
        return next((k for k in self.keys if k.name == name), None)


PROJECT_FIELDS = {"name", "limits"}
BUDGET_FIELDS = ("rpm", "tpm", "rpd")
# a model id, or a glob of one ("gemini-2.5-pro*"): fnmatch's * and ? only, no [sets]
MODEL_PATTERN_RE = re.compile(r"^[A-Za-z0-9*?][A-Za-z0-9._*?-]{0,127}$")


@dataclass(frozen=True)
class ModelLimits:
    """A project's configured budget for one model (or a glob of models); None: no limit."""

    pattern: str
    rpm: int | None = None  # requests per rolling minute
    tpm: int | None = None  # input tokens per rolling minute
    rpd: int | None = None  # requests per Pacific day


@dataclass(frozen=True)
class ProjectSpec:
    name: str
    limits: tuple[ModelLimits, ...] = ()  # in file order; an exact model id beats a glob


EMPTY = Config(keys=(), clients=(), source="(none)")


def parse_config(data: bytes, source: str, env: Mapping[str, str] | None = None) -> Config:
    """Parse key-file bytes. Raises ConfigError naming file, line and field."""
    env = os.environ if env is None else env
    doc = load_yaml(data, source)
    if doc is None:
        doc = LinedDict()
    top = Entry(source, "top level", doc, TOP_FIELDS, 1)
    raw_keys = top.raw.get("keys") or []
    raw_clients = top.raw.get("clients") or []
    if not isinstance(raw_keys, list):
        top.fail("must be a list of keys", "keys")
    if not isinstance(raw_clients, list):
        top.fail("must be a list of clients", "clients")

    keys: list[KeySpec] = []
    names: set[str] = set()
    secrets: dict[str, str] = {}
    for i, raw in enumerate(raw_keys):
        entry = Entry(source, f"keys[{i}]", raw, KEY_FIELDS, top.line)
        name = entry.name()
        if name in names:
            entry.fail(f"duplicate key name '{name}'", "name")
        secret = entry.secret("key", "key_env", env)
        if secret in secrets:
            entry.fail(f"same secret as key '{secrets[secret]}'", "key")
        weight = entry.raw.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            entry.fail(f"must be an integer from 1 to {MAX_WEIGHT}, got {weight!r}", "weight")
        enabled = entry.raw.get("enabled", True)
        if not isinstance(enabled, bool):
            entry.fail(f"must be true or false, got {enabled!r}", "enabled")
        project = entry.string("project") or name
        names.add(name)
        secrets[secret] = name
        keys.append(KeySpec(name, secret, project, weight, enabled, _egress(entry, env)))

    clients: list[ClientSpec] = []
    client_names: set[str] = set()
    tokens: set[str] = set()
    for i, raw in enumerate(raw_clients):
        entry = Entry(source, f"clients[{i}]", raw, CLIENT_FIELDS, top.line)
        name = entry.name()
        if name in client_names:
            entry.fail(f"duplicate client name '{name}'", "name")
        token = entry.secret("token", "token_env", env)
        if not all("!" <= c <= "~" for c in token) or len(token) > 4096:
            entry.fail("must be printable ASCII without spaces, at most 4096 characters", "token")
        if token in tokens:
            entry.fail("same token as another client", "token")
        if token in secrets:
            entry.fail("a client token must not be one of the API keys", "token")
        group = entry.string("group") or ""
        if group and not NAME_RE.match(group):
            entry.fail("must be 1-64 characters of letters, digits, '_', '.', '-'", "group")
        limits = _limits(entry, top.line) if "limits" in entry.raw else NO_LIMITS
        client_names.add(name)
        tokens.add(token)
        clients.append(ClientSpec(name, token, group, limits))
    try:
        fallbacks = parse_fallbacks(top.raw.get("fallbacks"), top.raw_line("fallbacks"))
    except FallbackError as e:
        raise ConfigError(source, str(e), e.line) from None
    return Config(
        tuple(keys), tuple(clients), source, _cache(top), _parse_projects(top, keys), fallbacks
    )


def _cache(top: Entry) -> CacheSpec | None:
    """`cache: {ttl_s, max_entries, max_bytes}`: the answer cache, off without it."""
    raw = top.raw.get("cache")
    if raw is None:
        return None
    entry = Entry(top.source, "cache", raw, CACHE_FIELDS, top.line)
    default = CacheSpec()
    values: dict[str, int] = {}
    for fld, low, high in (
        ("ttl_s", 1, 30 * 86400),
        ("max_entries", 1, 10_000_000),
        ("max_bytes", 1024, 1 << 40),
    ):
        value = entry.raw.get(fld, getattr(default, fld))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            entry.fail(f"must be an integer from {low} to {high}, got {value!r}", fld)
        values[fld] = int(value)
    return CacheSpec(float(values["ttl_s"]), values["max_entries"], values["max_bytes"])


def _egress(entry: Entry, env: Mapping[str, str]) -> Egress | None:
    """keys[].proxy and keys[].proxy_auth_env (the credentials, from the environment only)."""
    url, auth_env = entry.string("proxy"), entry.string("proxy_auth_env")
    if url is None:
        if auth_env is not None:
            entry.fail("needs 'proxy' too", "proxy_auth_env")
        return None
    try:
        url = parse_proxy_url(url)
    except EgressError as e:
        entry.fail(str(e), "proxy")
    auth = None
    if auth_env is not None:
        value = env.get(auth_env, "").strip()
        if not value:
            entry.fail(f"environment variable {auth_env} is not set or empty", "proxy_auth_env")
        try:
            auth = parse_proxy_auth(value)
        except EgressError as e:
            entry.fail(f"environment variable {auth_env} {e}", "proxy_auth_env")
    return Egress(url, auth)


def _limits(client: Entry, parent_line: int) -> ClientLimits:
    """A client's `limits:` mapping: positive whole numbers, and model globs that can match."""
    raw = client.raw.get("limits")
    if raw is None:
        return NO_LIMITS
    entry = Entry(client.source, f"{client.what} limits", raw, LIMIT_FIELDS, parent_line)
    numbers: dict[str, int | None] = {}
    for fld in sorted(LIMIT_FIELDS - {"models"}):
        value = entry.raw.get(fld)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT
        ):
            entry.fail(f"must be a whole number from 1 to {MAX_LIMIT}, got {value!r}", fld)
        numbers[fld] = value
    globs = entry.raw.get("models")
    if globs is None:
        globs = []
    if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
        entry.fail("must be a list of model names or globs (gemini-2.5-flash*)", "models")
    models: list[str] = []
    for glob in globs:
        g = glob.strip().removeprefix("models/")
        # a glob must be able to match some model name: * and ? stand for name characters
        if not MODEL_GLOB.fullmatch(g) or not _MODEL_NAME.fullmatch(
            g.replace("*", "x").replace("?", "x")
        ):
            entry.fail(
                f"{glob!r} matches no model name (letters, digits, . _ -, and * ?)", "models"
            )
        models.append(g)
    return ClientLimits(
        rpm=numbers["rpm"],
        concurrent=numbers["concurrent"],
        requests_per_day=numbers["requests_per_day"],
        tokens_per_day=numbers["tokens_per_day"],
        models=tuple(models),
    )


def _parse_projects(top: Entry, keys: list[KeySpec]) -> tuple[ProjectSpec, ...]:
    """`projects:` budgets per project and model (see budgets.py)."""
    raw_projects = top.raw.get("projects") or []
    if not isinstance(raw_projects, list):
        top.fail("must be a list of projects", "projects")
    used = {k.project for k in keys}
    out: list[ProjectSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_projects):
        entry = Entry(top.source, f"projects[{i}]", raw, PROJECT_FIELDS, top.line)
        name = entry.name()
        if name in seen:
            entry.fail(f"duplicate project '{name}'", "name")
        if name not in used:
            entry.fail(f"no key uses project '{name}' (keys[].project)", "name")
        seen.add(name)
        limits = entry.raw.get("limits") or {}
        if not isinstance(limits, dict):
            entry.fail("must be a mapping of model (or glob) to {rpm, tpm, rpd}", "limits")
        models: list[ModelLimits] = []
        for pattern, raw_limit in limits.items():
            if not isinstance(pattern, str) or not MODEL_PATTERN_RE.match(pattern):
                entry.fail(
                    f"{pattern!r} is not a model id or a glob of one (letters, digits, '.', '_',"
                    " '-', '*', '?')",
                    "limits",
                )
            sub = Entry(
                top.source,
                f"{entry.what}, limits '{pattern}'",
                raw_limit,
                set(BUDGET_FIELDS),
                getattr(limits, "lines", {}).get(pattern, entry.line),
            )
            values: dict[str, int] = {}
            for fld in BUDGET_FIELDS:
                value = sub.raw.get(fld)
                if value is None:
                    continue
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or not 0 < value <= MAX_LIMIT
                ):
                    sub.fail(f"must be a whole number from 1 to {MAX_LIMIT}, got {value!r}", fld)
                values[fld] = value
            if not values:
                sub.fail(f"give at least one of {', '.join(BUDGET_FIELDS)}")
            models.append(ModelLimits(str(pattern).removeprefix("models/"), **values))
        out.append(ProjectSpec(name, tuple(models)))
    return tuple(out)


def keys_from_env(value: str, source: str = ENV_KEYS_VAR) -> Config:
    """GEMINI_API_KEYS=k1,k2,...: keys named env-1, env-2, ... each its own project."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(set(parts)) != len(parts):
        raise ConfigError(source, "the same key appears twice")
    keys = tuple(KeySpec(f"env-{i}", s, f"env-{i}") for i, s in enumerate(parts, 1))
    return Config(keys, (), source)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load the key file; when it does not exist, fall back to GEMINI_API_KEYS."""
    env = os.environ if env is None else env
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if env.get(ENV_KEYS_VAR, "").strip():
            return keys_from_env(env[ENV_KEYS_VAR])
        raise ConfigError(
            str(p), f"no such file (create it from keys.yaml.example, or set {ENV_KEYS_VAR})"
        ) from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from None
    return parse_config(data, str(p), env)
