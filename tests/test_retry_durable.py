"""Retry attempts are journaled: a restart continues the count and the remaining delay.

Engine tests run on every store kind; the SIGKILL tests run real processes against a
SQLite file and count executions in an independent ledger.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import crashsafe
from crashsafe import App, RetryPolicy, Status
from crashsafe._errors import recorded_class
from crashsafe.policies.classify import FailureClass
from crashsafe.stores.base import AttemptRecord
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_idle, wait_until

HERE = Path(__file__).parent


def rate_limited(ms: int) -> openai.RateLimitError:
    request = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx.Response(429, headers={"retry-after-ms": str(ms)}, request=request)
    return openai.RateLimitError("Rate limit reached", response=response,  # type: ignore[arg-type]
                                 body={"error": {"code": "rate_limit_exceeded"}})


def auth_error() -> openai.AuthenticationError:
    request = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx.Response(401, request=request)
    return openai.AuthenticationError("Incorrect API key provided", response=response,  # type: ignore[arg-type]
                                      body={"error": {"code": "invalid_api_key"}})


def attempts_of(app: App, wid: str) -> list[AttemptRecord]:
    return app.store.load_attempts(wid)


# -- within one process -------------------------------------------------------------------
def test_always_failing_step_runs_exactly_max_attempts_and_records_each(app: App) -> None:
    calls: list[int] = []

    @app.step(retry=RetryPolicy(max_attempts=4, initial_delay=0.001, jitter="none"))
    def flaky() -> int:
        calls.append(crashsafe.current().attempt or 0)
        raise ConnectionError("upstream reset")

    @app.workflow()
    def flow() -> int:
        return flaky()

    handle = app.start(flow, workflow_id="always-fails")
    with pytest.raises(ConnectionError, match="upstream reset"):
        handle.result(timeout=10)
    assert calls == [1, 2, 3, 4]
    entry = app.journal("always-fails")[0]
    assert entry.attempts == 4
    assert entry.note is not None and "4 attempts" in entry.note
    assert "gave up: all 4 attempts failed" in entry.note
    rows = attempts_of(app, "always-fails")
    assert [r.attempt for r in rows] == [1, 2, 3, 4]
    assert all(r.failure_class == FailureClass.SERVER_ERROR.value for r in rows)
    assert all(r.ended_at is not None for r in rows)
    assert [r.delay for r in rows[:3]] == pytest.approx([0.001, 0.002, 0.004])
    assert {r.delay_source for r in rows[:3]} == {"backoff"}
    # The last attempt's row is closed with the step's entry: no further attempt planned.
    assert (rows[3].delay, rows[3].next_at) == (None, None)


def test_success_after_retry_records_failed_attempts_only(app: App) -> None:
    calls: list[int] = []

    @app.step(retry=RetryPolicy(max_attempts=5, initial_delay=0.001))
    def eventually() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow upstream")
        return "ok"

    @app.workflow()
    def flow() -> str:
        return eventually()

    assert app.start(flow, workflow_id="eventually").result(timeout=10) == "ok"
    entry = app.journal("eventually")[0]
    assert entry.attempts == 3
    rows = attempts_of(app, "eventually")
    assert [(r.attempt, r.failure_class) for r in rows] == [
        (1, "timeout"), (2, "timeout"), (3, None)]  # the third succeeded
    assert rows[2].ended_at is not None


def test_first_attempt_success_writes_no_attempt_rows(app: App) -> None:
    @app.step(retry=RetryPolicy(max_attempts=3))
    def fine() -> int:
        return 1

    @app.workflow()
    def flow() -> int:
        return fine()

    assert app.start(flow, workflow_id="fine").result(timeout=10) == 1
    assert attempts_of(app, "fine") == []
    assert app.journal("fine")[0].note is None


def test_retry_after_header_sets_the_delay_and_its_source(app: App) -> None:
    stamps: list[float] = []

    @app.step(retry=RetryPolicy(max_attempts=2, initial_delay=0.0, jitter="none"))
    def call_llm() -> str:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise rate_limited(300)
        return "answer"

    @app.workflow()
    def flow() -> str:
        return call_llm()

    assert app.start(flow, workflow_id="retry-after").result(timeout=10) == "answer"
    row = attempts_of(app, "retry-after")[0]
    assert row.failure_class == "rate_limited"
    assert row.delay_source == "retry-after-ms header"
    assert row.delay == pytest.approx(0.3)
    assert stamps[1] - stamps[0] >= 0.29


def test_non_retryable_class_fails_at_once_with_the_reason_in_the_timeline(app: App) -> None:
    calls: list[int] = []

    @app.step(retry=RetryPolicy(max_attempts=5, initial_delay=0.001))
    def call_llm() -> str:
        calls.append(1)
        raise auth_error()

    @app.workflow()
    def flow() -> str:
        return call_llm()

    with pytest.raises(crashsafe.WorkflowFailedError, match="AuthenticationError"):
        app.start(flow, workflow_id="auth").result(timeout=10)
    assert calls == [1]
    entry = app.journal("auth")[0]
    assert entry.error is not None and recorded_class(entry.error) == "auth"
    assert entry.note is not None and "auth failures are not retried" in entry.note


def test_recorded_failure_class_survives_replay(make_app: AppFactory) -> None:
    first = make_app()

    def build(app: App) -> Any:
        @app.step(retry=RetryPolicy(max_attempts=1))
        def call_llm() -> str:
            raise auth_error()

        @app.step()
        def after() -> int:
            if app is first:
                simulate_crash(app, wait=0)
            return 1

        @app.workflow()
        def flow() -> str:
            try:
                call_llm()
            except crashsafe.StepError as exc:
                return f"{exc.failure_class}:{after()}"
            return "no error"

        return flow

    flow = build(first)
    first.start(flow, workflow_id="replay-class")
    wait_idle(first)
    second = make_app()
    build(second)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == "auth:1"


# -- across a simulated crash ---------------------------------------------------------------
def test_restart_during_backoff_resumes_the_count_and_the_remaining_delay(
        make_app: AppFactory) -> None:
    calls: list[tuple[int, float]] = []
    policy = RetryPolicy(max_attempts=4, initial_delay=0.6, backoff=1.0, jitter="none")

    def build(app: App) -> Any:
        @app.step(retry=policy)
        def flaky() -> str:
            calls.append((crashsafe.current().attempt or 0, time.time()))
            raise ConnectionError("down")

        @app.workflow()
        def flow() -> str:
            return flaky()

        return flow

    first = make_app()
    first.start(build(first), workflow_id="backoff")
    # Crash during the wait after the second attempt failed.
    wait_until(lambda: len(first.store.load_attempts("backoff")) == 2, what="2 failures")
    simulate_crash(first, wait=1)
    failed_at = first.store.load_attempts("backoff")[-1]
    assert failed_at.next_at is not None
    second = make_app()
    build(second)
    (handle,) = second.recover()
    with pytest.raises(ConnectionError):
        handle.result(timeout=20)
    assert [a for a, _ in calls] == [1, 2, 3, 4]  # 4 in all, across both apps
    # The third attempt waited for the planned instant, not a fresh full delay from 0.
    third_at = calls[2][1]
    assert third_at >= failed_at.next_at - 0.01
    assert second.journal("backoff")[0].attempts == 4


def test_async_step_attempts_continue_after_a_crash(make_app: AppFactory) -> None:
    calls: list[int] = []
    policy = RetryPolicy(max_attempts=3, initial_delay=0.4, backoff=1.0, jitter="none")

    def build(app: App) -> Any:
        @app.step(retry=policy)
        async def flaky() -> str:
            calls.append(crashsafe.current().attempt or 0)
            if len(calls) < 3:
                raise ConnectionResetError("reset")
            return "third time"

        @app.workflow()
        async def flow() -> str:
            return await flaky()

        return flow

    first = make_app()
    first.start(build(first), workflow_id="async-backoff")
    wait_until(lambda: len(first.store.load_attempts("async-backoff")) == 1)
    simulate_crash(first, wait=1)
    second = make_app()
    build(second)
    (handle,) = second.recover()
    assert handle.result(timeout=20) == "third time"
    assert calls == [1, 2, 3]
    rows = second.store.load_attempts("async-backoff")
    assert [(r.attempt, r.failure_class) for r in rows] == [
        (1, "server_error"), (2, "server_error"), (3, None)]


def test_an_attempt_cut_off_by_a_crash_counts_as_used(make_app: AppFactory) -> None:
    calls: list[int] = []

    def build(app: App, crash: bool) -> Any:
        @app.step(retry=RetryPolicy(max_attempts=3, initial_delay=0.001))
        def fragile() -> str:
            n = crashsafe.current().attempt or 0
            calls.append(n)
            if n == 1:
                raise ConnectionError("first try fails")
            if crash:
                simulate_crash(app, wait=0)  # dies inside attempt 2: nothing more lands
            return f"attempt {n}"

        @app.workflow()
        def flow() -> str:
            return fragile()

        return flow

    first = make_app()
    first.start(build(first, True), workflow_id="cut-off")
    wait_idle(first)
    rows = first.store.load_attempts("cut-off")
    assert [(r.attempt, r.ended_at is None) for r in rows] == [(1, False), (2, True)]
    second = make_app()
    build(second, False)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == "attempt 3"
    assert calls == [1, 2, 3]
    rows = second.store.load_attempts("cut-off")
    assert rows[1].failure_class == "crashed"
    note = second.journal("cut-off")[0].note
    assert note is not None and "#2 crashed" in note


def test_last_attempt_cut_off_by_a_crash_fails_the_step(make_app: AppFactory) -> None:
    def build(app: App, crash: bool) -> Any:
        @app.step(retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
        def fragile() -> str:
            if crashsafe.current().attempt == 1:
                raise ConnectionError("first try fails")
            if crash:
                simulate_crash(app, wait=0)
                return "lost with the crashed app"
            raise AssertionError("attempt 3 must never run")

        @app.workflow()
        def flow() -> str:
            return fragile()

        return flow

    first = make_app()
    first.start(build(first, True), workflow_id="no-attempts-left")
    wait_idle(first)
    second = make_app()
    build(second, False)
    (handle,) = second.recover()
    with pytest.raises(crashsafe.StepCrashedError, match="cut off by a crash"):
        handle.result(timeout=10)
    assert second.store.get_workflow("no-attempts-left").status is Status.FAILED  # type: ignore[union-attr]


# -- real processes, SIGKILL ------------------------------------------------------------------
def _run_worker(db: Path, ledger: Path, mode: str, timeout: float = 60) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "retry_worker.py"), str(db), str(ledger), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )


def _executions(ledger: Path) -> list[int]:
    conn = sqlite3.connect(ledger)
    try:
        return [r[0] for r in conn.execute("SELECT attempt FROM executions ORDER BY rowid")]
    except sqlite3.OperationalError:  # the worker has not created its table yet
        return []
    finally:
        conn.close()


@pytest.mark.slow
def test_poison_step_that_kills_its_process_runs_exactly_max_attempts(tmp_path: Path) -> None:
    """R9: attempt 1 fails normally, every later attempt SIGKILLs its own process. Across
    restarts the step runs exactly max_attempts (4) times, then fails; never a loop."""
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    outcomes = []
    for _ in range(8):  # more restarts than attempts: the count, not luck, must stop it
        proc = _run_worker(db, ledger, "poison")
        out, err = proc.communicate(timeout=60)
        outcomes.append(proc.returncode)
        if proc.returncode == 0:
            break
    assert outcomes[:3] == [-signal.SIGKILL] * 3, (outcomes, err)
    assert outcomes[-1] == 0 and "failed StepCrashedError" in out, (outcomes, out, err)
    assert _executions(ledger) == [1, 2, 3, 4]


@pytest.mark.slow
def test_kill_during_backoff_keeps_the_total_at_max_attempts(tmp_path: Path) -> None:
    """An always-failing step with 5 attempts and 0.3 s backoff, the process SIGKILLed
    (from outside) during each backoff until the step gives up: 5 executions in all."""
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    kills = 0
    for _round in range(12):
        proc = _run_worker(db, ledger, "always-fails")
        assert proc.stdout is not None
        done = False
        deadline = time.monotonic() + 30
        seen = len(_executions(ledger)) if ledger.exists() else 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                done = True
                break
            now_seen = len(_executions(ledger)) if ledger.exists() else 0
            if now_seen > seen:
                time.sleep(0.1)  # inside the 0.3 s backoff
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += proc.returncode == -signal.SIGKILL
                break
            time.sleep(0.01)
        if done:
            out = proc.stdout.read()
            assert "failed ConnectionError" in out, out
            break
    else:
        pytest.fail("the workflow never finished")
    assert kills >= 3, f"only {kills} kills landed during a backoff"
    assert _executions(ledger) == [1, 2, 3, 4, 5]


# -- long waits free the worker -----------------------------------------------------------------
def _suspending_flow(app: App, calls: list[int]) -> Any:
    policy = RetryPolicy(max_attempts=3, initial_delay=0.8, backoff=1.0, jitter="none",
                         suspend_after=0.2)

    @app.step(retry=policy)
    def slow_to_recover() -> str:
        calls.append(crashsafe.current().attempt or 0)
        if len(calls) == 1:
            raise ConnectionError("try again later")
        return "recovered"

    @app.workflow()
    def flow() -> str:
        return slow_to_recover()

    return flow


def test_a_distant_retry_parks_the_workflow_and_frees_its_thread(app: App) -> None:
    calls: list[int] = []
    handle = app.start(_suspending_flow(app, calls), workflow_id="parked")
    wait_until(lambda: handle.status() is Status.WAITING, what="the workflow to park")
    rec = app.store.get_workflow("parked")
    assert rec is not None and rec.reason is not None and "retries at" in rec.reason
    # No thread holds it while it waits (it leaves the running set right after parking).
    wait_until(lambda: "parked" not in app._executions or calls == [1, 2],
               what="the parked workflow to leave the running set")
    assert calls == [1], "the second attempt ran before its delay"
    assert handle.result(timeout=10) == "recovered"
    assert calls == [1, 2]
    assert handle.status() is Status.SUCCEEDED


def test_cancelling_a_parked_workflow_takes_effect_at_once(app: App) -> None:
    calls: list[int] = []
    policy = RetryPolicy(max_attempts=2, initial_delay=30, jitter="none", suspend_after=0.1)

    @app.step(retry=policy)
    def never_soon() -> str:
        calls.append(1)
        raise ConnectionError("down for a while")

    @app.workflow()
    def flow() -> str:
        return never_soon()

    handle = app.start(flow, workflow_id="parked-cancel")
    wait_until(lambda: handle.status() is Status.WAITING, what="the workflow to park")
    handle.cancel()
    wait_until(lambda: handle.status() is Status.CANCELLED, timeout=5,
               what="the parked workflow to be cancelled")
    assert calls == [1]


def test_a_parked_workflow_of_a_crashed_process_is_resumed_by_another(
        make_app: AppFactory) -> None:
    calls: list[int] = []
    first = make_app()
    handle = first.start(_suspending_flow(first, calls), workflow_id="parked-crash")
    wait_until(lambda: handle.status() is Status.WAITING, what="the workflow to park")
    simulate_crash(first, wait=1)
    second = make_app()
    _suspending_flow(second, calls)
    (resumed,) = second.recover()
    assert resumed.result(timeout=10) == "recovered"
    assert calls == [1, 2]


def test_time_left_counts_down_from_the_step_timeout(app: App) -> None:
    seen: list[float | None] = []

    @app.step(timeout=5.0)
    def bounded() -> None:
        seen.append(crashsafe.current().time_left())

    @app.step()
    def unbounded() -> None:
        seen.append(crashsafe.current().time_left())

    @app.workflow()
    def flow() -> None:
        bounded()
        unbounded()

    app.start(flow, workflow_id="time-left").result(timeout=10)
    assert seen[0] is not None and 4.0 < seen[0] <= 5.0
    assert seen[1] is None
