"""The durable engine with real App objects, on the memory store and on a SQLite file.

Crashes are simulated with ``crashsafe.testing.simulate_crash``: a step body calls
it on its own app, so the body ran but its result is never committed (the "crash
after the effect, before the record" case), and a second app on the same store
recovers the workflow.
"""

import asyncio
import datetime as dt
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashsafe
from crashsafe import (
    App,
    ConfigurationError,
    DeadLetteredError,
    InvalidStateError,
    NotInWorkflowError,
    RetryPolicy,
    SerializationError,
    Status,
    StepError,
    StepTimeoutError,
    StoreUnavailableError,
    UnknownWorkflowError,
    WorkflowCancelled,
    WorkflowCancelledError,
    WorkflowFailedError,
    WorkflowHandle,
)
from crashsafe._codec import decode
from crashsafe.stores import MemoryStore
from crashsafe.testing import simulate_crash
from helpers import AppFactory, Database, wait_idle, wait_until
from strategies import Order, Point, same, storable

Build = Callable[[App, Callable[[], None]], Any]


def crash_then_recover(
    make_app: AppFactory, build: Build, *args: Any, workflow_id: str = "wf-1",
    app_kwargs: dict[str, Any] | None = None, **kwargs: Any,
) -> tuple[App, App, WorkflowHandle[Any]]:
    """Run ``build``'s workflow on a first app until a step calls ``crash()``; recover it
    on a second app (where ``crash()`` does nothing) and return both apps and the handle.

    ``build(app, crash)`` registers the steps and the workflow on ``app`` and returns
    the workflow; ``args`` and ``kwargs`` are the workflow's arguments.
    """
    app_kwargs = app_kwargs or {}
    first = make_app(**app_kwargs)
    flow = build(first, lambda: simulate_crash(first, wait=0))
    first.start(flow, *args, workflow_id=workflow_id, **kwargs)
    wait_idle(first, timeout=5)
    rec = first.store.get_workflow(workflow_id)
    assert rec is not None
    assert rec.status is Status.RUNNING, "the first app should have crashed mid-workflow"
    second = make_app(**app_kwargs)
    build(second, lambda: None)
    handles = second.recover()
    assert [h.workflow_id for h in handles] == [workflow_id]
    return first, second, handles[0]


def kinds(app: App, workflow_id: str) -> list[tuple[str, str]]:
    return [(e.kind, e.name) for e in app.journal(workflow_id)]


# -- journaling ---------------------------------------------------------------------------
def test_step_results_are_journaled_once(app: App) -> None:
    calls = Counter[str]()

    @app.step
    def add(a: int, b: int) -> int:
        calls["add"] += 1
        return a + b

    @app.workflow
    def flow(n: int) -> int:
        return add(n, 1) + add(n, 2)

    handle = app.start(flow, 10, workflow_id="sum")
    assert handle.result(timeout=10) == 23
    assert calls["add"] == 2
    journal = app.journal("sum")
    assert [(e.index, e.kind, e.name) for e in journal] == [(0, "step", add.name),
                                                              (1, "step", add.name)]
    assert [decode(e.output or b"") for e in journal] == [11, 12]
    assert all(e.attempts == 1 and e.error is None for e in journal)
    assert handle.status() is Status.SUCCEEDED
    assert decode(app.get_workflow("sum").output or b"") == 23


def test_app_opened_from_a_url_runs_and_closes(store_url: str) -> None:
    with App(store_url) as app:
        @app.step(name="hello")
        def hello(who: str) -> str:
            return f"hello {who}"

        @app.workflow(name="greet")
        def greet(who: str) -> str:
            return hello(who)

        assert app.start(greet, "ada", workflow_id="g").result(timeout=10) == "hello ada"
        assert app.store.url == store_url
        assert [r.status for r in app.list_workflows(status="succeeded")] == [Status.SUCCEEDED]
    assert app._closing.is_set()


def test_start_is_idempotent_on_workflow_id(make_app: AppFactory) -> None:
    app = make_app()
    bodies = Counter[str]()

    @app.step(name="echo")
    def echo(x: int) -> int:
        bodies["step"] += 1
        return x

    @app.workflow(name="once")
    def once(x: int) -> int:
        bodies["workflow"] += 1
        return echo(x)

    first = app.start(once, 1, workflow_id="same")
    second = app.start(once, 999, workflow_id="same")  # while or after the first runs
    assert first.result(timeout=10) == 1
    assert second.result(timeout=10) == 1
    assert app.start(once, 2, workflow_id="same").result(timeout=10) == 1

    other = make_app()

    @other.workflow(name="once")
    def once_elsewhere(x: int) -> int:
        bodies["elsewhere"] += 1
        return x

    assert other.start(once_elsewhere, 3, workflow_id="same").result(timeout=10) == 1
    assert bodies == {"workflow": 1, "step": 1}
    assert [r.id for r in app.list_workflows()] == ["same"]
    assert len(app.journal("same")) == 1


def test_start_with_an_id_taken_by_another_workflow_fails(app: App) -> None:
    @app.workflow(name="a")
    def a() -> int:
        return 1

    @app.workflow(name="b")
    def b() -> int:
        return 2

    app.start(a, workflow_id="taken").result(timeout=10)
    with pytest.raises(InvalidStateError, match="taken"):
        app.start(b, workflow_id="taken")


def test_sync_workflow_with_sync_and_nested_steps(app: App) -> None:
    @app.step(name="inner")
    def inner(x: int) -> int:
        return x + 100

    @app.step(name="outer")
    def outer(x: int) -> int:
        return inner(x) * 2  # a step inside a step is part of its body: not journaled

    @app.workflow
    def flow(x: int) -> int:
        return outer(x)

    handle = app.start(flow, 1, workflow_id="nested")
    assert handle.result(timeout=10) == 202
    assert kinds(app, "nested") == [("step", "outer")]


def test_async_workflow_with_async_and_sync_steps(app: App) -> None:
    @app.step(name="fetch")
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    @app.step(name="bump")
    def bump(x: int) -> int:
        return x + 1

    @app.workflow(name="flow")
    async def flow(x: int) -> list[int]:
        a = await fetch(x)
        b = bump(a)
        c = await fetch(b)
        await crashsafe.sleep_async(0.01)
        return [a, b, c]

    assert app.start(flow, 3, workflow_id="a1").result(timeout=10) == [6, 7, 14]
    assert kinds(app, "a1") == [("step", "fetch"), ("step", "bump"), ("step", "fetch"),
                                ("sleep", "sleep")]

    async def main() -> list[int]:
        handle = await app.start_async(flow, 4, workflow_id="a2")
        return await handle.result_async(timeout=10)

    assert asyncio.run(main()) == [8, 9, 18]


def test_async_step_from_sync_workflow_is_refused(app: App) -> None:
    @app.step(name="later")
    async def later() -> int:
        return 1

    @app.workflow
    def flow() -> int:
        return later()  # type: ignore[return-value]

    with pytest.raises(NotInWorkflowError, match="async step 'later'"):
        app.start(flow).result(timeout=10)


