"""Metrics computed from the journal, alert checks, and `crashsafe stats`.

A crafted journal is written through the real store API (sealed, on memory, SQLite and
PostgreSQL) with exact timestamps, and every figure is compared with the value worked
out by hand in the comments. A few tests drive the engine itself, to check that the
records it writes are read the way the metrics assume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import crashsafe
from crashsafe import App, RetryPolicy, _recovery_log
from crashsafe._codec import encode
from crashsafe._errors import error_payload, pin_class
from crashsafe.cli.main import cli
from crashsafe.exceptions import StoreError
from crashsafe.observe import Metrics, Percentiles, Thresholds, Verdict, compute, evaluate
from crashsafe.policies.breaker import Doc, dump
from crashsafe.stores import Store
from crashsafe.stores.base import (
    AttemptRecord,
    CreateWorkflow,
    JournalEntry,
    ListFilter,
    Op,
    Status,
    WorkflowRecord,
)
from crashsafe.testing import simulate_crash
from helpers import AppFactory, Database, wait_idle

T = 1_000_000.0
"""The crafted window is [T, T + 1000]."""
NULL = b"null"


def _wf(wid: str, status: Status, created: float, updated: float, *, name: str = "agent",
        token: int = 0, recovery_attempts: int = 0, recovery_mark: int = 0) -> Op:
    return CreateWorkflow(WorkflowRecord(
        wid, name, "1", status, NULL, created, updated, token=token,
        recovery_attempts=recovery_attempts, recovery_mark=recovery_mark,
        output=NULL if status is Status.SUCCEEDED else None))


def _step(wid: str, idx: int, name: str, start: float, end: float, *, attempts: int = 1,
          error: bytes | None = None, note: str | None = None) -> JournalEntry:
    return JournalEntry(wid, idx, "step", name, None if error else NULL, error, attempts,
                        T + start, T + end, note)


def _attempt(wid: str, idx: int, n: int, start: float, end: float | None,
             cls: str | None = None, delay: float | None = None) -> AttemptRecord:
    return AttemptRecord(wid, idx, n, "llm", T + start, None if end is None else T + end,
                         cls, None, delay, "backoff" if delay is not None else None,
                         None if end is None or delay is None else T + end + delay)


def _checkpoint(wid: str, idx: int, at: float, size: int) -> JournalEntry:
    """A checkpoint entry whose payload is ``size`` bytes (a JSON string)."""
    data = b'"' + b"a" * (size - 2) + b'"'
    return JournalEntry(wid, idx, "checkpoint", "checkpoint", data, None, 1, T + at, T + at)


def _failure(cls: str) -> bytes:
    exc = ValueError(f"a {cls} failure")
    pin_class(exc, cls)
    return error_payload(exc)


def _history(doc_changes: list[tuple[float, str, str]]) -> Doc:
    state = doc_changes[-1][2] if doc_changes else "closed"
    return Doc(state=state, history=[[T + at, src, dst, "crafted"] for at, src, dst in
                                     doc_changes], changes=len(doc_changes))


def _put_breaker(store: Store, name: str, doc: Doc) -> None:
    store.update_shared(f"breaker:{name}", lambda cur, now: (dump(doc), None))


def craft(store: Store) -> None:
    """The crafted journal (times relative to T)."""
    wake = encode(T + 380, "wake")[0]
    batches: list[list[Op]] = [
        # w-ok: succeeded in 100 s; a step retried twice then succeeded; a deduplicated key.
        [_wf("w-ok", Status.SUCCEEDED, T + 0, T + 100),
         _step("w-ok", 0, "fetch", 10, 12),
         _step("w-ok", 1, "llm", 20, 30, attempts=3),
         _attempt("w-ok", 1, 1, 20, 21, "rate_limited", 4.0),
         _attempt("w-ok", 1, 2, 25, 26, "server_error", 2.0),
         _attempt("w-ok", 1, 3, 28, 30),
         _step("w-ok", 2, "pay", 40, 41,
               note="deduplicated: key 'k' was already applied by step 'pay' of workflow 'x'"),
         _checkpoint("w-ok", 3, 42, 100)],
        # w-fail: failed in 60 s; a retried step whose last attempt closed with its class,
        # and a first attempt that failed without a retry (class from its error).
        [_wf("w-fail", Status.FAILED, T + 200, T + 260),
         _step("w-fail", 0, "llm", 210, 215, attempts=2, error=_failure("server_error")),
         _attempt("w-fail", 0, 1, 210, 211, "timeout", 3.0),
         _attempt("w-fail", 0, 2, 214, 215, "server_error"),
         _step("w-fail", 1, "tool", 230, 232, error=_failure("bad_request")),
         _checkpoint("w-fail", 2, 233, 100), _checkpoint("w-fail", 3, 234, 200)],
        # w-recovered: taken over twice; pauses 1 (start), 48 (the crash), then a sleep
        # until T+380 (not a pause), 1 after the wake-up, 17 before the end.
        [_wf("w-recovered", Status.SUCCEEDED, T + 300, T + 400, token=2,
             recovery_attempts=1, recovery_mark=1),
         _step("w-recovered", 0, "a", 301, 302),
         _step("w-recovered", 1, "b", 350, 351),
         JournalEntry("w-recovered", 2, "sleep", "sleep", wake, None, 1, T + 352, T + 352),
         _step("w-recovered", 3, "c", 381, 383,
               note="outcome unknown after a crash: retried with the same key")],
        # w-dead: dead-lettered after 21 recoveries; pauses 1 and 7, and an attempt cut off
        # by a crash that ran 20 s: its longest pause is 20.
        [_wf("w-dead", Status.DEAD_LETTER, T + 500, T + 600, token=21,
             recovery_attempts=21, recovery_mark=2),
         _step("w-dead", 0, "x", 501, 503),
         _step("w-dead", 1, "y", 510, 511),
         _attempt("w-dead", 2, 1, 520, 540, "crashed", 1.0)],
        # w-retrying: running, step 1 failed once and its second attempt is in flight.
        [_wf("w-retrying", Status.RUNNING, T + 700, T + 700),
         _step("w-retrying", 0, "s", 701, 702),
         _attempt("w-retrying", 1, 1, 710, 711, "rate_limited", 30.0),
         _attempt("w-retrying", 1, 2, 741, None)],
        # Ended before the window: never read.
        [_wf("w-old", Status.SUCCEEDED, T - 500, T - 400),
         _step("w-old", 0, "old", -490, -480, attempts=5)],
        # Another workflow name.
        [_wf("w-other", Status.SUCCEEDED, T + 800, T + 810, name="other"),
         _step("w-other", 0, "o", 801, 809)],
        # Created after the window.
        [_wf("w-future", Status.RUNNING, T + 2000, T + 2000),
         _step("w-future", 0, "f", 2001, 2002)],
    ]
    assert store.apply(batches) == [None] * len(batches)
    # openai: tripped at 100, 200 and 300; closed again at 162 and 231; open (probing
    # since 900) at the window's end, so its longest stretch is 1000 - 300 = 700 s.
    _put_breaker(store, "openai", _history([
        (100, "closed", "open"), (130, "open", "half_open"), (131, "half_open", "open"),
        (161, "open", "half_open"), (162, "half_open", "closed"), (200, "closed", "open"),
        (230, "open", "half_open"), (231, "half_open", "closed"), (300, "closed", "open"),
        (900, "open", "half_open")]))
    # quiet: tripped and closed before the window.
    _put_breaker(store, "quiet", _history([
        (-100, "closed", "open"), (-70, "open", "half_open"), (-69, "half_open", "closed")]))


@pytest.fixture
def crafted(make_app: AppFactory) -> App:
    app = make_app()
    craft(app.store)
    return app


def _window(app: App, **kwargs: Any) -> Metrics:
    return compute(app.store, kwargs.pop("since", T), kwargs.pop("until", T + 1000), **kwargs)


# -- each figure against the hand-computed value ------------------------------------------
def test_workflow_counts_throughput_and_latency(crafted: App) -> None:
    m = _window(crafted)
    assert m.workflows == 6  # w-ok, w-fail, w-recovered, w-dead, w-retrying, w-other
    assert {k: v for k, v in m.by_status.items() if v} == {
        "succeeded": 3, "failed": 1, "dead_letter": 1, "running": 1}
    assert set(m.by_status) == {s.value for s in Status}
    assert m.window_seconds == 1000
    assert m.workflows_finished == 4  # updated at 100, 260, 400, 810; the dead letter is not
    assert m.workflow_throughput == pytest.approx(4 / 1000)
    # Latencies 2, 10, 1 | 5, 2 | 1, 1, 2 | 2, 1 | 1 | 8: sorted 1x5, 2x4, 5, 8, 10.
    assert m.steps_finished == 12
    assert m.step_throughput == pytest.approx(12 / 1000)
    assert m.step_latency == Percentiles(12, 2.0, 10.0, 10.0, 10.0)
    # Succeeded or failed: 100, 60, 100, 10 -> ranks 2 (p50) and 4 (p95, p99).
    assert m.workflow_latency == Percentiles(4, 60.0, 100.0, 100.0, 100.0)


def test_retry_figures(crafted: App) -> None:
    m = _window(crafted)
    # 12 entries + 2 calls without an entry (w-dead #2, w-retrying #1); retried: w-ok #1,
    # w-fail #0 and both calls without an entry.
    assert (m.step_calls, m.retried_calls) == (14, 4)
    assert m.retry_rate == pytest.approx(4 / 14)
    assert (m.retried_finished, m.succeeded_after_retry) == (2, 1)
    assert m.success_after_retry_rate == pytest.approx(0.5)
    assert m.retry_delays == 5
    assert m.average_retry_delay == pytest.approx((4 + 2 + 3 + 1 + 30) / 5)


def test_failure_mix(crafted: App) -> None:
    m = _window(crafted)
    # Rows: rate_limited x2, server_error x2 (one the closing row of w-fail #0), timeout,
    # crashed; plus w-fail #1's unretried bad_request. w-fail #0's error is not counted
    # twice: its last attempt's row carries its class.
    assert m.failure_counts == {"rate_limited": 2, "server_error": 2, "timeout": 1,
                                "crashed": 1, "bad_request": 1}
    assert m.failed_attempts == 7
    assert m.failure_mix["rate_limited"] == pytest.approx(2 / 7)
    assert sum(m.failure_mix.values()) == pytest.approx(1.0)


def test_stuck_in_retries(crafted: App) -> None:
    m = _window(crafted)
    # Only the running workflow's step counts (the dead letter's is not retrying).
    assert [(r.workflow_id, r.index, r.attempts, r.last_failure) for r in m.retrying] == [
        ("w-retrying", 1, 2, "rate_limited")]
    assert m.longest_retry_span == pytest.approx(1000 - 710)
    assert m.stuck_in_retries == 0
    assert [r.workflow_id for r in m.stuck(after=200)] == ["w-retrying"]
    # Seen from later, the same step has been retrying for more than 30 minutes.
    later = _window(crafted, until=T + 710 + 1801)
    assert later.stuck_in_retries == 1
    stuck = next(c for c in evaluate(later) if c.name.startswith("stuck"))
    assert stuck.status is Verdict.ALERT and "w-retrying" in stuck.detail


def test_effect_figures(crafted: App) -> None:
    m = _window(crafted)
    assert m.deduplicated_effects == 1
    assert m.unknown_outcomes == {"retried with the same key": 1}
    assert m.unknown_outcome_reruns == 1
    assert m.unknown_outcome_rerun_rate == pytest.approx(1 / 14)
    assert m.duplicate_effect_rate == 0.0  # a deduplicated key is no duplicate


def test_recovery_figures(crafted: App) -> None:
    m = _window(crafted)
    assert m.recovered_workflows == 2  # w-recovered, w-dead
    assert m.recoveries == 2 + 21
    assert m.dead_lettered == 1
    assert m.recovery_success_rate == pytest.approx(0.5)
    assert m.recovery_time == Percentiles(2, 20.0, 48.0, 48.0, 48.0)
    assert m.state_consistency == 1.0 and m.unreadable == ()


def test_a_rollback_is_not_counted_as_a_recovery(crafted: App) -> None:
    store = crafted.store
    assert store.rewind("w-ok", 2, "rolled back by a test", T + 150) == 2  # pay, checkpoint
    [claim] = store.claim_workflows([("w-ok", None)], "resumer", 20)  # picked up again
    assert claim.claimed and claim.record is not None
    assert (claim.record.token, claim.record.recovery_attempts) == (2, 1)
    m = _window(crafted)
    assert m.rollbacks == 1
    assert (m.recovered_workflows, m.recoveries) == (2, 23)  # as before the rollback
    # The process that resumed it dies: that takeover counts.
    [claim] = store.claim_workflows([("w-ok", "resumer")], "successor", 20)
    assert claim.claimed
    m = _window(crafted)
    assert (m.recovered_workflows, m.recoveries) == (3, 24)
    assert _window(crafted, since=T + 151).rollbacks == 0


def test_breaker_figures(crafted: App) -> None:
    m = _window(crafted)
    by_name = {b.name: b for b in m.breakers}
    openai, quiet = by_name["openai"], by_name["quiet"]
    assert (openai.state, openai.changes, openai.trips) == ("half_open", 10,
                                                           (T + 100, T + 200, T + 300))
    assert openai.longest_open == pytest.approx(700)
    assert openai.open_since == T + 300
    assert openai.most_trips_within(600) == 3 and openai.most_trips_within(150) == 2
    assert (quiet.state, quiet.changes, quiet.trips, quiet.longest_open) == (
        "closed", 0, (), 0.0)
    assert m.breaker_changes == 10
    # Seen at T+215: open again since 200, but its longest stretch so far is 100 -> 162.
    early = _window(crafted, until=T + 215)
    assert {b.name: b.longest_open for b in early.breakers}["openai"] == pytest.approx(62)
    assert {b.name: b.state for b in early.breakers}["openai"] == "open"


def test_checkpoint_storage_and_unavailable_figures(crafted: App) -> None:
    m = _window(crafted)
    # w-ok: 100 bytes; w-fail: 100 + 200 bytes.
    assert m.checkpointed_workflows == 2
    assert m.checkpoint_bytes_per_task == pytest.approx(200)
    check = next(c for c in evaluate(m, Thresholds(checkpoint_bytes_per_task=150))
                 if c.name == "checkpoint storage per task")
    assert check.status is Verdict.ALERT
    # A rolled-back checkpoint no longer counts.
    assert crafted.store.rewind("w-fail", 3, "test", T + 300) == 1
    assert _window(crafted).checkpoint_bytes_per_task == pytest.approx(100)
    assert m.checkpoint_latency_overhead is None
    assert set(m.unavailable) == {"checkpoint_latency_overhead", "token_usage", "cost"}
    assert set(m.approximate) == {"recoveries", "recovery_time", "recovery_success_rate"}


def test_percentiles_are_nearest_rank() -> None:
    assert Percentiles.of([float(v) for v in range(20, 0, -1)]) == Percentiles(
        20, 10.0, 19.0, 20.0, 20.0)
    assert Percentiles.of([]) == Percentiles()
    assert Percentiles.of([3.0]) == Percentiles(1, 3.0, 3.0, 3.0, 3.0)


# -- window and name filters -------------------------------------------------------------
def test_window_filter(crafted: App) -> None:
    m = _window(crafted, since=T + 250, until=T + 450)
    # Created by 450 and not ended before 250: w-fail (ended 260) and w-recovered.
    assert m.workflows == 2
    assert m.workflows_finished == 2  # w-fail at 260, w-recovered at 400
    assert m.steps_finished == 3  # w-recovered's steps; w-fail's ended at 215 and 232
    assert m.retry_delays == 0 and m.average_retry_delay is None
    assert m.window_seconds == 200
    everything = compute(crafted.store, None, T + 1000)
    assert everything.workflows == 7  # w-old too; not w-future
    assert everything.window_seconds == pytest.approx(1000 + 500)  # from w-old's creation
    with pytest.raises(ValueError, match="after it ends"):
        compute(crafted.store, T + 10, T)


def test_name_filter(crafted: App) -> None:
    m = _window(crafted, name="other")
    assert (m.workflows, m.steps_finished, m.step_calls) == (1, 1, 1)
    assert m.step_latency.max == 8.0
    assert _window(crafted, name="agent").workflows == 5


@pytest.mark.parametrize("hostile", ["x' OR '1'='1", "%", "agent%", "_gent",
                                     "\"; DROP TABLE workflows; --", "agent\u00e9"])
def test_hostile_names_return_nothing_and_change_nothing(crafted: App, hostile: str) -> None:
    before = [(r.id, r.status, r.updated_at)
              for r in crafted.store.list_workflows(ListFilter(limit=100))]
    m = _window(crafted, name=hostile)
    assert m.workflows == 0 and m.step_calls == 0 and m.name == hostile
    assert all(c.status is not Verdict.ALERT or c.name.startswith("breaker")
               for c in evaluate(m))
    after = [(r.id, r.status, r.updated_at)
             for r in crafted.store.list_workflows(ListFilter(limit=100))]
    assert after == before
    assert _window(crafted).workflows == 6


def test_a_nul_in_the_name_reads_nothing_or_fails_cleanly(crafted: App,
                                                           store_kind: str) -> None:
    # PostgreSQL text cannot hold NUL, so no workflow there can have this name; its
    # store refuses the query with a StoreError where memory and SQLite return nothing.
    try:
        assert _window(crafted, name="agent\x00").workflows == 0
    except StoreError as exc:
        assert store_kind == "postgres" and "NUL" in str(exc)
    assert _window(crafted).workflows == 6


# -- alerts ------------------------------------------------------------------------------
def test_default_checks_on_the_crafted_journal(crafted: App) -> None:
    checks = {c.name: c for c in evaluate(_window(crafted))}
    status = {name: c.status.value for name, c in checks.items()}
    assert status == {
        "recovery time (max, approx.)": "ALERT",       # 48 s > 30 s
        "recovery time p95 (approx.)": "ALERT",        # 48 s > 20 s
        "recovery success rate (approx.)": "ALERT",    # 50 % < 99.8 %
        "duplicate-effect rate": "OK",
        "state consistency": "OK",
        "retry rate": "ALERT",                         # 4/14 > 10 %
        "success after retry": "ALERT",                # 50 % < 80 %
        "average retry delay": "OK",                   # 8 s
        "largest failure type": "NO DATA",             # 7 failed attempts < 10
        "breaker open longest": "ALERT",               # 700 s > 300 s
        "breaker flapping": "ALERT",                   # 3 trips in 200 s
        "stuck in retries (longest)": "OK",            # 290 s
        "checkpoint latency overhead": "NO DATA",
        "checkpoint storage per task": "OK",             # 200 bytes
    }
    mix = checks["largest failure type"]
    assert mix.value == pytest.approx(2 / 7)
    assert checks["breaker flapping"].value == 3
    assert checks["average retry delay"].value == pytest.approx(8.0)


def test_thresholds_are_overridable_and_validated(crafted: App) -> None:
    m = _window(crafted)
    loose = Thresholds(retry_rate=0.3, success_after_retry_rate=0.5, min_failures=5,
                       failure_type_share=0.25, breaker_flaps=4, average_retry_delay=7.9)
    checks = {c.name: c for c in evaluate(m, loose)}
    assert checks["retry rate"].status is Verdict.OK           # 28.6 % <= 30 %
    assert checks["success after retry"].status is Verdict.OK  # 50 % is not below 50 %
    assert checks["largest failure type"].status is Verdict.ALERT  # 28.6 % > 25 %
    assert checks["breaker flapping"].status is Verdict.OK
    assert checks["average retry delay"].status is Verdict.ALERT
    assert dataclasses.replace(loose, retry_rate=0.2).retry_rate == 0.2
    with pytest.raises(ValueError, match="fraction"):
        Thresholds(retry_rate=10)
    with pytest.raises(ValueError, match=">= 0"):
        Thresholds(recovery_time=-1)


def test_an_empty_store_has_no_data_and_no_alert(make_app: AppFactory) -> None:
    m = compute(make_app().store)
    assert m.workflows == 0 and m.retry_rate is None and m.window_seconds is None
    assert {c.status for c in evaluate(m)} == {Verdict.NO_DATA}


# -- records the engine writes -----------------------------------------------------------
def test_figures_from_a_real_run(make_app: AppFactory) -> None:
    app = make_app()
    calls = {"flaky": 0}

    @app.step(retry=RetryPolicy(max_attempts=3, initial_delay=0.01, jitter="none"))
    def flaky() -> int:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionResetError("reset by peer")
        return 1

    @app.step(effect=True)
    def refund(order: str) -> str:
        return f"refunded {order}"

    @app.workflow(name="real")
    def real(order: str) -> int:
        refund(order, key=f"refund:{order}")
        return flaky()

    assert app.start(real, "o-1", workflow_id="r-1").result(timeout=10) == 1
    calls["flaky"] = 0
    assert app.start(real, "o-1", workflow_id="r-2").result(timeout=10) == 1
    m = compute(app.store, name="real")
    assert m.workflows == 2 and m.workflows_finished == 2
    assert (m.step_calls, m.retried_calls, m.succeeded_after_retry) == (4, 2, 2)
    assert m.failure_counts == {"server_error": 2}
    assert m.retry_delays == 2 and m.average_retry_delay == pytest.approx(0.01)
    assert m.deduplicated_effects == 1  # r-2's refund used r-1's key
    assert m.recovered_workflows == 0 and m.recovery_success_rate is None


def test_checkpoints_from_a_real_run(make_app: AppFactory) -> None:
    app = make_app()

    @app.workflow(name="chatty")
    def chatty() -> int:
        messages = ["hello"]
        crashsafe.checkpoint({"messages": messages})
        messages.append("x" * 1000)
        crashsafe.checkpoint({"messages": messages})
        return len(messages)

    assert app.start(chatty, workflow_id="cp-1").result(timeout=10) == 2
    stored = [len(e.output or b"") for e in app.journal("cp-1") if e.kind == "checkpoint"]
    assert len(stored) == 2 and stored[1] > 1000
    m = compute(app.store, name="chatty")
    assert m.checkpointed_workflows == 1
    assert m.checkpoint_bytes_per_task == sum(stored)


def test_a_recovery_and_an_unknown_outcome_from_a_real_crash(make_app: AppFactory) -> None:
    first = make_app()

    def build(app: App, crash: Any) -> Any:
        @app.step(effect=True, name="charge")
        def charge() -> str:
            crash()
            return "charged"

        @app.workflow(name="crashy")
        def crashy() -> str:
            return charge()

        return crashy

    flow = build(first, lambda: simulate_crash(first, wait=0))
    first.start(flow, workflow_id="c-1")
    wait_idle(first, timeout=5)
    second = make_app()
    build(second, lambda: None)
    [handle] = second.recover()
    assert handle.result(timeout=10) == "charged"
    m = compute(second.store, name="crashy")
    assert (m.recovered_workflows, m.recoveries) == (1, 1)
    assert m.recovery_success_rate == 1.0
    assert m.recovery_time.count == 1 and m.recovery_time.max is not None
    assert 0 <= m.recovery_time.max < 10
    assert m.unknown_outcomes == {"retried with the same key": 1}
    assert m.unknown_outcome_reruns == 1


def test_a_corrupt_record_lowers_state_consistency(make_app: AppFactory) -> None:
    app = make_app()
    craft(app.store)
    raw = app.store.inner  # type: ignore[attr-defined]
    assert raw.apply([[JournalEntry("w-ok", 9, "step", "bad", b"\xffjunk", None, 1,
                                    T + 50, T + 51)]]) == [None]
    m = _window(app)
    assert m.unreadable == ("w-ok",)
    assert m.workflows == 5
    assert m.state_consistency == pytest.approx(5 / 6)
    check = next(c for c in evaluate(m) if c.name == "state consistency")
    assert check.status is Verdict.ALERT and "w-ok" in check.detail


# -- crashsafe stats ---------------------------------------------------------------------
runner = CliRunner()
CLI_KINDS = ["sqlite", "postgres"]  # the command opens the database by URL


@pytest.fixture(params=CLI_KINDS)
def cli_db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db = Database(request.param, tmp_path)
    yield db
    db.close()


def _healthy(store: Store, now: float) -> None:
    assert store.apply([[
        CreateWorkflow(WorkflowRecord("h-1", "agent", "1", Status.SUCCEEDED, NULL,
                                      now - 60, now - 50, output=NULL)),
        JournalEntry("h-1", 0, "step", "fetch", NULL, None, 1, now - 59, now - 58)]]) == [None]


def _retry_storm(store: Store, now: float) -> None:
    """Two of three steps retried (above the 10 % retry-rate threshold), both succeeded."""
    ops: list[Op] = [CreateWorkflow(WorkflowRecord("s-1", "agent", "1", Status.SUCCEEDED,
                                                   NULL, now - 40, now - 30, output=NULL))]
    for i in range(3):
        ops.append(JournalEntry("s-1", i, "step", "llm", NULL, None, 2 if i else 1,
                                now - 39 + i, now - 38 + i))
    assert store.apply([ops]) == [None]


def _stats(url: str, *args: str) -> Any:
    return runner.invoke(cli, ["--db", url, "stats", *args])


def test_stats_check_exit_code_follows_the_thresholds(cli_db: Database) -> None:
    app = App(store=cli_db.connect())
    now = time.time()
    _healthy(app.store, now)
    ok = _stats(cli_db.url, "--check", "--since", "1h")
    assert ok.exit_code == 0, ok.output
    assert "ALERT" not in ok.output.replace("ALERT WHEN", "")
    _retry_storm(app.store, now)
    bad = _stats(cli_db.url, "--check", "--since", "1h")
    assert bad.exit_code == 1, bad.output
    assert "retry rate" in bad.output and "ALERT" in bad.output.replace("ALERT WHEN", "")
    # Without --check the figures print and the exit code stays 0.
    assert _stats(cli_db.url, "--since", "1h").exit_code == 0
    # A looser threshold, given on the command line, silences it.
    loose = _stats(cli_db.url, "--check", "--since", "1h", "--threshold", "retry_rate=0.9")
    assert loose.exit_code == 0, loose.output
    # The window: both workflows ended 30 s ago or more, so the last 10 s hold none.
    recent = _stats(cli_db.url, "--check", "--since", "10s", "--json")
    assert recent.exit_code == 0
    assert json.loads(recent.output)["metrics"]["workflows"] == 0
    app.close()


def test_stats_json_shape(cli_db: Database) -> None:
    app = App(store=cli_db.connect())
    now = time.time()
    _healthy(app.store, now)
    _retry_storm(app.store, now)
    res = _stats(cli_db.url, "--json", "--since", "2h", "--name", "agent")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert set(data) == {"since", "until", "name", "alerts", "checks", "metrics"}
    assert data["name"] == "agent"
    assert data["until"] - data["since"] == pytest.approx(7200, abs=5)
    assert data["alerts"] == sum(c["status"] == "ALERT" for c in data["checks"]) == 1
    [alert] = [c for c in data["checks"] if c["status"] == "ALERT"]
    assert alert["name"] == "retry rate" and alert["unit"] == "ratio"
    for c in data["checks"]:
        assert set(c) == {"name", "value", "threshold", "alert_when", "unit", "status",
                          "detail"}
        assert c["status"] in {"OK", "ALERT", "NO DATA"}
    metrics = data["metrics"]
    assert metrics["workflows"] == 2 and metrics["step_calls"] == 4
    assert metrics["retry_rate"] == pytest.approx(0.5)
    assert metrics["by_status"]["succeeded"] == 2
    assert metrics["step_latency"]["p50"] == pytest.approx(1.0)
    app.close()


def test_stats_hostile_name_and_bad_options(cli_db: Database) -> None:
    app = App(store=cli_db.connect())
    now = time.time()
    _retry_storm(app.store, now)
    for hostile in ("agent' OR '1'='1", "%", "[red]x[/red]"):
        res = _stats(cli_db.url, "--json", "--check", "--name", hostile)
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["metrics"]["workflows"] == 0
        table = _stats(cli_db.url, "--name", hostile)
        assert table.exit_code == 0 and "0 workflows" in table.output
    assert len(app.store.list_workflows(ListFilter())) == 1
    assert _stats(cli_db.url, "--json", "--check").exit_code == 1  # still there, still bad
    for bad in (["--since", "yesterday"], ["--since", "0s"], ["--since", "1h30"],
                ["--threshold", "nonsense=1"], ["--threshold", "retry_rate=abc"],
                ["--threshold", "retry_rate=5"]):
        res = _stats(cli_db.url, *bad)
        assert res.exit_code == 2, (bad, res.output)
    assert _stats(cli_db.url, "--since", "1h30m").exit_code == 0
    app.close()


def test_stats_on_a_missing_database_says_so(tmp_path: Path) -> None:
    res = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path / 'nope.db'}", "stats"])
    assert res.exit_code == 2 and "no database" in res.output



def test_recovery_time_comes_from_the_recovery_log(make_app: AppFactory) -> None:
    app = make_app()
    store = app.store
    # Dead owner last seen at +100; claimed at +130; first resumed step starts at +131.5:
    # 31.5 s. A second takeover (seen +200, claimed +240) followed by the workflow's end
    # at +245 without another entry: 45 s. A takeover never followed by progress and a
    # dead-letter event are not timed.
    store.apply([[_wf("w-log", Status.SUCCEEDED, T, T + 245, token=2)]])
    store.apply([[_step("w-log", 0, "a", 10, 11), _step("w-log", 1, "b", 131.5, 132)]])
    for event in ({"at": T + 130, "from": "ex-1", "seen": T + 100, "by": "ex-2",
                   "outcome": "claimed"},
                  {"at": T + 240, "from": "ex-2", "seen": T + 200, "by": "ex-3",
                   "outcome": "claimed"}):
        _recovery_log.append(store, "w-log", event)
    store.apply([[_wf("w-wait", Status.RUNNING, T, T + 500, token=1)]])
    store.apply([[_step("w-wait", 0, "a", 10, 11)]])
    _recovery_log.append(store, "w-wait", {"at": T + 300, "from": "ex-1", "seen": T + 290,
                                           "by": "ex-2", "outcome": "claimed"})
    _recovery_log.append(store, "w-wait", {"at": T + 310, "from": "ex-2", "seen": None,
                                           "by": "ex-3", "outcome": "dead_letter"})
    m = _window(app)
    assert m.recovery_time == Percentiles(2, 31.5, 45.0, 45.0, 45.0)
    assert (m.recovered_workflows, m.recoveries) == (2, 4)
    assert m.recovery_success_rate == 1.0  # of the ended ones (w-wait still runs)


def test_a_real_takeover_is_logged_with_the_dead_owners_last_heartbeat(
        make_app: AppFactory) -> None:
    first = make_app()

    def build(app: App, crash: Any) -> Any:
        @app.step(name="work")
        def work() -> str:
            crash()
            return "done"

        @app.workflow(name="logged")
        def logged() -> str:
            return work()

        return logged

    first.start(build(first, lambda: simulate_crash(first, wait=0)), workflow_id="r-1")
    wait_idle(first, timeout=5)
    seen = first.store.get_executors([first.executor_id])[first.executor_id].heartbeat_at
    second = make_app()
    build(second, lambda: None)
    [handle] = second.recover()
    assert handle.result(timeout=10) == "done"
    (event,) = second.recoveries("r-1")
    assert event["from"] == first.executor_id and event["by"] == second.executor_id
    assert event["seen"] == seen and event["outcome"] == "claimed"
    assert event["at"] >= seen
    m = compute(second.store, name="logged")
    assert m.recovery_time.count == 1 and m.recovery_time.max is not None
    assert 0 <= m.recovery_time.max < 10


def test_token_usage_and_checkpoint_overhead_from_recorded_checkpoints(
        make_app: AppFactory) -> None:
    app = make_app()

    @app.step(name="think")
    def think(i: int) -> str:
        time.sleep(0.002)
        return f"thought {i}"

    @app.workflow(name="agentic", checkpoint=crashsafe.CheckpointPolicy(
        every_steps=1, recovery_target=60.0))
    def agentic(turns: int) -> int:
        state: dict[str, Any] = {"messages": []}
        crashsafe.track(state)
        for i in range(turns):
            state["messages"].append(think(i))
            crashsafe.record_usage(100 + i, model="model-x")
        return len(state["messages"])

    assert app.start(agentic, 4, workflow_id="t-1").result(timeout=10) == 4
    assert app.start(agentic, 2, workflow_id="t-2").result(timeout=10) == 2
    m = compute(app.store, name="agentic")
    recorded = [c.tokens for c in app.checkpoints("t-1")] + \
               [c.tokens for c in app.checkpoints("t-2")]
    totals = [max(t for t in (c.tokens for c in app.checkpoints(w)) if t is not None)
              for w in ("t-1", "t-2")]
    assert any(t is not None for t in recorded)
    assert m.token_usage == sum(totals) and m.tokens_per_workflow == sum(totals) / 2
    assert m.checkpoint_latency_overhead is not None and m.checkpoint_latency_overhead > 0
    assert set(m.unavailable) == {"cost"}
