"""Limits per client with an injected clock: rolling minute, Pacific day, slots released once,
model globs, shares across workers (simulated, with the overshoot measured)."""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool.accounting import client_label
from gemini_pool.config import ClientLimits, ClientSpec, Config
from gemini_pool.gate import Target
from gemini_pool.limits import Counts, Limiter, body_model_refusal
from gemini_pool.pipeline import Pipeline, ProxyAnswer, Unary
from gemini_pool.records import RequestRecord
from gemini_pool.routing import Route, route
from gemini_pool.shared_limits import read

from .test_pipeline import GEN, A, B, FakeGemini, request, run

PACIFIC = ZoneInfo("America/Los_Angeles")
NOON = datetime(2026, 12, 7, 12, 0, tzinfo=PACIFIC).timestamp()
_ids = itertools.count()


class Clock:
    def __init__(self, t: float = NOON) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def route_of(path: str, method: str = "POST") -> Route:
    return route(method, path, "", False, b"")


def ask(lim: Limiter, limits: ClientLimits, client: str = "alice", model: str = "m") -> str | None:
    """None: admitted (its id is in lim.held); else the refusal's message."""
    r = lim.check(client, limits, model, f"r{next(_ids)}")
    return None if r is None else r.message


def test_rpm_is_a_rolling_minute_with_retry_after_until_the_oldest_leaves() -> None:
    clock = Clock()
    lim = Limiter(clock)
    limits = ClientLimits(rpm=3)
    for dt in (0, 10, 20):
        clock.t = NOON + dt
        assert ask(lim, limits) is None
    clock.t = NOON + 30
    r = lim.check("alice", limits, "m", "x")
    assert r is not None and (r.status, r.reason) == (429, "client_limit_rpm")
    assert r.message == "client limit rpm 3 reached"
    assert r.retry_after == 30  # the first one leaves the minute at NOON + 60
    assert "x" not in lim.held
    assert ask(lim, limits, client="bob") is None  # another client is not slowed
    clock.t = NOON + 60.5
    assert ask(lim, limits) is None  # the first left the window
    assert ask(lim, limits) == "client limit rpm 3 reached"


def test_concurrency_slot_is_released_exactly_once() -> None:
    lim = Limiter(Clock())
    limits = ClientLimits(concurrent=1)
    assert lim.check("alice", limits, "m", "one") is None
    r = lim.check("alice", limits, "m", "two")
    assert r is not None and r.reason == "client_limit_concurrent" and r.retry_after == 1
    assert lim.release("one") is True
    assert lim.release("one") is False  # a second finish frees nothing more
    assert lim.release("two") is False  # never admitted: holds nothing
    assert lim.check("alice", limits, "m", "three") is None
    assert lim.check("alice", limits, "m", "four") is not None
    assert lim.meters["alice"].inflight == 1


def test_requests_and_tokens_per_day_reset_at_pacific_midnight() -> None:
    clock = Clock(datetime(2026, 12, 7, 23, 59, 0, tzinfo=PACIFIC).timestamp())
    lim = Limiter(clock)
    limits = ClientLimits(requests_per_day=2, tokens_per_day=100)
    assert lim.check("alice", limits, "m", "a") is None
    lim.release("a", tokens=150)  # the tokens come with the finished request
    r = lim.check("alice", limits, "m", "b")
    assert r is not None and r.message == "client limit tokens per day 100 reached"
    assert r.retry_after == 60  # until midnight in Los Angeles
    clock.t += 61  # 00:00:01 Pacific: a new day
    assert lim.check("alice", limits, "m", "c") is None
    assert lim.check("alice", limits, "m", "d") is None
    r = lim.check("alice", limits, "m", "e")
    assert r is not None and r.message == "client limit requests per day 2 reached"
    assert lim.usage("alice")["requests_today"] == 2 and lim.usage("alice")["limited_today"] == 1


def test_tokens_of_a_request_from_yesterday_do_not_count_today() -> None:
    clock = Clock(datetime(2026, 12, 7, 23, 59, 59, tzinfo=PACIFIC).timestamp())
    lim = Limiter(clock)
    limits = ClientLimits(tokens_per_day=10)
    assert lim.check("alice", limits, "m", "late") is None
    clock.t += 5
    lim.release("late", tokens=1000)
    assert lim.check("alice", limits, "m", "new") is None


