"""Forwarding as a mitmproxy addon: a flow in, the pipeline's decision back onto the flow.

`request` translates the admitted flow into a plain `Incoming` request, awaits the pipeline
(`pipeline.py`: route, pins, checks, dispatch with retries, upload URLs, remembered resources) and
applies its decision: the proxy's own answer, Google's whole answer as `flow.response`, or an open
2xx stream handed to mitmproxy through the loopback relay (mitmproxy streams only answers it
fetches itself). Every upstream attempt is made by the pipeline's own client, so the key never
enters a flow. `responseheaders`, `response`, `error` and `client_disconnected` end the flow's
record: the relay detour undone, the stream's bytes counted, the outcome settled once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import http

from ..bodybudget import RETRY_AFTER
from ..classify import network_verdict
from ..decisions import Incoming, ProxyAnswer, Stream, Unary
from ..metrics import BODY_BYTES_IN_FLIGHT
from ..records import RequestRecord
from ..relay import Held
from ..runtime import Runtime
from ..upstream import UpstreamAnswer
from . import inbound
from .answers import answer_with, s, upstream_response
from .console import Progress, annotate
from .detour import point_at_relay, restore_request

log = logging.getLogger("gemini_proxy")


class Forwarding:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.flows.get(flow.id)
        if rec is None:  # no requestheaders of ours ran: never forward such a flow
            rec = self.rt.flows.open(flow.id, flow.client_conn.id)
        if rec.refused or flow.response is not None:
            return
        try:
            await self._forward(flow, rec)
        except Exception:  # a bug here must not let the flow go upstream unhandled
            log.exception("gemini-proxy: internal error on request %s", rec.request_id)
            message = f"internal proxy error (request id {rec.request_id}); see the proxy's log"
            answer_with(flow, rec, ProxyAnswer(500, message, "internal_error"))

    async def _forward(self, flow: http.HTTPFlow, rec: RequestRecord) -> None:
        await self.rt.ready()  # the relay (streams) and the side servers, at start
        req = flow.request
        path, _, query = req.path.partition("?")
        body = req.raw_content or b""
        if not rec.body_bytes and body:  # no Content-Length (chunked): counted now it is read
            budget = self.rt.flows.budget
            if not budget.reserve(len(body)):
                message = budget.message(len(body))
                refusal = ProxyAnswer(503, message, "inflight_bytes_exhausted", RETRY_AFTER)
                answer_with(flow, rec, refusal)
                return
            rec.body_bytes = len(body)
            BODY_BYTES_IN_FLIGHT.set(budget.held)
        incoming = Incoming(
            req.method,
            path,
            query,
            [(s(k), s(v)) for k, v in req.headers.fields],
            body,
            rec.admit,
            lambda: inbound.where(flow, rec.origin_host),
        )
        rec.dispatching = True
        try:
            decision = await self.rt.pipeline.handle(incoming, rec)
        except BaseException:
            rec.dispatching = False
            if rec.ended:
                self._settle_late(rec)
            raise
        rec.dispatching = False
        if rec.ended:  # the caller left meanwhile: still count what Google was asked and billed
            if isinstance(decision, Unary):
                rec.tap.feed(decision.answer.body)
            elif isinstance(decision, Stream) and decision.answer.stream is not None:
                decision.answer.stream.close()  # nobody reads it
            self._settle_late(rec)
            return
        if rec.upstream_path is not None and req.path != rec.upstream_path:
            req.path = rec.upstream_path  # mitmweb shows what went upstream (OpenAI SDK paths)
        if isinstance(decision, ProxyAnswer):
            answer_with(flow, rec, decision)
        elif isinstance(decision, Stream) and self.rt.relay.port:
            self._relay(flow, rec, decision.answer, decision.headers)
        else:
            answer = decision.answer
            if answer.stream is not None:  # no relay (it failed to start): buffer the stream
                answer.body += await answer.stream.read()
                answer.stream.release()
            flow.response = upstream_response(answer, decision.headers)

    def _relay(
        self,
        flow: http.HTTPFlow,
        rec: RequestRecord,
        answer: UpstreamAnswer,
        extra: list[tuple[str, str]],
    ) -> None:
        """Point the flow at the relay, which hands mitmproxy the open stream we hold."""
        assert answer.stream is not None
        key, model = rec.key, rec.model or "*"
        pool = self.rt.service.pool
        progress = Progress(flow, rec)

        def on_chunk(chunk: bytes) -> None:
            if rec.first_byte is None:
                rec.first_byte = time.perf_counter()
            rec.tap.feed(chunk)
            progress()  # mitmweb shows the bytes and events so far

        def on_end(error: str | None) -> None:
            if error:
                rec.stream_error = error
                if error.startswith("upstream") and key:
                    pool.record(key, model, network_verdict("stream broke"), time.time())

        held = Held(
            answer.status,
            answer.reason,
            answer.headers + extra,
            answer.body,
            answer.stream,
            on_chunk,
            on_end,
        )
        rec.relay_ticket = self.rt.relay.hold(held)
        rec.detour = point_at_relay(flow, self.rt.relay.port, rec.relay_ticket, keep_body=False)
        annotate(flow, rec)  # a stream may run for minutes: show it in mitmweb now

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.flows.get(flow.id)
        if rec is None or rec.detour is None:
            return
        detour, rec.detour = rec.detour, None
        restore_request(flow, detour)
        assert flow.response is not None
        flow.response.stream = not detour.streamed

    def response(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.flows.close(flow.id, flow.client_conn.id)
        if rec is None:
            return
        assert flow.response is not None
        rec.status = flow.response.status_code
        if rec.relay_ticket is None or rec.refused:  # not streamed: the whole body is here
            rec.first_byte = time.perf_counter()
            rec.tap.feed(flow.response.raw_content or b"")
        self._settle(rec)
        annotate(flow, rec)  # now: mitmweb and `-w` dumps take the flow after this hook

    def error(self, flow: http.HTTPFlow) -> None:
        rec = self.rt.flows.close(flow.id, flow.client_conn.id)
        if rec is None:
            return
        if rec.detour is not None:
            restore_request(flow, rec.detour)
            rec.detour = None
        if rec.relay_ticket and rec.first_byte is None:
            self.rt.relay.cancel(rec.relay_ticket, "flow failed before the stream started")
        msg = flow.error.msg if flow.error else "unknown error"
        if not rec.stream_error and not rec.refused:
            rec.stream_error = msg
        if not rec.status:
            rec.status = 499  # the caller went away before an answer
        self._settle(rec)
        annotate(flow, rec)

    def client_disconnected(self, client: Any) -> None:
        """Settle flows no hook will end (mitmproxy gave up on them, e.g. request trailers)."""
        for rec in self.rt.flows.close_connection(client.id):
            rec.stream_error = rec.stream_error or "the connection closed mid-request"
            rec.status = rec.status or 499
            self._settle(rec)

    def _settle(self, rec: RequestRecord) -> None:
        rec.ended = True
        if rec.dispatching:  # attempts still under way: `_forward` settles once they are in
            return
        self._release_body(rec)
        rec.tap.finish()  # token counts and stream errors, for the comment
        # mitmproxy sends the answer only after the `response` hook returns: count, log and
        # store once it is on its way (this took ~1 ms off every request's latency)
        asyncio.get_running_loop().call_soon(self.rt.service.finish, rec)

    def _settle_late(self, rec: RequestRecord) -> None:
        """The flow ended while the pipeline was still dispatching (the caller disconnected):
        its attempts are in now, and what Google billed is counted with them."""
        rec.status = 499  # whatever Google answered, the caller never got it
        self._release_body(rec)
        rec.tap.finish()
        self.rt.service.finish(rec)

    def _release_body(self, rec: RequestRecord) -> None:
        if rec.body_bytes:
            self.rt.flows.budget.release(rec.body_bytes)
            rec.body_bytes = 0
            BODY_BYTES_IN_FLIGHT.set(self.rt.flows.budget.held)
