"""What the proxy remembers about one client request while it is in flight, and after.

The record is filled in by the gate (who is asking), the pipeline (route, attempts, the key that
served) and the mitmproxy layer (stream progress, how the flow ended). What is said about it lives
elsewhere: `comments` (mitmweb and the log line), `accounting` (metrics and SQLite rows).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .budgets import Spend
from .classify import Outcome
from .dispatch import Attempt
from .gate import Admit
from .usage import UsageTap

if TYPE_CHECKING:  # the mitmproxy layer's per-flow note; a type only, no mitmproxy import here
    from .mitm.detour import Detour

MESSAGE_CHARS = 300  # of Google's error message kept per failed attempt (already scrubbed)

# request ids: unique per process start (random prefix) and cheap (a counter)
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


@dataclass
class RequestRecord:
    api: str = "native"
    client: str | None = None
    model: str | None = None  # the model that served (a fallback's, see asked_model)
    asked_model: str | None = None  # the model asked for, when a fallback model served it
    streaming: bool = False
    admit: Admit | None = None  # the gate's admission: who, where to, which upload session
    origin_host: str = ""  # the Host the caller used
    upstream_path: str | None = None  # path and query as routed (what goes to Google)
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
    cache: str | None = None  # the answer cache: "hit", "miss" or "stored"; None: not cacheable
    body_bytes: int = 0  # reserved in the request body budget until the flow is settled
    dispatching: bool = False  # the pipeline is at work: settling waits for its attempts
    spend: Spend | None = None  # the budget the served (or last) attempt was charged to
    finished: bool = False
    ended: bool = False  # the answer is complete (or failed): the flow's last hook ran
    final_comment: str | None = None  # the comment once the flow ended (the log line reuses it)
    usage_note: str | None = None  # the client's usage today (limits.usage_note), for the comment
    _attempts_json: list[dict[str, Any]] | None = field(default=None, repr=False)

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
        if self.cache == "hit":
            return "cache_hit"
        if self.stream_error or self.tap.stream_error:
            return "stream_error"
        if self.attempts:
            return str(self.attempts[-1].verdict.outcome)
        return str(Outcome.OK) if 200 <= self.status < 400 else "unknown"

    @property
    def retried(self) -> bool:
        return len(self.attempts) > 1

    def answered(self, status: int, reason: str, message: str) -> None:
        """The proxy itself answered this request."""
        self.status, self.proxy_reason, self.proxy_message = status, reason, message

    def attempts_json(self) -> list[dict[str, Any]]:
        """Every attempt as JSON (mitmweb's metadata, the SQLite row): built once, as attempts
        are final when the pipeline hands its decision back."""
        if self._attempts_json is None or len(self._attempts_json) != len(self.attempts):
            self._attempts_json = [
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
        return self._attempts_json

    def upstream_errors(self) -> list[str]:
        """Google's own (scrubbed) message of each failed attempt."""
        return [
            f"{a.key}: Google said {a.status}: {a.verdict.message[:MESSAGE_CHARS]}"
            for a in self.attempts
            if a.verdict.message and a.status is not None and a.status >= 400
        ]