def test_models_by_glob_and_a_403_naming_the_rule() -> None:
    lim = Limiter(Clock())
    limits = ClientLimits(models=("gemini-2.5-flash*", "text-embedding-*"))
    assert ask(lim, limits, model="gemini-2.5-flash-lite") is None
    assert ask(lim, limits, model="text-embedding-004") is None
    r = lim.check("alice", limits, "gemini-2.5-pro", "p")
    assert r is not None and (r.status, r.reason) == (403, "client_model_not_allowed")
    assert r.message == (
        "client limit models: gemini-2.5-pro is not in gemini-2.5-flash*, text-embedding-*"
    )
    assert "p" not in lim.held


def test_a_client_without_limits_is_counted_never_refused_and_uploads_not_twice() -> None:
    lim = Limiter(Clock())
    for i in range(50):
        assert lim.check("alice", ClientLimits(), "m", f"x{i}") is None
    assert lim.usage("alice")["requests_today"] == 50 and lim.usage("alice")["in_flight"] == 50
    assert lim.check("upload", ClientLimits(rpm=1), "m", "y") is None
    assert lim.check("upload", ClientLimits(rpm=1), "m", "z") is None
    assert "y" not in lim.held and "upload" not in lim.meters


def test_seed_from_the_database_counts_today() -> None:
    clock = Clock()
    lim = Limiter(clock)
    lim.seed("alice", "2026-12-07", 5, 0)
    r = lim.check("alice", ClientLimits(requests_per_day=5), "m", "x")
    assert r is not None and r.reason == "client_limit_requests_per_day"
    lim.seed("bob", "2026-12-06", 5, 0)  # yesterday's: nothing today
    assert lim.check("bob", ClientLimits(requests_per_day=5), "m", "y") is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["check", "release", "tick"]), st.integers(0, 30)),
        max_size=120,
    ),
    st.integers(1, 5),
    st.integers(1, 10),
)
def test_in_flight_and_the_minute_never_exceed_the_limits(
    steps: list[tuple[str, int]], concurrent: int, rpm: int
) -> None:
    clock = Clock()
    lim = Limiter(clock)
    limits = ClientLimits(rpm=rpm, concurrent=concurrent)
    admitted: list[str] = []
    for i, (op, n) in enumerate(steps):
        if op == "check":
            if lim.check("c", limits, "m", f"q{i}") is None:
                admitted.append(f"q{i}")
        elif op == "release" and admitted:
            lim.release(admitted.pop(n % len(admitted)), tokens=n)
        else:
            clock.t += n
        m = lim.meters.get("c")
        if m is not None:
            assert m.inflight == len(admitted) <= concurrent
            assert sum(1 for t in m.times if t > clock.t - 60) <= rpm


def simulate(limit: int, rounds: int, per_tick: tuple[int, int]) -> int:
    """Two workers sharing rpm `limit` through views of each other taken every tick (the
    published counts one tick old for one of them, as in Redis); each gets `per_tick` requests
    per tick. How many they admitted within the minute."""
    clock = Clock()
    a, b = Limiter(clock, "w1"), Limiter(clock, "w2")
    limits = {"alice": ClientLimits(rpm=limit)}
    admitted = 0
    seen_by_a: dict[str, Counts] = {}
    for _ in range(rounds):
        # w2 publishes after w1 read: w1 sees w2's counts of the tick before
        a.apply_view({"alice": list(seen_by_a.values())}, 2, limits)
        b.apply_view({"alice": [a.own_counts()["alice"]]} if a.meters else {}, 2, limits)
        seen_by_a = {"w2": b.own_counts()["alice"]} if b.meters else {}
        for lim, n in ((a, per_tick[0]), (b, per_tick[1])):
            for _ in range(n):
                admitted += ask(lim, limits["alice"]) is None
        clock.t += 0.25
    return admitted


def test_two_workers_hold_a_shared_limit_within_a_few_per_cent() -> None:
    for per_tick in ((50, 50), (5, 5), (40, 1), (0, 30), (3, 200)):
        admitted = simulate(100, 200, per_tick)
        assert admitted >= 95, per_tick  # not starved
        assert admitted <= 103, per_tick


