"""Circuit breaker transitions as pure functions over the stored document.

The engine applies :func:`admit` and :func:`record` inside ``Store.update_shared``; here
they run on a document and an explicit clock, so every transition (and the one-probe
rule under random interleavings) is checked without a store or a sleep.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings

from crashsafe.policies import breaker as b
from crashsafe.policies.breaker import Admission, BreakerState, CircuitBreaker, Doc
from strategies import breaker_events

RATIO = CircuitBreaker("dep", failure_ratio=0.5, min_calls=4, window=10.0, open_for=5.0,
                       probe_lease=2.0)
STREAK = CircuitBreaker("dep", min_calls=100, consecutive_failures=3, window=10.0,
                        open_for=5.0, probe_lease=2.0)


def outcomes(cfg: CircuitBreaker, doc: Doc, now: float, *failed: bool) -> None:
    for i, f in enumerate(failed):
        assert b.admit(cfg, doc, now, f"call-{i}") is Admission.ALLOW
        b.record(cfg, doc, now, f"call-{i}", f)


def tripped(cfg: CircuitBreaker, at: float) -> Doc:
    doc = Doc()
    while doc.state == BreakerState.CLOSED:
        outcomes(cfg, doc, at, True)
    assert doc.state == BreakerState.OPEN
    return doc


# -- closed -> open -----------------------------------------------------------------------
def test_trips_on_the_failure_ratio_only_once_the_window_holds_min_calls() -> None:
    doc = Doc()
    outcomes(RATIO, doc, 100.0, True, True, True)
    assert doc.state == BreakerState.CLOSED, "3 calls < min_calls=4: no verdict yet"
    outcomes(RATIO, doc, 100.0, True)
    assert doc.state == BreakerState.OPEN
    assert doc.why == "4 of 4 calls failed in the last 10 s"
    assert (doc.until, doc.trips, doc.changes) == (105.0, 1, 1)
    assert doc.history == [[100.0, "closed", "open", doc.why]]


def test_the_ratio_is_inclusive_and_successes_dilute_it() -> None:
    doc = Doc()
    outcomes(RATIO, doc, 100.0, False, False, False, True, True)
    assert doc.state == BreakerState.CLOSED, "2 of 5 failed: 0.4 < 0.5"
    assert b.counts(doc) == (3, 2)
    outcomes(RATIO, doc, 100.5, True)
    assert doc.state == BreakerState.OPEN, "3 of 6 failed: exactly the ratio trips"
    assert doc.why == "3 of 6 calls failed in the last 10 s"


def test_trips_on_consecutive_failures_and_a_success_resets_the_streak() -> None:
    doc = Doc()
    outcomes(STREAK, doc, 100.0, True, True, False, True, True)
    assert (doc.state, doc.streak) == (BreakerState.CLOSED, 2)
    outcomes(STREAK, doc, 100.0, True)
    assert doc.state == BreakerState.OPEN
    assert doc.why == "3 failures in a row"


def test_flushed_successes_reset_the_streak_too() -> None:
    doc = Doc()
    outcomes(STREAK, doc, 100.0, True, True)
    b.record(STREAK, doc, 100.0, "", None, successes=5)
    assert (doc.streak, b.counts(doc)) == (0, (5, 2))
    # A failure flushed together with earlier successes starts a new streak of one.
    b.record(STREAK, doc, 100.0, "x", True, successes=1)
    assert (doc.streak, doc.state) == (1, BreakerState.CLOSED)


def test_failures_older_than_the_window_are_dropped() -> None:
    doc = Doc()
    outcomes(RATIO, doc, 100.0, True, True, True)
    assert b.counts(doc) == (0, 3)
    outcomes(RATIO, doc, 125.0, True)
    assert doc.state == BreakerState.CLOSED, "the three old failures left the window"
    assert b.counts(doc) == (0, 1)
    assert all(bucket[0] > 125.0 - 10.0 - 1.0 for bucket in doc.buckets)
    assert len(doc.buckets) == 1


def test_buckets_inside_the_window_still_count() -> None:
    doc = Doc()
    outcomes(RATIO, doc, 100.0, True, True)
    outcomes(RATIO, doc, 105.0, True)
    outcomes(RATIO, doc, 109.0, True)
    assert doc.state == BreakerState.OPEN
    assert len(doc.buckets) == 3


# -- open -> half-open -> closed / open ----------------------------------------------------
def test_open_rejects_until_open_for_then_hands_exactly_one_probe() -> None:
    doc = tripped(STREAK, 100.0)
    assert b.quick_admit(doc, 104.9, "a") is Admission.REJECT
    assert b.admit(STREAK, doc, 104.9, "a") is Admission.REJECT
    assert doc.state == BreakerState.OPEN
    assert b.quick_admit(doc, 105.0, "a") is None, "a transition is due: decide under a write"
    assert b.admit(STREAK, doc, 105.0, "a") is Admission.PROBE
    assert (doc.state, doc.probe, doc.probe_until) == (BreakerState.HALF_OPEN, "a", 107.0)
    assert doc.why == "open for 5 s: probing"
    for who in ("b", "c", "d"):
        assert b.quick_admit(doc, 105.1, who) is Admission.REJECT
        assert b.admit(STREAK, doc, 105.1, who) is Admission.REJECT
    assert doc.probe == "a"


def test_the_probe_holder_gets_its_own_probe_back() -> None:
    doc = tripped(STREAK, 100.0)
    assert b.admit(STREAK, doc, 105.0, "wf-1:3") is Admission.PROBE
    # A recovered workflow asks again with the same identity: it continues its probe.
    assert b.admit(STREAK, doc, 106.5, "wf-1:3") is Admission.PROBE
    assert doc.probe_until == 108.5, "re-acquiring renews the lease"
    assert b.admit(STREAK, doc, 107.5, "other") is Admission.REJECT
    assert doc.changes == 2, "re-acquiring is not a state change"


def test_an_expired_probe_lease_lets_another_caller_probe() -> None:
    doc = tripped(STREAK, 100.0)
    assert b.admit(STREAK, doc, 105.0, "crashed") is Admission.PROBE
    assert b.admit(STREAK, doc, 106.99, "b") is Admission.REJECT
    assert b.admit(STREAK, doc, 107.0, "b") is Admission.PROBE
    assert doc.probe == "b"
    assert b.admit(STREAK, doc, 107.1, "crashed") is Admission.REJECT
    # The old prober's late outcome is not the probe's any more: ignored.
    before = b.dump(doc)
    b.record(STREAK, doc, 107.2, "crashed", False)
    assert b.dump(doc) == before


def test_a_successful_probe_closes_and_forgets_the_failures() -> None:
    doc = tripped(STREAK, 100.0)
    assert b.admit(STREAK, doc, 105.0, "a") is Admission.PROBE
    b.record(STREAK, doc, 105.5, "a", False)
    assert doc.state == BreakerState.CLOSED
    assert (doc.probe, doc.streak, doc.buckets) == (None, 0, [])
    assert doc.history[-1] == [105.5, "half_open", "closed", "the half-open probe succeeded"]
    assert b.admit(STREAK, doc, 105.6, "b") is Admission.ALLOW
    # One failure after closing does not re-trip a streak breaker of 3.
    b.record(STREAK, doc, 105.7, "b", True)
    assert doc.state == BreakerState.CLOSED


def test_a_failed_probe_reopens_for_another_open_for() -> None:
    doc = tripped(STREAK, 100.0)
    assert b.admit(STREAK, doc, 105.0, "a") is Admission.PROBE
    b.record(STREAK, doc, 106.0, "a", True)
    assert (doc.state, doc.probe, doc.until, doc.trips) == (BreakerState.OPEN, None, 111.0, 2)
    assert doc.history[-1] == [106.0, "half_open", "open", "the half-open probe failed"]
    assert b.admit(STREAK, doc, 110.9, "b") is Admission.REJECT
    assert b.admit(STREAK, doc, 111.0, "b") is Admission.PROBE


def test_a_flush_does_not_release_the_probe() -> None:
    doc = tripped(STREAK, 100.0)
    assert b.admit(STREAK, doc, 105.0, "a") is Admission.PROBE
    before = b.dump(doc)
    b.record(STREAK, doc, 105.1, "a", None, successes=3)
    b.record(STREAK, doc, 105.1, "", None, successes=3)
    assert b.dump(doc) == before


def test_outcomes_of_calls_admitted_before_the_trip_are_ignored() -> None:
    doc = Doc()
    assert b.admit(STREAK, doc, 100.0, "early") is Admission.ALLOW
    outcomes(STREAK, doc, 100.0, True, True, True)
    assert doc.state == BreakerState.OPEN
    before = b.dump(doc)
    b.record(STREAK, doc, 100.5, "early", True)
    b.record(STREAK, doc, 100.5, "early", False)
    assert b.dump(doc) == before
    assert b.admit(STREAK, doc, 105.0, "a") is Admission.PROBE
    before = b.dump(doc)
    b.record(STREAK, doc, 105.5, "early", False)
    assert b.dump(doc) == before, "only the probe holder decides a half-open breaker"


def test_history_keeps_the_last_twenty_changes() -> None:
    doc = tripped(STREAK, 100.0)
    now = 100.0
    for _ in range(15):
        now += 5.0
        assert b.admit(STREAK, doc, now, "p") is Admission.PROBE
        b.record(STREAK, doc, now, "p", True)
    assert doc.changes == 31
    assert doc.trips == 16
    assert len(doc.history) == 20
    assert doc.history[-1][1:] == ["half_open", "open", "the half-open probe failed"]
    assert doc.history[0][1:3] == ["open", "half_open"], "the oldest changes were dropped"


# -- stored bytes ---------------------------------------------------------------------------
def test_dump_load_round_trip() -> None:
    doc = tripped(RATIO, 100.0)
    b.admit(RATIO, doc, 105.0, "a")
    assert b.load(b.dump(doc)) == doc
    assert b.load(None) == Doc()


@pytest.mark.parametrize("raw", [
    b"", b"garbage", b"\xff\xfe", b"[]", b"null", b'{"state": 5}', b'{"buckets": 3}',
    b'{"buckets": [["a", 1, 2]]}', b'{"history": {"x": 1}}', b'{"probe": 1}',
    # Well-formed JSON whose meaning is broken: a state that does not exist, a bucket
    # without its three numbers.
    b'{"state": "bogus"}', b'{"buckets": [[]]}', b'{"buckets": [[1.0]]}',
])
def test_unreadable_stored_bytes_are_a_fresh_breaker(raw: bytes) -> None:
    doc = b.load(raw)
    assert doc == Doc()
    assert b.admit(STREAK, doc, 100.0, "a") is Admission.ALLOW
    assert b.admit(STREAK, doc, 100.0, "b") is Admission.ALLOW
    b.record(STREAK, doc, 100.0, "a", True)
    assert b.counts(doc) == (0, 1)


def test_settings_accept_timedeltas_and_reject_nonsense() -> None:
    cfg = CircuitBreaker("x", window=timedelta(minutes=1), open_for=timedelta(seconds=3))
    assert (cfg.window, cfg.open_for) == (60.0, 3.0)
    for bad, says in (({"failure_ratio": 0}, "failure_ratio"),
                      ({"failure_ratio": 1.5}, "failure_ratio"),
                      ({"min_calls": 0}, "min_calls"),
                      ({"consecutive_failures": 0}, "consecutive_failures"),
                      ({"open_for": 0}, "open_for must be positive"),
                      ({"window": -1}, "window must be a non-negative duration"),
                      ({"scope": "planet"}, "scope")):
        with pytest.raises(ValueError, match=says):
            CircuitBreaker("x", **bad)
    with pytest.raises(ValueError, match="non-empty"):
        CircuitBreaker("")


# -- the one-probe invariant under random interleavings -------------------------------------
@settings(max_examples=300, deadline=None)
@given(events=breaker_events(callers=4))
def test_at_most_one_live_probe_under_any_interleaving(
        events: list[tuple[str, int, float]]) -> None:
    """Callers admit, report and wait in any order (time only moves forward). A caller
    holds a live probe from its PROBE admission until it reports or its lease runs out;
    at every instant at most one caller holds one, and the state is always valid."""
    cfg = CircuitBreaker("p", failure_ratio=0.5, min_calls=2, window=4.0,
                         consecutive_failures=2, open_for=1.0, probe_lease=0.5)
    doc = b.load(None)
    now = 1000.0
    tickets: dict[str, Admission] = {}
    probes: dict[str, float] = {}  # caller -> when its probe lease runs out
    for kind, caller, dt in events:
        who = f"c{caller}"
        raw = b.dump(doc)  # every step goes through the stored form, as in the store
        doc = b.load(raw)
        if kind == "tick":
            now += dt
        elif kind == "admit":
            quick = b.quick_admit(doc, now, who)
            got = b.admit(cfg, doc, now, who)
            if quick is not None:
                assert got is quick
            tickets[who] = got
            if got is Admission.PROBE:
                probes[who] = now + 0.5
            else:
                probes.pop(who, None)
        elif who in tickets:
            del tickets[who]
            b.record(cfg, doc, now, who, kind == "fail")
            probes.pop(who, None)
        live = [w for w, until in probes.items() if until > now]
        assert len(live) <= 1, (live, doc)
        assert doc.state in {s.value for s in BreakerState}
        assert (doc.probe is not None) == (doc.state == BreakerState.HALF_OPEN)
        if live:
            assert doc.probe == live[0]
        assert len(doc.history) <= 20
        assert doc.changes >= len(doc.history)
