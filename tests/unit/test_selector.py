"""The pool: weighted, health-, breaker- and cooldown-aware selection; per project x model."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from gemini_pool.breaker import BreakerPolicy, BreakerState
from gemini_pool.classify import Outcome, Verdict, network_verdict
from gemini_pool.config import Config, KeySpec
from gemini_pool.selector import KeyPool, NoKey, Pick, PoolPolicy, merge_marks


def pool(*specs: KeySpec, **policy) -> KeyPool:
    p = KeyPool(PoolPolicy(**policy))
    p.apply_config(Config(tuple(specs), (), "test"))
    return p


def k(name: str, project: str | None = None, weight: int = 1, enabled: bool = True) -> KeySpec:
    return KeySpec(name, f"secret-{name}", project or name, weight, enabled)


def picks(p: KeyPool, n: int, model: str = "m", now: float = 0.0) -> list[str]:
    out = []
    for _ in range(n):
        got = p.select(model, now)
        assert isinstance(got, Pick)
        out.append(got.key.name)
    return out


def test_weighted_and_smooth() -> None:
    p = pool(k("a", weight=2), k("b"))
    got = picks(p, 6)
    assert Counter(got) == {"a": 4, "b": 2}
    assert got[:3] == ["a", "b", "a"]  # smooth, not a,a,b


def test_yaml_disabled_key_is_never_picked() -> None:
    p = pool(k("a"), k("b", enabled=False))
    assert set(picks(p, 5)) == {"a"}


def test_quota_cooldown_is_per_project_and_model() -> None:
    p = pool(k("a1", "proj-a"), k("a2", "proj-a"), k("b"))
    p.record("a1", "pro", Verdict(Outcome.QUOTA_MINUTE, "429", cooldown_until=60), 0)
    assert set(picks(p, 6, "pro")) == {"b"}  # a2 shares a1's project bucket
    assert set(picks(p, 6, "flash")) == {"a1", "a2", "b"}  # other model unaffected
    assert set(picks(p, 6, "pro", now=61)) == {"a1", "a2", "b"}


def dead(p: KeyPool, name: str, now: float = 0) -> None:
    """A dead-key answer, then a check that confirms it."""
    p.record(name, "m", Verdict(Outcome.DEAD_KEY, "400 API key invalid"), now)
    assert p.check_result(name, Verdict(Outcome.DEAD_KEY, "400 API key invalid"), now) == "dead"


def test_a_dead_key_answer_takes_the_key_out_until_a_check_decides() -> None:
    p = pool(k("a"), k("b"), recheck_base=60, recheck_max=200)
    p.record("a", "m", Verdict(Outcome.DEAD_KEY, "400 API key invalid"), 0)
    assert set(picks(p, 4)) == {"b"} and p.status(p.keys["a"], 0) == "suspect"
    assert [s.name for s in p.due_checks(0)] == ["a"]
    # the check says Google accepts the key: it was not the key's fault, nothing is disabled
    assert p.check_result("a", Verdict(Outcome.OK, "check: 200"), 1) == "cleared"
    assert set(picks(p, 4)) == {"a", "b"} and p.keys["a"].disabled_reason is None
    # confirmed: dead, re-checked with a backoff that doubles up to its cap
    p.record("a", "m", Verdict(Outcome.DEAD_KEY, "400 API key invalid"), 2)
    assert p.check_result("a", Verdict(Outcome.DEAD_KEY, "400 API key invalid"), 2) == "dead"
    assert p.status(p.keys["a"], 2) == "dead" and p.due_checks(61) == []
    waits = []
    now = 2.0
    for _ in range(4):
        now = p.keys["a"].next_check or 0
        assert [s.name for s in p.due_checks(now)] == ["a"]
        p.check_result("a", Verdict(Outcome.DEAD_KEY, "still"), now)
        waits.append(p.keys["a"].check_backoff)
    assert waits == [120, 200, 200, 200]
    p.check_result("a", None, now)  # no verdict (Google unreachable): try again soon
    assert p.status(p.keys["a"], now) == "dead"
    assert p.check_result("a", Verdict(Outcome.OK, "check: 200"), now) == "recovered"
    assert set(picks(p, 4, now=now)) == {"a", "b"}


def test_dead_key_stays_out_until_operator_or_reload() -> None:
    p = pool(k("a"), k("b"))
    dead(p, "a")
    assert set(picks(p, 4)) == {"b"}
    p.apply_config(Config((k("a"), k("b")), (), "reload"))  # same secret: state kept
    assert set(picks(p, 4)) == {"b"}
    p.set_enabled("a", True)
    assert set(picks(p, 4)) == {"a", "b"}


def test_no_key_left_says_cooling_or_disabled_and_when() -> None:
    p = pool(k("a"), k("b"))
    p.record("a", "m", Verdict(Outcome.QUOTA_MINUTE, "429 per-minute", cooldown_until=30), 0)
    p.record("b", "m", Verdict(Outcome.QUOTA_MINUTE, "429 per-minute", cooldown_until=20), 0)
    got = p.select("m", 1)
    assert isinstance(got, NoKey) and not got.all_disabled and got.retry_at == 20
    p.record("a", "m", Verdict(Outcome.DEAD_KEY, "dead"), 1)
    p.record("b", "m", Verdict(Outcome.DEAD_KEY, "dead"), 1)
    got = p.select("m", 1)
    assert isinstance(got, NoKey) and got.all_disabled and "dead" in got.reason


def test_breaker_opens_after_network_failures_and_admits_one_probe() -> None:
    p = pool(k("a"), k("b"), breaker=BreakerPolicy(failure_threshold=2, base_cooldown=10))
    for _ in range(2):
        p.record("a", "m", network_verdict("timeout"), 0)
    assert set(picks(p, 4, now=1)) == {"b"}
    assert picks(p, 1, now=10.5)  # some key
    # at t=10 a is half-open: exactly one request goes to it until it reports back
    names = picks(p, 6, now=11)
    assert names.count("a") <= 1


def test_unhealthy_keys_serve_only_when_nothing_better_is_left() -> None:
    p = pool(k("a"), k("b"), breaker=BreakerPolicy(failure_threshold=100))
    for _ in range(6):
        p.record("a", "m", Verdict(Outcome.TRANSIENT, "x"), 0)  # transient: no blame
        p.record("b", "m", network_verdict("connection reset"), 0)  # the key's connection
    assert set(picks(p, 4, now=1)) == {"a"}
    assert p.keys["b"].health.ratio == 0.0 and p.keys["a"].health.ratio == 1.0
    p.record("a", "m", Verdict(Outcome.DEAD_KEY, "dead"), 1)
    assert set(picks(p, 2, now=2)) == {"b"}  # the unhealthy one is still better than none


def test_removed_keys_stop_at_once_and_new_secret_means_new_state() -> None:
    p = pool(k("a"), k("b"))
    p.record("a", "m", Verdict(Outcome.DEAD_KEY, "dead"), 0)
    p.apply_config(Config((KeySpec("a", "rotated", "a"),), (), "r"))
    assert picks(p, 3) == ["a", "a", "a"]


def test_exclude_and_project_pin() -> None:
    p = pool(k("a", "pa"), k("b", "pb"))
    assert {picks(p, 1)[0] for _ in range(1)}
    got = p.select("m", 0, exclude={"a"})
    assert isinstance(got, Pick) and got.key.name == "b"
    got = p.select("m", 0, project="pa")
    assert isinstance(got, Pick) and got.key.name == "a"


def test_rotation_preview_does_not_disturb_selection() -> None:
    p = pool(k("a", weight=2), k("b"))
    preview = p.rotation("m", 0, 3)
    assert preview == picks(p, 3)


def test_state_snapshot_restores_by_fingerprint() -> None:
    p = pool(k("a"), k("b"))
    dead(p, "a")
    p.record("b", "m", Verdict(Outcome.QUOTA_DAY, "day", cooldown_until=500), 0)
    keys = {n: p.snapshot_key(s) for n, s in p.keys.items()}
    q = pool(k("a"), k("b"))
    q.restore(keys, p.snapshot_cooldowns(), now=100)
    assert q.keys["a"].disabled_reason == "400 API key invalid"
    assert isinstance(q.select("m", 100), NoKey)
    r = pool(k("a"), k("b"))
    r.restore(keys, p.snapshot_cooldowns(), now=600)  # cooldown expired meanwhile
    assert picks(r, 2, now=600) == ["b", "b"]


def test_bare_429s_back_off_exponentially_per_project_and_a_success_resets() -> None:
    p = pool(k("a", "p"), k("b", "q"))
    bare = Verdict(Outcome.QUOTA_UNKNOWN, "429 rate limited")
    p.record("a", "m", bare, 0)
    assert p.cooldowns[("p", "*")].until == 2
    p.record("a", "m", bare, 3)
    assert p.cooldowns[("p", "*")].until == 7  # 3 + 4
    p.record("a", "m", Verdict(Outcome.OK, "200"), 8)
    p.record("a", "m", bare, 9)
    assert p.cooldowns[("p", "*")].until == 11  # back to 2 s
    assert "(backoff 2s)" in p.cooldowns[("p", "*")].reason
    # all keys throttled at once (egress IP): nothing is disabled, all come back by themselves
    p.record("b", "x", bare, 9)
    assert isinstance(p.select("x", 10), NoKey)
    assert {picks(p, 1, "x", now=12)[0]} <= {"a", "b"}
    assert all(s.usable_ever for s in p.keys.values())


def test_a_key_that_leaves_and_comes_back_returns_as_it_left() -> None:
    p = pool(k("a"), k("b"))
    dead(p, "a")
    p.set_weight("b", 9)
    p.apply_config(Config((), (), "half-written file"), now=10)
    assert p.keys == {}
    p.apply_config(Config((k("a"), k("b")), (), "whole file"), now=20)
    assert p.keys["a"].disabled_reason == "400 API key invalid" and p.keys["b"].weight == 9
    # renamed (same secret): the state follows the secret
    p.apply_config(Config((KeySpec("a2", "secret-a", "a"), k("b")), (), "renamed"), now=30)
    assert p.keys["a2"].disabled_reason == "400 API key invalid"
    # gone for longer than RETIRED_TTL: forgotten
    p.apply_config(Config((k("b"),), (), "x"), now=40)
    p.apply_config(Config((k("a"), k("b")), (), "y"), now=40 + 8 * 86400)
    assert p.keys["a"].disabled_reason is None


def test_shared_marks_breakers_and_cooldowns_merge_as_the_pool_expects() -> None:
    a, b = pool(k("a"), k("b")), pool(k("a"), k("b"))
    heard: list[tuple[str, object]] = []
    a.on_change = lambda kind, what: heard.append((kind, what))
    dead(a, "a")
    fp = a.keys["a"].spec.fingerprint
    assert b.apply_marks(fp, a.shared_marks(a.keys["a"]))
    assert (
        b.keys["a"].disabled_reason == "400 API key invalid" and b.status(b.keys["a"], 0) == "dead"
    )
    assert not b.apply_marks(fp, {**a.shared_marks(a.keys["a"]), "dead": None})  # not newer
    a.set_enabled("a", True)  # an operator, later: wins
    assert b.apply_marks(fp, a.shared_marks(a.keys["a"])) and b.keys["a"].usable_ever
    a.record("b", "m", Verdict(Outcome.QUOTA_DAY, "day", cooldown_until=500), 0)
    assert ("cooldown", ("b", "m", a.cooldowns[("b", "m")])) in heard
    assert b.apply_cooldown("b", "m", 500, "day") and not b.apply_cooldown("b", "m", 400, "older")
    assert b.cooldowns[("b", "m")].until == 500
    assert b.apply_cooldown("b", "m", None, "") and ("b", "m") not in b.cooldowns  # a reset


def test_a_shared_breaker_probes_only_with_its_grant() -> None:
    p = pool(k("a"), k("b"), breaker=BreakerPolicy(failure_threshold=1, base_cooldown=10))
    p.record("a", "m", network_verdict("refused"), 0)
    br = p.keys["a"].breaker
    br.shared = True
    assert br.wants_probe(11) and "a" not in picks(p, 3, now=11)  # past its cooldown: no grant
    br.probe_granted = True
    assert picks(p, 1, now=11) == ["a"]  # the probe
    assert "a" not in picks(p, 3, now=11)  # one probe at a time
    q = pool(k("a"), k("b"))
    assert q.apply_breaker(br_fp := p.keys["a"].spec.fingerprint, p.shared_breaker(p.keys["a"]))
    assert q.keys["a"].breaker.state is BreakerState.OPEN
    p.record("a", "m", Verdict(Outcome.OK, "200"), 12)
    assert q.apply_breaker(br_fp, p.shared_breaker(p.keys["a"]))
    assert q.keys["a"].breaker.state is BreakerState.CLOSED


def test_a_dead_mark_survives_a_newer_change_that_never_saw_it() -> None:
    """Two workers apart (Redis away): A finds the key dead, B changes its weight later."""
    a, b = pool(k("a"), k("b")), pool(k("a"), k("b"))
    fp = a.keys["a"].spec.fingerprint
    dead(a, "a")
    b.set_weight("a", 5)  # newer, but knows nothing of the dead mark
    assert b.keys["a"].marks_at >= a.keys["a"].marks_at
    assert b.apply_marks(fp, a.shared_marks(a.keys["a"]))  # B hears A: still dead, weight kept
    assert b.keys["a"].disabled_reason == "400 API key invalid" and b.keys["a"].weight == 5
    assert a.apply_marks(fp, b.shared_marks(b.keys["a"]))  # and A hears B: the same
    assert a.keys["a"].disabled_reason == "400 API key invalid" and a.keys["a"].weight == 5
    assert merge_marks(a.shared_marks(a.keys["a"]), b.shared_marks(b.keys["a"])) == merge_marks(
        b.shared_marks(b.keys["a"]), a.shared_marks(a.keys["a"])
    )
    b.set_enabled("a", True)  # an operator revives it after it was found dead: that holds
    assert a.apply_marks(fp, b.shared_marks(b.keys["a"])) and a.keys["a"].usable_ever


def test_the_health_window_counts_what_it_holds() -> None:
    from gemini_pool.health import HealthWindow

    w = HealthWindow(size=4, min_samples=2)
    assert w.ratio == 1.0 and w.healthy(0.5)
    for ok in (False, False, True, True, True, True):  # the two failures slide out
        w.add(ok)
    assert w.ratio == 1.0
    w.add(False)
    assert w.ratio == 0.75
    w.restore([0, 0, 1, 0])
    assert w.ratio == 0.25 and not w.healthy(0.5)
    w.clear()
    assert w.ratio == 1.0 and w.healthy(0.5)


@given(st.lists(st.one_of(st.booleans(), st.just("clear")), max_size=60), st.integers(1, 8))
def test_the_health_windows_running_count_matches_its_contents(
    ops: list[bool | str], size: int
) -> None:
    from gemini_pool.health import HealthWindow

    w = HealthWindow(size=size)
    for op in ops:
        if op == "clear":
            w.clear()
        else:
            w.add(bool(op))
        expected = sum(w.results) / len(w.results) if w.results else 1.0
        assert w.ratio == expected


def test_a_quota_answer_is_no_failure_of_the_key() -> None:
    """One 429 (or a capped project, a model at capacity) cools the key; its health stays."""
    p = pool(k("a"), k("b"))
    p.record("a", "m", Verdict(Outcome.OK, "200"), 0)
    p.record("a", "m", Verdict(Outcome.QUOTA_MINUTE, "429 per-minute quota", cooldown_until=5), 1)
    assert p.keys["a"].health.ratio == 1.0 and p.keys["a"].health.snapshot() == [1]
    assert set(picks(p, 4, now=2)) == {"b"}  # cooling: the quota is handled by the cooldown
    for outcome in (Outcome.QUOTA_DAY, Outcome.QUOTA_UNKNOWN, Outcome.PROJECT_CAPPED):
        p.record("b", "m", Verdict(outcome, "429", cooldown_until=0), 0)
    p.record("b", "m", Verdict(Outcome.MODEL_UNAVAILABLE, "429 model", cooldown_until=0), 0)
    assert p.keys["b"].health.ratio == 1.0 and p.keys["b"].health.snapshot() == []
    # what does count: a dead key's answer and a failed connection
    p.record("b", "m", network_verdict("timed out"), 3)
    p.record("a", "m", Verdict(Outcome.DEAD_KEY, "403 API_KEY_INVALID"), 3)
    assert p.keys["b"].health.snapshot() == [0] and p.keys["a"].health.snapshot() == [1, 0]