def test_a_limit_of_one_is_never_given_out_twice() -> None:
    assert simulate(1, 200, (10, 10)) == 1


def test_while_redis_is_away_each_worker_keeps_its_share() -> None:
    clock = Clock()
    lim = Limiter(clock, "w1")
    limits = {"alice": ClientLimits(rpm=10, concurrent=3)}
    lim.apply_view({}, 2, limits)  # two workers seen
    lim.apply_view(None, lim.workers, limits)  # then Redis went away
    got = [ask(lim, limits["alice"]) for _ in range(6)]
    assert got[:2] == [None, None] and got[2] == "client limit concurrent 3 reached"
    got = []
    for _ in range(5):
        for rid in list(lim.held):
            lim.release(rid)
        got.append(ask(lim, limits["alice"]))
    assert got[:3] == [None, None, None] and got[3] == "client limit rpm 10 reached"


def test_read_skips_malformed_and_stale_fields_and_my_own() -> None:
    now = 1000.0
    good = '{"t": 999.5, "m": 3, "i": 1, "d": "2026-12-07", "r": 7, "k": 50, "s": 2}'
    stored = {
        "alice\x1fw2": good,
        "alice\x1fw1": good,  # mine
        "alice\x1fw3": '{"t": 10, "m": 1, "i": 0, "d": "x", "r": 0, "k": 0, "s": 0}',  # stale
        "alice\x1fw4": '{"t": 999.5, "m": -1}',  # malformed
        "bob\x1fw5": "not json",
        "\x1fw6": '{"t": 999.9}',  # a heartbeat
        "nosep": "{}",
    }
    others, workers, stale = read(stored, "w1", now)
    assert [c.worker for c in others["alice"]] == ["w2"] and others["alice"][0].minute == 3
    assert workers == {"w2", "w6"}
    assert set(stale) == {"alice\x1fw3", "alice\x1fw4", "bob\x1fw5", "nosep"}


def test_the_client_label_is_bounded_to_configured_names_local_and_unknown() -> None:
    configured = {"alice", "bob"}
    assert client_label("alice", configured) == "alice"
    for caller in ("mallory", "upload", None, "local", "x" * 500):
        assert client_label(caller, configured) == "unknown"
    assert client_label("local", set()) == "local"
    assert client_label("upload", set()) == "unknown"


def test_the_pipeline_check_refuses_past_the_limit_and_nothing_goes_upstream() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        service = p.service
        limits = ClientLimits(rpm=5, concurrent=1, models=("gemini-2.5-flash*",))
        service.apply_config(
            Config(service.config.keys, (ClientSpec("alice", "tok-a", "", limits),), "test")
        )
        p.checks = [service.limit_check]
        first = RequestRecord(client="alice")
        d = await p.handle(request(up), first)
        assert isinstance(d, Unary) and d.answer.status == 200
        second = RequestRecord(client="alice")  # the first has not finished: one in flight
        d = await p.handle(request(up), second)
        assert isinstance(d, ProxyAnswer) and (d.status, d.retry_after) == (429, 1.0)
        assert d.message == "client limit concurrent 1 reached"
        service.finish(second)  # a refused request holds no slot
        service.finish(first)
        service.finish(first)  # once only
        assert service.limiter.meters["alice"].inflight == 0
        third = RequestRecord(client="alice")
        d = await p.handle(request(up), third)
        assert isinstance(d, Unary) and third.usage_note == "alice: 2 requests, 0 tokens today"
        service.finish(third)
        pro = "/v1beta/models/gemini-2.5-pro:generateContent"
        d = await p.handle(request(up, path=pro), RequestRecord(client="alice"))
        assert isinstance(d, ProxyAnswer) and d.status == 403
        assert d.message == "client limit models: gemini-2.5-pro is not in gemini-2.5-flash*"
        assert len(fake.log) == 2
        # a reload changes the limits of the next request
        service.apply_config(Config(service.config.keys, (ClientSpec("alice", "tok-a"),), "t"))
        d = await p.handle(request(up, path=pro), RequestRecord(client="alice"))
        assert isinstance(d, Unary)

    run(scenario, {A: "ok", B: "ok"})


