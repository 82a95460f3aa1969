"""The memory budget for request bodies held while a request is in flight (gemini_max_inflight_bytes).

An admitted body stays in memory until its flow ends: the proxy may send it again on another key.
Without a total bound, twelve concurrent 40 MB requests take over a gigabyte. The gate reserves a
body's announced size (Content-Length) at the request head, before mitmproxy reads the body, and
refuses past the budget (503 with Retry-After); a body without a length (chunked) is counted once
it is read, bounded by gemini_max_body. The reservation ends when the flow is settled.

Pure logic: sizes in, yes or no out; no mitmproxy.
"""

from __future__ import annotations

DEFAULT_LIMIT = 512 << 20  # fits a 2 GB container next to mitmproxy's own copies of bodies
RETRY_AFTER = 2.0  # seconds a refused caller is told to wait: bodies in flight end quickly


class BodyBudget:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.held = 0  # bytes reserved by flows in flight
        self.refused = 0  # requests refused for want of budget, since start

    def reserve(self, size: int) -> bool:
        """Reserve `size` bytes; False (nothing reserved) past the budget.

        A body larger than the whole budget is admitted when nothing else is held, so that a
        request within gemini_max_body is never refused forever."""
        if size <= 0:
            return True
        if self.held and self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)

    def message(self, size: int) -> str:
        return (
            f"the proxy holds {self.held} bytes of request bodies in flight; a {size}-byte body "
            f"would pass its budget of {self.limit} (gemini_max_inflight_bytes): retry shortly"
        )
