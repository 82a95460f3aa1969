"""Whole-pool incidents: Google throttling the egress address or overloading a whole model.

When most projects answer a model with 503 or a 429 without a quota id (classify's
QUOTA_UNKNOWN) within a few seconds, and none of them served it meanwhile, the trouble is not any
one key's: it is one incident. While it lasts, new requests for the model are held (awaited,
bounded by the caller's wait budget) instead of walking every key into the same answer; after the
hold one request at a time goes as the probe. A probe that meets the same answer doubles the hold
(capped); any request the model serves ends the incident, and so does a quiet period with no
such answer.

Pure logic: no mitmproxy, no I/O, no asyncio; time is passed in (unix seconds). Per worker: each
worker sees its own answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_MODELS = 64  # models whose recent answers are tracked (callers name models)


@dataclass(frozen=True)
class IncidentPolicy:
    window: float = 5.0  # seconds: answers this recent count
    share: float = 0.5  # an incident: more than this share of the pool's projects in trouble
    min_projects: int = 2  # ... and at least this many (one project alone is that project's)
    hold: float = 2.0  # first hold of new requests; doubles after each failed probe
    hold_max: float = 8.0
    quiet: float = 15.0  # no trouble answer for this long: the incident is over by itself
    poll: float = 0.25  # while the probe is out, held requests look again this often
    probe_timeout: float = 30.0  # a probe that never reports back stops blocking after this


@dataclass
class Incident:
    model: str
    started: float
    projects: int  # projects in trouble when it started
    of: int  # projects in the pool then
    hold: float  # the current hold
    hold_until: float  # new requests wait until then (then one goes as the probe)
    last_trouble: float
    probe: int | None = None  # the probe in flight (its ticket)
    probe_at: float = 0.0
    failed_probes: int = 0
    held: int = 0  # requests held so far

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "model": self.model,
            "since": round(self.started, 3),
            "seconds": round(now - self.started, 1),
            "projects": self.projects,
            "of": self.of,
            "hold_seconds": self.hold,
            "holding_for": round(max(0.0, self.hold_until - now), 1),
            "probe_in_flight": self.probe is not None,
            "failed_probes": self.failed_probes,
            "held": self.held,
        }


@dataclass(frozen=True)
class Admission:
    """What a new request does: go now (`wait_until` 0), as the probe if `probe` is set, or wait
    until `wait_until` and ask again."""

    wait_until: float = 0.0
    probe: int | None = None


GO = Admission()
# (what changed: "started" | "ended", the incident, why in words)
OnChange = Callable[[str, Incident, str], None]


class Incidents:
    def __init__(self, policy: IncidentPolicy | None = None) -> None:
        self.policy = policy or IncidentPolicy()
        self.open: dict[str, Incident] = {}  # model -> its incident
        # model -> project -> (last trouble answer, last served answer)
        self._seen: dict[str, dict[str, tuple[float, float]]] = {}
        self._tickets = 0
        self.on_change: OnChange | None = None

    # --- answers

    def observe(
        self,
        model: str,
        project: str,
        trouble: bool,
        now: float,
        projects: int,
        probe: int | None = None,
    ) -> None:
        """One upstream answer for `model` from `project`: `trouble` (503, 429 without a quota
        id) or served (2xx). `projects`: how many projects the pool can use; `probe`: the
        ticket of the request, if it is the incident's probe."""
        incident = self.active(model, now)
        if not trouble:
            self._note(model, project, False, now)
            if incident is not None:
                self._end(incident, f"{project} served {model}")
            return
        self._note(model, project, True, now)
        if incident is not None:
            incident.last_trouble = now
            if probe is not None and probe == incident.probe:  # the probe failed: hold longer
                incident.failed_probes += 1
                incident.hold = min(self.policy.hold_max, incident.hold * 2)
                incident.hold_until = now + incident.hold
                incident.probe = None
            return
        troubled = self._troubled(model, now)
        if troubled >= self.threshold(projects):
            p = self.policy
            incident = Incident(model, now, troubled, projects, p.hold, now + p.hold, now)
            self.open[model] = incident
            self._said(
                "started",
                incident,
                f"{troubled} of {projects} projects answered {model} with 503 or 429 without a"
                f" quota id within {p.window:.0f}s; holding new requests {p.hold:.0f}s, then"
                " one probe at a time",
            )

    def threshold(self, projects: int) -> int:
        """Projects in trouble that make an incident: most of them, and at least min_projects."""
        return max(self.policy.min_projects, math.floor(projects * self.policy.share) + 1)

    def _note(self, model: str, project: str, trouble: bool, now: float) -> None:
        seen = self._seen.get(model)
        if seen is None:
            if len(self._seen) >= MAX_MODELS:
                self._prune(now)
                if len(self._seen) >= MAX_MODELS:
                    return  # too many models at once: the rest go untracked
            seen = self._seen[model] = {}
        last_trouble, last_ok = seen.get(project, (-math.inf, -math.inf))
        seen[project] = (now, last_ok) if trouble else (last_trouble, now)

    def _troubled(self, model: str, now: float) -> int:
        """Projects that answered `model` with trouble within the window and served it not."""
        w = self.policy.window
        return sum(
            1
            for trouble, ok in self._seen.get(model, {}).values()
            if now - trouble <= w and now - ok > w
        )

    def _prune(self, now: float) -> None:
        horizon = max(self.policy.window, self.policy.quiet)
        for model in [
            m
            for m, seen in self._seen.items()
            if m not in self.open and all(now - max(t, o) > horizon for t, o in seen.values())
        ]:
            del self._seen[model]

    # --- requests

    def admit(self, model: str, now: float) -> Admission:
        """May a new request for `model` go upstream now?"""
        incident = self.active(model, now)
        if incident is None:
            return GO
        if now < incident.hold_until:
            return Admission(incident.hold_until)
        if incident.probe is not None and now - incident.probe_at < self.policy.probe_timeout:
            return Admission(
                min(now + self.policy.poll, incident.probe_at + self.policy.probe_timeout)
            )
        self._tickets += 1
        incident.probe, incident.probe_at = self._tickets, now
        return Admission(0.0, self._tickets)

    def held(self, model: str) -> None:
        """A request is being held (counted once per request)."""
        incident = self.open.get(model)
        if incident is not None:
            incident.held += 1

    def done(self, model: str, probe: int) -> None:
        """The probe's request ended; if no answer spoke for or against the model (no key, the
        caller's mistake, a network error), the next request may probe."""
        incident = self.open.get(model)
        if incident is not None and incident.probe == probe:
            incident.probe = None

    # --- views

    def active(self, model: str, now: float) -> Incident | None:
        """The model's incident, if any (one quiet for long enough ends here)."""
        incident = self.open.get(model)
        if incident is not None and now - incident.last_trouble > self.policy.quiet:
            self._end(incident, f"no 503 or 429 without a quota id for {self.policy.quiet:.0f}s")
            return None
        return incident

    def current(self, now: float) -> list[Incident]:
        return [i for m in list(self.open) if (i := self.active(m, now)) is not None]

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [i.describe(now) for i in self.current(now)]

    def count(self, now: float) -> int:
        return len(self.current(now))

    def _end(self, incident: Incident, why: str) -> None:
        if self.open.get(incident.model) is incident:
            del self.open[incident.model]
            self._said("ended", incident, why)

    def _said(self, what: str, incident: Incident, why: str) -> None:
        if self.on_change is not None:
            self.on_change(what, incident, why)
