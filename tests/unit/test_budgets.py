"""Budgets per project x model: the key file's `projects:`, limits learned from Google's 429s,
rolling minutes, Pacific days (DST too), token estimates corrected by usage, headroom-first
selection. Time is injected everywhere."""

from __future__ import annotations

import json
import math
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool.budgets import WINDOW, Budgets, counted, estimate_tokens, quota_limits
from gemini_pool.config import Config, ConfigError, KeySpec, ModelLimits, ProjectSpec, parse_config
from gemini_pool.selector import KeyPool, NoKey, Pick

PACIFIC = ZoneInfo("America/Los_Angeles")
FLASH = "gemini-2.5-flash"


def pacific(*args: int) -> float:
    return datetime(*args, tzinfo=PACIFIC).timestamp()  # type: ignore[misc]


def budgets(**limits: dict[str, int]) -> Budgets:
    """budgets(proj_a={"rpm": 2}) -> proj-a limited for FLASH."""
    b = Budgets()
    b.configure(
        ProjectSpec(p.replace("_", "-"), (ModelLimits(FLASH, **lim),)) for p, lim in limits.items()
    )
    return b


# --- the key file


KEYS = """
keys:
  - {name: a1, key: AIza-a1, project: proj-a}
  - {name: b1, key: AIza-b1, project: proj-b}
"""


def parse(text: str) -> Config:
    return parse_config((KEYS + text).encode(), "keys.yaml", {})


def test_projects_parse_with_globs_and_exact_ids_first() -> None:
    cfg = parse(
        """
projects:
  - name: proj-a
    limits:
      "gemini-2.5-pro*": {rpm: 5, rpd: 100}
      gemini-2.5-flash: {rpm: 10, tpm: 250000, rpd: 250}
      gemini-2.5-pro-exp: {rpd: 7}
"""
    )
    assert cfg.projects[0].name == "proj-a"
    b = Budgets()
    b.configure(cfg.projects)
    assert {k: v.value for k, v in b.limits("proj-a", FLASH).items()} == {
        "rpm": 10,
        "tpm": 250000,
        "rpd": 250,
    }
    assert b.limits("proj-a", "gemini-2.5-pro")["rpd"].value == 100  # the glob
    assert b.limits("proj-a", "gemini-2.5-pro-exp")["rpd"].value == 7  # exact beats the glob
    assert b.limits("proj-b", FLASH) == {}


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("projects: {a: 1}", 5, "must be a list of projects"),
        ("projects:\n  - {name: proj-a, limit: {}}", 6, "unknown field(s) limit"),
        ("projects:\n  - {name: proj-z, limits: {}}", 6, "no key uses project 'proj-z'"),
        (
            "projects:\n  - {name: proj-a}\n  - {name: proj-a}",
            7,
            "duplicate project 'proj-a'",
        ),
        (
            "projects:\n  - name: proj-a\n    limits:\n      m: {rpm: 0}",
            8,
            "field 'rpm': must be a whole number from 1",
        ),
        (
            "projects:\n  - name: proj-a\n    limits:\n      m: {rpm: 1.5}",
            8,
            "must be a whole number",
        ),
        ("projects:\n  - name: proj-a\n    limits:\n      m: {rpm: true}", 8, "whole number"),
        ("projects:\n  - name: proj-a\n    limits:\n      m: {rps: 3}", 8, "unknown field(s) rps"),
        ("projects:\n  - name: proj-a\n    limits:\n      m: {}", 8, "give at least one of"),
        (
            'projects:\n  - name: proj-a\n    limits:\n      "gemini-[12]*": {rpm: 1}',
            7,
            "is not a model id or a glob",
        ),
        ("projects:\n  - name: proj-a\n    limits: [1]", 7, "must be a mapping of model"),
    ],
)
def test_bad_projects_name_file_line_and_field(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"keys.yaml:{line}:"), str(e.value)


# --- counting


