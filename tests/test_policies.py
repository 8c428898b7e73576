"""Resilience policies wired into real steps: circuit breakers, retry budgets, rate and
concurrency limits, hedged requests, fallback chains and escalation to a person.

Every engine test runs on each store kind (memory, SQLite file, PostgreSQL). Failures
are the real exception types of ``openai`` (built on real ``httpx`` responses) or
builtins; executions are counted in the step bodies, and waits are polled, never slept.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import httpx2
import msgspec
import openai
import pytest

import crashsafe
from crashsafe import (
    App,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    Escalation,
    Hedge,
    RetryBudget,
    RetryBudgetExhaustedError,
    RetryPolicy,
    Status,
    StepError,
    WorkflowFailedError,
)
from crashsafe.policies import breaker as _b
from crashsafe.policies import limits as _l
from crashsafe.policies.breaker import BreakerState
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_idle, wait_until

ACTIONS = ("retry", "fallback", "abort", "value")


# -- real provider errors -------------------------------------------------------------------
def _response(status: int) -> httpx2.Response:
    # The openai SDK is built on httpx2 (the httpx fork): its errors carry its responses.
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    return httpx2.Response(status, request=request)


def server_error() -> openai.InternalServerError:
    return openai.InternalServerError("The server had an error", response=_response(500),
                                      body={"error": {"type": "server_error"}})


def bad_request() -> openai.BadRequestError:
    return openai.BadRequestError("Invalid 'messages'", response=_response(400),
                                  body={"error": {"type": "invalid_request_error"}})


def auth_error(message: str = "Incorrect API key provided") -> openai.AuthenticationError:
    return openai.AuthenticationError(message, response=_response(401),
                                      body={"error": {"code": "invalid_api_key"}})


# -- helpers ----------------------------------------------------------------------------------
def breaker_doc(app: App, key: str = "breaker:dep") -> tuple[_b.Doc, float]:
    raw, now = app.store.read_shared(key)
    return _b.load(raw), now


def wait_for_probe_time(app: App, key: str = "breaker:dep") -> None:
    """Poll the store's clock until the open breaker under ``key`` admits a probe."""
    def due() -> bool:
        doc, now = breaker_doc(app, key)
        return doc.state == BreakerState.OPEN and now >= doc.until
    wait_until(due, what=f"{key} to be due for a probe")


def outcome(app: App, wid: str, timeout: float = 10.0) -> Any:
    """The workflow's result, or the exception its handle raises."""
    try:
        return app.handle(wid).result(timeout=timeout)
    except Exception as exc:
        return exc


def crash_and_recover(make_app: AppFactory, build: Callable[[App, Callable[[], None]], Any],
                      wid: str, **app_kwargs: Any) -> tuple[App, Any]:
    """Run ``build``'s workflow until a step calls ``crash()``; recover it on a new app."""
    first = make_app(**app_kwargs)
    flow = build(first, lambda: simulate_crash(first, wait=0))
    first.start(flow, workflow_id=wid)
    wait_idle(first)
    assert first.get_workflow(wid).status is Status.RUNNING, "the first app should crash"
    second = make_app(**app_kwargs)
    build(second, lambda: None)
    (handle,) = second.recover()
    return second, handle


def waiting_reason(app: App, wid: str) -> str:
    wait_until(lambda: app.get_workflow(wid).status is Status.WAITING, what=f"{wid} waiting")
    return app.get_workflow(wid).reason or ""


# -- circuit breakers -------------------------------------------------------------------------
def test_breaker_fails_fast_when_open_then_one_probe_closes_it(app: App) -> None:
    cfg = app.breaker("dep", consecutive_failures=2, open_for=0.5)
    calls: list[str] = []
    healthy = threading.Event()
    gate = threading.Event()

    @app.step(breaker=cfg)
    def call_dep(wid: str) -> str:
        calls.append(wid)
        if not healthy.is_set():
            raise server_error()
        assert gate.wait(10), "the test never released the probe"
        return f"ok {wid}"

    @app.workflow(name="uses_dep")
    def uses_dep(wid: str) -> str:
        return call_dep(wid)

    for wid in ("f1", "f2"):
        app.start(uses_dep, wid, workflow_id=wid)
        assert isinstance(outcome(app, wid), WorkflowFailedError)
    doc, _ = breaker_doc(app)
    assert (doc.state, doc.why, doc.trips) == (BreakerState.OPEN, "2 failures in a row", 1)

    app.start(uses_dep, "fast", workflow_id="fast")
    with pytest.raises(CircuitOpenError, match="circuit breaker 'dep' is open") as info:
        app.handle("fast").result(timeout=10)
    assert info.value.breaker == "dep"
    assert calls == ["f1", "f2"], "an open breaker must not call the body"
    entry = app.journal("fast")[0]
    assert entry.error is not None and entry.output is None

    wait_for_probe_time(app)
    healthy.set()
    app.start(uses_dep, "probe", workflow_id="probe")
    wait_until(lambda: "probe" in calls, what="the probe to start")
    assert breaker_doc(app)[0].state == BreakerState.HALF_OPEN
    for wid in ("during-1", "during-2"):
        app.start(uses_dep, wid, workflow_id=wid)
        with pytest.raises(CircuitOpenError, match="half-open with its one probe in flight"):
            app.handle(wid).result(timeout=10)
    assert calls == ["f1", "f2", "probe"], "exactly one probe runs while half-open"

    gate.set()
    assert app.handle("probe").result(timeout=10) == "ok probe"
    doc, _ = breaker_doc(app)
    assert doc.state == BreakerState.CLOSED
    assert doc.probe is None
    assert [h[1:3] for h in doc.history] == [["closed", "open"], ["open", "half_open"],
                                            ["half_open", "closed"]]
    app.start(uses_dep, "after", workflow_id="after")
    assert app.handle("after").result(timeout=10) == "ok after"
    assert calls[-1] == "after"


