"""Pointing a flow at the loopback relay, and putting its request back as it went to Google.

mitmproxy streams only answers it fetches itself, so a stream the addon holds (or a refusal whose
body must be drained unbuffered) is fetched from the relay: the flow's target is set to the relay
with a ticket header, and restored once the answer's headers are in, so mitmweb and `-w` dumps show
the request that went upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from ..relay import TICKET_FIELD

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_TICKET_ONLY = frozenset({TICKET_FIELD})
_RELAY_ONLY = _FRAMING | _TICKET_ONLY


@dataclass
class Detour:
    """What pointing a flow at the relay changed on its request, put back once the answer is in."""

    scheme: bytes
    host: str
    port: int
    body: bytes | None  # the relay hop of a held stream carries no body
    framing: tuple[tuple[bytes, bytes], ...]  # content-length / transfer-encoding header fields
    streamed: bool = False  # a refused request whose body streams into the relay's sink


def point_at_relay(flow: http.HTTPFlow, port: int, ticket: str, keep_body: bool) -> Detour:
    """Send the flow's request to the relay (`keep_body`: its body still streams there)."""
    data = flow.request.data  # the target, set directly: the Host header stays as it is
    fields = data.headers.fields
    framing = tuple(kv for kv in fields if kv[0].lower() in _FRAMING)
    if keep_body:
        detour = Detour(data.scheme, data.host, data.port, None, (), streamed=True)
    else:
        detour = Detour(data.scheme, data.host, data.port, data.content, framing)
        if data.content or framing:  # the relay needs no body: do not copy it again
            fields = tuple(kv for kv in fields if kv[0].lower() not in _FRAMING)
            fields += ((b"content-length", b"0"),)
            data.content = b""
    data.headers.fields = (*fields, (TICKET_FIELD, ticket.encode()))
    data.scheme, data.host, data.port = b"http", "127.0.0.1", port
    return detour


def restore_request(flow: http.HTTPFlow, detour: Detour) -> None:
    """Show in mitmweb and dumps the request as it went to Google, not to the relay."""
    data = flow.request.data
    data.scheme, data.host, data.port = detour.scheme, detour.host, detour.port
    if detour.streamed:
        data.headers.fields = tuple(
            kv for kv in data.headers.fields if kv[0].lower() not in _TICKET_ONLY
        )
        return
    drop = _RELAY_ONLY if (detour.body or detour.framing) else _TICKET_ONLY
    fields = tuple(kv for kv in data.headers.fields if kv[0].lower() not in drop)
    data.headers.fields = fields + detour.framing
    data.content = detour.body
