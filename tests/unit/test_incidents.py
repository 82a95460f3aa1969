"""Whole-pool incidents with an injected clock: when one starts, how requests are held and
probed, how it ends."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gemini_pool.incidents import GO, MAX_MODELS, Incident, IncidentPolicy, Incidents

PRO = "gemini-2.5-pro"
T0 = 1_000_000.0


def watch() -> tuple[Incidents, list[tuple[str, str, str]]]:
    said: list[tuple[str, str, str]] = []
    inc = Incidents()

    def on_change(what: str, incident: Incident, why: str) -> None:
        said.append((what, incident.model, why))

    inc.on_change = on_change
    return inc, said


def test_most_projects_in_trouble_within_seconds_is_one_incident() -> None:
    inc, said = watch()
    inc.observe(PRO, "a", True, T0, 3)
    assert inc.admit(PRO, T0) == GO and not said  # one project: that project's trouble
    inc.observe(PRO, "b", True, T0 + 1, 3)
    assert [w for w, _, _ in said] == ["started"]
    assert "2 of 3 projects" in said[0][2]
    [d] = inc.describe(T0 + 1)
    assert (d["model"], d["projects"], d["of"], d["probe_in_flight"]) == (PRO, 2, 3, False)
    assert inc.count(T0 + 1) == 1
    # other models are not held
    assert inc.admit("gemini-2.5-flash", T0 + 1) == GO


def test_a_project_that_served_within_the_window_is_not_in_trouble() -> None:
    inc, said = watch()
    inc.observe(PRO, "a", False, T0, 3)
    inc.observe(PRO, "a", True, T0 + 0.1, 3)  # sometimes 503, sometimes served: no incident
    inc.observe(PRO, "b", True, T0 + 0.2, 3)
    assert not said
    inc.observe(PRO, "a", True, T0 + 6, 3)  # served nothing for a window: in trouble again
    inc.observe(PRO, "b", True, T0 + 6, 3)
    assert [w for w, _, _ in said] == ["started"]


def test_trouble_spread_over_more_than_the_window_is_no_incident() -> None:
    inc, said = watch()
    for i, p in enumerate("abcd"):
        inc.observe(PRO, p, True, T0 + 6 * i, 4)
    assert not said


def test_requests_are_held_then_one_probe_goes_and_a_failed_probe_holds_longer() -> None:
    inc, _ = watch()
    p = IncidentPolicy()
    inc.observe(PRO, "a", True, T0, 2)
    inc.observe(PRO, "b", True, T0, 2)
    assert inc.admit(PRO, T0 + 0.5).wait_until == T0 + p.hold
    probe = inc.admit(PRO, T0 + p.hold)
    assert probe.wait_until == 0 and probe.probe is not None
    # while the probe is out, others look again shortly
    other = inc.admit(PRO, T0 + p.hold + 0.1)
    assert other.probe is None and other.wait_until == T0 + p.hold + 0.1 + p.poll
    # trouble from a request that is not the probe keeps the hold as it is
    inc.observe(PRO, "a", True, T0 + p.hold + 0.2, 2)
    assert inc.admit(PRO, T0 + p.hold + 0.2).probe is None
    inc.observe(PRO, "b", True, T0 + 3, 2, probe.probe)  # the probe failed: twice the hold
    assert inc.admit(PRO, T0 + 3).wait_until == T0 + 3 + 2 * p.hold
    assert inc.describe(T0 + 3)[0]["failed_probes"] == 1
    # the hold never passes its cap
    t = T0 + 3
    for _ in range(10):
        t = inc.admit(PRO, t).wait_until
        nxt = inc.admit(PRO, t)
        assert nxt.probe is not None
        inc.observe(PRO, "a", True, t, 2, nxt.probe)
    assert inc.admit(PRO, t).wait_until == t + p.hold_max


def test_a_probe_that_learned_nothing_frees_the_slot() -> None:
    inc, _ = watch()
    inc.observe(PRO, "a", True, T0, 2)
    inc.observe(PRO, "b", True, T0, 2)
    first = inc.admit(PRO, T0 + 2)
    assert first.probe is not None
    inc.done(PRO, first.probe + 99)  # someone else's ticket: nothing
    assert inc.admit(PRO, T0 + 2).probe is None
    inc.done(PRO, first.probe)  # its request ended without an answer about the model
    second = inc.admit(PRO, T0 + 2.1)
    assert second.probe is not None and second.probe != first.probe
    # a probe that never reports back stops blocking after its timeout
    late = T0 + 2.1 + IncidentPolicy().probe_timeout
    for t in range(int(T0) + 10, int(late), 10):  # trouble meanwhile: not quiet
        inc.observe(PRO, "a", True, t, 2)
    assert inc.admit(PRO, late - 0.1).probe is None
    assert inc.admit(PRO, late).probe is not None


def test_a_served_answer_ends_it_and_so_does_a_quiet_period() -> None:
    inc, said = watch()
    inc.observe(PRO, "a", True, T0, 2)
    inc.observe(PRO, "b", True, T0, 2)
    probe = inc.admit(PRO, T0 + 2)
    inc.observe(PRO, "a", False, T0 + 2.5, 0, probe.probe)
    assert said[-1][0] == "ended" and "a served" in said[-1][2]
    assert inc.admit(PRO, T0 + 2.5) == GO and inc.count(T0 + 2.5) == 0
    # again, then nothing more: over by itself after the quiet period
    inc.observe(PRO, "a", True, T0 + 10, 2)
    inc.observe(PRO, "b", True, T0 + 10, 2)
    assert said[-1][0] == "started"
    quiet = IncidentPolicy().quiet
    assert inc.count(T0 + 10 + quiet) == 1
    assert inc.count(T0 + 10 + quiet + 0.1) == 0
    assert said[-1][0] == "ended" and "no 503" in said[-1][2]
    assert inc.admit(PRO, T0 + 30) == GO


def test_the_threshold_is_most_projects_and_at_least_two() -> None:
    inc = Incidents()
    assert [inc.threshold(n) for n in (0, 1, 2, 3, 4, 5, 10)] == [2, 2, 2, 2, 3, 3, 6]


def test_tracked_models_are_bounded() -> None:
    inc = Incidents()
    for i in range(MAX_MODELS * 3):
        inc.observe(f"m{i}", "a", True, T0 + i * 100, 3)
    assert len(inc._seen) <= MAX_MODELS
    for i in range(MAX_MODELS * 3):  # all at once: the rest go untracked, nothing grows
        inc.observe(f"x{i}", "a", True, T0 + 10**6, 3)
    assert len(inc._seen) <= MAX_MODELS


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["trouble", "ok", "admit", "done"]),
            st.sampled_from("abcd"),
            st.floats(min_value=0, max_value=20, allow_nan=False),
        ),
        max_size=60,
    )
)
def test_any_sequence_keeps_the_promises(steps: list[tuple[str, str, float]]) -> None:
    """Whatever answers come: a hold is never longer than hold_max, at most one probe is out, an
    incident needs at least two projects, and a served answer always ends it."""
    p = IncidentPolicy()
    inc, said = watch()
    now = T0
    probes: list[Any] = []
    for kind, project, dt in steps:
        now += dt
        if kind in ("trouble", "ok"):
            probe = probes.pop() if probes else None
            inc.observe(PRO, project, kind == "trouble", now, 4, probe)
            if kind == "ok":
                assert inc.count(now) == 0
        elif kind == "admit":
            a = inc.admit(PRO, now)
            if a.wait_until:
                assert now <= a.wait_until <= now + max(p.hold_max, p.poll)
            elif a.probe is not None:
                probes.append(a.probe)
        elif probes:
            inc.done(PRO, probes.pop())
        current = inc.current(now)
        assert len(current) <= 1
        for i in current:
            assert i.projects >= 2 and i.hold <= p.hold_max
    starts = sum(1 for w, _, _ in said if w == "started")
    ends = sum(1 for w, _, _ in said if w == "ended")
    assert starts - ends == inc.count(now) or starts - ends == len(inc.open)