def test_a_failed_probe_reopens_the_breaker(app: App) -> None:
    calls = Counter[str]()

    @app.step(breaker=CircuitBreaker("dep", consecutive_failures=1, open_for=0.3))
    def call_dep() -> str:
        calls["dep"] += 1
        raise ConnectionError("still down")

    @app.workflow(name="w")
    def w() -> str:
        return call_dep()

    app.start(w, workflow_id="trip")
    assert isinstance(outcome(app, "trip"), ConnectionError)
    wait_for_probe_time(app)
    app.start(w, workflow_id="probe")
    assert isinstance(outcome(app, "probe"), ConnectionError)
    assert calls["dep"] == 2
    doc, now = breaker_doc(app)
    assert (doc.state, doc.why, doc.trips) == (BreakerState.OPEN, "the half-open probe failed", 2)
    assert doc.until > now - 0.3
    app.start(w, workflow_id="rejected")
    assert isinstance(outcome(app, "rejected"), CircuitOpenError)
    assert calls["dep"] == 2


def test_failures_the_dependency_is_not_to_blame_for_do_not_trip_it(app: App) -> None:
    app.breaker("dep", consecutive_failures=2, open_for=60)
    script = iter([server_error, bad_request, bad_request, server_error, server_error])
    calls = Counter[str]()

    @app.step(breaker="dep")
    def call_dep() -> str:
        calls["dep"] += 1
        raise next(script)()

    @app.workflow(name="w")
    def w() -> str:
        return call_dep()

    for i in range(4):
        app.start(w, workflow_id=f"w{i}")
        err = outcome(app, f"w{i}")
        assert isinstance(err, WorkflowFailedError)
        assert breaker_doc(app)[0].state == BreakerState.CLOSED, (
            "a 500, two 400s and a 500: the bad requests broke the streak")
    assert "BadRequestError" in str(outcome(app, "w1"))
    app.start(w, workflow_id="w4")
    outcome(app, "w4")
    doc, _ = breaker_doc(app)
    assert (doc.state, doc.why) == (BreakerState.OPEN, "2 failures in a row")
    assert calls["dep"] == 5


def test_a_bad_request_never_trips_the_breaker(app: App) -> None:
    app.breaker("dep", consecutive_failures=1, open_for=60)
    calls = Counter[str]()

    @app.step(breaker="dep")
    def call_dep() -> str:
        calls["dep"] += 1
        raise bad_request()

    @app.workflow(name="w")
    def w() -> str:
        return call_dep()

    for i in range(3):
        app.start(w, workflow_id=f"w{i}")
        assert "BadRequestError" in str(outcome(app, f"w{i}"))
    assert calls["dep"] == 3
    app._resilience.flush()
    doc, _ = breaker_doc(app)
    assert doc.state == BreakerState.CLOSED
    assert _b.counts(doc) == (3, 0), "an answered bad request shows the dependency is up"


def test_breaker_state_survives_a_restart(make_app: AppFactory) -> None:
    calls = Counter[str]()

    def build(app: App) -> Any:
        app.breaker("dep", consecutive_failures=1, open_for=60)

        @app.step(breaker="dep")
        def call_dep() -> str:
            calls["dep"] += 1
            raise ConnectionError("down")

        @app.workflow(name="w")
        def w() -> str:
            return call_dep()

        return w

    first = make_app()
    first.start(build(first), workflow_id="trip")
    assert isinstance(outcome(first, "trip"), ConnectionError)
    first.close()
    second = make_app()
    second.start(build(second), workflow_id="after-restart")
    err = outcome(second, "after-restart")
    assert isinstance(err, CircuitOpenError)
    assert "1 failures in a row" in str(err)
    assert calls["dep"] == 1


def test_an_async_step_fails_fast_on_an_open_breaker(app: App) -> None:
    calls = Counter[str]()

    @app.step(breaker=CircuitBreaker("dep", consecutive_failures=1, open_for=60))
    async def call_dep() -> str:
        calls["dep"] += 1
        raise server_error()

    @app.workflow(name="w")
    async def w() -> str:
        return await call_dep()

    app.start(w, workflow_id="trip")
    assert "InternalServerError" in str(outcome(app, "trip"))
    app.start(w, workflow_id="fast")
    assert isinstance(outcome(app, "fast"), CircuitOpenError)
    assert calls["dep"] == 1