def test_the_minute_is_rolling_not_fixed() -> None:
    b = budgets(proj_a={"rpm": 2})
    t0 = 1_000_000.0
    b.charge("proj-a", FLASH, 1, t0 + 50)
    b.charge("proj-a", FLASH, 1, t0 + 59)
    assert b.ready_at("proj-a", FLASH, 1, t0 + 61) == t0 + 50 + WINDOW  # not at the next :00
    assert b.ready_at("proj-a", FLASH, 1, t0 + 50 + WINDOW) == 0.0
    b.charge("proj-a", FLASH, 1, t0 + 50 + WINDOW)
    assert b.ready_at("proj-a", FLASH, 1, t0 + 50 + WINDOW) == t0 + 59 + WINDOW


def test_input_tokens_per_minute_and_a_prompt_larger_than_the_budget() -> None:
    b = budgets(proj_a={"tpm": 1000})
    b.charge("proj-a", FLASH, 600, 0.0)
    b.charge("proj-a", FLASH, 300, 10.0)
    assert b.ready_at("proj-a", FLASH, 100, 20.0) == 0.0
    assert b.ready_at("proj-a", FLASH, 200, 20.0) == WINDOW  # once the 600 leave
    assert b.ready_at("proj-a", FLASH, 800, 20.0) == 10.0 + WINDOW  # once both leave
    assert math.isinf(b.ready_at("proj-a", FLASH, 1001, 20.0))  # never fits this project
    assert b.why("proj-a", FLASH, 200, 20.0) is not None


def test_the_estimate_is_corrected_by_googles_usage() -> None:
    b = budgets(proj_a={"tpm": 1000})
    body = json.dumps({"contents": [{"parts": [{"text": "x" * 3000}]}]}).encode()
    est = estimate_tokens(body)
    assert 750 < est < 800
    spend = b.charge("proj-a", FLASH, est, 0.0)
    assert b.ready_at("proj-a", FLASH, 400, 1.0) > 1.0  # the estimate fills the budget
    b.correct(spend, 12, 2.0)  # Google counted 12 input tokens
    assert b.ready_at("proj-a", FLASH, 400, 2.0) == 0.0
    assert b.describe(2.0)[0]["input_tokens_today"] == 12
    assert b.left("proj-a", FLASH, "tpm", 2.0) == 988


@pytest.mark.parametrize(
    "day",
    [
        (2026, 3, 8),  # spring forward: a 23-hour day
        (2026, 11, 1),  # fall back: a 25-hour day
        (2026, 6, 15),
    ],
)
def test_days_end_at_pacific_midnight_dst_days_too(day: tuple[int, int, int]) -> None:
    b = budgets(proj_a={"rpd": 2})
    y, m, d = day
    start, end = pacific(y, m, d, 0, 0, 1), pacific(y, m, d + 1, 0, 0, 0)
    b.charge("proj-a", FLASH, 1, start)
    b.charge("proj-a", FLASH, 1, end - 120)
    assert b.ready_at("proj-a", FLASH, 1, end - 1) == end
    assert b.ready_at("proj-a", FLASH, 1, end) == 0.0
    hours = (end - start + 1) / 3600
    assert hours == {8: 23, 1: 25}.get(d, 24)
    spend = b.charge("proj-a", FLASH, 1, end)
    assert spend.day == f"{y}-{m:02d}-{d + 1:02d}" and spend.day_count == 1
    assert spend.note == f"proj-a {FLASH} 1/2 today"


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(1, 5),
    gaps=st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=60),
)
def test_never_more_than_rpm_in_any_rolling_minute(rpm: int, gaps: list[float]) -> None:
    b = budgets(proj_a={"rpm": rpm})
    now, sent = 1_000_000.0, []
    for gap in gaps:
        now += gap
        if b.ready_at("proj-a", FLASH, 1, now) <= now:
            b.charge("proj-a", FLASH, 1, now)
            sent.append(now)
    for t in sent:
        assert sum(1 for s in sent if t - 60 < s <= t) <= rpm


# --- learned from Google


def quota_429(quota_id: str, value: str, delay: str = "23s") -> bytes:
    return json.dumps(
        {
            "error": {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "message": "You exceeded your current quota",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{"quotaId": quota_id, "quotaValue": value}],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
                ],
            }
        }
    ).encode()