def test_many_concurrent_workflows_all_finish(app: App) -> None:
    @app.step(name="square")
    def square(x: int) -> int:
        return x * x

    @app.workflow(name="sq")
    def sq(x: int) -> int:
        return square(x) + square(x + 1)

    handles = [app.start(sq, i, workflow_id=f"c{i}") for i in range(40)]
    assert [h.result(timeout=20) for h in handles] == [i * i + (i + 1) ** 2 for i in range(40)]


# -- crashsafe.current() and idempotency keys -------------------------------------------
def test_current_describes_the_running_step(app: App) -> None:
    seen: list[crashsafe.Current] = []

    @app.step(name="plain")
    def plain() -> int:
        cur = crashsafe.current()
        seen.append(cur)
        assert cur.step_index is not None
        return cur.step_index

    @app.step(name="flaky", retry=RetryPolicy(max_attempts=3, initial_delay=0))
    def flaky() -> str:
        cur = crashsafe.current()
        seen.append(cur)
        if cur.attempt is not None and cur.attempt < 3:
            raise ConnectionError("try again")
        assert cur.idempotency_key is not None
        return cur.idempotency_key

    @app.workflow(name="who")
    def who() -> dict[str, Any]:
        outside = crashsafe.current()
        return {
            "outside": [outside.workflow_id, outside.workflow_name, outside.step_index,
                        outside.attempt, outside.idempotency_key, outside.in_step],
            "plain": plain(),
            "key": flaky(),
        }

    result = app.start(who, workflow_id="cur-1").result(timeout=10)
    assert result == {"outside": ["cur-1", "who", None, None, None, False], "plain": 0,
                      "key": "cur-1:1"}
    assert [(c.step_name, c.step_index, c.attempt) for c in seen] == [
        ("plain", 0, 1), ("flaky", 1, 1), ("flaky", 1, 2), ("flaky", 1, 3)]
    assert {c.idempotency_key for c in seen[1:]} == {"cur-1:1"}
    assert {c.workflow_id for c in seen} == {"cur-1"}
    assert {c.workflow_name for c in seen} == {"who"}
    assert all(c.in_step for c in seen)


def test_idempotency_key_is_stable_across_a_crash(make_app: AppFactory) -> None:
    calls: list[tuple[str | None, int | None, str]] = []

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="setup")
        def setup() -> int:
            return 1

        @app.step(name="charge")
        def charge(amount: int) -> str:
            cur = crashsafe.current()
            calls.append((cur.idempotency_key, cur.attempt, app.executor_id))
            crash()
            return f"charged {amount}"

        @app.workflow(name="pay")
        def pay(amount: int) -> str:
            setup()
            return charge(amount)

        return pay

    first, second, handle = crash_then_recover(make_app, build, 5, workflow_id="order-1")
    assert handle.result(timeout=10) == "charged 5"
    assert calls == [("order-1:1", 1, first.executor_id), ("order-1:1", 1, second.executor_id)]


def test_current_outside_a_workflow_is_refused() -> None:
    with pytest.raises(NotInWorkflowError, match="outside a workflow"):
        crashsafe.current()


# -- retries and timeouts -----------------------------------------------------------------
@pytest.mark.parametrize(("failures", "attempts", "succeeds"), [(0, 1, True), (2, 3, True),
                                                                (5, 3, False)])
def test_retries_count_attempts_exactly(app: App, failures: int, attempts: int,
                                        succeeds: bool) -> None:
    bodies: list[int | None] = []

    @app.step(name="call_llm", retry=RetryPolicy(max_attempts=3, initial_delay=0))
    def call_llm() -> str:
        bodies.append(crashsafe.current().attempt)
        if len(bodies) <= failures:
            raise ConnectionResetError(f"5xx number {len(bodies)}")
        return "answer"

    @app.workflow(name="ask")
    def ask() -> str:
        return call_llm()

    handle = app.start(ask, workflow_id="r")
    if succeeds:
        assert handle.result(timeout=10) == "answer"
    else:
        with pytest.raises(ConnectionResetError, match="5xx number 3"):
            handle.result(timeout=10)
        assert handle.status() is Status.FAILED
    assert bodies == list(range(1, attempts + 1))
    (entry,) = app.journal("r")
    assert entry.attempts == attempts
    assert (entry.error is None) is succeeds


@pytest.mark.parametrize(
    "policy",
    [RetryPolicy(max_attempts=5, initial_delay=0, give_up_on=(ValueError,)),
     RetryPolicy(max_attempts=5, initial_delay=0, retry_on=(ConnectionError,))],
    ids=["give_up_on", "retry_on"],
)
def test_retry_policy_filters_exception_types(app: App, policy: RetryPolicy) -> None:
    bodies = Counter[str]()

    @app.step(name="validate", retry=policy)
    def validate() -> None:
        bodies["n"] += 1
        raise ValueError("bad request: not retryable")

    @app.workflow(name="v")
    def v() -> None:
        validate()

    with pytest.raises(ValueError, match="not retryable"):
        app.start(v).result(timeout=10)
    assert bodies["n"] == 1


def test_retry_int_shorthand_and_validation() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=0.5)
    policy = RetryPolicy(max_attempts=4, initial_delay=1, backoff=2, max_delay=3, jitter=False)
    err = RuntimeError()
    assert [policy.delay(n, err) for n in (1, 2, 3, 4)] == [1, 2, 3, None]


def test_sync_step_timeout_raises_step_timeout_error(app: App) -> None:
    release = threading.Event()

    @app.step(name="hang", timeout=0.1, retry=RetryPolicy(max_attempts=2, initial_delay=0))
    def hang() -> None:
        release.wait(10)

    @app.workflow(name="t")
    def t() -> str:
        try:
            hang()
        except TimeoutError as exc:
            return f"{type(exc).__name__}"
        return "no timeout"

    try:
        start = time.monotonic()
        assert app.start(t, workflow_id="t1").result(timeout=10) == "StepTimeoutError"
        assert time.monotonic() - start < 5
        (entry,) = app.journal("t1")
        assert entry.attempts == 2
        assert entry.error is not None
    finally:
        release.set()


def test_async_step_timeout_raises_step_timeout_error(app: App) -> None:
    @app.step(name="slow", timeout=dt.timedelta(milliseconds=50))
    async def slow() -> None:
        await asyncio.sleep(10)

    @app.workflow(name="t")
    async def t() -> None:
        await slow()

    with pytest.raises(StepTimeoutError, match="slow"):
        app.start(t).result(timeout=10)


# -- failures, recorded and replayed ------------------------------------------------------
@crashsafe.register_exception
class InsufficientFunds(Exception):
    """A registered user exception: rebuilt on replay from its arguments."""


class UnregisteredProviderError(Exception):
    """Not registered: surfaces as StepError on the first run and on replay."""


@crashsafe.register_exception
class QuotaExceeded(Exception):
    """Registered, but its constructor does not take its own ``args`` back."""

    def __init__(self, used: int, limit: int) -> None:
        super().__init__(f"used {used} of {limit}")
        self.used = used
        self.limit = limit