def test_process_scoped_breakers_are_kept_per_executor(make_app: AppFactory) -> None:
    calls = Counter[str]()

    def build(app: App) -> Any:
        @app.step(breaker=CircuitBreaker("dep", consecutive_failures=1, open_for=60,
                                         scope="process"))
        def call_dep() -> str:
            calls[app.executor_id] += 1
            raise ConnectionError("down")

        @app.workflow(name="w")
        def w() -> str:
            return call_dep()

        return w

    one, two = make_app(), make_app()
    w1, w2 = build(one), build(two)
    one.start(w1, workflow_id="one-trips")
    assert isinstance(outcome(one, "one-trips"), ConnectionError)
    two.start(w2, workflow_id="two-still-calls")
    assert isinstance(outcome(two, "two-still-calls"), ConnectionError), "not one's breaker"
    one.start(w1, workflow_id="one-fast")
    assert isinstance(outcome(one, "one-fast"), CircuitOpenError)
    assert calls == {one.executor_id: 1, two.executor_id: 1}
    keys = [k for k, _, _ in one.store.list_shared("breaker:")]
    assert keys == sorted([f"breaker:dep@process:{one.executor_id}",
                           f"breaker:dep@process:{two.executor_id}"])


def test_workflow_in_the_name_keeps_one_breaker_per_agent(app: App) -> None:
    app.breaker("openai:{workflow}", consecutive_failures=1, open_for=60)
    calls = Counter[str]()

    @app.step(breaker="openai:{workflow}")
    def call_dep(agent: str) -> str:
        calls[agent] += 1
        raise ConnectionError("down")

    @app.workflow(name="triage")
    def triage() -> str:
        return call_dep("triage")

    @app.workflow(name="refunds")
    def refunds() -> str:
        return call_dep("refunds")

    app.start(triage, workflow_id="t1")
    assert isinstance(outcome(app, "t1"), ConnectionError)
    app.start(triage, workflow_id="t2")
    assert isinstance(outcome(app, "t2"), CircuitOpenError)
    app.start(refunds, workflow_id="r1")
    assert isinstance(outcome(app, "r1"), ConnectionError), "another agent's breaker is closed"
    assert calls == {"triage": 1, "refunds": 1}
    assert [k for k, _, _ in app.store.list_shared("breaker:")] == [
        "breaker:openai:refunds", "breaker:openai:triage"]


# -- retry budgets ----------------------------------------------------------------------------
def test_retry_budget_is_shared_and_exhaustion_fails_fast(app: App) -> None:
    budget = RetryBudget("b", ratio=0.1, burst=1)
    policy = RetryPolicy(max_attempts=5, initial_delay=0, budget=budget)
    calls = Counter[str]()
    failing = threading.Event()
    failing.set()

    @app.step(retry=policy)
    def call_dep(wid: str) -> str:
        calls[wid] += 1
        if failing.is_set():
            raise ConnectionError("down")
        return "ok"

    @app.workflow(name="w")
    def w(wid: str, n: int = 1) -> list[str]:
        return [call_dep(wid) for _ in range(n)]

    app.start(w, "first", workflow_id="first")
    err = outcome(app, "first")
    assert isinstance(err, RetryBudgetExhaustedError)
    assert calls["first"] == 2, "the bucket's one token bought one retry"
    app.start(w, "second", workflow_id="second")
    err = outcome(app, "second")
    assert isinstance(err, RetryBudgetExhaustedError)
    assert "retry budget 'b' is empty" in str(err)
    assert "10%" in str(err) and "ConnectionError: down" in str(err)
    assert calls["second"] == 1, "no token: the failure is not retried"
    note = app.journal("second")[0].note or ""
    assert "retry budget 'b' is empty" in note

    # First calls deposit ratio x calls; the app flushes them to the store.
    failing.clear()
    app.start(w, "healthy", 12, workflow_id="healthy")
    assert outcome(app, "healthy") == ["ok"] * 12
    app._resilience.flush()
    raw, _ = app.store.read_shared("budget:b")
    assert raw is not None
    assert msgspec.json.decode(raw)["tokens"] == pytest.approx(1.0)
    failing.set()
    app.start(w, "third", workflow_id="third")
    assert isinstance(outcome(app, "third"), RetryBudgetExhaustedError)
    assert calls["third"] == 2, "the refilled token bought one more retry"


def test_ten_deposits_of_a_tenth_buy_one_retry() -> None:
    budget = RetryBudget("b", ratio=0.1, burst=1)
    raw, allowed = _l.withdraw(budget, None, 0.0, 0)
    assert allowed
    for _ in range(10):
        raw = _l.deposit(budget, raw, 1.0, 1)
    raw, allowed = _l.withdraw(budget, raw, 2.0, 0)
    assert allowed, "retries are limited to 10 % of calls: ten calls earn one"
    assert not _l.withdraw(budget, raw, 3.0, 0)[1]
    assert not _l.withdraw(budget, raw, 3.0, 9)[1]
    assert _l.withdraw(budget, raw, 3.0, 10)[1]


