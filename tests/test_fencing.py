"""Fencing tokens: a worker that lost its lease (paused, partitioned) cannot write.

Every takeover raises the workflow's token; every write a run makes carries the token
its lease was granted with, and the store refuses a write whose token is stale. Runs
on every store kind.
"""

from __future__ import annotations

import threading
from typing import Any

from crashsafe import App, Status
from helpers import AppFactory, wait_until


def _build(app: App, gate: threading.Event | None, ran: list[str], tag: str) -> Any:
    @app.step(name="first")
    def first() -> str:
        ran.append(f"{tag}:first")
        if gate is not None:
            gate.wait(10)  # the "paused" worker sits here past its lease
        return f"{tag}-first"

    @app.step(name="second")
    def second(x: str) -> str:
        ran.append(f"{tag}:second")
        return f"{x}+{tag}-second"

    @app.workflow(name="fenced")
    def flow() -> str:
        return second(first())

    return flow


def test_a_paused_worker_cannot_write_after_a_takeover(make_app: AppFactory) -> None:
    ran: list[str] = []
    gate = threading.Event()
    old = make_app()
    flow = _build(old, gate, ran, "old")
    old.start(flow, workflow_id="fenced-1")
    wait_until(lambda: "old:first" in ran, what="the old worker to enter its step")
    # The old worker is declared dead (its lease ran out) while it is still running.
    old.store.stop_executor(old.executor_id)
    new = make_app()
    _build(new, None, ran, "new")
    (handle,) = new.recover()
    assert handle.result(timeout=10) == "new-first+new-second"
    token_after = new.store.get_workflow("fenced-1").token  # type: ignore[union-attr]
    assert token_after == 1
    # The paused worker wakes up and tries to record its result: refused.
    gate.set()
    wait_until(lambda: "fenced-1" not in old._executions, what="the stale run to stop")
    journal = new.journal("fenced-1")
    assert [(e.name, e.output) for e in journal] == [
        ("first", b'"new-first"'), ("second", b'"new-first+new-second"')]
    assert "old:second" not in ran  # the stale run stopped at its refused write
    rec = new.store.get_workflow("fenced-1")
    assert rec is not None and rec.status is Status.SUCCEEDED and rec.token == token_after


def test_a_stale_worker_cannot_finish_a_workflow_taken_over(make_app: AppFactory) -> None:
    ran: list[str] = []
    gate = threading.Event()
    old = make_app()

    @old.step(name="slow")
    def slow() -> int:
        ran.append("old")
        gate.wait(10)
        return 1

    @old.workflow(name="finish-race")
    def flow() -> int:
        return slow()

    old.start(flow, workflow_id="fenced-2")
    wait_until(lambda: ran == ["old"], what="the old worker to start")
    old.store.stop_executor(old.executor_id)
    new = make_app()
    release = threading.Event()

    @new.step(name="slow")
    def slow_new() -> int:
        ran.append("new")
        release.wait(10)  # the new holder is mid-step when the old one wakes
        return 2

    @new.workflow(name="finish-race")
    def flow_new() -> int:
        return slow_new()

    (handle,) = new.recover()
    wait_until(lambda: "new" in ran, what="the new worker to start")
    gate.set()
    wait_until(lambda: "fenced-2" not in old._executions, what="the stale run to stop")
    assert new.journal("fenced-2") == []  # the stale result never landed
    release.set()
    assert handle.result(timeout=10) == 2
    assert [e.output for e in new.journal("fenced-2")] == [b"2"]
