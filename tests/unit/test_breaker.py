"""Breaker transitions: closed -> open -> half-open with exactly one probe -> closed/open."""

from gemini_pool.breaker import BreakerPolicy, BreakerState, CircuitBreaker

POLICY = BreakerPolicy(failure_threshold=3, base_cooldown=10, max_cooldown=35, probe_timeout=60)


def tripped(now: float = 0.0) -> CircuitBreaker:
    b = CircuitBreaker(POLICY)
    for _ in range(3):
        b.record_failure(now)
    return b


def test_three_consecutive_failures_open_it() -> None:
    b = CircuitBreaker(POLICY)
    b.record_failure(0)
    b.record_failure(0)
    assert b.state is BreakerState.CLOSED and b.acquire(0)
    b.record_failure(0)
    assert b.state is BreakerState.OPEN
    assert not b.acquire(5) and not b.available(9.9)


def test_a_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(POLICY)
    b.record_failure(0)
    b.record_failure(0)
    b.record_success()
    b.record_failure(0)
    b.record_failure(0)
    assert b.state is BreakerState.CLOSED


def test_half_open_admits_exactly_one_probe() -> None:
    b = tripped()
    assert b.available(10)
    assert b.acquire(10)
    assert b.state is BreakerState.HALF_OPEN
    assert not b.acquire(10.1) and not b.available(10.1)  # second caller is refused
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.acquire(10.2) and b.acquire(10.2)


def test_failed_probe_reopens_with_a_longer_cooldown_up_to_the_cap() -> None:
    b = tripped()
    assert b.acquire(10)
    b.record_failure(10)
    assert b.state is BreakerState.OPEN and b.open_until == 30  # 10 * 2
    assert b.acquire(30)
    b.record_failure(30)
    assert b.open_until == 65  # 40 capped to 35
    assert b.acquire(65)
    b.record_success()
    assert b.trips == 0


def test_neutral_outcome_frees_the_probe_slot_and_stuck_probes_expire() -> None:
    b = tripped()
    assert b.acquire(10)
    b.record_neutral()
    assert b.acquire(10.5)  # another probe may go
    assert not b.acquire(11)
    assert b.acquire(10.5 + 61)  # the probe never reported back: it stops blocking


def test_snapshot_roundtrip() -> None:
    b = tripped(100)
    c = CircuitBreaker(POLICY)
    c.restore(b.snapshot())
    assert c.state is BreakerState.OPEN and c.open_until == 110 and c.trips == 1