def test_limits_learned_from_a_429_configured_wins_and_said_once() -> None:
    day = quota_429("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "20")
    assert quota_limits(day) == [("rpd", 20)]
    assert quota_limits(
        quota_429("GenerateContentInputTokensPerModelPerMinute-FreeTier", "250000")
    ) == [("tpm", 250000)]
    assert quota_limits(b"[not json") == [] and quota_limits(quota_429("X", "many")) == []
    b = budgets(proj_b={"rpd": 5})
    heard: list[tuple[str, str, str, int]] = []
    b.on_learn = lambda p, m, k, learned: heard.append((p, m, k, learned.value))
    said = b.learn("proj-a", FLASH, day, 100.0)
    assert said == [f"learned: proj-a × {FLASH}, 20 requests a day, from Google's 429"]
    assert b.learn("proj-a", FLASH, day, 200.0) == []  # the same again: said once
    assert heard == [("proj-a", FLASH, "rpd", 20)]
    lim = b.limits("proj-a", FLASH)["rpd"]
    assert (lim.value, lim.source, lim.at) == (20, "learned", 100.0)
    assert b.ready_at("proj-a", FLASH, 1, 100.0) > 100.0  # Google says the day is spent
    b.learn("proj-b", FLASH, day, 100.0)
    assert b.limits("proj-b", FLASH)["rpd"].source == "configured"  # configured wins
    other = Budgets()
    assert other.restore_learned(b.learned_rows()) == 2 and other.on_learn is None


def test_counted_requests() -> None:
    assert counted("POST", "generateContent", "/v1beta/models/m:generateContent", "m")
    assert counted("POST", None, "/v1beta/openai/chat/completions", "m")
    assert not counted("POST", "countTokens", "/v1beta/models/m:countTokens", "m")
    assert not counted("GET", None, "/v1beta/models/m", "m")
    assert not counted("POST", None, "/v1beta/files", None)


# --- selection


def pool_of(b: Budgets, *projects: str) -> KeyPool:
    p = KeyPool(budgets=b)
    keys = tuple(KeySpec(f"{x}-key", f"secret-{x}", x) for x in projects)
    p.apply_config(Config(keys, (), "test"))
    return p


def test_headroom_first_spreads_the_day_and_skips_spent_projects() -> None:
    b = budgets(proj_a={"rpd": 10}, proj_b={"rpd": 10}, proj_c={"rpd": 4})
    p = pool_of(b, "proj-a", "proj-b", "proj-c")
    now = pacific(2026, 6, 15, 12, 0, 0)
    got = []
    for i in range(24):
        pick = p.select(FLASH, now + i, tokens=10)
        assert isinstance(pick, Pick), pick
        b.charge(pick.key.project, FLASH, 10, now + i)
        got.append(pick.key.project)
    assert got.count("proj-a") == got.count("proj-b") == 10 and got.count("proj-c") == 4
    # the small project is not drained first: it still had budget when the last picks came
    assert "proj-c" in got[-6:]
    nokey = p.select(FLASH, now + 30, tokens=10)
    assert isinstance(nokey, NoKey) and nokey.quota and not nokey.all_disabled
    assert nokey.retry_at == pacific(2026, 6, 16, 0, 0, 0)
    assert "out of budget" in nokey.reason and "10/10 requests today" in nokey.reason
    # a request that spends no quota (countTokens) is not held back by budgets
    assert isinstance(p.select(FLASH, now + 30), Pick)


def test_a_prompt_too_large_for_one_project_goes_elsewhere_or_is_refused() -> None:
    b = budgets(proj_a={"tpm": 100}, proj_b={"tpm": 5000})
    p = pool_of(b, "proj-a", "proj-b")
    for _ in range(3):
        pick = p.select(FLASH, 0.0, tokens=1000)
        assert isinstance(pick, Pick) and pick.key.project == "proj-b"
    b.charge("proj-b", FLASH, 4500, 0.0)
    nokey = p.select(FLASH, 1.0, tokens=1000)
    assert isinstance(nokey, NoKey) and not nokey.too_large and nokey.retry_at == WINDOW
    nokey = p.select(FLASH, 1.0, tokens=6000)
    assert isinstance(nokey, NoKey) and nokey.too_large and nokey.all_disabled


def test_counters_stay_bounded_whatever_models_callers_name() -> None:
    from gemini_pool import budgets as mod

    b = budgets(proj_a={"rpd": 5})
    b.charge("proj-a", FLASH, 1, 0.0)
    for i in range(mod.MAX_TRACKED + 50):
        b.charge("proj-a", f"made-up-{i}", 1, 100.0 + i / 1000)
    assert len(b.usage) <= mod.MAX_TRACKED
    assert b.left("proj-a", FLASH, "rpd", 200.0) == 4  # the limited counter is kept


def test_what_other_workers_spent_counts_here_too() -> None:
    mine, theirs = budgets(proj_a={"rpm": 3, "tpm": 1000}), budgets(proj_a={"rpm": 3, "tpm": 1000})
    told: list[tuple[str, str, float, int, int | None]] = []
    theirs.on_spend = lambda *a: told.append(a)
    spend = theirs.charge("proj-a", FLASH, 400, 10.0)
    theirs.charge("proj-b", FLASH, 400, 10.0)  # no limit there: nobody needs to know
    theirs.correct(spend, 40, 11.0)
    assert told == [("proj-a", FLASH, 10.0, 400, None), ("proj-a", FLASH, 10.0, 40, 400)]
    mine.charge("proj-a", FLASH, 10, 12.0)
    mine.spent_elsewhere(*told[0], now=12.5)  # older than my own: kept in time order
    assert [e[0] for e in mine.usage[("proj-a", FLASH)].window] == [10.0, 12.0]
    assert mine.left("proj-a", FLASH, "tpm", 12.5) == 590
    mine.spent_elsewhere(*told[1], now=13.0)
    assert mine.left("proj-a", FLASH, "tpm", 13.0) == 950
    assert mine.left("proj-a", FLASH, "rpm", 13.0) == 1
    assert mine.ready_at("proj-a", FLASH, 1, 10.0 + WINDOW) == 0.0  # theirs left the minute


def _fill(b: Budgets, now: float) -> int:
    """Charge proj-a until its budget says no: how many."""
    n = 0
    while b.ready_at("proj-a", FLASH, 1, now) == 0.0 and n < 1000:
        b.charge("proj-a", FLASH, 1, now)
        n += 1
    return n


@pytest.mark.parametrize(
    ("rpd", "spent", "each"), [(20, 10, 5), (21, 10, 6), (20, 0, 10), (3, 3, 0)]
)
def test_redis_away_each_worker_keeps_to_its_share_of_the_day_left(
    rpd: int, spent: int, each: int
) -> None:
    t = pacific(2026, 3, 2, 9, 0)
    w1, w2 = budgets(proj_a={"rpd": rpd}), budgets(proj_a={"rpd": rpd})
    for _ in range(spent):  # shared: both count every request
        w1.charge("proj-a", FLASH, 1, t)
        w2.spent_elsewhere("proj-a", FLASH, t, 1, None, t)
    for w in (w1, w2):
        w.isolate(2, t + 1)
    got = [_fill(w1, t + 2), _fill(w2, t + 2)]
    assert got == [each, each]
    assert spent + sum(got) <= rpd + 1  # 2 workers: at most one over (rounding up)
    why = w1.why("proj-a", FLASH, 1, t + 2)
    assert why is not None and "this worker's share while Redis is away" in why
    # a new Pacific day while still away: half the day's limit each
    tomorrow = pacific(2026, 3, 3, 0, 1)
    assert _fill(w1, tomorrow) == math.ceil(rpd / 2)
    # Redis back: one budget again (the whole day's limit, as counted here)
    w1.rejoin()
    assert _fill(w1, tomorrow) == rpd - math.ceil(rpd / 2)


def test_redis_away_a_minutes_limits_are_split_too() -> None:
    w = budgets(proj_a={"rpm": 10, "tpm": 1000})
    w.isolate(2, 0.0)
    assert _fill(w, 1.0) == 5
    assert w.ready_at("proj-a", FLASH, 1, 1.0) == 1.0 + WINDOW
    later = 1.0 + WINDOW
    assert w.why("proj-a", FLASH, 600, later) is not None  # 600 > 1000 / 2 tokens
    assert w.why("proj-a", FLASH, 400, later) is None
    w.rejoin()
    assert w.why("proj-a", FLASH, 600, later) is None
    # one worker alone: its share is the whole budget
    alone = budgets(proj_a={"rpd": 4})
    alone.isolate(1, 0.0)
    assert _fill(alone, 1.0) == 4
