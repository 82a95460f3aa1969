"""What the request pipeline takes (Incoming) and what it decides (Decision): refuse with the
proxy's own answer, Google's whole answer, or an open stream to relay. Plain data, no mitmproxy:
the mitmproxy layer reads a flow into an Incoming and writes a Decision back onto it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .gate import Admit
from .records import RequestRecord
from .routing import Route
from .uploads import Where
from .upstream import UpstreamAnswer

if TYPE_CHECKING:
    from .dispatch import Result


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the caller sent, as the gate let it through."""

    method: str
    path: str  # without the query
    query: str  # without credentials (the gate removed them)
    headers: Sequence[tuple[str, str]]  # without credentials and Host
    body: bytes
    admit: Admit | None  # the gate's admission; None: no gate ran for this request
    # how the caller reached the proxy (asked only when an answer names an upload URL)
    where: Callable[[], Where] = Where


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    """The proxy answers itself, in the caller's API's error shape; nothing (more) upstream."""

    status: int
    message: str
    reason: str
    retry_after: float | None = None
    close: bool = False  # close the connection (a body the proxy did not read may follow)
    detail: str = ""  # for the log, mitmweb and the admin API only (which keys were tried)


@dataclass(frozen=True, slots=True)
class Unary:
    """Google's whole answer, with the proxy's own headers to add."""

    answer: UpstreamAnswer
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Stream:
    """An open 2xx answer to relay as it arrives, with the proxy's own headers to add."""

    answer: UpstreamAnswer
    headers: list[tuple[str, str]]


Decision = ProxyAnswer | Unary | Stream


class Check(Protocol):
    """Step 4: a limit or budget. Returns an answer to refuse with, or None to go on."""

    def __call__(self, req: Incoming, route: Route, rec: RequestRecord) -> ProxyAnswer | None: ...


PUBLIC_NO_ANSWER = {
    "all_keys_cooling": "every API key for {model} is out of quota for now",
    "keys_unavailable": "no API key can serve {model} right now",
    "no_usable_key": "the proxy has no usable API key",
    "upstream_timeout": "Google did not answer in time",
    "upstream_unreachable": "Google could not be reached",
    "attempts_exhausted": "no key answered after {attempts} attempts",
    "pool_incident": "Google is throttling or overloaded for {model} across the pool",
}


def no_answer(result: Result, r: Route, group: str | None) -> ProxyAnswer:
    """The proxy answers for the pool (no key could serve). A tenant client learns what to
    do, not which keys were tried or why: that goes to the log, mitmweb and the admin API."""
    full = result.message
    if group is None:
        return ProxyAnswer(result.status, full, result.reason, result.retry_after)
    public = PUBLIC_NO_ANSWER.get(result.reason, "the proxy could not serve this request")
    public = public.format(model=r.model_or_default, attempts=len(result.attempts))
    if result.retry_after is not None:
        public += f"; retry in {result.retry_after:.0f}s"
    return ProxyAnswer(result.status, public, result.reason, result.retry_after, detail=full)


def json_answer(body: bytes) -> UpstreamAnswer:
    """An answer the proxy composed itself in Google's place (a filtered list)."""
    return UpstreamAnswer(200, "OK", [("content-type", "application/json; charset=UTF-8")], body)
