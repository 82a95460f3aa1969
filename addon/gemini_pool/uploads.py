"""Upload and download URLs that point at Google, pointed back at this proxy.

A resumable upload's start answer names the URL the bytes go to (`X-Goog-Upload-URL`, and
`X-Goog-Upload-Control-URL`), and a download answers with a `Location`: both at Google, with the
upload_id as the only credential. The caller must reach them through the proxy, so they are
rewritten to the address the caller reaches the proxy at (`proxy_origin`), and Google's upload_id
in them is swapped for an opaque token of the proxy's (`upload_tokens`): the caller, mitmweb and
flow dumps never see Google's. A follow-up's query gets Google's id back on its way upstream
(`upstream_query`). Pure: no mitmproxy.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, urlsplit

from .gate import parse_ip
from .routing import param_name
from .upload_tokens import is_token, new_token

UPLOAD_URL_HEADERS = frozenset({"x-goog-upload-url", "x-goog-upload-control-url", "location"})
# Google's uploader names the upload it served here (for GCS, the upload_id itself): never passed on
DROPPED_ANSWER_HEADERS = frozenset({"x-guploader-uploadid"})
UPLOAD_ID = "upload_id"
_UPLOAD_ID_FOLDED = param_name(UPLOAD_ID)  # "uploadid": `upload_id`, `uploadId`, `%75pload_id`...
HOSTPORT = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Where:
    """How the caller reached the proxy: what upload URLs handed back must point at."""

    host: str = ""  # the Host the caller used, if it looks like host[:port]
    tls: bool = False
    local: tuple[str, int] = ("127.0.0.1", 8080)  # the socket the caller connected to
    peer: str = ""  # the caller's address
    forwarded_host: str = ""  # X-Forwarded-Host (believed from trusted proxies only)
    forwarded_proto: str = ""


def proxy_origin(where: Where, public_url: str = "", trusted: Collection[IPNetwork] = ()) -> str:
    """Where the caller reaches this proxy: upload URLs handed back point there.

    The configured public URL wins; then X-Forwarded-Host/-Proto, but only from a trusted front
    proxy (anyone else could point an upload at a host of their choosing); then the Host the
    caller used (through a TCP forwarder, NAT or a Service that is the address it knows); last,
    the socket it connected to.
    """
    if public_url:
        return public_url.rstrip("/")
    if where.peer and trusted and _in_networks(where.peer, trusted):
        fwd = where.forwarded_host.split(",")[0].strip()
        proto = where.forwarded_proto.split(",")[0].strip().lower()
        if fwd and HOSTPORT.fullmatch(fwd):
            scheme = proto if proto in ("http", "https") else "https"
            return f"{scheme}://{fwd}"
    scheme = "https" if where.tls else "http"
    if where.host:
        return f"{scheme}://{where.host}"
    ip, port = where.local[:2]
    if ":" in ip:
        ip = f"[{ip}]"
    return f"{scheme}://{ip}:{port}"


def _in_networks(ip: str, networks: Collection[IPNetwork]) -> bool:
    address = parse_ip(ip)
    return address is not None and any(address in net for net in networks)


def names_upload_urls(headers: Sequence[tuple[str, str]]) -> bool:
    return any(k.lower() in UPLOAD_URL_HEADERS for k, _ in headers)


@dataclass(frozen=True, slots=True)
class Started:
    """An upload session an answer named: Google's upload_id and the token handed out for it."""

    upload_id: str  # Google's: kept only sealed under the token
    token: str  # the proxy's, in the URL the caller gets
    path: str  # the upload URL's path, which its follow-ups must use


def rewrite_upload_headers(
    headers: list[tuple[str, str]],
    upstream_host: str,
    proxy_origin: str,
    known: Mapping[str, str] | None = None,
    mint: Callable[[], str] = new_token,
) -> tuple[list[tuple[str, str]], list[Started]]:
    """Point upload / redirect URLs at Google back at this proxy, with opaque upload ids.

    Every upload_id a URL at Google names is replaced by a token: `known`'s (Google's id ->
    token: a follow-up's own session) or a fresh one from `mint`. Returns the new headers and the
    sessions given a fresh token (the caller remembers each: `ResourcePins.remember_upload`).
    Google's ids show nowhere in what is returned, in any header.
    """
    tokens: dict[str, str] = dict(known or {})
    started: list[Started] = []

    def token_for(upload_id: str, path: str) -> str:
        token = tokens.get(upload_id)
        if token is None and not upload_id:
            return ""
        if token is None:
            token = tokens[upload_id] = mint()
            started.append(Started(upload_id, token, path))
        return token

    out: list[tuple[str, str]] = []
    for k, v in headers:
        if k.lower() in DROPPED_ANSWER_HEADERS:
            continue
        if k.lower() in UPLOAD_URL_HEADERS and v.startswith(("http://", "https://")):
            u = urlsplit(v)
            if u.hostname == upstream_host:
                query = _swap_upload_ids(u.query, functools.partial(token_for, path=u.path))
                v = proxy_origin + u.path + (f"?{query}" if query else "")
        out.append((k, v))
    if tokens:  # Google's id anywhere else in a header (never expected): the token instead
        out = [(k, _hide(v, tokens)) for k, v in out]
    return out, started


def upstream_query(query: str, upload_id: str) -> str:
    """A follow-up's query as it goes to Google: its token swapped for Google's `upload_id`
    (every upload-id parameter, in any spelling, gives way to exactly one)."""
    return _swap_upload_ids(query, lambda _: upload_id)


def names_upload_id(query: str) -> bool:
    """The query has an upload-id parameter in some spelling (`upload_id`, `uploadId`, ...)."""
    return "pload" in query.lower() and any(
        param_name(part.partition("=")[0]) == _UPLOAD_ID_FOLDED for part in query.split("&")
    )


def mask_upload_ids(query: str) -> str:
    """A refused request's query as flows and records show it: an upload id that is not one of
    the proxy's tokens (Google's own, say) reads `redacted`."""
    if "pload" not in query.lower():
        return query
    parts = []
    for part in query.split("&"):
        raw_name, _, raw_value = part.partition("=")
        if param_name(raw_name) == _UPLOAD_ID_FOLDED and not is_token(unquote_plus(raw_value)):
            part = f"{raw_name}=redacted"
        parts.append(part)
    return "&".join(parts)


def _swap_upload_ids(query: str, swap: Callable[[str], str]) -> str:
    """The query with its first upload-id parameter's value swapped and any other dropped."""
    parts: list[str] = []
    done = False
    for part in query.split("&") if query else ():
        raw_name, _, raw_value = part.partition("=")
        if param_name(raw_name) != _UPLOAD_ID_FOLDED:
            parts.append(part)
        elif not done:
            done = True
            parts.append(f"{UPLOAD_ID}={quote(swap(unquote_plus(raw_value)), safe='')}")
    return "&".join(parts)


def _hide(value: str, tokens: Mapping[str, str]) -> str:
    for upload_id, token in tokens.items():
        if upload_id and upload_id in value:
            value = value.replace(upload_id, token)
    return value
