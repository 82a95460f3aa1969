"""Budgets per project x model: configured in the key file or learned from Google's 429s, counted
before each upstream call, consulted by the selector.

Pure logic: no mitmproxy, no I/O; time is passed in (unix seconds). Google's quota is per project
and model: requests per minute (rpm), input tokens per minute (tpm) and requests per day (rpd).
Minutes are a rolling window (a second longer than a minute: Google's window shape is not
documented, so never more than the limit in any such window); days end at midnight
America/Los_Angeles. Each attempt is charged before it is sent, with its input tokens estimated
from the body (bytes / 4); the served attempt is corrected from Google's usageMetadata after.
A configured limit wins over a learned one.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .budget_share import NOTE, LocalShare
from .classify import error_object, next_pacific_midnight, pacific_day
from .config import ModelLimits, ProjectSpec

log = logging.getLogger("gemini_proxy")

WINDOW = 61.0  # seconds: a rolling minute, plus a second for clock skew with Google
BYTES_PER_TOKEN = 4  # the cheap estimate of input tokens, before the call
KINDS = ("rpm", "tpm", "rpd")
MAX_TRACKED = 10_000  # project x model counters kept (callers name models; Google refuses most)
KIND_WORDS = {"rpm": "requests a minute", "tpm": "input tokens a minute", "rpd": "requests a day"}
# native methods and OpenAI-compatible paths that spend generation quota (countTokens does not)
COUNTED_METHODS = frozenset(
    {"generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents"}
)
COUNTED_OPENAI = ("/chat/completions", "/embeddings", "/completions", "/images/generations")


def counted(http_method: str, api_method: str | None, path: str, model: str | None) -> bool:
    """Does this request spend a project's per-model quota?"""
    if model is None or http_method != "POST":
        return False
    if api_method is not None:
        return api_method in COUNTED_METHODS
    return path.endswith(COUNTED_OPENAI)


def estimate_tokens(body: bytes) -> int:
    """Input tokens, estimated without asking Google: about four bytes of JSON per token."""
    return len(body) // BYTES_PER_TOKEN + 1


def quota_limits(body: bytes) -> list[tuple[str, int]]:
    """What a 429's QuotaFailure says about the limits: [(kind, value)] (rpm, tpm, rpd)."""
    err = error_object(body) or {}
    details = err.get("details")
    out: list[tuple[str, int]] = []
    for d in details if isinstance(details, list) else ():
        violations = d.get("violations") if isinstance(d, dict) else None
        for v in violations if isinstance(violations, list) else ():
            if not isinstance(v, dict):
                continue
            qid, value = str(v.get("quotaId", "")), v.get("quotaValue")
            try:
                n = int(str(value))
            except ValueError:
                continue
            kind = quota_kind(qid)
            if kind is not None and 0 < n <= 10**12:
                out.append((kind, n))
    return out


def quota_kind(quota_id: str) -> str | None:
    token = "Token" in quota_id
    if "PerMinute" in quota_id:
        return "tpm" if token else "rpm"
    if "PerDay" in quota_id and not token:
        return "rpd"
    return None


@dataclass
class Learned:
    value: int
    at: float  # when Google's 429 said so


@dataclass(frozen=True)
class Limit:
    value: int
    source: str  # "configured" | "learned"
    at: float | None = None  # learned at


@dataclass
class Usage:
    """What one project x model spent: the rolling minute and the Pacific day."""

    window: deque[list[float]] = field(default_factory=deque)  # [sent at, input tokens]
    window_tokens: float = 0.0
    day: str = ""
    day_ends: float = 0.0
    day_requests: int = 0
    day_tokens: int = 0

    def roll(self, now: float) -> None:
        w = self.window
        while w and w[0][0] <= now - WINDOW:
            self.window_tokens -= w.popleft()[1]
        if now >= self.day_ends:
            self.day, self.day_ends = pacific_day(now), next_pacific_midnight(now)
            self.day_requests = self.day_tokens = 0


@dataclass
class Spend:
    """One attempt charged to a project x model (corrected once Google's usage is known)."""

    project: str
    model: str
    entry: list[float]
    day: str
    day_count: int  # the day's requests, this one included
    estimate: int
    rpd: int | None = None  # the day's limit when charged
    limited: bool = False  # the project x model had a limit (configured or learned) when charged

    @property
    def note(self) -> str:
        """What a request spent, for its comment: "proj-a gemini-2.5-flash 17/20 today"."""
        of = f"/{self.rpd}" if self.rpd is not None else ""
        return f"{self.project} {self.model} {self.day_count}{of} today"


