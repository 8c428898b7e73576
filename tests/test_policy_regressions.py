"""Regressions found by review of the resilience policies; every store kind."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import crashsafe
from crashsafe import App, Escalation, Hedge, RetryPolicy, Status
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_until
from test_policies import _escalating, auth_error


def test_async_steps_waiting_for_a_slot_hold_no_thread(app: App) -> None:
    """Ten async workflows on a one-slot limit: waiting awaits instead of filling the
    default thread pool (which once deadlocked the slot's own release)."""
    app.concurrency_limit("gpu", 1)
    spans: list[tuple[float, float]] = []

    @app.step(name="infer", limits=["gpu"])
    async def infer(i: int) -> int:
        start = time.monotonic()
        await asyncio.sleep(0.02)
        spans.append((start, time.monotonic()))
        return i

    @app.workflow(name="job")
    async def job(i: int) -> int:
        return await infer(i)

    handles = [app.start(job, i, workflow_id=f"gpu-{i}") for i in range(10)]
    assert [h.result(timeout=20) for h in handles] == list(range(10))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


def test_async_escalations_hold_no_thread(make_app: AppFactory) -> None:
    app = make_app()
    calls: Counter[str] = Counter()

    @app.step(name="ask", retry=RetryPolicy(escalate=True))
    async def ask(q: str) -> str:
        calls["ask"] += 1
        raise auth_error()

    @app.workflow(name="asker")
    async def asker(q: str) -> str:
        return await ask(q)

    app.breaker("dep")

    @app.step(name="ok", breaker="dep")
    async def ok() -> str:
        return "fine"

    @app.workflow(name="unrelated")
    async def unrelated() -> str:
        return await ok()

    handles = [app.start(asker, str(i), workflow_id=f"esc-{i}") for i in range(12)]
    wait_until(lambda: all(h.status() is Status.WAITING for h in handles), timeout=20,
               what="all twelve escalations to park")
    assert app.start(unrelated, workflow_id="other").result(timeout=10) == "fine"
    for i, h in enumerate(handles):
        app.signal(h.workflow_id, "resolve:0", {"action": "value", "value": f"v{i}"})
    assert [h.result(timeout=20) for h in handles] == [f"v{i}" for i in range(12)]


def test_an_answer_sent_while_the_process_was_down_counts(make_app: AppFactory) -> None:
    hooks: list[Escalation] = []
    calls: Counter[str] = Counter()
    first = make_app(on_escalate=hooks.append)
    handle = first.start(_escalating(first, calls, times=99), "q", workflow_id="down")
    wait_until(lambda: handle.status() is Status.WAITING, what="the escalation")
    wait_until(lambda: len(hooks) == 1, what="the hook")
    simulate_crash(first, wait=1)
    first.signal("down", "resolve:0", {"action": "value", "value": "answered meanwhile"})
    second = make_app(on_escalate=hooks.append)
    _escalating(second, calls, times=99)
    (resumed,) = second.recover()
    assert resumed.result(timeout=10) == "answered meanwhile"
    assert [h.key for h in hooks] == ["down:resolve:0:0"]  # no second page for it


def test_a_hedge_never_retries_a_failure(app: App) -> None:
    runs: list[float] = []

    @app.step(name="flaky", retry=RetryPolicy(max_attempts=3, initial_delay=0.0),
              hedge=Hedge(after=0.5))
    def flaky() -> str:
        runs.append(time.monotonic())
        raise ConnectionError("fails fast")

    @app.workflow(name="hedged")
    def hedged() -> str:
        return flaky()

    try:
        app.start(hedged, workflow_id="h").result(timeout=10)
    except ConnectionError:
        pass
    assert len(runs) == 3  # the policy's attempts, not doubled by hedges


def test_a_configuration_error_is_not_retried(app: App) -> None:
    calls: list[int] = []

    @app.step(name="limited", limits=["never-declared"], retry=RetryPolicy(max_attempts=4))
    def limited() -> str:
        calls.append(1)
        return "ran"

    @app.workflow(name="misconfigured")
    def misconfigured() -> str:
        return limited()

    handle = app.start(misconfigured, workflow_id="cfg")
    try:
        handle.result(timeout=10)
    except crashsafe.ConfigurationError as exc:
        assert "no limit named 'never-declared'" in str(exc)
    else:
        raise AssertionError("the step should have failed")
    assert calls == []
    assert app.journal("cfg")[0].attempts == 1


def test_value_without_a_value_is_not_an_answer(make_app: AppFactory) -> None:
    calls: Counter[str] = Counter()
    app = make_app()
    handle = app.start(_escalating(app, calls), "q", workflow_id="novalue")
    wait_until(lambda: handle.status() is Status.WAITING, what="the escalation")
    app.signal("novalue", "resolve:0", {"action": "value"})
    wait_until(lambda: "not understood" in (app.get_workflow("novalue").reason or ""),
               what="the reason to report the bad answer")
    # A value that does not fit the step's return type (str) is refused the same way.
    app.signal("novalue", "resolve:0", {"action": "value", "value": 42})
    wait_until(lambda: "cannot be used" in (app.get_workflow("novalue").reason or ""),
               what="the reason to report the unusable value")
    app.signal("novalue", "resolve:0", {"action": "value", "value": "typed by hand"})
    assert handle.result(timeout=10) == "typed by hand"