EXCEPTIONS: dict[str, Callable[[], Exception]] = {
    "KeyError": lambda: KeyError("order-9"),
    "ValueError": lambda: ValueError("bad", 3),
    "FileNotFoundError": lambda: FileNotFoundError(2, "No such file", "x.txt"),
    "ZeroDivisionError": lambda: ZeroDivisionError("division by zero"),
    "StepTimeoutError": lambda: StepTimeoutError("too slow"),
    "registered": lambda: InsufficientFunds("balance 3", 5),
    "unregistered": lambda: UnregisteredProviderError("HTTP 529 overloaded"),
    "registered-odd-constructor": lambda: QuotaExceeded(5, 3),
    "builtin-with-unstorable-args": lambda: ValueError("bad", object()),
}


def describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, StepError):
        return ("StepError", f"{exc.type_name}: {exc.message}")
    return (type(exc).__name__, repr(exc.args))


@pytest.mark.parametrize("kind", list(EXCEPTIONS))
def test_step_failure_is_the_same_on_first_run_and_replay(make_app: AppFactory,
                                                          kind: str) -> None:
    seen: list[tuple[str, str]] = []
    bodies = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="risky")
        def risky() -> None:
            bodies["risky"] += 1
            raise EXCEPTIONS[kind]()

        @app.step(name="after")
        def after(note: list[str]) -> list[str]:
            crash()
            return note

        @app.workflow(name="w")
        def w() -> list[str]:
            try:
                risky()
            except Exception as exc:
                seen.append(describe(exc))
            return after(list(seen[-1]))

        return w

    _, _, handle = crash_then_recover(make_app, build)
    assert bodies["risky"] == 1  # the failure is replayed, not re-run
    assert len(seen) == 2
    assert seen[1] == seen[0], "replay raised a different exception than the first run"
    assert handle.result(timeout=10) == list(seen[0])


def test_builtin_and_registered_exceptions_keep_their_type(app: App) -> None:
    @app.step(name="pay")
    def pay() -> None:
        raise InsufficientFunds("balance 3", 5)

    @app.step(name="parse")
    def parse() -> None:
        raise KeyError("missing")

    @app.step(name="provider")
    def provider() -> None:
        raise UnregisteredProviderError("HTTP 529")

    @app.workflow(name="w")
    def w() -> list[str]:
        out = []
        for step in (pay, parse, provider):
            try:
                step()
            except Exception as exc:
                out.append(type(exc).__name__)
        return out

    assert app.start(w).result(timeout=10) == ["InsufficientFunds", "KeyError", "StepError"]


def test_unregistered_step_error_carries_the_original_details(app: App) -> None:
    @app.step(name="provider")
    def provider() -> None:
        raise UnregisteredProviderError("HTTP 529 overloaded")

    @app.workflow(name="w")
    def w() -> list[str]:
        try:
            provider()
        except StepError as err:
            return [err.step_name, err.type_name, err.message, err.traceback]
        return []

    step_name, type_name, message, tb = app.start(w).result(timeout=10)
    assert step_name == "provider"
    assert type_name.endswith("UnregisteredProviderError")
    assert message == "HTTP 529 overloaded"
    assert "UnregisteredProviderError" in tb


def test_failed_workflow_raises_the_same_error_here_and_from_the_store(
    make_app: AppFactory,
) -> None:
    """``result()`` must not depend on whether the caller waited in the running process
    or read the finished record (another process, or simply a later call)."""
    app = make_app()
    release = threading.Event()

    @app.step(name="provider")
    def provider() -> None:
        release.wait(10)
        raise UnregisteredProviderError("HTTP 529 overloaded")

    @app.workflow(name="w")
    def w() -> None:
        provider()

    handle = app.start(w, workflow_id="fail-1")
    waiter: list[BaseException] = []

    def wait_in_process() -> None:
        try:
            handle.result(timeout=10)
        except BaseException as exc:
            waiter.append(exc)

    thread = threading.Thread(target=wait_in_process)
    thread.start()
    time.sleep(0.05)  # the waiter is now blocked on the running execution
    release.set()
    thread.join(10)
    with pytest.raises(Exception, match="HTTP 529 overloaded") as from_store:
        make_app().handle("fail-1").result(timeout=5)
    (in_process,) = waiter
    assert type(in_process) is type(from_store.value)
    assert str(in_process) == str(from_store.value)


def test_workflow_failure_is_recorded(make_app: AppFactory) -> None:
    app = make_app()

    @app.workflow(name="bad")
    def bad() -> None:
        raise LookupError("no such ticket")

    @app.workflow(name="odd")
    def odd() -> None:
        raise UnregisteredProviderError("boom")

    with pytest.raises(LookupError, match="no such ticket"):
        app.start(bad, workflow_id="bad-1").result(timeout=10)
    with pytest.raises(WorkflowFailedError, match="boom"):
        app.start(odd, workflow_id="odd-1").result(timeout=10)
    assert app.get_workflow("bad-1").status is Status.FAILED
    # Read back by another app, from the store alone.
    reader = make_app()
    with pytest.raises(LookupError, match="no such ticket"):
        reader.handle("bad-1").result(timeout=10)
    with pytest.raises(WorkflowFailedError, match="UnregisteredProviderError"):
        reader.handle("odd-1").result(timeout=10)


# -- journaled values and durable timers --------------------------------------------------
def test_now_uuid_random_return_the_same_values_on_replay(make_app: AppFactory) -> None:
    seen: list[list[Any]] = []

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="save")
        def save() -> int:
            return 1

        @app.step(name="boom")
        def boom() -> None:
            crash()

        @app.workflow(name="w")
        def w() -> list[Any]:
            values = [crashsafe.now(), crashsafe.uuid4(), crashsafe.random()]
            seen.append(values)
            save()  # commits the journaled values with it
            boom()
            return values

        return w

    _, second, handle = crash_then_recover(make_app, build)
    result = handle.result(timeout=10)
    assert len(seen) == 2
    assert seen[1] == seen[0]
    assert result == seen[0]
    when, ident, number = seen[0]
    assert isinstance(when, dt.datetime)
    assert when.tzinfo is not None
    assert isinstance(ident, uuid.UUID)
    assert 0.0 <= number < 1.0
    assert kinds(second, "wf-1") == [("now", "now"), ("uuid", "uuid"), ("random", "random"),
                                     ("step", "save"), ("step", "boom")]


def test_journaled_values_inside_steps_are_not_journaled(app: App) -> None:
    @app.step(name="stamp")
    def stamp() -> str:
        return f"{crashsafe.now().year}-{crashsafe.random() < 1}-{crashsafe.uuid4().version}"

    @app.workflow(name="w")
    def w() -> str:
        return stamp()

    assert app.start(w, workflow_id="j").result(timeout=10) == f"{dt.datetime.now(dt.UTC).year}" \
        "-True-4"
    assert kinds(app, "j") == [("step", "stamp")]


