"""Durable waits for signals: crashsafe.wait_for / app.signal / crashsafe signal."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from typer.testing import CliRunner

import crashsafe
from crashsafe.cli.main import cli
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_until


def _register(app: crashsafe.App) -> dict[str, Any]:
    calls: list[str] = []

    @app.step(name="prepare")
    def prepare(order: str) -> str:
        calls.append("prepare")
        return f"prepared {order}"

    @app.step(name="finish")
    def finish(decision: Any) -> str:
        calls.append("finish")
        return f"finished with {decision}"

    @app.workflow(name="approval")
    def approval(order: str, timeout: float | None = None) -> dict[str, Any]:
        prepared = prepare(order)
        try:
            decision = crashsafe.wait_for("approve", timeout=timeout)
        except crashsafe.WaitTimeoutError:
            decision = "timed out"
        return {"prepared": prepared, "done": finish(decision)}

    @app.workflow(name="twice")
    def twice() -> list[Any]:
        return [crashsafe.wait_for("vote"), crashsafe.wait_for("vote")]

    @app.workflow(name="async_approval")
    async def async_approval() -> Any:
        return await crashsafe.wait_for_async("approve", timeout=30)

    return {"approval": approval, "twice": twice, "async_approval": async_approval,
            "calls": calls}


def test_wait_for_parks_as_waiting_and_resumes_with_the_payload(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)
    handle = app.start(wf["approval"], "A-1", workflow_id="A-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="waiting")
    rec = handle.record()
    assert rec.reason == "waiting for signal 'approve'"
    app.signal("A-1", "approve", {"approved": True, "by": "ada"})
    assert handle.result(timeout=10) == {
        "prepared": "prepared A-1", "done": "finished with {'approved': True, 'by': 'ada'}"}
    assert handle.status() is crashsafe.Status.SUCCEEDED
    kinds = [(e.kind, e.name) for e in app.journal("A-1")]
    assert kinds == [("step", "prepare"), ("wait", "approve"), ("signal", "approve"),
                     ("step", "finish")]


def test_a_signal_sent_before_the_wait_is_kept(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)

    @app.step(name="slow")
    def slow() -> int:
        time.sleep(0.3)
        return 1

    @app.workflow(name="late_waiter")
    def late_waiter() -> Any:
        slow()
        return crashsafe.wait_for("go")

    handle = app.start(late_waiter, workflow_id="L-1")
    app.signal("L-1", "go", [1, 2, 3])
    assert handle.result(timeout=10) == [1, 2, 3]
    assert wf["calls"] == []


def test_the_nth_wait_gets_the_nth_signal(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)
    handle = app.start(wf["twice"], workflow_id="V-1")
    app.signal("V-1", "vote", "first")
    app.signal("V-1", "vote", "second")
    assert handle.result(timeout=10) == ["first", "second"]


def test_timeout_is_durable_and_replays_as_the_same_outcome(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)
    handle = app.start(wf["approval"], "T-1", 0.2, workflow_id="T-1")
    assert handle.result(timeout=10)["done"] == "finished with timed out"
    entries = app.journal("T-1")
    assert entries[2].kind == "signal" and entries[2].error is not None
    # A late signal is refused: the workflow has finished.
    with pytest.raises(crashsafe.InvalidStateError, match="succeeded"):
        app.signal("T-1", "approve", True)


def test_a_crash_while_waiting_keeps_the_wait_and_its_deadline(make_app: AppFactory) -> None:
    first = make_app()
    wf = _register(first)
    handle = first.start(wf["approval"], "C-1", 30.0, workflow_id="C-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="waiting")
    deadline_before = first.journal("C-1")[1].output
    simulate_crash(first)

    second = make_app()
    wf2 = _register(second)
    assert [h.workflow_id for h in second.recover()] == ["C-1"]
    wait_until(lambda: second.get_workflow("C-1").status is crashsafe.Status.WAITING,
               what="waiting again")
    assert second.journal("C-1")[1].output == deadline_before  # the clock did not restart
    second.signal("C-1", "approve", "yes")
    result = second.handle("C-1").result(timeout=10)
    assert result["done"] == "finished with yes"
    assert wf2["calls"] == ["finish"]  # prepare was replayed, not re-run


def test_async_wait_is_woken_by_a_signal(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)
    handle = app.start(wf["async_approval"], workflow_id="AS-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="waiting")
    app.signal("AS-1", "approve", {"ok": 1})
    assert handle.result(timeout=10) == {"ok": 1}


def test_cancel_while_waiting(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)
    handle = app.start(wf["approval"], "X-1", workflow_id="X-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="waiting")
    assert handle.cancel() is True
    with pytest.raises(crashsafe.WorkflowCancelledError):
        handle.result(timeout=10)
    assert wf["calls"] == ["prepare"]


def test_bad_signals_get_clear_errors_and_change_nothing(make_app: AppFactory) -> None:
    app = make_app()
    wf = _register(app)
    handle = app.start(wf["approval"], "B-1", workflow_id="B-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="waiting")
    with pytest.raises(crashsafe.UnknownWorkflowError, match="no workflow with id 'nope'"):
        app.signal("nope", "approve", 1)
    with pytest.raises(crashsafe.ConfigurationError, match="non-empty string"):
        app.signal("B-1", "", 1)
    with pytest.raises(crashsafe.SerializationError, match="payload of signal 'approve'"):
        app.signal("B-1", "approve", object())
    assert handle.status() is crashsafe.Status.WAITING
    assert [e.kind for e in app.journal("B-1")] == ["step", "wait"]
    app.signal("B-1", "approve", "finally")
    assert handle.result(timeout=10)["done"] == "finished with finally"


def test_wait_for_outside_a_workflow_is_refused() -> None:
    with pytest.raises(crashsafe.NotInWorkflowError):
        crashsafe.wait_for("approve")


def test_cli_signal(tmp_path: Any) -> None:
    db = f"sqlite:///{tmp_path / 'sig.db'}"
    app = crashsafe.App(db)
    wf = _register(app)
    handle = app.start(wf["approval"], "S-1", workflow_id="S-1")
    wait_until(lambda: handle.status() is crashsafe.Status.WAITING, what="waiting")
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db, "signal", "S-1", "approve", "{not json"])
    assert res.exit_code == 2 and "not valid JSON" in res.output
    assert handle.status() is crashsafe.Status.WAITING
    res = runner.invoke(cli, ["--db", db, "ls", "--status", "waiting", "--json"])
    assert [r["id"] for r in json.loads(res.output)] == ["S-1"]
    res = runner.invoke(cli, ["--db", db, "signal", "S-1", "approve", '{"approved": true}'])
    assert res.exit_code == 0, res.output
    assert handle.result(timeout=10)["done"] == "finished with {'approved': True}"
    res = runner.invoke(cli, ["--db", db, "signal", "S-1", "approve", "1"])
    assert res.exit_code == 2 and "succeeded" in res.output
    app.close()