class Budgets:
    def __init__(self) -> None:
        self.projects: dict[str, tuple[ModelLimits, ...]] = {}
        self.learned: dict[tuple[str, str, str], Learned] = {}  # (project, model, kind)
        self.usage: dict[tuple[str, str], Usage] = {}
        self.models: set[str] = set()  # models seen (bounded by the caller's model labels)
        # told of a limit learned here (to persist and share it): (project, model, kind, Learned)
        self.on_learn: Callable[[str, str, str, Learned], None] | None = None
        # told of each attempt charged to a limited project x model, and of each correction
        # (other workers count them too): (project, model, sent at, tokens, tokens before)
        self.on_spend: Callable[[str, str, float, int, int | None], None] | None = None
        self._limits: dict[tuple[str, str], dict[str, Limit]] = {}  # cache, cleared on change
        self._pruned_at = -math.inf
        self.share: LocalShare | None = None  # Redis away: this worker's share (budget_share.py)

    def isolate(self, workers: int, now: float) -> None:
        """Shared state went away (`workers` last seen sharing): keep to a share from now on."""
        if self.share is None:
            for u in self.usage.values():
                u.roll(now)
            cut = {pm: (u.day, u.day_requests) for pm, u in self.usage.items()}
            self.share = LocalShare(workers, cut)

    def rejoin(self) -> None:
        """Shared state is back: one budget across the workers again."""
        self.share = None

    def _in_force(
        self, pm: tuple[str, str], limits: dict[str, Limit], u: Usage
    ) -> dict[str, Limit]:
        share = self.share
        if share is None or not limits:
            return limits
        return {
            k: Limit(share.cap(*pm, k, lim.value, u.day), f"{lim.source}, {NOTE}", lim.at)
            for k, lim in limits.items()
        }

    def configure(self, projects: Iterable[ProjectSpec]) -> None:
        self.projects = {p.name: p.limits for p in projects}
        self._limits.clear()

    # --- limits

    def configured(self, project: str, model: str) -> ModelLimits | None:
        limits = self.projects.get(project)
        if not limits:
            return None
        exact = next((m for m in limits if m.pattern == model), None)
        if exact is not None:
            return exact
        return next((m for m in limits if fnmatch.fnmatchcase(model, m.pattern)), None)

    def limits(self, project: str, model: str) -> dict[str, Limit]:
        """The limits in force, each with its source: configured beats learned."""
        cached = self._limits.get((project, model))
        if cached is not None:
            return cached
        out: dict[str, Limit] = {}
        conf = self.configured(project, model)
        for kind in KINDS:
            value = getattr(conf, kind) if conf is not None else None
            if value is not None:
                out[kind] = Limit(value, "configured")
                continue
            learned = self.learned.get((project, model, kind))
            if learned is not None:
                out[kind] = Limit(learned.value, "learned", learned.at)
        if len(self._limits) >= MAX_TRACKED:
            self._limits.clear()
        self._limits[(project, model)] = out
        return out

    def learn(self, project: str, model: str, body: bytes, now: float) -> list[str]:
        """Google's 429 named its limits: remember them. Returns a line per new or changed one."""
        said = []
        for kind, value in quota_limits(body):
            if self.set_learned(project, model, kind, Learned(value, now)):
                said.append(
                    f"learned: {project} × {model}, {value} {KIND_WORDS[kind]}, from Google's 429"
                )
            if kind == "rpd":  # Google says the day is spent, whatever this worker counted
                u = self._usage(project, model, now)
                u.day_requests = max(u.day_requests, value)
        return said

    def set_learned(self, project: str, model: str, kind: str, learned: Learned) -> bool:
        """A learned limit (here, from the database or another worker). True if it changed."""
        if kind not in KINDS:
            return False
        old = self.learned.get((project, model, kind))
        if old is not None and (old.value == learned.value or old.at > learned.at):
            return False
        self.learned[(project, model, kind)] = learned
        self._limits.pop((project, model), None)
        self.models.add(model)
        if self.on_learn is not None:
            self.on_learn(project, model, kind, learned)
        return True

    # --- counting

    def _usage(self, project: str, model: str, now: float) -> Usage:
        u = self.usage.get((project, model))
        if u is None:
            if len(self.usage) >= MAX_TRACKED and now - self._pruned_at >= 1.0:
                self._pruned_at = now
                self._prune(now)
            u = Usage()
            if len(self.usage) < MAX_TRACKED:
                self.usage[(project, model)] = u
        u.roll(now)
        return u

    def _prune(self, now: float) -> None:
        """Forget counters with nothing in their minute and no limit (made-up model names)."""
        for pm, u in list(self.usage.items()):
            u.roll(now)
            if not u.window and not self.limits(*pm):
                del self.usage[pm]

    def seed_day(self, project: str, model: str, requests: int, tokens: int, now: float) -> None:
        """What the database says this project x model spent today (a restart keeps the day)."""
        u = self._usage(project, model, now)
        u.day_requests = max(u.day_requests, requests)
        u.day_tokens = max(u.day_tokens, tokens)

    def charge(self, project: str, model: str, tokens: int, now: float) -> Spend:
        """An attempt is about to be sent: count it."""
        u = self._usage(project, model, now)
        entry = [now, float(tokens)]
        u.window.append(entry)
        u.window_tokens += tokens
        u.day_requests += 1
        u.day_tokens += tokens
        limits = self.limits(project, model)
        if limits and self.on_spend is not None:
            self.on_spend(project, model, now, tokens, None)
        rpd = limits.get("rpd")
        return Spend(
            project,
            model,
            entry,
            u.day,
            u.day_requests,
            tokens,
            rpd.value if rpd else None,
            bool(limits),
        )

    def correct(self, spend: Spend, tokens_in: int | None, now: float) -> None:
        """Google said how many input tokens the served attempt had: replace the estimate."""
        if tokens_in is None or tokens_in < 0:
            return
        u = self._usage(spend.project, spend.model, now)
        before = int(spend.entry[1])
        delta = tokens_in - before
        if spend.entry[0] > now - WINDOW:  # still in the minute (rolled out only by age)
            u.window_tokens += delta
        spend.entry[1] = float(tokens_in)
        if u.day == spend.day:
            u.day_tokens = max(0, u.day_tokens + int(delta))
        if delta and spend.limited and self.on_spend is not None:
            self.on_spend(spend.project, spend.model, spend.entry[0], tokens_in, before)

    def spent_elsewhere(
        self, project: str, model: str, at: float, tokens: int, before: int | None, now: float
    ) -> bool:
        """Another worker charged (`before` None) or corrected an attempt: count it here too."""
        if at <= now - WINDOW and before is not None:
            return False
        u = self._usage(project, model, now)
        w = u.window
        if before is not None:  # a correction of an entry we hold
            for e in reversed(w):
                if e[0] == at and e[1] == before:
                    e[1] = float(tokens)
                    u.window_tokens += tokens - before
                    u.day_tokens = max(0, u.day_tokens + tokens - before)
                    return True
            return False
        if at > now - WINDOW:
            i = len(w)
            while i and w[i - 1][0] > at:  # the window stays in time order
                i -= 1
            w.insert(i, [at, float(tokens)])
            u.window_tokens += tokens
        if pacific_day(at) == u.day:
            u.day_requests += 1
            u.day_tokens += tokens
        return True

    # --- what the selector asks

    def ready_at(self, project: str, model: str, tokens: int, now: float) -> float:
        """0 if a request of `tokens` input tokens fits now; else when it will (inf: never)."""
        limits = self.limits(project, model)
        if not limits:
            return 0.0
        u = self._usage(project, model, now)
        limits = self._in_force((project, model), limits, u)
        at = 0.0
        rpd = limits.get("rpd")
        if rpd is not None and u.day_requests >= rpd.value:
            at = u.day_ends
        rpm = limits.get("rpm")
        if rpm is not None and len(u.window) >= rpm.value:
            at = max(at, u.window[len(u.window) - rpm.value][0] + WINDOW)
        tpm = limits.get("tpm")
        if tpm is not None and u.window_tokens + tokens > tpm.value:
            if tokens > tpm.value:
                return math.inf
            left = u.window_tokens
            for t, n in u.window:  # the oldest leave first
                left -= n
                if left + tokens <= tpm.value:
                    at = max(at, t + WINDOW)
                    break
        return at

    def headroom(self, project: str, model: str, now: float) -> float:
        """The smallest share left of any limit (1.0: untouched or unlimited)."""
        limits = self.limits(project, model)
        if not limits:
            return 1.0
        u = self._usage(project, model, now)
        limits = self._in_force((project, model), limits, u)
        share = 1.0
        for kind, limit in limits.items():
            used = (
                u.day_requests
                if kind == "rpd"
                else len(u.window)
                if kind == "rpm"
                else u.window_tokens
            )
            share = min(share, max(0.0, limit.value - used) / limit.value)
        return share

    def why(self, project: str, model: str, tokens: int, now: float) -> str | None:
        """Why a request of `tokens` cannot go to this project now (None: it can)."""
        limits = self.limits(project, model)
        if not limits:
            return None
        u = self._usage(project, model, now)
        limits = self._in_force((project, model), limits, u)
        rpd, rpm, tpm = limits.get("rpd"), limits.get("rpm"), limits.get("tpm")
        if rpd is not None and u.day_requests >= rpd.value:
            return f"{project} spent {u.day_requests}/{rpd.value} requests today ({rpd.source})"
        if rpm is not None and len(u.window) >= rpm.value:
            return f"{project} at {len(u.window)}/{rpm.value} requests a minute ({rpm.source})"
        if tpm is not None and u.window_tokens + tokens > tpm.value:
            return (
                f"{project} has {max(0, tpm.value - int(u.window_tokens))} of {tpm.value} input"
                f" tokens a minute left ({tpm.source}), the request ~{tokens}"
            )
        return None

    # --- views

    def describe(self, now: float, projects: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Per project x model with a limit or a count: limits with their source, used, left,
        when each resets."""
        pairs = set(self.usage) | {(p, m) for (p, m, _k) in self.learned}
        for project in projects:
            for limit in self.projects.get(project, ()):
                if "*" not in limit.pattern and "?" not in limit.pattern:
                    pairs.add((project, limit.pattern))
        out = []
        for project, model in sorted(pairs):
            u = self._usage(project, model, now)
            limits = self.limits(project, model)
            used = {"rpm": len(u.window), "tpm": int(u.window_tokens), "rpd": u.day_requests}
            oldest = u.window[0][0] + WINDOW if u.window else now
            resets = {"rpm": oldest, "tpm": oldest, "rpd": u.day_ends}
            out.append(
                {
                    "project": project,
                    "model": model,
                    "day": u.day,
                    "requests_today": u.day_requests,
                    "input_tokens_today": u.day_tokens,
                    "limits": {
                        kind: {
                            "limit": lim.value,
                            "source": lim.source,
                            **({"learned_at": lim.at} if lim.at is not None else {}),
                            "used": used[kind],
                            "left": max(0, lim.value - used[kind]),
                            "resets_at": round(resets[kind], 3),
                            **self._shown_share(project, model, kind, lim.value, u.day),
                        }
                        for kind, lim in limits.items()
                    },
                }
            )
        return out

    def _shown_share(
        self, project: str, model: str, kind: str, value: int, day: str
    ) -> dict[str, int]:
        share = self.share
        return {} if share is None else {"share": share.cap(project, model, kind, value, day)}

    def left(self, project: str, model: str, kind: str, now: float) -> float | None:
        lim = self.limits(project, model).get(kind)
        if lim is None:
            return None
        u = self._usage(project, model, now)
        used = {"rpm": len(u.window), "tpm": u.window_tokens, "rpd": u.day_requests}[kind]
        return max(0.0, lim.value - used)

    # --- persistence and sharing

    def learned_rows(self) -> list[dict[str, Any]]:
        return [
            {"project": p, "model": m, "kind": k, "value": v.value, "at": v.at}
            for (p, m, k), v in self.learned.items()
        ]

    def restore_learned(self, rows: Iterable[dict[str, Any]]) -> int:
        """Learned limits from the database or another worker (not told to on_learn again)."""
        hook, self.on_learn = self.on_learn, None
        n = 0
        try:
            for r in rows:
                with_value = Learned(int(r["value"]), float(r["at"]))
                n += self.set_learned(
                    str(r["project"]), str(r["model"]), str(r["kind"]), with_value
                )
        finally:
            self.on_learn = hook
        return n