def test_durable_sleep_keeps_its_wake_time_across_a_crash(make_app: AppFactory) -> None:
    duration = 1.2

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="wake")
        def wake() -> float:
            return app.clock()  # durable timers run on the store's clock

        @app.workflow(name="nap")
        def nap() -> float:
            crashsafe.sleep(duration)
            return wake()

        return nap

    first = make_app()
    first.start(build(first, lambda: None), workflow_id="nap-1")
    wait_until(lambda: len(first.journal("nap-1")) == 1, what="the sleep to be journaled")
    simulate_crash(first)
    (sleep_entry,) = first.journal("nap-1")
    assert sleep_entry.kind == "sleep"
    wake_at = float(decode(sleep_entry.output or b""))
    assert wake_at == pytest.approx(sleep_entry.started_at + duration, abs=0.05)
    assert first.get_workflow("nap-1").status is Status.RUNNING

    time.sleep(duration / 2)
    second = make_app()
    build(second, lambda: None)
    recovered_at = time.time()
    (handle,) = second.recover()
    woke = handle.result(timeout=10)
    assert woke >= wake_at
    # Re-planning the sleep from the recovery would wake at recovered_at + duration.
    assert woke < recovered_at + duration * 0.85
    assert second.journal("nap-1")[0] == sleep_entry


def test_sleep_in_async_workflow_must_be_awaited(app: App) -> None:
    @app.workflow(name="w")
    async def w() -> None:
        crashsafe.sleep(0.01)

    with pytest.raises(NotInWorkflowError, match="sleep_async"):
        app.start(w).result(timeout=10)


# -- child workflows ------------------------------------------------------------------------
def test_child_workflows_are_journaled_and_not_started_twice(make_app: AppFactory) -> None:
    bodies = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="double")
        def double(x: int) -> int:
            bodies["double"] += 1
            return 2 * x

        @app.workflow(name="child")
        def child(x: int) -> int:
            bodies["child"] += 1
            return double(x)

        @app.step(name="boom")
        def boom() -> None:
            crash()

        @app.workflow(name="parent")
        def parent(x: int) -> dict[str, Any]:
            a = child(x)  # run and wait, journaled
            handle = app.start(child, x + 1)  # start and wait via the handle, journaled
            b = handle.result(timeout=10)
            boom()
            return {"a": a, "b": b, "child": handle.workflow_id}

        return parent

    _, second, handle = crash_then_recover(make_app, build, 5, workflow_id="p")
    assert handle.result(timeout=10) == {"a": 10, "b": 12, "child": "p/1"}
    assert bodies == {"child": 2, "double": 2}
    assert kinds(second, "p") == [("child", "child"), ("child", "child"), ("step", "boom")]
    for child_id in ("p/0", "p/1"):
        rec = second.get_workflow(child_id)
        assert rec.parent_id == "p"
        assert rec.status is Status.SUCCEEDED
    assert sorted(r.id for r in second.list_workflows()) == ["p", "p/0", "p/1"]


def test_child_workflow_with_explicit_id(app: App) -> None:
    @app.workflow(name="kid")
    def kid(x: int) -> int:
        return x + 1

    @app.workflow(name="mom")
    def mom() -> int:
        return app.start(kid, 1, workflow_id="kid-explicit").result(timeout=10)

    assert app.start(mom, workflow_id="mom").result(timeout=10) == 2
    assert app.get_workflow("kid-explicit").parent_id == "mom"
    (entry,) = app.journal("mom")
    assert decode(entry.output or b"") == "kid-explicit"


# -- versioning ---------------------------------------------------------------------------
def test_patched_replays_old_journals_on_the_old_path(make_app: AppFactory) -> None:
    bodies = Counter[str]()

    def steps(app: App, crash: Callable[[], None]) -> tuple[Any, Any, Any, Any]:
        @app.step(name="a")
        def a() -> str:
            return "a"

        @app.step(name="old_b")
        def old_b() -> str:
            bodies["old_b"] += 1
            return "old"

        @app.step(name="new_b")
        def new_b() -> str:
            bodies["new_b"] += 1
            return "new"

        @app.step(name="c")
        def c() -> str:
            crash()
            return "c"

        return a, old_b, new_b, c

    def build_old(app: App, crash: Callable[[], None]) -> Any:
        a, old_b, _, c = steps(app, crash)

        @app.workflow(name="flow")
        def flow() -> list[str]:
            return [a(), old_b(), c()]

        return flow

    def build_new(app: App, crash: Callable[[], None]) -> Any:
        a, old_b, new_b, c = steps(app, crash)

        @app.workflow(name="flow")
        def flow() -> list[str]:
            first = a()
            if crashsafe.patched("use-new-b"):
                assert crashsafe.patched("use-new-b")  # stable within a run
                return [first, new_b(), c()]
            assert not crashsafe.patched("use-new-b")
            return [first, old_b(), c()]

        return flow

    first = make_app()
    first.start(build_old(first, lambda: simulate_crash(first, wait=0)), workflow_id="old")
    wait_idle(first)
    assert kinds(first, "old") == [("step", "a"), ("step", "old_b")]

    second = make_app()
    flow = build_new(second, lambda: None)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == ["a", "old", "c"]
    assert bodies == {"old_b": 1}
    assert second.get_workflow("old").status is Status.SUCCEEDED

    assert second.start(flow, workflow_id="fresh").result(timeout=10) == ["a", "new", "c"]
    assert kinds(second, "fresh") == [("step", "a"), ("patch", "use-new-b"), ("step", "new_b"),
                                      ("step", "c")]


def test_patched_outside_a_workflow_is_refused() -> None:
    with pytest.raises(NotInWorkflowError):
        crashsafe.patched("x")


