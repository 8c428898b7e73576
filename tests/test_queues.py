"""Durable queues: enqueue, priorities, delays, dedup ids, limits, hand-back. Every store."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import crashsafe
from crashsafe import App, RetryPolicy, Status
from helpers import AppFactory, wait_until


def _worker(app: App, log: list[tuple[str, str, float, float]], gate: threading.Event | None = None,
            hold: float = 0.0) -> Any:
    lock = threading.Lock()

    @app.step(name="work")
    def work(label: str) -> str:
        start = time.monotonic()
        if gate is not None:
            gate.wait(10)
        if hold:
            time.sleep(hold)
        with lock:
            log.append((label, app.executor_id, start, time.monotonic()))
        return label.upper()

    @app.workflow(name="job")
    def job(label: str) -> str:
        return work(label)

    return job


def test_enqueued_workflows_wait_for_a_worker_then_run(make_app: AppFactory) -> None:
    log: list[tuple[str, str, float, float]] = []
    producer = make_app()
    q = producer.queue("jobs")
    job = _worker(producer, log)
    handle = q.enqueue(job, "a", workflow_id="job-a")
    time.sleep(0.3)
    assert handle.status() is Status.ENQUEUED and log == []  # nobody serves the queue yet
    worker = make_app()
    worker.queue("jobs")
    _worker(worker, log)
    worker.serve(["jobs"])
    assert handle.result(timeout=10) == "A"
    assert [(label, who) for label, who, _, _ in log] == [("a", worker.executor_id)]
    rec = worker.store.get_workflow("job-a")
    assert rec is not None and rec.queue == "jobs" and rec.token == 1


def test_enqueue_is_idempotent_on_the_workflow_id(app: App) -> None:
    log: list[tuple[str, str, float, float]] = []
    q = app.queue("jobs")
    job = _worker(app, log)
    first = q.enqueue(job, "a", workflow_id="same")
    second = q.enqueue(job, "a", workflow_id="same")
    assert first.workflow_id == second.workflow_id == "same"
    app.serve()
    assert first.result(timeout=10) == "A"
    assert len(log) == 1


def test_dedup_id_returns_the_pending_workflow_then_allows_a_new_one(app: App) -> None:
    log: list[tuple[str, str, float, float]] = []
    q = app.queue("jobs")
    job = _worker(app, log)
    first = q.enqueue(job, "a", dedup_id="doc-7")
    again = q.enqueue(job, "b", dedup_id="doc-7")
    assert again.workflow_id == first.workflow_id
    app.serve()
    assert first.result(timeout=10) == "A"
    later = q.enqueue(job, "c", dedup_id="doc-7")  # the first is done: a new one is welcome
    assert later.workflow_id != first.workflow_id
    assert later.result(timeout=10) == "C"
    assert sorted(label for label, *_ in log) == ["a", "c"]


def test_higher_priority_runs_first_and_delays_are_honoured(app: App) -> None:
    log: list[tuple[str, str, float, float]] = []
    q = app.queue("jobs", worker_concurrency=1)
    job = _worker(app, log)
    enqueued_at = time.monotonic()
    handles = [q.enqueue(job, "late", delay=0.6), q.enqueue(job, "low", priority=0),
               q.enqueue(job, "high", priority=5), q.enqueue(job, "mid", priority=2)]
    app.serve()
    for h in handles:
        h.result(timeout=15)
    assert [label for label, *_ in log] == ["high", "mid", "low", "late"]
    late_start = next(start for label, _, start, _ in log if label == "late")
    assert late_start - enqueued_at >= 0.55


def test_global_concurrency_holds_across_workers_and_no_item_runs_twice(
        make_app: AppFactory) -> None:
    log: list[tuple[str, str, float, float]] = []
    workers = []
    for _ in range(3):
        w = make_app()
        w.queue("jobs", concurrency=2, worker_concurrency=2)
        _worker(w, log, hold=0.05)
        workers.append(w)
    q = workers[0]._queues["jobs"]
    job = workers[0]._lookup("job")
    assert job is not None
    handles = [q.enqueue(job, f"item-{i}") for i in range(18)]
    for w in workers:
        w.serve()
    for h in handles:
        h.result(timeout=30)
    labels = [label for label, *_ in log]
    assert sorted(labels) == sorted(f"item-{i}" for i in range(18))  # each exactly once
    events = sorted([(s, 1) for _, _, s, _ in log] + [(e, -1) for _, _, _, e in log])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2, f"{peak} ran at once on a queue limited to 2"


def test_cancelling_an_enqueued_workflow_means_it_never_runs(app: App) -> None:
    log: list[tuple[str, str, float, float]] = []
    q = app.queue("jobs")
    job = _worker(app, log)
    handle = q.enqueue(job, "never", delay=0.5)
    assert handle.cancel() is True
    app.serve()
    with pytest.raises(crashsafe.WorkflowCancelledError):
        handle.result(timeout=5)
    time.sleep(0.7)
    assert log == []


def test_a_distant_retry_goes_back_to_the_queue(make_app: AppFactory) -> None:
    calls: list[str] = []
    policy = RetryPolicy(max_attempts=2, initial_delay=0.6, jitter="none", suspend_after=0.1)
    apps = [make_app(), make_app()]
    for a in apps:
        a.queue("jobs")

        @a.step(name="flaky", retry=policy)
        def flaky(a: App = a) -> str:
            calls.append(a.executor_id)
            if len(calls) == 1:
                raise ConnectionError("come back later")
            return "done"

        @a.workflow(name="retrying")
        def retrying() -> str:
            return flaky()

    handle = apps[0]._queues["jobs"].enqueue(apps[0]._lookup("retrying"))  # type: ignore[arg-type]
    apps[0].serve()
    wait_until(lambda: calls != [], what="the first attempt")
    wait_until(lambda: handle.status() is Status.ENQUEUED, what="the hand-back to the queue")
    rec = apps[0].store.get_workflow(handle.workflow_id)
    assert rec is not None and rec.not_before is not None and rec.owner is None
    apps[1].serve()
    assert handle.result(timeout=10) == "done"
    assert len(calls) == 2
    assert apps[0].store.load_attempts(handle.workflow_id)[0].failure_class == "server_error"


def test_a_worker_closing_hands_its_queued_work_back(make_app: AppFactory) -> None:
    log: list[tuple[str, str, float, float]] = []
    gate = threading.Event()
    first = make_app()
    first.queue("jobs")
    job = _worker(first, log, gate=gate)
    handle = first._queues["jobs"].enqueue(job, "x", workflow_id="handed-back")
    first.serve()
    wait_until(lambda: "handed-back" in first._executions, what="the first worker to start")
    execution = first._executions["handed-back"]
    closer = threading.Thread(target=first.close, kwargs={"timeout": 5.0})
    closer.start()
    wait_until(lambda: execution.ctx.shutdown, what="the close to reach the workflow")
    gate.set()  # its step finishes, but the closing worker records nothing more
    closer.join(10)
    assert handle.status() is Status.ENQUEUED
    second = make_app()
    second.queue("jobs")
    _worker(second, log)
    second.serve()
    assert handle.result(timeout=10) == "X"
    # The second worker ran it (on a loaded machine the first one's body, released by
    # the gate, may log after it: its result was not recorded).
    assert second.executor_id in [who for _, who, _, _ in log]


def test_a_closing_worker_does_not_resume_what_it_just_stopped(make_app: AppFactory) -> None:
    # The background sweep may read the workflow as ours and running just before close()
    # stops it, and resume it once it stopped: pin that sweep between the stop and the
    # hand-back. A closing app must not run it again (it would record the step result).
    log: list[tuple[str, str, float, float]] = []
    gate = threading.Event()
    first = make_app()
    first.queue("jobs")
    job = _worker(first, log, gate=gate)
    handle = first._queues["jobs"].enqueue(job, "x", workflow_id="swept")
    first.serve()
    wait_until(lambda: "swept" in first._executions, what="the first worker to start")
    execution = first._executions["swept"]
    hand_back = first._hand_back

    def sweep_then_hand_back(workflow_ids: Any) -> None:
        first._recover()
        hand_back(workflow_ids)

    first._hand_back = sweep_then_hand_back  # type: ignore[method-assign]
    closer = threading.Thread(target=first.close, kwargs={"timeout": 5.0})
    closer.start()
    wait_until(lambda: execution.ctx.shutdown, what="the close to reach the workflow")
    gate.set()
    closer.join(10)
    wait_until(lambda: not first._executions, what="the closed app to go idle")
    assert handle.status() is Status.ENQUEUED
    assert first.store.load_journal("swept") == []
    assert len(log) <= 1  # the stopped run's body at most, never a second run
    second = make_app()
    second.queue("jobs")
    _worker(second, log)
    second.serve()
    assert handle.result(timeout=10) == "X"
    assert second.executor_id in [who for _, who, _, _ in log]


def test_a_workflow_can_enqueue_a_child_exactly_once(make_app: AppFactory) -> None:
    log: list[tuple[str, str, float, float]] = []
    app = make_app()
    q = app.queue("jobs")
    job = _worker(app, log)

    @app.workflow(name="parent")
    def parent() -> str:
        child = q.enqueue(job, "child")
        return child.workflow_id

    child_id = app.start(parent, workflow_id="parent-1").result(timeout=10)
    assert child_id == "parent-1/0"
    assert [e.kind for e in app.journal("parent-1")] == ["child"]
    app.serve()
    assert app.handle(child_id).result(timeout=10) == "CHILD"


def test_a_queue_rate_limit_spaces_the_starts(app: App) -> None:
    log: list[tuple[str, str, float, float]] = []
    q = app.queue("slow", rate_limit=crashsafe.RateLimit("q-slow", rate=5, per=1.0, burst=1))
    job = _worker(app, log)
    handles = [q.enqueue(job, f"r{i}") for i in range(4)]
    app.serve()
    for h in handles:
        h.result(timeout=15)
    starts = sorted(start for _, _, start, _ in log)
    assert starts[-1] - starts[0] >= 0.5  # 4 starts at 5/s: at least 3 gaps of 0.2 s


def test_serving_an_unknown_queue_is_a_clear_error(app: App) -> None:
    app.queue("jobs")
    with pytest.raises(crashsafe.ConfigurationError, match="no queue named 'nope'"):
        app.serve(["nope"])


def test_a_dead_workers_queued_workflow_goes_back_to_its_queue(make_app: AppFactory) -> None:
    from crashsafe.testing import simulate_crash

    log: list[tuple[str, str, float, float]] = []
    gate = threading.Event()
    doomed = make_app()
    doomed.queue("jobs")
    job = _worker(doomed, log, gate=gate)
    handle = doomed._queues["jobs"].enqueue(job, "y", workflow_id="orphan")
    doomed.serve()
    wait_until(lambda: "orphan" in doomed._executions, what="the doomed worker to start")
    simulate_crash(doomed, wait=0)
    gate.set()
    # A process that does not serve the queue recovers it: back to the queue it goes.
    bystander = make_app()
    bystander.queue("jobs")
    _worker(bystander, log)
    bystander.recover()
    assert handle.status() is Status.ENQUEUED
    assert [who for _, who, _, _ in log if who == bystander.executor_id] == []
    bystander.serve(["jobs"])
    assert handle.result(timeout=10) == "Y"
    # The doomed app's step body may still append its line after the bystander's
    # (a simulated crash stops it at its next durable call, not mid-body): what
    # matters is that the bystander ran the workflow.
    assert bystander.executor_id in [who for _, who, _, _ in log]
