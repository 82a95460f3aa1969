"""What a caller sent, read off a mitmproxy flow for the gate, and what of it goes no further."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from .gate import STRIPPED_FIELDS, Arrival, Target, parse_ip
from .routing import query_credentials

_HOSTPORT = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def reverse_target(spec: str | ProxyMode) -> Target | None:
    """The upstream of a reverse-mode listener; None for modes where callers pick the host."""
    mode = ProxyMode.parse(spec) if isinstance(spec, str) else spec
    if isinstance(mode, ReverseMode) and mode.scheme in ("http", "https"):
        return Target(mode.scheme, mode.address[0], mode.address[1])
    return None


def arrival(flow: http.HTTPFlow) -> Arrival:
    req = flow.request
    path, _, query = req.path.partition("?")
    peer = flow.client_conn.peername
    return Arrival(
        method=req.method,
        path=path,
        query=query,
        fields=tuple(req.headers.fields),
        peer=str(peer[0]) if peer else "",
        listener=reverse_target(flow.client_conn.proxy_mode),
        destination=Target(req.scheme, req.host, req.port),
        authority=req.authority,
    )


def strip_credentials(req: http.Request) -> None:
    """A refused request keeps no credential either (mitmweb, dumps); this cannot raise."""
    try:
        req.headers.fields = tuple(
            kv for kv in req.headers.fields if kv[0].strip().lower() not in STRIPPED_FIELDS
        )
        path, sep, query = req.path.partition("?")
        if sep:
            clean = query_credentials(query).query
            req.path = f"{path}?{clean}" if clean else path
    except Exception:
        req.headers.fields = ()
        req.data.path = b"/"


def client_host(req: http.Request) -> str:
    """The host[:port] the caller addressed (with keep_host_header), if it looks like one."""
    host = req.host_header or ""
    return host if _HOSTPORT.fullmatch(host) else ""


def proxy_origin(
    flow: http.HTTPFlow,
    host: str,
    public_url: str = "",
    trusted: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str:
    """Where the caller reaches this proxy: upload URLs handed back point there.

    The configured public URL wins; then X-Forwarded-Host/-Proto, but only from a trusted front
    proxy (anyone else could point an upload at a host of their choosing); then the Host the
    caller used (through a TCP forwarder, NAT or a Service that is the address it knows); last,
    the socket it connected to.
    """
    if public_url:
        return public_url.rstrip("/")
    peer = flow.client_conn.peername
    if peer and trusted and _in_networks(str(peer[0]), trusted):
        fwd = flow.request.headers.get("x-forwarded-host", "").split(",")[0].strip()
        proto = flow.request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if fwd and _HOSTPORT.fullmatch(fwd):
            scheme = proto if proto in ("http", "https") else "https"
            return f"{scheme}://{fwd}"
    scheme = "https" if flow.client_conn.tls else "http"
    if host:
        return f"{scheme}://{host}"
    ip, port = flow.client_conn.sockname[:2]
    if ":" in ip:
        ip = f"[{ip}]"
    return f"{scheme}://{ip}:{port}"


def _in_networks(
    ip: str, networks: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    address = parse_ip(ip)
    return address is not None and any(address in net for net in networks)
