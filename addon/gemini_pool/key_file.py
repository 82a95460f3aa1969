"""The key file read strictly: YAML without aliases or duplicate keys, every mapping with its line,
each entry checked field by field with errors as `file:line: what, field 'x': why`.

config.py says what the fields mean; this module only knows how to read them and how to complain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A key file that cannot be used. str() reads `file:line: message`."""

    def __init__(self, source: str, message: str, line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.detail = message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


# --- YAML loading: no aliases (no "billion laughs"), no duplicate mapping keys, line numbers kept.


class LinedDict(dict[Any, Any]):
    line: int = 0
    lines: dict[Any, int]  # the line of each field


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in the key file", event.start_mark
            )
        return super().compose_node(parent, index)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> LinedDict:
    result = LinedDict()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | bool | float) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain scalars", key_node.start_mark
            )
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(data: bytes, source: str) -> Any:
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(source, f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(source, f"not valid UTF-8 (byte {e.start})", line) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = mark.line + 1 if mark else None
        message = f"YAML error: {e.problem or e.context}"
        if e.context and e.context_mark and e.problem:
            message += f" ({e.context} started at line {e.context_mark.line + 1})"
        raise ConfigError(source, message, where) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"YAML error: {e}") from None
    except RecursionError:
        raise ConfigError(source, "YAML nested too deeply") from None
    except Exception as e:  # a tagged scalar PyYAML cannot construct (!!timestamp nope, ...)
        raise ConfigError(source, f"YAML error: {type(e).__name__}: {e}") from None


# --- validation


class Entry:
    """One mapping in the file, with enough context to name it in an error."""

    def __init__(self, source: str, what: str, raw: Any, allowed: set[str], parent_line: int):
        self.source = source
        self.what = what
        self.line = raw.line if isinstance(raw, LinedDict) else parent_line
        if not isinstance(raw, dict):
            self.fail(f"must be a mapping, got {type(raw).__name__}")
        self.raw: dict[Any, Any] = raw
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            self.fail(
                f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )

    def fail(self, message: str, fld: str | None = None) -> None:
        where = f"{self.what}, field '{fld}'" if fld else self.what
        lines = getattr(self.raw, "lines", {}) if hasattr(self, "raw") else {}
        raise ConfigError(self.source, f"{where}: {message}", lines.get(fld, self.line))

    def raw_line(self, fld: str) -> int:
        return int(getattr(self.raw, "lines", {}).get(fld, self.line))

    def string(self, fld: str, *, required: bool = False) -> str | None:
        value = self.raw.get(fld)
        if value is None:
            if required:
                self.fail("is required", fld)
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(f"must be a non-empty string, got {type(value).__name__}", fld)
        return str(value).strip()

    def secret(self, fld: str, env_fld: str, env: Mapping[str, str]) -> str:
        direct, from_env = self.string(fld), self.string(env_fld)
        if direct and from_env:
            self.fail(f"give either '{fld}' or '{env_fld}', not both")
        if from_env:
            value = env.get(from_env, "").strip()
            if not value:
                self.fail(f"environment variable {from_env} is not set or empty", env_fld)
            return value
        if not direct:
            self.fail(f"one of '{fld}' or '{env_fld}' is required")
        return str(direct)

    def name(self) -> str:
        name = self.string("name", required=True)
        assert name is not None
        if not NAME_RE.match(name):
            self.fail(
                "must be 1-64 characters of letters, digits, '_', '.', '-', starting with a "
                "letter or digit",
                "name",
            )
        self.what = f"{self.what} ({name})"
        return name
