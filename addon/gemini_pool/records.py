"""What the proxy remembers about one client request while it is in flight, and after."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .classify import Outcome, pacific_day
from .dispatch import Attempt
from .gate import Target
from .store import OutcomeRow, UsageDelta
from .usage import UsageTap

MESSAGE_CHARS = 300  # of Google's error message kept per failed attempt (already scrubbed)

# request ids: unique per process start (random prefix) and cheap (a counter)
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


@dataclass
class Detour:
    """What pointing a flow at the relay changed on its request, put back once the answer is in."""

    scheme: bytes
    host: str
    port: int
    body: bytes | None  # the relay hop of a held stream carries no body
    framing: tuple[tuple[bytes, bytes], ...]  # content-length / transfer-encoding header fields
    streamed: bool = False  # a refused request whose body streams into the relay's sink


@dataclass
class RequestRecord:
    api: str = "native"
    client: str | None = None
    model: str | None = None
    streaming: bool = False
    bearer_only: bool = False  # authenticated the OpenAI way (decides what /v1/models means)
    upload_id: str | None = None  # set on resumable-upload follow-ups
    upload_key: str | None = None  # the key that started that upload session
    upstream: Target | None = None  # where this caller's requests go (set by the gate)
    origin_host: str = ""  # the Host the caller used
    refused: bool = False  # answered by the gate at the head
    request_id: str = field(default_factory=lambda: f"{_ID_PREFIX}{next(_ID_COUNTER):08x}")
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    key: str | None = None  # the key whose answer went back
    status: int = 0
    proxy_reason: str | None = None  # set when the proxy itself answered
    proxy_message: str | None = None
    first_byte: float | None = None  # perf_counter when the first byte went to the caller
    tap: UsageTap = field(default_factory=UsageTap)
    stream_error: str | None = None
    relay_ticket: str | None = None
    detour: Detour | None = None  # set while the flow points at the relay
    waited: float = 0.0
    finished: bool = False
    ended: bool = False  # the answer is complete (or failed): the flow's last hook ran

    @property
    def latency(self) -> float:
        return time.perf_counter() - self.started

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started

    @property
    def outcome(self) -> str:
        if self.proxy_reason:
            return f"proxy:{self.proxy_reason}"
        if self.stream_error or self.tap.stream_error:
            return "stream_error"
        if self.attempts:
            return str(self.attempts[-1].verdict.outcome)
        return str(Outcome.OK) if 200 <= self.status < 400 else "unknown"

    @property
    def retried(self) -> bool:
        return len(self.attempts) > 1

    def comment(self) -> str:
        """For mitmweb: the outcome and the serving key first, then every attempt and why it
        was retried, what a stream carried; Google's own error of each failed attempt below."""
        if self.proxy_reason:
            head = f"proxy answered {self.status} ({self.proxy_reason})"
        elif self.key:
            head = f"served by {self.key}: {self.status}"
        else:
            head = f"{self.status or 'no answer'}"
        parts = [head]
        if self.retried or (self.proxy_reason and self.attempts):
            parts.append(" → ".join(a.describe() for a in self.attempts))
        if self.relay_ticket and not self.refused:
            parts.append(self.stream_summary())
        if self.waited:
            parts.append(f"waited {self.waited:.1f}s for a key")
        lines = [" · ".join(parts)]
        if self.proxy_message:
            lines.append(self.proxy_message)
        lines.extend(self.upstream_errors())
        return "\n".join(lines)

    def upstream_errors(self) -> list[str]:
        """Google's own (scrubbed) message of each failed attempt."""
        return [
            f"{a.key}: Google said {a.status}: {a.verdict.message[:MESSAGE_CHARS]}"
            for a in self.attempts
            if a.verdict.message and a.status is not None and a.status >= 400
        ]

    def stream_summary(self) -> str:
        tokens = (
            f", tokens {self.tap.tokens_in} in / {self.tap.tokens_out} out"
            if self.tap.tokens_out is not None
            else ""
        )
        if self.stream_error or self.tap.stream_error:
            end = f"cut: {self.stream_error or 'error event in the stream'}"
        elif self.ended:
            end = "complete"
        else:
            end = "streaming"
        events = f", {self.tap.events} events" if self.tap.events else ""
        return f"streamed {_size(self.tap.bytes)}{events}{tokens}, {end}"

    def attempts_json(self) -> list[dict[str, Any]]:
        return [
            {
                "key": a.key,
                "status": a.status,
                "outcome": str(a.verdict.outcome),
                "reason": a.verdict.reason,
                "ms": round(a.seconds * 1000, 1),
                **({"message": a.verdict.message[:MESSAGE_CHARS]} if a.verdict.message else {}),
            }
            for a in self.attempts
        ]

    def metadata(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "client": self.client,
            "api": self.api,
            "model": self.model,
            "key": self.key,
            "outcome": self.outcome,
            "retried": self.retried,
            "attempts": self.attempts_json(),
            "proxy_reason": self.proxy_reason,
        }

    def row(self) -> OutcomeRow:
        ttfb = self.ttfb
        return OutcomeRow(
            t=self.started_wall,
            request_id=self.request_id,
            client=self.client,
            key=self.key,
            model=self.model,
            api=self.api,
            stream=self.streaming,
            status=self.status,
            outcome=self.outcome,
            attempts=self.attempts_json(),
            latency_ms=round(self.latency * 1000, 2),
            ttfb_ms=None if ttfb is None else round(ttfb * 1000, 2),
            bytes=self.tap.bytes,
            tokens_in=self.tap.tokens_in,
            tokens_out=self.tap.tokens_out,
            proxy_reason=self.proxy_reason,
        )

    def usage(self, projects: dict[str, str], model: str) -> list[UsageDelta]:
        """Per-attempt usage (Google counts every request against the key's project)."""
        day = pacific_day(self.started_wall)
        out: dict[str, UsageDelta] = {}
        for a in self.attempts:
            d = out.setdefault(a.key, UsageDelta(day, a.key, projects.get(a.key, a.key), model))
            d.requests += 1
            if a.verdict.outcome is not Outcome.OK:
                d.errors += 1
        if self.key and self.key in out:
            out[self.key].tokens_in += self.tap.tokens_in or 0
            out[self.key].tokens_out += self.tap.tokens_out or 0
        return list(out.values())


def _size(n: int) -> str:
    if n < 10_000:
        return f"{n} B"
    if n < 10_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"