# -- rate and concurrency limits ------------------------------------------------------------
def test_rate_limit_spaces_calls_out(app: App) -> None:
    app.rate_limit("rpm", rate=20, per=1.0, burst=1)
    stamps: list[float] = []

    @app.step(limits=["rpm"])
    def call_api(i: int) -> int:
        stamps.append(time.monotonic())
        return i

    @app.workflow(name="w")
    def w() -> list[int]:
        return [call_api(i) for i in range(6)]

    t0 = time.monotonic()
    assert app.start(w).result(timeout=20) == list(range(6))
    assert time.monotonic() - t0 >= 0.2, "6 calls at 20/s with a burst of 1 take >= 0.25 s"
    assert stamps[-1] - stamps[0] >= 0.2


def test_a_rate_limit_is_shared_by_apps_on_one_store(make_app: AppFactory) -> None:
    stamps: list[float] = []

    def build(app: App) -> Any:
        app.rate_limit("rpm", rate=20, per=1.0, burst=1)

        @app.step(name="call_api", limits=["rpm"])
        def call_api(i: int) -> int:
            stamps.append(time.monotonic())
            return i

        @app.workflow(name="w")
        def w(i: int) -> int:
            return call_api(i)

        return w

    one, two = make_app(), make_app()
    w1, w2 = build(one), build(two)
    handles = [(one if i % 2 else two).start(w1 if i % 2 else w2, i, workflow_id=f"r{i}")
               for i in range(6)]
    assert sorted(h.result(timeout=20) for h in handles) == list(range(6))
    assert max(stamps) - min(stamps) >= 0.2, "six calls at 20/s share one bucket"


def test_concurrency_limit_runs_one_at_a_time(app: App) -> None:
    app.concurrency_limit("gpu", 1)
    intervals: list[tuple[float, float]] = []

    @app.step(limits=["gpu"])
    def render(i: int) -> int:
        start = time.monotonic()
        time.sleep(0.05)
        intervals.append((start, time.monotonic()))
        return i

    @app.workflow(name="w")
    def w(i: int) -> int:
        return render(i)

    handles = [app.start(w, i, workflow_id=f"gpu-{i}") for i in range(3)]
    assert [h.result(timeout=20) for h in handles] == [0, 1, 2]
    assert len(intervals) == 3
    ordered = sorted(intervals)
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert start >= end, f"two holders of a 1-slot limit overlapped: {ordered}"
    assert app.store.read_shared("concurrency:gpu")[0] is None, "every slot was released"


def test_an_undeclared_limit_name_is_a_configuration_error(app: App) -> None:
    calls = Counter[str]()

    @app.step(limits=["openai-rpm"])
    def call_api() -> int:
        calls["api"] += 1
        return 1

    @app.workflow(name="w")
    def w() -> int:
        return call_api()

    with pytest.raises(ConfigurationError, match=r"app\.rate_limit\('openai-rpm'"):
        app.start(w).result(timeout=10)
    assert calls["api"] == 0


def test_limits_must_be_a_list_not_a_name(app: App) -> None:
    with pytest.raises(ConfigurationError, match=r"limits=\['openai-rpm'\]"):
        @app.step(limits="gpu")
        def step() -> None: ...


def test_a_crashed_holders_slot_frees_after_its_lease(app: App) -> None:
    lim = app.concurrency_limit("gpu", 1, lease=0.5)
    assert app.store.update_shared(
        lim.key, lambda raw, now: _l.take_slot(lim, raw, now, "dead-worker:wf:0:1")) == 0.0
    raw, _ = app.store.read_shared(lim.key)
    assert raw is not None
    expires = msgspec.json.decode(raw, type=_l.Slots).holders["dead-worker:wf:0:1"]
    started: list[float] = []

    @app.step(limits=["gpu"])
    def render() -> str:
        started.append(time.time())
        return "rendered"

    @app.workflow(name="w")
    def w() -> str:
        return render()

    assert app.start(w).result(timeout=10) == "rendered"
    assert len(started) == 1
    assert started[0] >= expires - 0.05, "the body ran while the dead holder's lease held"


# -- hedged requests ----------------------------------------------------------------------------
def test_async_hedge_fast_call_wins_and_the_slow_one_is_cancelled(app: App) -> None:
    counter = itertools.count()
    cancelled = threading.Event()

    @app.step(hedge=Hedge(after=0.05))
    async def ask(q: str) -> str:
        if next(counter) == 0:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "slow"
        return f"fast answer to {q}"

    @app.workflow(name="w")
    async def w() -> str:
        return await ask("q")

    app.start(w, workflow_id="h")
    assert outcome(app, "h") == "fast answer to q"
    wait_until(cancelled.is_set, what="the losing call to be cancelled")
    note = app.journal("h")[0].note or ""
    assert "hedged: 1 extra call(s)" in note and "hedge 1 answered" in note