def test_a_model_named_in_a_native_body_must_be_one_the_client_may_use() -> None:
    limits = ClientLimits(models=("gemini-2.5-flash*",))

    def refusal(path: str, body: object, method: str = "POST") -> tuple[int, str] | None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = body_model_refusal(request(None, path, raw, method), route_of(path), "alice", limits)
        return None if r is None else (r.status, r.message)

    pro = "models/gemini-2.5-pro"
    denied = (403, "client limit models: gemini-2.5-pro is not in gemini-2.5-flash*")
    caches, count = "/v1beta/cachedContents", "/v1beta/models/gemini-2.5-flash:countTokens"
    assert refusal(caches, {"model": pro, "contents": []}) == denied
    assert refusal("/v1/cachedContents/", {"model": "gemini-2.5-pro"}) == denied
    assert refusal("/v1beta/cachedContents/c1", {"model": pro}, "PATCH") == denied
    assert refusal(count, {"generateContentRequest": {"contents": [], "model": pro}}) == denied
    assert refusal(count, {"generate_content_request": {"model": pro}}) == denied
    # a repeated member: whichever one Google keeps, both must be allowed
    twice = b'{"model": "models/gemini-2.5-pro", "m\\u006fdel": "models/gemini-2.5-flash"}'
    assert refusal(caches, twice) == denied
    # a model that is no model id is not one the globs allow
    odd = refusal(caches, {"model": "models/gemini-2.5-flash/../gemini-2.5-pro"})
    assert odd is not None and odd[0] == 403
    # allowed models, no model, and requests where Google takes no model from the body
    assert refusal(caches, {"model": "models/gemini-2.5-flash", "contents": []}) is None
    assert refusal(count, {"generateContentRequest": {"model": "gemini-2.5-flash-lite"}}) is None
    assert refusal(count, {"contents": [{"parts": [{"text": "model: gemini-2.5-pro"}]}]}) is None
    assert refusal(count, {"generateContentRequest": None}) is None
    assert refusal(GEN, {"contents": [{"parts": [{"text": '"model": "x"'}]}]}) is None
    assert refusal("/upload/v1beta/files", b'{"model": "gemini-2.5-pro"}') is None
    assert refusal(caches, b"") is None
    # a body that cannot be read might name any model; a model that is not a string is refused
    assert refusal(caches, b"\x1f\x8b\x08\x00gzip")[0] == 400  # type: ignore[index]
    assert refusal(caches, {"model": ["gemini-2.5-pro"]})[0] == 400  # type: ignore[index]
    # the body of a client without model globs is not looked at
    assert (
        body_model_refusal(
            request(None, caches, b"\x1f\x8b"), route_of(caches), "alice", ClientLimits(rpm=5)
        )
        is None
    )


def test_the_pipeline_refuses_a_cache_or_a_count_for_a_model_the_client_may_not_use() -> None:
    async def scenario(p: Pipeline, up: Target, fake: FakeGemini) -> None:
        service = p.service
        limits = ClientLimits(models=("gemini-2.5-flash*",))
        service.apply_config(
            Config(service.config.keys, (ClientSpec("alice", "tok-a", "", limits),), "test")
        )
        p.checks = [service.limit_check]
        body = json.dumps({"model": "models/gemini-2.5-pro", "contents": []}).encode()
        rec = RequestRecord(client="alice")
        d = await p.handle(request(up, "/v1beta/cachedContents", body), rec)
        assert isinstance(d, ProxyAnswer) and (d.status, d.reason) == (
            403,
            "client_model_not_allowed",
        )
        assert d.message == "client limit models: gemini-2.5-pro is not in gemini-2.5-flash*"
        count = json.dumps({"generateContentRequest": {"model": "models/gemini-2.5-pro"}})
        path = "/v1beta/models/gemini-2.5-flash:countTokens"
        d = await p.handle(request(up, path, count.encode()), RequestRecord(client="alice"))
        assert isinstance(d, ProxyAnswer) and d.status == 403
        assert fake.log == [] and not service.limiter.held  # refused: no slot held
        # the model it may use goes through
        flash = json.dumps({"model": "models/gemini-2.5-flash", "contents": []}).encode()
        d = await p.handle(
            request(up, "/v1beta/cachedContents", flash), RequestRecord(client="alice")
        )
        assert isinstance(d, Unary) and d.answer.status == 200 and len(fake.log) == 1

    run(scenario, {A: "ok", B: "ok"})
