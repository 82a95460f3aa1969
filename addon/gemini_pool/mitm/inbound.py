"""What a caller sent, read off a mitmproxy flow for the gate, and what of it goes no further."""

from __future__ import annotations

import re

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from ..gate import STRIPPED_FIELDS, Arrival, Target
from ..routing import query_credentials
from ..uploads import HOSTPORT, Where, mask_upload_ids


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


_PATH_PARAMS = re.compile(r";|%3[bB]")


def strip_credentials(req: http.Request) -> None:
    """A refused request keeps no credential either (mitmweb, dumps); this cannot raise."""
    try:
        req.headers.fields = tuple(
            kv for kv in req.headers.fields if kv[0].strip().lower() not in STRIPPED_FIELDS
        )
        path, sep, query = req.path.partition("?")
        cut = _PATH_PARAMS.split(path, maxsplit=1)[0]  # `;key=...` goes with the rest
        if sep:
            clean = mask_upload_ids(query_credentials(query).query)
            req.path = f"{cut}?{clean}" if clean else cut
        elif cut != path:
            req.path = cut
    except Exception:
        req.headers.fields = ()
        req.data.path = b"/"


def client_host(req: http.Request) -> str:
    """The host[:port] the caller addressed (with keep_host_header), if it looks like one."""
    host = req.host_header or ""
    return host if HOSTPORT.fullmatch(host) else ""


def where(flow: http.HTTPFlow, host: str) -> Where:
    """How the caller reached the proxy, for the upload URLs the pipeline hands back."""
    headers = flow.request.headers
    peer = flow.client_conn.peername
    local = flow.client_conn.sockname
    return Where(
        host=host,
        tls=bool(flow.client_conn.tls),
        local=(str(local[0]), int(local[1])),
        peer=str(peer[0]) if peer else "",
        forwarded_host=headers.get("x-forwarded-host", ""),
        forwarded_proto=headers.get("x-forwarded-proto", ""),
    )