def test_sync_hedge_fast_call_wins(app: App) -> None:
    counter = itertools.count()
    release = threading.Event()
    finished: list[str] = []

    @app.step(hedge=Hedge(after=0.05))
    def ask(q: str) -> str:
        if next(counter) == 0:
            release.wait(10)
            finished.append("slow")
            return "slow"
        return f"fast answer to {q}"

    @app.workflow(name="w")
    def w() -> str:
        return ask("q")

    try:
        assert app.start(w, workflow_id="h").result(timeout=10) == "fast answer to q"
        note = app.journal("h")[0].note or ""
        assert "hedged" in note and "hedge 1 answered" in note
        assert finished == [], "the winner did not wait for the slow call"
    finally:
        release.set()
    wait_until(lambda: finished == ["slow"], what="the loser thread to finish")
    assert app.journal("h")[0].note == note, "the loser's late result changes nothing"


def test_an_alternative_serves_the_hedge(app: App) -> None:
    release = threading.Event()

    async def other_provider(q: str) -> str:
        return f"other: {q}"

    @app.step(hedge=Hedge(after=0.05, alternative=other_provider))
    async def ask(q: str) -> str:
        await asyncio.sleep(30)
        return "slow"

    @app.workflow(name="w")
    async def w() -> str:
        return await ask("q")

    try:
        app.start(w, workflow_id="h")
        assert outcome(app, "h") == "other: q"
    finally:
        release.set()


def test_max_per_workflow_zero_disables_hedging(app: App) -> None:
    calls = Counter[str]()

    @app.step(hedge=Hedge(after=0.01, max_per_workflow=0))
    async def ask() -> str:
        calls["ask"] += 1
        await asyncio.sleep(0.15)
        return "only call"

    @app.workflow(name="w")
    async def w() -> str:
        return await ask()

    app.start(w, workflow_id="h")
    assert outcome(app, "h") == "only call"
    assert calls["ask"] == 1
    assert "hedged" not in (app.journal("h")[0].note or "")


def test_the_hedge_budget_is_per_workflow(app: App) -> None:
    calls = Counter[int]()

    @app.step(hedge=Hedge(after=0.02, max_per_workflow=1))
    def ask(i: int) -> int:
        calls[i] += 1
        time.sleep(0.15)
        return i

    @app.workflow(name="w")
    def w() -> list[int]:
        return [ask(0), ask(1), ask(2)]

    assert app.start(w, workflow_id="h").result(timeout=10) == [0, 1, 2]
    assert calls == {0: 2, 1: 1, 2: 1}, "one hedge in all, then none"
    notes = [e.note or "" for e in app.journal("h")]
    assert ["hedged" in n for n in notes] == [True, False, False]


def test_hedging_an_effect_step_needs_a_safe_alternative(app: App) -> None:
    with pytest.raises(ConfigurationError, match="would apply it twice"):
        @app.step(effect=True, hedge=Hedge(after=0.1))
        def charge(amount: int) -> str:
            return "charged"

    @app.step(effect=True, hedge=Hedge(after=0.1, alternative=lambda amount: "looked up"))
    def refund(amount: int) -> str:
        return "refunded"

    assert refund.hedge is not None


def test_a_replayed_hedged_step_returns_the_recorded_winner(make_app: AppFactory) -> None:
    calls = Counter[str]()
    counter = itertools.count()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="ask", hedge=Hedge(after=0.05))
        async def ask() -> str:
            n = next(counter)
            calls["ask"] += 1
            if n == 0:
                await asyncio.sleep(30)
            return f"call {n}"

        @app.step(name="after")
        async def after() -> str:
            crash()
            return "after"

        @app.workflow(name="w")
        async def w() -> list[str]:
            return [await ask(), await after()]

        return w

    second, handle = crash_and_recover(make_app, build, "h")
    assert calls["ask"] == 2
    assert handle.result(timeout=10) == ["call 1", "after"]
    assert calls["ask"] == 2, "replay returned the recorded winner without calling"
    assert "hedge 1 answered" in (second.journal("h")[0].note or "")


def test_hedges_replayed_after_a_crash_still_count_against_the_budget(
        make_app: AppFactory) -> None:
    calls = Counter[Any]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="ask", hedge=Hedge(after=0.02, max_per_workflow=1))
        def ask(i: int) -> int:
            calls[i] += 1
            time.sleep(0.15)
            return i

        @app.step(name="mid")
        def mid() -> int:
            calls["mid"] += 1
            crash()
            return -1

        @app.workflow(name="w")
        def w() -> list[int]:
            return [ask(0), mid(), ask(1)]

        return w

    _, handle = crash_and_recover(make_app, build, "h")
    assert handle.result(timeout=10) == [0, -1, 1]
    assert calls == {0: 2, "mid": 2, 1: 1}, "the replayed hedge used the workflow's budget"


# -- fallback chains ------------------------------------------------------------------------
def _chain(app: App, primary_fails: Callable[[], Exception] | None,
           calls: Counter[str], *, on: Callable[[BaseException], bool] | None = None,
           breaker: CircuitBreaker | None = None) -> Any:
    @app.step(name="primary", breaker=breaker)
    def primary(prompt: str) -> str:
        calls["primary"] += 1
        if primary_fails is not None:
            raise primary_fails()
        return f"primary: {prompt}"

    @app.step(name="backup")
    def backup(prompt: str) -> str:
        calls["backup"] += 1
        return f"backup: {prompt}"

    @app.workflow(name="ask")
    def ask(prompt: str) -> str:
        return crashsafe.fallback(primary, backup, on=on)(prompt)

    return ask


