"""Upload and download URLs that point at Google, pointed back at this proxy.

A resumable upload's start answer names the URL the bytes go to (`X-Goog-Upload-URL`, and
`X-Goog-Upload-Control-URL`), and a download answers with a `Location`: both at Google, with the
upload_id as the only credential. The caller must reach them through the proxy, so they are
rewritten to the address the caller reaches the proxy at (`proxy_origin`). Pure: no mitmproxy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from .gate import parse_ip

UPLOAD_URL_HEADERS = frozenset({"x-goog-upload-url", "x-goog-upload-control-url", "location"})
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


def rewrite_upload_headers(
    headers: list[tuple[str, str]], upstream_host: str, proxy_origin: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Point upload / redirect URLs at Google back at this proxy.

    Returns the new headers and (upload_id, path) of each upload URL they carried: the caller
    remembers which key started each session and the path its follow-ups must use
    (`ResourcePins.remember_upload(upload_id, key, path, now)`).
    """
    out: list[tuple[str, str]] = []
    uploads: list[tuple[str, str]] = []
    for k, v in headers:
        if k.lower() in UPLOAD_URL_HEADERS and v.startswith(("http://", "https://")):
            u = urlsplit(v)
            if u.hostname == upstream_host:
                upload_id = dict(parse_qsl(u.query)).get("upload_id")
                if upload_id and (upload_id, u.path) not in uploads:
                    uploads.append((upload_id, u.path))
                v = proxy_origin + u.path + (f"?{u.query}" if u.query else "")
        out.append((k, v))
    return out, uploads