@pytest.mark.parametrize(
    ("change", "index", "expected", "recorded"),
    [
        ("renamed", 1, "step 'b2'", "step 'b'"),
        ("reordered", 0, "step 'b'", "step 'a'"),
        ("removed", 1, "no further call", "step 'b'"),
        ("kind-changed", 1, "sleep 'sleep'", "step 'b'"),
    ],
)
def test_changed_code_raises_nondeterminism_and_dead_letters(
    make_app: AppFactory, change: str, index: int, expected: str, recorded: str,
) -> None:
    def steps(app: App, crash: Callable[[], None]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("a", "b", "b2"):
            out[name] = app.step(name=name)(lambda name=name: name)

        @app.step(name="c")
        def c() -> str:
            crash()
            return "c"

        out["c"] = c
        return out

    def build_old(app: App, crash: Callable[[], None]) -> Any:
        s = steps(app, crash)

        @app.workflow(name="flow")
        def flow() -> list[str]:
            return [s["a"](), s["b"](), s["c"]()]

        return flow

    def build_new(app: App, crash: Callable[[], None]) -> Any:
        s = steps(app, crash)

        @app.workflow(name="flow")
        def flow() -> list[str]:
            if change == "renamed":
                return [s["a"](), s["b2"](), s["c"]()]
            if change == "reordered":
                return [s["b"](), s["a"](), s["c"]()]
            if change == "kind-changed":
                first = s["a"]()
                crashsafe.sleep(0)
                return [first]
            return [s["a"]()]

        return flow

    first = make_app()
    first.start(build_old(first, lambda: simulate_crash(first, wait=0)), workflow_id="nd-1")
    wait_idle(first)
    second = make_app()
    build_new(second, lambda: None)
    (handle,) = second.recover()
    with pytest.raises(DeadLetteredError) as info:
        handle.result(timeout=10)
    for text in ("nd-1", f"step index {index}", expected, recorded):
        assert text in str(info.value)
    rec = second.get_workflow("nd-1")
    assert rec.status is Status.DEAD_LETTER
    assert rec.owner is None
    assert rec.reason is not None
    assert "nondeterminism" in rec.reason
    assert expected in rec.reason
    assert recorded in rec.reason
    with pytest.raises(DeadLetteredError, match="nd-1"):
        make_app().handle("nd-1").result(timeout=5)


def test_nondeterminism_is_not_swallowed_by_except_exception(make_app: AppFactory) -> None:
    """Agent code often wraps a step in ``except Exception``; a changed step must still be
    reported, not silently replaced by the new code's path."""

    def build_old(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="charge_card")
        def charge_card() -> str:
            return "charged"

        @app.step(name="notify")
        def notify() -> str:
            crash()
            return "notified"

        @app.workflow(name="checkout")
        def checkout() -> list[str]:
            return [charge_card(), notify()]

        return checkout

    def build_new(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="charge_wallet")
        def charge_wallet() -> str:
            return "wallet"

        @app.step(name="notify")
        def notify() -> str:
            return "notified"

        @app.workflow(name="checkout")
        def checkout() -> list[str]:
            try:
                paid = charge_wallet()
            except Exception:  # a broad fallback, as agent code often has
                paid = "fallback"
            return [paid, notify()]

        return checkout

    first = make_app()
    first.start(build_old(first, lambda: simulate_crash(first, wait=0)), workflow_id="co-1")
    wait_idle(first)
    second = make_app()
    build_new(second, lambda: None)
    (handle,) = second.recover()
    with pytest.raises(DeadLetteredError, match="charge_wallet"):
        handle.result(timeout=10)
    assert second.get_workflow("co-1").status is Status.DEAD_LETTER


# -- cancellation ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same-app", "other-app"])
def test_cancel_stops_the_workflow_and_is_not_swallowed(make_app: AppFactory,
                                                        where: str) -> None:
    app = make_app()
    swallowed: list[BaseException] = []
    cleaned_up: list[bool] = []

    @app.step(name="tick")
    def tick(n: int) -> int:
        return n + 1

    @app.workflow(name="loop")
    def loop() -> int:
        n = 0
        try:
            while True:
                try:
                    crashsafe.sleep(0.02)
                    n = tick(n)
                except Exception as exc:  # must not catch a cancellation
                    swallowed.append(exc)
        finally:
            cleaned_up.append(True)

    handle = app.start(loop, workflow_id="loop-1")
    wait_until(lambda: len(app.journal("loop-1")) >= 4, what="a few loop iterations")
    canceller = app if where == "same-app" else make_app()
    assert canceller.handle("loop-1").cancel() is True
    with pytest.raises(WorkflowCancelledError):
        handle.result(timeout=10)
    assert handle.status() is Status.CANCELLED
    assert swallowed == []
    assert cleaned_up == [True]
    assert handle.cancel() is False  # already finished
    count = len(app.journal("loop-1"))
    time.sleep(0.1)
    assert len(app.journal("loop-1")) == count  # nothing more was recorded
    with pytest.raises(WorkflowCancelledError):
        make_app().handle("loop-1").result(timeout=5)


def test_workflow_cancelled_is_a_base_exception() -> None:
    assert issubclass(WorkflowCancelled, BaseException)
    assert not issubclass(WorkflowCancelled, Exception)


def test_cancel_during_the_last_step_is_reported_consistently(app: App) -> None:
    """cancel() returned True and the store says cancelled: the handle must agree."""
    entered = threading.Event()
    release = threading.Event()

    @app.step(name="slow")
    def slow() -> int:
        entered.set()
        release.wait(10)
        return 1

    @app.workflow(name="w")
    def w() -> int:
        return slow()

    handle = app.start(w, workflow_id="race")
    assert entered.wait(10)
    assert handle.cancel() is True
    outcome: list[object] = []

    def wait_in_process() -> None:
        try:
            outcome.append(handle.result(timeout=10))
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_in_process)
    waiter.start()
    time.sleep(0.05)  # the waiter is now blocked on the running execution
    release.set()
    waiter.join(10)
    assert handle.status() is Status.CANCELLED
    assert len(outcome) == 1
    assert isinstance(outcome[0], WorkflowCancelledError), f"result() returned {outcome[0]!r}"


def test_cancel_then_resume_continues_from_the_journal(app: App) -> None:
    bodies = Counter[str]()
    gate = threading.Event()

    @app.step(name="first")
    def first() -> int:
        bodies["first"] += 1
        return 1

    @app.step(name="second")
    def second() -> int:
        bodies["second"] += 1
        return 2

    gate_open = app.step(name="gate_open")(lambda: gate.is_set())

    @app.workflow(name="w")
    def w() -> int:
        a = first()
        while not gate_open():  # journaled, so the replay takes the same turns
            crashsafe.sleep(0.01)
        return a + second()

    handle = app.start(w, workflow_id="cr")
    wait_until(lambda: len(app.journal("cr")) >= 2, what="the workflow to wait on its gate")
    handle.cancel()
    with pytest.raises(WorkflowCancelledError):
        handle.result(timeout=10)
    gate.set()
    assert app.resume("cr").result(timeout=10) == 3
    assert bodies == {"first": 1, "second": 1}


# -- dead letters -------------------------------------------------------------------------
def test_poison_workflow_is_dead_lettered_after_max_recoveries(make_app: AppFactory) -> None:
    runs: list[str] = []
    poisoned = [True]

    def build(app: App) -> Any:
        @app.step(name="poison")
        def poison() -> str:
            runs.append(app.executor_id)
            if poisoned[0]:
                simulate_crash(app, wait=0)
            return "healed"

        @app.workflow(name="victim")
        def victim() -> str:
            return poison()

        return victim

    app0 = make_app(max_recoveries=2)
    app0.start(build(app0), workflow_id="poison-1")
    wait_idle(app0)
    for n in (1, 2):
        app_n = make_app(max_recoveries=2)
        build(app_n)
        assert [h.workflow_id for h in app_n.recover()] == ["poison-1"]
        wait_idle(app_n)
        rec = app_n.get_workflow("poison-1")
        assert rec.status is Status.RUNNING
        assert rec.recovery_attempts == n

    last = make_app(max_recoveries=2)
    build(last)
    assert last.recover() == []
    rec = last.get_workflow("poison-1")
    assert rec.status is Status.DEAD_LETTER
    assert rec.recovery_attempts == 3
    assert rec.reason is not None
    assert "recovered 2 times" in rec.reason
    assert len(runs) == 3  # never run a fourth time
    with pytest.raises(DeadLetteredError, match="poison-1"):
        last.handle("poison-1").result(timeout=5)
    assert last.recover() == []
    assert len(runs) == 3

    poisoned[0] = False
    handle = last.resume("poison-1")
    assert handle.result(timeout=10) == "healed"
    assert len(runs) == 4
    assert last.get_workflow("poison-1").status is Status.SUCCEEDED


def test_resume_refuses_running_and_finished_workflows(app: App) -> None:
    @app.workflow(name="w")
    def w() -> int:
        return 1

    app.start(w, workflow_id="done").result(timeout=10)
    with pytest.raises(InvalidStateError, match="succeeded"):
        app.resume("done")
    with pytest.raises(UnknownWorkflowError):
        app.resume("nope")