@pytest.mark.parametrize("error", [server_error, lambda: ConnectionError("reset"),
                                   lambda: httpx.ConnectError("connection refused")])
def test_fallback_moves_on_after_a_server_error(app: App,
                                                error: Callable[[], Exception]) -> None:
    calls = Counter[str]()
    ask = _chain(app, error, calls)
    assert app.start(ask, "hi", workflow_id="f").result(timeout=10) == "backup: hi"
    assert calls == {"primary": 1, "backup": 1}
    journal = app.journal("f")
    assert [(e.name, e.error is not None) for e in journal] == [("primary", True),
                                                               ("backup", False)]


def test_fallback_uses_the_primary_when_it_answers(app: App) -> None:
    calls = Counter[str]()
    ask = _chain(app, None, calls)
    assert app.start(ask, "hi", workflow_id="f").result(timeout=10) == "primary: hi"
    assert calls == {"primary": 1}
    assert [e.name for e in app.journal("f")] == ["primary"]


def test_fallback_raises_a_bad_request_without_trying_the_backup(app: App) -> None:
    calls = Counter[str]()
    ask = _chain(app, bad_request, calls)
    with pytest.raises(WorkflowFailedError, match="BadRequestError"):
        app.start(ask, "hi", workflow_id="f").result(timeout=10)
    assert calls == {"primary": 1}
    assert [e.name for e in app.journal("f")] == ["primary"]


def test_fallback_skips_a_primary_whose_breaker_is_open(app: App) -> None:
    calls = Counter[str]()
    ask = _chain(app, server_error, calls,
                 breaker=CircuitBreaker("primary", consecutive_failures=1, open_for=60))
    assert app.start(ask, "one", workflow_id="trips").result(timeout=10) == "backup: one"
    assert calls == {"primary": 1, "backup": 1}
    assert app.start(ask, "two", workflow_id="skips").result(timeout=10) == "backup: two"
    assert calls == {"primary": 1, "backup": 2}, "the open breaker kept the primary uncalled"
    first = app.journal("skips")[0]
    assert first.name == "primary" and first.error is not None
    assert b"CircuitOpenError" in first.error


def test_fallback_replay_after_a_crash_calls_nothing_again(make_app: AppFactory) -> None:
    calls = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="primary")
        def primary(prompt: str) -> str:
            calls["primary"] += 1
            raise server_error()

        @app.step(name="backup")
        def backup(prompt: str) -> str:
            calls["backup"] += 1
            return f"backup: {prompt}"

        @app.step(name="deliver")
        def deliver(answer: str) -> str:
            calls["deliver"] += 1
            crash()
            return f"delivered {answer}"

        @app.workflow(name="ask")
        def ask() -> str:
            return deliver(crashsafe.fallback(primary, backup)("hi"))

        return ask

    second, handle = crash_and_recover(make_app, build, "f")
    assert handle.result(timeout=10) == "delivered backup: hi"
    assert calls == {"primary": 1, "backup": 1, "deliver": 2}
    assert [e.name for e in second.journal("f")] == ["primary", "backup", "deliver"]


