"""Compensations (saga): cancelling a workflow undoes its completed steps, newest first,
each exactly once, journaled; also across a kill -9 in the middle of compensating."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import crashsafe
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_until

WORKER = str(Path(__file__).with_name("saga_worker.py"))


def _saga(app: crashsafe.App, undone: list[str], gate: dict[str, Any]) -> Any:
    def undo(result: dict[str, Any]) -> None:
        undone.append(result["booked"])

    def make(i: int) -> Any:
        @app.step(name=f"book_{i}", effect=True, compensate=undo)
        def book(trip: str) -> dict[str, Any]:
            return {"booked": f"{trip}-{i}"}
        return book

    books = [make(i) for i in range(5)]

    @app.workflow(name="trip")
    def trip(name: str) -> list[str]:
        out = []
        for i, book in enumerate(books):
            if i == 3:
                gate["reached"] = True
                crashsafe.wait_for("continue")  # cancelled while parked here
            out.append(book(name)["booked"])
        return out

    return trip


def test_cancel_after_three_of_five_compensates_three_in_reverse(make_app: AppFactory) -> None:
    app = make_app()
    undone: list[str] = []
    trip = _saga(app, undone, {})
    handle = app.start(trip, "rome", workflow_id="trip-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="parked")
    assert handle.cancel() is True
    with pytest.raises(crashsafe.WorkflowCancelledError):
        handle.result(timeout=10)
    assert undone == ["rome-2", "rome-1", "rome-0"]
    rec = handle.record()
    assert rec.status is crashsafe.Status.CANCELLED
    assert rec.reason == "compensations ran"
    with pytest.raises(crashsafe.InvalidStateError, match="were compensated"):
        app.resume("trip-1")
    comp = [(e.kind, e.name, e.note) for e in app.journal("trip-1") if e.kind == "compensate"]
    assert comp == [("compensate", "book_2", "undoes step 2"),
                    ("compensate", "book_1", "undoes step 1"),
                    ("compensate", "book_0", "undoes step 0")]


def test_compensations_resume_after_a_crash_without_repeating(make_app: AppFactory) -> None:
    first = make_app()
    undone: list[str] = []
    trip = _saga(first, undone, {})
    handle = first.start(trip, "oslo", workflow_id="trip-2")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="parked")
    simulate_crash(first)  # the process dies before it sees the cancel
    assert first.store.set_status("trip-2", crashsafe.Status.CANCELLING,
                                  only_from=(crashsafe.Status.WAITING,)) is not None
    second = make_app()
    trip2_undone: list[str] = []
    _saga(second, trip2_undone, {})
    second.recover()
    with pytest.raises(crashsafe.WorkflowCancelledError):
        second.handle("trip-2").result(timeout=10)
    assert trip2_undone == ["oslo-2", "oslo-1", "oslo-0"]
    assert undone == []


def test_a_failing_compensation_is_recorded_and_the_rest_still_run(
        make_app: AppFactory) -> None:
    app = make_app()
    undone: list[str] = []

    def undo_ok(result: str) -> None:
        undone.append(result)

    def undo_broken(result: str) -> None:
        raise RuntimeError("refund API down")

    @app.step(name="a", compensate=undo_ok)
    def a() -> str:
        return "a"

    @app.step(name="b", compensate=undo_broken)
    def b() -> str:
        return "b"

    @app.workflow(name="ab")
    def ab() -> None:
        a()
        b()
        crashsafe.wait_for("never")

    handle = app.start(ab, workflow_id="ab-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="parked")
    handle.cancel()
    with pytest.raises(crashsafe.WorkflowCancelledError, match="compensations failed for b"):
        handle.result(timeout=10)
    assert undone == ["a"]
    errors = [e for e in app.journal("ab-1") if e.kind == "compensate" and e.error]
    assert [e.name for e in errors] == ["b"]


@pytest.mark.slow
def test_kill_9_in_the_middle_of_compensating(tmp_path: Path) -> None:
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    env = dict(os.environ, SAGA_KILL_AT_UNDO="2")
    proc = subprocess.Popen([sys.executable, WORKER, str(db), str(ledger), "start"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    app = crashsafe.App(f"sqlite:///{db}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rec = app.store.get_workflow("saga-1")
        if rec is not None and rec.status is crashsafe.Status.WAITING:
            break
        time.sleep(0.02)
    assert app.cancel("saga-1") is True
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # died after the 2nd compensation's effect
    out = subprocess.run([sys.executable, WORKER, str(db), str(ledger), "recover"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["status"] == "cancelled"
    conn = sqlite3.connect(ledger)
    undo_calls = [r[0] for r in conn.execute("SELECT booking FROM undo_calls ORDER BY rowid")]
    undone = [r[0] for r in conn.execute("SELECT booking FROM undone ORDER BY rowid")]
    conn.close()
    # Reverse order, each applied once; the one cut off by the kill was called again
    # (a compensation body runs at least once) but its receiver applied it once.
    assert undone == ["saga-2", "saga-1", "saga-0"]
    assert undo_calls in (["saga-2", "saga-1", "saga-1", "saga-0"],)
    app.close()


def test_a_deduplicated_result_is_not_compensated(make_app: AppFactory) -> None:
    app = make_app()
    undone: list[str] = []

    @app.step(name="refund", effect=True, compensate=lambda r: undone.append(r))
    def refund(order: str) -> str:
        return f"rf-{order}"

    @app.workflow(name="refund_then_wait")
    def refund_then_wait(order: str) -> None:
        refund(order, key=f"refund:{order}")
        crashsafe.wait_for("never")

    first = app.start(refund_then_wait, "o-1", workflow_id="first")
    wait_until(lambda: first.status() is crashsafe.Status.WAITING, what="first parked")
    second = app.start(refund_then_wait, "o-1", workflow_id="second")
    wait_until(lambda: second.status() is crashsafe.Status.WAITING, what="second parked")
    second.cancel()
    with pytest.raises(crashsafe.WorkflowCancelledError, match="nothing to compensate"):
        second.result(timeout=10)
    assert undone == []  # the refund belongs to "first", which still stands
    first.cancel()
    with pytest.raises(crashsafe.WorkflowCancelledError, match="compensations ran"):
        first.result(timeout=10)
    assert undone == ["rf-o-1"]