def test_recover_never_takes_a_workflow_from_a_live_app(make_app: AppFactory) -> None:
    live = make_app()
    gate = threading.Event()

    @live.workflow(name="w")
    def w() -> int:
        while not gate.is_set():
            crashsafe.sleep(0.01)
        return 1

    handle = live.start(w, workflow_id="live-1")
    other = make_app()

    @other.workflow(name="w")
    def w2() -> int:
        return 2

    try:
        assert other.recover() == []
        assert other.get_workflow("live-1").owner == live.executor_id
    finally:
        gate.set()
    assert handle.result(timeout=10) == 1


def test_closed_app_leaves_workflows_for_its_successor(make_app: AppFactory) -> None:
    first = make_app()
    gate = threading.Event()

    def build(app: App) -> Any:
        @app.step(name="s")
        def s() -> int:
            return 7

        gate_open = app.step(name="gate_open")(lambda: gate.is_set())

        @app.workflow(name="w")
        def w() -> int:
            value = s()
            while not gate_open():
                crashsafe.sleep(0.01)
            return value

        return w

    first.start(build(first), workflow_id="handover")
    wait_until(lambda: len(first.journal("handover")) >= 2, what="the workflow to be waiting")
    first.close(timeout=5)
    assert first.get_workflow("handover").status is Status.RUNNING
    gate.set()
    second = make_app()
    build(second)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == 7


def test_closed_app_refuses_new_work(make_app: AppFactory) -> None:
    """A closed app is marked stopped, so any other app may recover what it owns: it
    must not start (and run) new workflows that look orphaned the moment they exist."""
    app = make_app()
    bodies = Counter[str]()

    @app.workflow(name="w")
    def w() -> int:
        bodies["w"] += 1
        return 1

    assert app.start(w, workflow_id="before").result(timeout=10) == 1
    app.close(timeout=5)
    with pytest.raises(InvalidStateError, match="closed"):
        app.start(w, workflow_id="after-close")
    assert bodies["w"] == 1
    assert [r.id for r in app.list_workflows()] == ["before"]


# -- bad input ------------------------------------------------------------------------------
def test_unstorable_argument_fails_at_start_and_creates_nothing(app: App) -> None:
    @app.workflow(name="w")
    def w(ticket: dict[str, Any], retries: int = 0) -> int:
        return retries

    with pytest.raises(SerializationError) as info:
        app.start(w, {"order": "A1", "callback": [print]}, workflow_id="bad")
    message = str(info.value)
    assert "argument 'ticket'" in message
    assert "builtin_function_or_method" in message
    assert "['callback'][0]" in message
    with pytest.raises(SerializationError, match=r"argument 'retries'.*builtins\.object"):
        app.start(w, {}, retries=object(), workflow_id="bad")
    assert app.list_workflows() == []
    with pytest.raises(UnknownWorkflowError):
        app.handle("bad")


def test_dataclass_argument_needs_an_annotation(app: App) -> None:
    @app.workflow(name="w")
    def w(point) -> int:  # type: ignore[no-untyped-def]
        return 1

    with pytest.raises(SerializationError, match=r"argument 'point'.*annotat"):
        app.start(w, Point(1, 2))
    assert app.list_workflows() == []


def test_wrong_arguments_and_ids_are_refused(app: App) -> None:
    @app.workflow(name="w")
    def w(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="workflow 'w'"):
        app.start(w, 1, 2)
    with pytest.raises(ConfigurationError, match="workflow_id"):
        app.start(w, 1, workflow_id="")
    with pytest.raises(UnknownWorkflowError, match="no workflow named 'nope'"):
        app.start("nope")
    assert app.list_workflows() == []


def test_unknown_workflow_id(app: App) -> None:
    with pytest.raises(UnknownWorkflowError, match="nope") as info:
        app.handle("nope")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "no workflow with id 'nope'"
    with pytest.raises(UnknownWorkflowError):
        app.cancel("nope")
    with pytest.raises(UnknownWorkflowError):
        app.journal("nope")


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        ("foo://x", ConfigurationError, ["foo://x", "sqlite:///"]),
        ("sqlite://host/x.db", ConfigurationError, ["three slashes", "sqlite:///agent.db"]),
        ("sqlite:///", ConfigurationError, ["no file path"]),
        ("sqlite:///x.db?synchronous=off", ConfigurationError, ["synchronous", "full"]),
        ("sqlite:///x.db?journal=delete", ConfigurationError, ["unknown", "journal"]),
        ("sqlite:///x.db?busy_timeout=soon", ConfigurationError, ["busy_timeout"]),
        ("postgresql://u@127.0.0.1/db?pool=9", ConfigurationError,
         ["unknown", "pool", "pool_max"]),
        ("no-scheme-at-all", ConfigurationError, ["unsupported"]),
    ],
)
def test_bad_urls_fail_with_clear_messages(url: str, error: type[Exception],
                                           words: list[str]) -> None:
    app = App(url)
    with pytest.raises(error) as info:
        _ = app.store
    for word in words:
        assert word in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_directory_is_store_unavailable(tmp_path: Any) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    app = App(f"sqlite:///{missing}/agent.db")
    with pytest.raises(StoreUnavailableError, match="does not exist") as info:
        _ = app.store
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_app_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="max_recoveries"):
        App("memory://", max_recoveries=0)
    with pytest.raises(ConfigurationError, match="either a URL or a store"):
        App("memory://", store=MemoryStore())
    with pytest.raises(ValueError, match="lease"):
        App("memory://", lease=-1)


def test_step_called_outside_a_workflow(app: App) -> None:
    @app.step(name="lookup")
    def lookup(x: int) -> int:
        return x * 3

    with pytest.raises(NotInWorkflowError, match=r"step 'lookup'.*lookup\.fn"):
        lookup(2)
    assert lookup.fn(2) == 6
    assert isinstance(crashsafe.now(), dt.datetime)  # plain behaviour outside workflows


def test_dataclass_result_without_annotation_is_refused(app: App) -> None:
    @app.step(name="make_point")
    def make_point():  # type: ignore[no-untyped-def]
        return Point(1, 2)

    @app.workflow(name="w")
    def w() -> int:
        make_point()
        return 1

    with pytest.raises(SerializationError, match=r"make_point.*return annotation"):
        app.start(w, workflow_id="dc").result(timeout=10)
    assert app.get_workflow("dc").status is Status.FAILED


def test_typed_values_are_rebuilt_on_replay(make_app: AppFactory) -> None:
    seen: list[tuple[type, type, type]] = []

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="order")
        def order(p: Point) -> Order:
            return Order("o-1", Decimal("9.99"), dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                         {"vip"}, [p], raw=b"\x00")

        @app.step(name="boom")
        def boom() -> None:
            crash()

        @app.workflow(name="w")
        def w(p: Point, when: dt.date) -> Order:
            o = order(p)
            seen.append((type(p), type(o), type(o.lines[0])))
            boom()
            return o

        return w

    _, _, handle = crash_then_recover(make_app, build, Point(3, 4), dt.date(2026, 2, 3))
    result = handle.result(timeout=10)
    assert seen == [(Point, Order, Point)] * 2
    assert isinstance(result, Order)
    assert result.lines == [Point(3, 4)]
    stored = make_app()
    build(stored, lambda: None)
    assert stored.handle("wf-1").result(timeout=5) == result