def test_fallback_on_predicate_overrides_the_class_rule(app: App) -> None:
    calls = Counter[str]()
    seen: list[BaseException] = []

    def everything(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    ask = _chain(app, bad_request, calls, on=everything)
    assert app.start(ask, "hi", workflow_id="f1").result(timeout=10) == "backup: hi"
    assert calls == {"primary": 1, "backup": 1}
    # Workflow code sees the recorded failure (the SDK type is not rebuilt on replay).
    assert isinstance(seen[0], StepError) and seen[0].type_name == "openai.BadRequestError"


def test_fallback_on_predicate_can_refuse_to_move_on(make_app: AppFactory) -> None:
    app = make_app()
    calls = Counter[str]()
    ask = _chain(app, lambda: ConnectionError("reset"), calls, on=lambda exc: False)
    with pytest.raises(ConnectionError, match="reset"):
        app.start(ask, "hi", workflow_id="f").result(timeout=10)
    assert calls == {"primary": 1}


def test_fallback_async_chains_async_steps(app: App) -> None:
    calls = Counter[str]()

    @app.step(name="primary")
    async def primary(prompt: str) -> str:
        calls["primary"] += 1
        raise server_error()

    @app.step(name="backup")
    async def backup(prompt: str) -> str:
        calls["backup"] += 1
        return f"backup: {prompt}"

    @app.workflow(name="ask")
    async def ask() -> str:
        result: str = await crashsafe.fallback_async(primary, backup)("hi")
        return result

    app.start(ask, workflow_id="f")
    assert outcome(app, "f") == "backup: hi"
    assert calls == {"primary": 1, "backup": 1}


def test_fallback_misuse_is_refused(app: App) -> None:
    @app.step
    def one(x: str) -> str:
        return x

    @app.step
    def two(x: str) -> str:
        return x

    @app.step
    async def three(x: str) -> str:
        return x

    @app.step
    async def four(x: str) -> str:
        return x

    def plain(x: str) -> str:
        return x

    with pytest.raises(ConfigurationError, match="is not one, so its answer would not be"):
        crashsafe.fallback(one, plain)
    with pytest.raises(ConfigurationError, match="at least two alternatives"):
        crashsafe.fallback(one)
    with pytest.raises(ConfigurationError, match="fallback_async"):
        crashsafe.fallback(one, three)
    with pytest.raises(ConfigurationError, match="at least two alternatives"):
        crashsafe.fallback_async(three)
    with pytest.raises(ConfigurationError, match="chains async steps"):
        crashsafe.fallback_async(three, two)
    with pytest.raises(ConfigurationError, match="chains async steps"):
        crashsafe.fallback_async(three, plain)
    assert crashsafe.fallback(one, two).alternatives == (one, two)
    assert crashsafe.fallback_async(three, four).alternatives == (three, four)


# -- escalation to a person --------------------------------------------------------------------
def _escalating(app: App, calls: Counter[str], *,
                fails: Callable[[], Exception] = auth_error, times: int = 1,
                policy: RetryPolicy | None = None) -> Any:
    @app.step(name="call_api", retry=policy or RetryPolicy(escalate=True))
    def call_api(q: str) -> str:
        calls["api"] += 1
        if calls["api"] <= times:
            raise fails()
        return f"answer to {q}"

    @app.workflow(name="agent")
    def agent(q: str) -> str:
        return call_api(q)

    return agent


def test_escalation_parks_the_workflow_and_notifies_once(make_app: AppFactory) -> None:
    hooks: list[Escalation] = []
    app = make_app(on_escalate=hooks.append)
    calls = Counter[str]()
    app.start(_escalating(app, calls), "q", workflow_id="esc")
    reason = waiting_reason(app, "esc")
    assert "crashsafe signal esc resolve:0" in reason
    assert "AuthenticationError" in reason and "Incorrect API key" in reason
    assert "auth failures are not retried" in reason
    wait_until(lambda: len(hooks) == 1, what="the on_escalate hook")
    (esc,) = hooks
    assert esc == Escalation("esc", "agent", 0, "call_api", "resolve:0", ACTIONS, reason,
                             "esc:resolve:0:0")
    assert calls["api"] == 1, "an auth failure is not retried"

    app.signal("esc", "resolve:0", {"action": "value", "value": "x"})
    assert app.handle("esc").result(timeout=10) == "x"
    assert app.get_workflow("esc").status is Status.SUCCEEDED
    assert len(hooks) == 1
    entry = app.journal("esc")[0]
    assert "a person supplied the result" in (entry.note or "")
    assert app.get_workflow("esc").reason is None


def test_escalation_retry_runs_the_body_again(app: App) -> None:
    calls = Counter[str]()
    app.start(_escalating(app, calls), "q", workflow_id="esc")
    waiting_reason(app, "esc")
    app.signal("esc", "resolve:0", {"action": "retry"})
    assert app.handle("esc").result(timeout=10) == "answer to q"
    assert calls["api"] == 2
    assert "escalated: a person chose retry" in (app.journal("esc")[0].note or "")


def test_escalation_abort_fails_the_workflow(app: App) -> None:
    calls = Counter[str]()
    app.start(_escalating(app, calls), "q", workflow_id="esc")
    waiting_reason(app, "esc")
    app.signal("esc", "resolve:0", {"action": "abort"})
    with pytest.raises(WorkflowFailedError, match="AuthenticationError"):
        app.handle("esc").result(timeout=10)
    assert app.get_workflow("esc").status is Status.FAILED
    assert calls["api"] == 1
    assert "a person chose 'abort'" in (app.journal("esc")[0].note or "")


def test_an_answer_that_is_not_a_decision_keeps_it_waiting(app: App) -> None:
    calls = Counter[str]()
    app.start(_escalating(app, calls), "q", workflow_id="esc")
    waiting_reason(app, "esc")
    app.signal("esc", "resolve:0", {"action": "dance"})
    wait_until(lambda: "not understood" in (app.get_workflow("esc").reason or ""),
               what="the reason to report the bad answer")
    reason = app.get_workflow("esc").reason or ""
    assert "'dance'" in reason and "crashsafe signal esc resolve:0" in reason
    assert app.get_workflow("esc").status is Status.WAITING
    app.signal("esc", "resolve:0", {"action": "value", "value": "y"})
    assert app.handle("esc").result(timeout=10) == "y"
    assert calls["api"] == 1


def test_running_out_of_attempts_escalates(app: App) -> None:
    calls = Counter[str]()
    policy = RetryPolicy(max_attempts=2, initial_delay=0, escalate=True)
    app.start(_escalating(app, calls, fails=lambda: ValueError("odd reply"), times=5,
                          policy=policy), "q", workflow_id="esc")
    reason = waiting_reason(app, "esc")
    assert "all 2 attempts failed" in reason and "ValueError: odd reply" in reason
    assert calls["api"] == 2
    app.signal("esc", "resolve:0", {"action": "abort"})
    with pytest.raises(ValueError, match="odd reply"):
        app.handle("esc").result(timeout=10)
    assert calls["api"] == 2


def test_without_escalate_an_auth_failure_just_fails(app: App) -> None:
    calls = Counter[str]()
    app.start(_escalating(app, calls, policy=RetryPolicy(max_attempts=3)), "q",
              workflow_id="esc")
    with pytest.raises(WorkflowFailedError, match="AuthenticationError"):
        app.handle("esc").result(timeout=10)
    assert calls["api"] == 1


def _escalating_chain(app: App, calls: Counter[str]) -> Any:
    @app.step(name="primary", retry=RetryPolicy(escalate=True))
    def primary(q: str) -> str:
        calls["primary"] += 1
        raise auth_error()

    @app.step(name="backup")
    def backup(q: str) -> str:
        calls["backup"] += 1
        return f"backup: {q}"

    @app.workflow(name="agent")
    def agent(q: str) -> str:
        return crashsafe.fallback(primary, backup)(q)

    return agent


def test_a_person_can_choose_the_fallback(app: App) -> None:
    calls = Counter[str]()
    app.start(_escalating_chain(app, calls), "q", workflow_id="esc")
    waiting_reason(app, "esc")
    assert calls == {"primary": 1}
    app.signal("esc", "resolve:0", {"action": "fallback"})
    assert app.handle("esc").result(timeout=10) == "backup: q"
    assert calls == {"primary": 1, "backup": 1}


def test_a_chosen_fallback_is_replayed_after_a_crash(make_app: AppFactory) -> None:
    calls = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="primary", retry=RetryPolicy(escalate=True))
        def primary(q: str) -> str:
            calls["primary"] += 1
            raise auth_error()

        @app.step(name="backup")
        def backup(q: str) -> str:
            calls["backup"] += 1
            return f"backup: {q}"

        @app.step(name="deliver")
        def deliver(answer: str) -> str:
            calls["deliver"] += 1
            crash()
            return f"delivered {answer}"

        @app.workflow(name="agent")
        def agent(q: str) -> str:
            return deliver(crashsafe.fallback(primary, backup)(q))

        return agent

    first = make_app()
    first.start(build(first, lambda: simulate_crash(first, wait=0)), "q", workflow_id="esc")
    waiting_reason(first, "esc")
    first.signal("esc", "resolve:0", {"action": "fallback"})
    wait_idle(first)
    assert calls == {"primary": 1, "backup": 1, "deliver": 1}
    second = make_app()
    build(second, lambda: None)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == "delivered backup: q"
    assert calls == {"primary": 1, "backup": 1, "deliver": 2}, (
        "replay follows the person's recorded choice: no new escalation, no call")


