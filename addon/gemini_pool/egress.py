"""Egress per key: the forward proxy (http:// or socks5://) a key's requests leave through.

Pure logic: parsing and validating `keys[].proxy` and `proxy_auth_env`. The URL holds no
credentials (they come from the environment only), so `Egress.url` may be shown anywhere: logs,
mitmweb, metrics, the admin API. The credentials live in `Egress.auth`, never in its repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

SCHEMES = ("http", "socks5", "socks5h")  # socks5h: the proxy resolves the host name


class EgressError(ValueError):
    """A proxy URL or credential that cannot be used (the message never holds a credential)."""


@dataclass(frozen=True)
class Egress:
    url: str  # scheme://host:port, never with credentials
    auth: str | None = field(default=None, repr=False)  # "user:password", from the environment

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0]

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.auth is None:
            return None
        user, _, password = self.auth.partition(":")
        return user, password


def parse_proxy_url(value: str) -> str:
    """`http://host:port` or `socks5://host:port`, normalised. Raises EgressError."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise EgressError("is not a valid URL (scheme://host:port)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise EgressError(
            f"scheme must be one of {', '.join(s + '://' for s in SCHEMES)}, got {scheme or '-'!r}"
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise EgressError(
            "must not hold credentials: put user:password in an environment variable and name "
            "it in 'proxy_auth_env'"
        )
    if not parts.hostname:
        raise EgressError("names no host")
    if port is None:
        raise EgressError("needs an explicit port (http://host:3128, socks5://host:1080)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressError("must be scheme://host:port, nothing after the port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port}"


def parse_proxy_auth(value: str) -> str:
    """`user:password` as held in the environment. Raises EgressError (never echoing it)."""
    user, sep, _password = value.partition(":")
    if not sep or not user:
        raise EgressError("must hold user:password")
    if not all(" " < c < "\x7f" for c in value):
        raise EgressError("must be printable ASCII without spaces")
    return value