def test_future_annotations_module_with_unresolvable_hint_replays(make_app: AppFactory) -> None:
    namespace: dict[str, Any] = {}
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from decimal import Context\n"
        "def count(n: int, ctx: Context | None = None) -> int:\n"
        "    return n + 1\n"
    )
    exec(compile(source, "<future-annotations-module>", "exec"), namespace)

    def build(app: App, crash: Callable[[], None]) -> Any:
        count = app.step(name="count")(namespace["count"])

        @app.step(name="boom")
        def boom() -> None:
            crash()

        @app.workflow(name="w")
        def w() -> int:
            n = count(1)
            boom()
            return n

        return w

    _, _, handle = crash_then_recover(make_app, build)
    assert handle.result(timeout=10) == 2


# -- more recovery paths ------------------------------------------------------------------
def test_async_workflow_recovers_after_a_crash(make_app: AppFactory) -> None:
    bodies = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="fetch")
        async def fetch(x: int) -> int:
            bodies["fetch"] += 1
            await asyncio.sleep(0)
            return x * 10

        @app.step(name="store")
        async def store(x: int) -> int:
            bodies["store"] += 1
            crash()
            return x + 1

        @app.workflow(name="aflow")
        async def aflow(x: int) -> list[Any]:
            a = await fetch(x)
            await crashsafe.sleep_async(0.01)
            token = crashsafe.uuid4()
            b = await store(a)
            return [a, b, str(token)]

        return aflow

    _, second, handle = crash_then_recover(make_app, build, 4)
    a, b, token = handle.result(timeout=10)
    assert [a, b] == [40, 41]
    assert bodies == {"fetch": 1, "store": 2}
    assert kinds(second, "wf-1") == [("step", "fetch"), ("sleep", "sleep"), ("uuid", "uuid"),
                                     ("step", "store")]
    assert decode(second.journal("wf-1")[2].output or b"") == uuid.UUID(token)


def test_async_gather_keeps_call_order_indexes_across_a_crash(make_app: AppFactory) -> None:
    bodies = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="lookup")
        async def lookup(key: str) -> str:
            bodies[key] += 1
            await asyncio.sleep(0.01 if key == "a" else 0)  # "a" commits last
            return key.upper()

        @app.step(name="boom")
        async def boom() -> None:
            crash()

        @app.workflow(name="fan")
        async def fan() -> list[str]:
            found = await asyncio.gather(lookup("a"), lookup("b"), lookup("c"))
            await boom()
            return list(found)

        return fan

    _, second, handle = crash_then_recover(make_app, build)
    assert handle.result(timeout=10) == ["A", "B", "C"]
    assert bodies == {"a": 1, "b": 1, "c": 1}
    journal = second.journal("wf-1")
    assert [(e.index, e.name, decode(e.output or b"null")) for e in journal] == [
        (0, "lookup", "A"), (1, "lookup", "B"), (2, "lookup", "C"), (3, "boom", None)]


def test_parent_and_running_child_both_recover(make_app: AppFactory) -> None:
    bodies = Counter[str]()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="child_work")
        def child_work(x: int) -> int:
            bodies["child_work"] += 1
            crash()
            return x * 3

        @app.workflow(name="kid")
        def kid(x: int) -> int:
            return child_work(x)

        @app.workflow(name="parent")
        def parent(x: int) -> int:
            return kid(x) + 1

        return parent

    first = make_app()
    first.start(build(first, lambda: simulate_crash(first, wait=0)), 5, workflow_id="par")
    wait_idle(first, timeout=3)
    assert first.get_workflow("par/0").status is Status.RUNNING
    second = make_app()
    build(second, lambda: None)
    handles = second.recover()
    assert sorted(h.workflow_id for h in handles) == ["par", "par/0"]
    assert second.handle("par").result(timeout=10) == 16
    assert second.handle("par/0").result(timeout=10) == 15
    assert bodies["child_work"] == 2
    assert [r.id for r in second.list_workflows(name="kid")] == ["par/0"]


def _parent_waiting_on_child(app: App, gate: threading.Event) -> Any:
    gate_open = app.step(name="gate_open")(lambda: gate.is_set())

    @app.workflow(name="kid")
    def kid(x: int) -> int:
        while not gate_open():
            crashsafe.sleep(0.01)
        return x

    @app.workflow(name="parent")
    def parent(x: int) -> int:
        return kid(x) + 1

    return parent


def test_parent_waiting_on_a_child_stops_when_cancelled(app: App) -> None:
    gate = threading.Event()
    parent = _parent_waiting_on_child(app, gate)
    handle = app.start(parent, 1, workflow_id="pc")
    try:
        wait_until(lambda: app.store.get_workflow("pc/0") is not None
                   and len(app.journal("pc/0")) >= 2, what="the child to be waiting")
        assert handle.cancel() is True
        with pytest.raises(WorkflowCancelledError):
            handle.result(timeout=2)
    finally:
        gate.set()


def test_parent_waiting_on_a_child_stops_when_its_app_closes(app: App) -> None:
    gate = threading.Event()
    parent = _parent_waiting_on_child(app, gate)
    app.start(parent, 1, workflow_id="pc")
    try:
        wait_until(lambda: app.store.get_workflow("pc/0") is not None
                   and len(app.journal("pc/0")) >= 2, what="the child to be waiting")
        app.close(timeout=2)
        assert sorted(app._executions) == []
    finally:
        gate.set()


def test_in_flight_runs_finish_on_the_version_that_started_them(make_app: AppFactory) -> None:
    def steps(app: App, crash: Callable[[], None]) -> tuple[Any, Any]:
        @app.step(name="greet")
        def greet(who: str) -> str:
            return f"hello {who}"

        @app.step(name="boom")
        def boom() -> None:
            crash()

        return greet, boom

    def build_v1(app: App, crash: Callable[[], None]) -> Any:
        greet, boom = steps(app, crash)

        @app.workflow(name="hi", version=1)
        def hi(who: str) -> str:
            text = greet(who)
            boom()
            return text

        return hi

    def build_v1_and_v2(app: App, crash: Callable[[], None]) -> Any:
        build_v1(app, crash)
        greet, _ = steps(app, crash)

        @app.workflow(name="hi", version=2)
        def hi(who: str) -> str:
            return greet(who).upper()

        return hi

    first = make_app()
    first.start(build_v1(first, lambda: simulate_crash(first, wait=0)), "ada", workflow_id="v1")
    wait_idle(first)
    second = make_app()
    latest = build_v1_and_v2(second, lambda: None)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == "hello ada"
    assert second.get_workflow("v1").version == "1"
    assert second.start(latest, "bob", workflow_id="v2").result(timeout=10) == "HELLO BOB"
    assert second.get_workflow("v2").version == "2"


def test_registering_different_code_under_one_name_and_version_is_refused(app: App) -> None:
    @app.workflow(name="dup")
    def one() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="already registered"):
        @app.workflow(name="dup")
        def two() -> int:
            return 2