def test_an_async_step_escalates_too(app: App) -> None:
    calls = Counter[str]()

    @app.step(name="call_api", retry=RetryPolicy(escalate=True))
    async def call_api() -> str:
        calls["api"] += 1
        raise auth_error()

    @app.workflow(name="agent")
    async def agent() -> str:
        return await call_api()

    app.start(agent, workflow_id="esc")
    assert "crashsafe signal esc resolve:0" in waiting_reason(app, "esc")
    app.signal("esc", "resolve:0", {"action": "value", "value": "x"})
    assert app.handle("esc").result(timeout=10) == "x"
    assert calls["api"] == 1


def test_abort_inside_a_chain_does_not_move_on(app: App) -> None:
    calls = Counter[str]()
    app.start(_escalating_chain(app, calls), "q", workflow_id="esc")
    waiting_reason(app, "esc")
    app.signal("esc", "resolve:0", {"action": "abort"})
    with pytest.raises(WorkflowFailedError, match="AuthenticationError"):
        app.handle("esc").result(timeout=10)
    assert calls == {"primary": 1}


def test_an_escalation_is_notified_once_across_a_crash(make_app: AppFactory) -> None:
    hooks: list[Escalation] = []
    calls = Counter[str]()

    def fails() -> Exception:
        return auth_error(f"Incorrect API key (call {calls['api']})")

    first = make_app(on_escalate=hooks.append)
    first.start(_escalating(first, calls, fails=fails, times=5), "q", workflow_id="esc")
    assert "(call 1)" in waiting_reason(first, "esc")
    wait_until(lambda: len(hooks) == 1, what="the first notification")
    simulate_crash(first)
    second = make_app(on_escalate=hooks.append)
    _escalating(second, calls, fails=fails, times=5)
    (handle,) = second.recover()
    wait_until(lambda: "(call 2)" in (second.get_workflow("esc").reason or ""),
               what="the recovered step to escalate again")
    second.signal("esc", "resolve:0", {"action": "value", "value": "z"})
    assert handle.result(timeout=10) == "z"
    assert [h.key for h in hooks] == ["esc:resolve:0:0"], "the same escalation: no new hook call"
