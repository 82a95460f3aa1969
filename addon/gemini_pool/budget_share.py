"""A worker's share of the budgets while Redis is away (pure: no I/O, no mitmproxy).

Workers on one Redis spend one budget: each hears the others' attempts. Cut off from Redis, a
worker hears nothing more, so it keeps to its share of what was left when it lost Redis, split
over the workers it last saw sharing (`workers`, rounded up):
- a minute's limits (rpm, tpm): the limit / workers, against its own rolling minute (which still
  holds what it heard before the cut, until that leaves the minute: conservative);
- the day's requests (rpd): what the day had spent at the cut (everybody's, as heard), plus
  (limit - that) / workers. A new Pacific day starts from nothing: limit / workers.
So N workers together spend at most the budget plus N - 1 per limit (the rounding) while Redis is
away. Once it is back, each worker tells the others what it spent meanwhile, and one budget again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

NOTE = "this worker's share while Redis is away"


@dataclass
class LocalShare:
    workers: int
    # (project, model) -> (Pacific day, requests that day) when Redis went away
    at_cut: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    def cap(self, project: str, model: str, kind: str, limit: int, day: str) -> int:
        """What this worker may count up to for one limit while cut off."""
        n = max(1, self.workers)
        if kind != "rpd":
            return math.ceil(limit / n)
        cut_day, spent = self.at_cut.get((project, model), (day, 0))
        spent = spent if cut_day == day else 0
        return spent + math.ceil(max(0, limit - spent) / n)