def test_concurrent_starts_of_one_id_run_it_once(app: App) -> None:
    bodies = Counter[str]()
    lock = threading.Lock()

    @app.workflow(name="w")
    def w(n: int) -> int:
        with lock:
            bodies["w"] += 1
        return n

    barrier = threading.Barrier(8)
    handles: list[WorkflowHandle[int]] = []

    def starter(n: int) -> None:
        barrier.wait(10)
        handles.append(app.start(w, n, workflow_id="contended"))

    threads = [threading.Thread(target=starter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    results = {h.result(timeout=10) for h in handles}
    assert len(handles) == 8
    assert len(results) == 1
    assert bodies["w"] == 1


def test_concurrent_recoveries_claim_an_orphan_once(make_app: AppFactory) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="work")
        def work() -> str:
            with lock:
                runs.append(app.executor_id)
            crash()
            return app.executor_id

        @app.workflow(name="orphan")
        def orphan() -> str:
            return work()

        return orphan

    first = make_app()
    first.start(build(first, lambda: simulate_crash(first, wait=0)), workflow_id="o")
    wait_idle(first)
    rescuers = [make_app() for _ in range(4)]
    for r in rescuers:
        build(r, lambda: None)
    barrier = threading.Barrier(len(rescuers))
    claimed: list[WorkflowHandle[Any]] = []

    def rescue(app: App) -> None:
        barrier.wait(10)
        claimed.extend(app.recover())

    threads = [threading.Thread(target=rescue, args=(r,)) for r in rescuers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(claimed) == 1
    winner = claimed[0].result(timeout=10)
    assert runs == [first.executor_id, winner]
    assert rescuers[0].get_workflow("o").recovery_attempts == 1


def test_varargs_keyword_only_and_typed_arguments_survive_recovery(
    make_app: AppFactory,
) -> None:
    seen: list[Any] = []

    def build(app: App, crash: Callable[[], None]) -> Any:
        @app.step(name="boom")
        def boom() -> None:
            crash()

        @app.workflow(name="w")
        def w(first: Point, *rest: Point, scale: Decimal, **extra: Point) -> list[Any]:
            seen.append((first, rest, scale, extra))
            boom()
            return [first.x, [p.y for p in rest], str(scale), sorted(extra)]

        return w

    args = (Point(1, 2), Point(3, 4), Point(5, 6))
    _, _, handle = crash_then_recover(make_app, build, *args, scale=Decimal("1.50"),
                                      bonus=Point(7, 8))
    assert handle.result(timeout=10) == [1, [4, 6], "1.50", ["bonus"]]
    assert seen[0] == seen[1]
    first, rest, scale, extra = seen[1]
    assert isinstance(first, Point)
    assert all(isinstance(p, Point) for p in rest)
    assert isinstance(rest, tuple)
    assert isinstance(extra["bonus"], Point)
    assert scale == Decimal("1.50")


def test_unstorable_workflow_result_fails_the_workflow(app: App) -> None:
    @app.workflow(name="w")
    def w() -> Any:
        return {"conn": threading.Lock()}

    with pytest.raises(SerializationError, match=r"result of workflow 'w'.*\['conn'\]"):
        app.start(w, workflow_id="unstorable").result(timeout=10)
    assert app.get_workflow("unstorable").status is Status.FAILED


def test_graceful_handovers_that_make_progress_are_not_dead_lettered(
    make_app: AppFactory,
) -> None:
    """Deploys close the app and a successor takes over. A workflow that commits new
    steps in every life is not a poison workflow, however many deploys it lives through."""
    life = [0]
    progress: list[int] = []

    def build(app: App) -> Any:
        @app.step(name="advance")
        def advance(i: int) -> int:
            progress.append(i)
            return i

        @app.step(name="await_deploy")
        def await_deploy(i: int) -> None:
            # A long wait in the current life, cut short by the deploy (the last life runs on).
            while i == life[0] < 4 and not app._closing.is_set():
                time.sleep(0.005)

        @app.workflow(name="long")
        def long() -> list[int]:
            for i in range(5):
                advance(i)
                await_deploy(i)
            return sorted(set(progress))

        return long

    app = make_app(max_recoveries=2)
    app.start(build(app), workflow_id="long-1")
    for n in range(1, 5):
        wait_until(lambda n=n: len(progress) >= n, what=f"life {n - 1} to make progress")
        app.close(timeout=5)  # a deploy: graceful, not a crash
        life[0] = n
        app = make_app(max_recoveries=2)
        build(app)
        handles = app.recover()
        rec = app.get_workflow("long-1")
        assert [h.workflow_id for h in handles] == ["long-1"], (
            f"handover {n}: status {rec.status}, reason {rec.reason!r}"
        )
    assert handles[0].result(timeout=10) == [0, 1, 2, 3, 4]


# -- the replay property ------------------------------------------------------------------
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(outputs=st.lists(storable(max_leaves=6), min_size=1, max_size=5), data=st.data())
def test_replay_equals_first_run(store_kind: str, tmp_path: Any, outputs: list[Any],
                                 data: st.DataObject) -> None:
    crash_at = data.draw(st.integers(min_value=0, max_value=len(outputs) - 1), label="crash_at")
    db = Database(store_kind, tmp_path)
    apps = AppFactory(db)
    runs: list[tuple[str, int]] = []
    randoms: dict[str, list[float]] = {}
    try:
        def build(app: App, crash_index: int) -> Any:
            @app.step(name="produce")
            def produce(i: int) -> Any:
                runs.append((app.executor_id, i))
                if i == crash_index:
                    simulate_crash(app, wait=0)
                return outputs[i]

            @app.workflow(name="pipeline")
            def pipeline(n: int) -> list[Any]:
                mine = randoms.setdefault(app.executor_id, [])
                results = []
                for i in range(n):
                    results.append(produce(i))
                    mine.append(crashsafe.random())
                return results

            return pipeline

        # Redaction off: a generated field name that looks like a credential would be
        # stored as "***" and replay so (the documented trade-off; with redaction on,
        # tests/test_redaction.py checks that replay equals the first run as stored).
        reference = apps(redact=False)
        ref_handle = reference.start(build(reference, -1), len(outputs), workflow_id="ref")
        assert same(ref_handle.result(timeout=10), outputs)
        # Closed, or its background sweep may take the victim over before `second` does.
        reference.close()

        first = apps(redact=False)
        first.start(build(first, crash_at), len(outputs), workflow_id="victim")
        wait_idle(first)
        second = apps(redact=False)
        build(second, -1)
        (handle,) = second.recover()
        recovered = handle.result(timeout=10)

        assert same(recovered, outputs)
        reader = apps(redact=False)
        stored_ref = reader.handle("ref").result(timeout=5)
        stored_victim = reader.handle("victim").result(timeout=5)
        assert same(stored_victim, stored_ref)
        assert same(stored_ref, outputs)
        # Completed steps never ran again; the crashed one ran again once.
        assert [i for ex, i in runs if ex == first.executor_id] == list(range(crash_at + 1))
        assert [i for ex, i in runs if ex == second.executor_id] == list(
            range(crash_at, len(outputs)))
        # Journaled values committed before the crash replay unchanged.
        before, after = randoms[first.executor_id], randoms[second.executor_id]
        committed = max(0, crash_at - 1)
        assert after[:committed] == before[:committed]
    finally:
        apps.close()
        db.close()
