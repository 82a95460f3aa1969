"""The request body budget: reservations up to the limit, a lone large body, releases."""

from __future__ import annotations

from gemini_pool.bodybudget import BodyBudget


def test_reservations_stop_at_the_limit_and_come_back_on_release() -> None:
    b = BodyBudget(100)
    assert b.reserve(60) and b.reserve(40) and b.held == 100
    assert not b.reserve(1) and b.held == 100 and b.refused == 1
    assert "100 bytes" in b.message(1) and "gemini_max_inflight_bytes" in b.message(1)
    b.release(60)
    assert b.reserve(50) and b.held == 90
    b.release(1000)  # never below zero
    assert b.held == 0


def test_a_body_larger_than_the_budget_passes_alone_and_empty_bodies_always() -> None:
    b = BodyBudget(100)
    assert b.reserve(0) and b.held == 0
    assert b.reserve(500) and b.held == 500  # alone: never refused forever
    assert not b.reserve(10)
    assert b.reserve(0)
    b.release(500)
    assert b.reserve(10)
