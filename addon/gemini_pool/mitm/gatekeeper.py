"""The gate as a mitmproxy addon: who may use the proxy, decided on the request head.

`requestheaders` hands the head to the pure gate (`gate.py`) and either admits the flow (client
credentials and the headers Google checks key restrictions against removed, Host set to the
upstream's) or refuses it at once. A refused flow never goes upstream, and a body still to come is
never held in memory: it streams into the relay's sink, which answers and discards it. Whatever
raises on the way to a decision leaves the caller refused (mitmproxy's proxyauth is the model).
"""

from __future__ import annotations

import functools
import logging
import time

from mitmproxy import http
from mitmproxy.net.http.url import hostport

from ..bodybudget import RETRY_AFTER
from ..gate import STRIPPED_FIELDS, Admit, Refuse, Target, content_length
from ..metrics import BODY_BYTES_IN_FLIGHT, GATE_REFUSALS
from ..records import RequestRecord
from ..routing import Api
from ..runtime import Runtime
from . import inbound
from .answers import error_parts, error_response
from .detour import point_at_relay

log = logging.getLogger("gemini_proxy")

_DROPPED = STRIPPED_FIELDS | {b"host"}


@functools.lru_cache(maxsize=16)  # one upstream per listener
def _host_field(target: Target) -> bytes:
    """The Host header mitmproxy would send to the upstream."""
    return hostport(target.scheme, target.host, target.port).encode("idna")


class Gatekeeper:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT lets a caller pick the destination: never, with our keys."""
        if inbound.reverse_target(flow.client_conn.proxy_mode) is None:
            flow.response = http.Response.make(
                403,
                b"gemini-proxy serves only reverse-mode listeners",
                {"content-type": "text/plain", "connection": "close"},
            )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.flows.open(flow.id, flow.client_conn.id)
        try:
            arrival = inbound.arrival(flow)
            decision = self.rt.service.gate.decide(arrival, time.time())
            if isinstance(decision, Admit):
                decision = self._reserve_body(rec, decision, arrival.fields)
            if isinstance(decision, Admit):
                self._admit(flow, rec, decision)
                return
        except Exception as e:  # fail closed: never a forwarded flow, never a logged error
            error = f"{type(e).__name__}: {e}"
            decision = Refuse(
                401, "the request could not be read", "invalid_token", Api.NATIVE, True, error
            )
        try:
            self._refuse(flow, rec, decision)
        except Exception as e:  # still refused: the `request` hook answers a flow without admit
            log.warning("gemini-proxy: refusing request %s failed: %s", rec.request_id, e)

    def _reserve_body(
        self, rec: RequestRecord, d: Admit, fields: tuple[tuple[bytes, bytes], ...]
    ) -> Admit | Refuse:
        """Reserve the announced body in the memory budget before mitmproxy reads it; past the
        budget, refuse (the body then streams into the relay's sink, never into memory)."""
        size = content_length(fields) if d.body_expected else 0
        budget = self.rt.flows.budget
        if budget.reserve(size):
            rec.body_bytes = size
            BODY_BYTES_IN_FLIGHT.set(budget.held)
            return d
        return Refuse(
            503,
            budget.message(size),
            "inflight_bytes_exhausted",
            d.api,
            True,
            retry_after=RETRY_AFTER,
        )

    def _admit(self, flow: http.HTTPFlow, rec: RequestRecord, d: Admit) -> None:
        req = flow.request
        rec.client, rec.api = d.client, str(d.api)
        rec.origin_host = inbound.client_host(req)
        # credentials and the headers Google checks key restrictions against go no further
        # (nor show in mitmweb or dumps); Host becomes the upstream's, as mitmproxy would set it
        fields = tuple(kv for kv in req.headers.fields if kv[0].lower() not in _DROPPED)
        req.headers.fields = ((b"host", _host_field(d.upstream)), *fields)
        path, _, query = req.path.partition("?")
        if query != d.query:
            req.path = f"{path}?{d.query}" if d.query else path
        rec.admit = d  # last: an admission stands only once the flow is clean

    def _refuse(self, flow: http.HTTPFlow, rec: RequestRecord, d: Refuse) -> None:
        """Answer at the head. A body still to come streams into the relay's sink (which answers
        at once and discards it) instead of being buffered by mitmproxy."""
        rec.api = str(d.api)
        GATE_REFUSALS.labels(d.reason).inc()
        if d.error:  # a warning, not an error: mitmdump exits on an error logged at startup
            log.warning("gemini-proxy: request %s refused: %s", rec.request_id, d.error)
        inbound.strip_credentials(flow.request)
        # no "100 Continue" for a refused body: the caller gets the refusal instead
        flow.request.headers.pop("expect", None)
        rec.answered(d.status, d.reason, d.message)
        relay = self.rt.relay
        if not (d.body_expected and relay.port):
            flow.response = response = error_response(
                d.api,
                rec.request_id,
                d.status,
                d.message,
                d.reason,
                d.retry_after,
                close=d.body_expected,
            )
            if d.allow:
                response.headers["allow"] = d.allow
            if flow.request.method == "HEAD":
                response.content = b""  # mitmproxy would send a body on a HEAD answer
            return
        headers, body = error_parts(
            d.api, rec.request_id, d.status, d.message, d.reason, d.retry_after
        )
        headers += [("allow", d.allow)] if d.allow else []
        rec.relay_ticket = relay.refuse(d.status, "", headers, body, after_body=True)
        rec.detour = point_at_relay(flow, relay.port, rec.relay_ticket, keep_body=True)
        flow.request.stream = True
        rec.refused = True  # last: only a refusal fully set up lets `request` pass the flow by
