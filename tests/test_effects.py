"""Effect steps: intent before effect, outcome-unknown rules, the deduplication table."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import crashsafe
from crashsafe._effects import args_hash
from crashsafe.stores.base import WorkflowRecord
from crashsafe.stores.sqlite import SQLiteStore
from helpers import AppFactory, wait_until

WORKER = str(Path(__file__).with_name("effects_worker.py"))


def _run(db: Path, ledger: Path, rule: str, crash: str, *extra: str,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, WORKER, str(db), str(ledger), rule, crash, *extra],
                          capture_output=True, text=True, timeout=120)


def _ledger(ledger: Path) -> tuple[list[tuple[str, float]], list[tuple[str, float, str]]]:
    conn = sqlite3.connect(ledger)
    calls = conn.execute("SELECT key, amount FROM calls").fetchall()
    charges = conn.execute("SELECT key, amount, charge_id FROM charges").fetchall()
    conn.close()
    return calls, charges


def _note(db: Path) -> str | None:
    store = SQLiteStore(f"sqlite:///{db}")
    try:
        return store.load_journal("order-1")[0].note
    finally:
        store.close()


@pytest.mark.parametrize(("rule", "crash", "calls_expected", "note"), [
    ("retry", "after", 2, "outcome unknown after a crash: retried with the same key"),
    ("reconcile", "after", 1, "outcome unknown after a crash: reconciled: the effect had been "
                              "applied"),
    ("reconcile", "before", 1, "outcome unknown after a crash: reconciled: not applied, ran "
                               "the step again"),
])
def test_kill_between_effect_and_record(tmp_path: Path, rule: str, crash: str,
                                        calls_expected: int, note: str) -> None:
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    first = _run(db, ledger, rule, crash)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = _run(db, ledger, rule, crash)
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout.strip().splitlines()[-1])
    assert out == {"status": "succeeded", "result": "ch-order-1:0"}
    calls, charges = _ledger(ledger)
    assert charges == [("order-1:0", 42.0, "ch-order-1:0")]  # exactly one charge landed
    assert len(calls) == calls_expected
    assert {k for k, _ in calls} == {"order-1:0"}  # every call carried the same key
    assert _note(db) == note


@pytest.mark.parametrize("rule", ["escalate", "reconcile-raises"])
def test_escalation_parks_the_workflow_until_a_person_decides(tmp_path: Path,
                                                              rule: str) -> None:
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    assert _run(db, ledger, rule, "after").returncode == -signal.SIGKILL
    # The restarted process finds the unknown outcome and parks the workflow.
    parked = subprocess.Popen([sys.executable, WORKER, str(db), str(ledger), rule, "after"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    app = crashsafe.App(f"sqlite:///{db}")
    wait_until(lambda: app.get_workflow("order-1").status is crashsafe.Status.WAITING,
               what="the workflow to be parked")
    reason = app.get_workflow("order-1").reason or ""
    assert "outcome of step 'charge' (index 0, key 'order-1:0') is unknown" in reason
    assert "crashsafe signal order-1 resolve:0" in reason
    if rule == "reconcile-raises":
        assert "reconcile raised ConnectionError" in reason
    app.signal("order-1", "resolve:0", {"action": "skip", "result": "ch-order-1:0"})
    out, err = parked.communicate(timeout=60)
    assert parked.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"status": "succeeded",
                                                        "result": "ch-order-1:0"}
    calls, charges = _ledger(ledger)
    assert len(calls) == 1 and len(charges) == 1  # the person's decision ran nothing again
    note = _note(db) or ""
    assert note.startswith("outcome unknown after a crash: escalated (")
    assert note.endswith("a person chose skip")
    app.close()


def _effect_app(app: crashsafe.App) -> dict[str, Any]:
    applied: list[tuple[str, float]] = []

    @app.step(name="refund", effect=True)
    def refund(order: str, amount: float) -> dict[str, Any]:
        key = crashsafe.current().idempotency_key
        assert key is not None
        applied.append((key, amount))
        return {"refund_id": f"rf-{len(applied)}", "key": key}

    @app.workflow(name="refunder")
    def refunder(order: str, amount: float) -> dict[str, Any]:
        return refund(order, amount, key=f"refund:{order}")

    @app.step(name="fail_once", effect=True)
    def fail_once() -> None:
        raise ValueError("card declined")

    @app.workflow(name="declined")
    def declined() -> None:
        fail_once(key="charge:decline")

    return {"refunder": refunder, "declined": declined, "applied": applied}


def test_a_user_key_is_applied_once_across_workflows(make_app: AppFactory) -> None:
    app = make_app()
    wf = _effect_app(app)
    first = app.start(wf["refunder"], "order-123", 10.0, workflow_id="W-1").result(timeout=10)
    second = app.start(wf["refunder"], "order-123", 10.0, workflow_id="W-2").result(timeout=10)
    assert first == second == {"refund_id": "rf-1", "key": "refund:order-123"}
    assert wf["applied"] == [("refund:order-123", 10.0)]
    entry = app.journal("W-2")[0]
    assert entry.note == ("deduplicated: key 'refund:order-123' was already applied by step "
                          "'refund' of workflow 'W-1'")


def test_a_user_key_reused_with_other_arguments_is_refused(make_app: AppFactory) -> None:
    app = make_app()
    wf = _effect_app(app)
    app.start(wf["refunder"], "order-9", 10.0, workflow_id="K-1").result(timeout=10)
    with pytest.raises(crashsafe.IdempotencyKeyConflictError) as info:
        app.start(wf["refunder"], "order-9", 99.0, workflow_id="K-2").result(timeout=10)
    assert "uses key 'refund:order-9', which step 'refund' of workflow 'K-1' already used " \
           "with different arguments" in str(info.value)
    assert wf["applied"] == [("refund:order-9", 10.0)]  # nothing applied the second time
    assert app.get_workflow("K-1").status is crashsafe.Status.SUCCEEDED


def test_a_recorded_failure_is_shared_by_the_key(make_app: AppFactory) -> None:
    app = make_app()
    wf = _effect_app(app)
    with pytest.raises(ValueError, match="card declined"):
        app.start(wf["declined"], workflow_id="D-1").result(timeout=10)
    with pytest.raises(ValueError, match="card declined"):
        app.start(wf["declined"], workflow_id="D-2").result(timeout=10)


def test_effect_keys_expire_after_the_retention(make_app: AppFactory) -> None:
    app = make_app(effect_retention=0.0)
    wf = _effect_app(app)
    app.start(wf["refunder"], "order-5", 5.0, workflow_id="R-1").result(timeout=10)
    assert app.store.get_effect("refund:order-5") is not None
    assert app.store.purge_effects(1e12) == 1
    assert app.store.get_effect("refund:order-5") is None
    app.start(wf["refunder"], "order-5", 5.0, workflow_id="R-2").result(timeout=10)
    assert len(wf["applied"]) == 2  # forgotten key: the effect applies again, as documented


def test_effect_steps_reserve_the_key_parameter(make_app: AppFactory) -> None:
    app = make_app()
    with pytest.raises(crashsafe.ConfigurationError, match="parameter named 'key'"):
        @app.step(effect=True)
        def bad(key: str) -> None:
            return None
    with pytest.raises(crashsafe.ConfigurationError, match="needs reconcile=fn"):
        app.step(on_unknown="reconcile")(lambda: None)
    with pytest.raises(crashsafe.ConfigurationError, match="on_unknown must be one of"):
        app.step(on_unknown="guess")(lambda: None)


def _parked_run(db: Path, ledger: Path, crash: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, WORKER, str(db), str(ledger), "escalate", crash],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_unknown_outcome_asks_the_person_again(tmp_path: Path) -> None:
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    assert _run(db, ledger, "escalate", "after-twice").returncode == -signal.SIGKILL
    app = crashsafe.App(f"sqlite:///{db}")

    def parked() -> bool:
        return app.get_workflow("order-1").status is crashsafe.Status.WAITING

    second = _parked_run(db, ledger, "after-twice")
    wait_until(parked, what="the first escalation")
    app.signal("order-1", "resolve:0", {"action": "retry"})
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL  # the retry died too: unknown again
    third = _parked_run(db, ledger, "after-twice")
    wait_until(parked, what="a second escalation, not the old answer reused")
    app.signal("order-1", "resolve:0", {"oops": "not a decision"})
    wait_until(lambda: "was not understood" in (app.get_workflow("order-1").reason or ""),
               what="the bad answer to be reported")
    app.signal("order-1", "resolve:0", {"action": "skip", "result": "ch-order-1:0"})
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["result"] == "ch-order-1:0"
    assert (_note(db) or "").endswith("a person chose skip")
    calls, charges = _ledger(ledger)
    assert len(calls) == 2 and len(charges) == 1
    app.close()


def test_a_key_held_by_a_stopped_workflow_is_refused_not_waited_on_forever(
        make_app: AppFactory) -> None:
    app = make_app()
    wf = _effect_app(app)
    # Workflow A claimed the key, its outcome became unknown, then it was cancelled.
    now = time.time()
    app.store.create_workflow(WorkflowRecord("A", "refunder", "1", crashsafe.Status.CANCELLED,
                                             b"{}", now, now))
    digest = args_hash(("order-77", 3.0), {})
    assert app.store.begin_effect("A", 0, "refund", "refund:order-77", digest, now).holder \
        is None
    with pytest.raises(crashsafe.InvalidStateError) as info:
        app.start(wf["refunder"], "order-77", 3.0, workflow_id="B").result(timeout=10)
    assert "holds key 'refund:order-77' but stopped (cancelled)" in str(info.value)
    assert wf["applied"] == []


def test_a_steps_start_and_end_are_on_one_clock_when_the_stores_is_apart(
        make_app: AppFactory) -> None:
    """A step's ``started_at`` and ``ended_at`` are both on the store's clock, whatever
    the offset of ours (durations, spans and ``crashsafe stats`` subtract them): a
    plain result, an effect that failed, and an effect deduplicated by its key."""
    app = make_app()
    wf = _effect_app(app)
    app.launch()
    app._sync_clock = lambda: None  # type: ignore[method-assign]
    app._clock_offset = 3600.0  # the store's clock an hour ahead of ours

    @app.step(name="plain_s")
    def plain_s() -> int:
        return 1

    @app.workflow(name="plain_wf")
    def plain_wf() -> int:
        return plain_s()

    assert app.start(plain_wf, workflow_id="C-1").result(timeout=10) == 1
    app.start(wf["refunder"], "order-9", 1.0, workflow_id="C-2").result(timeout=10)
    app.start(wf["refunder"], "order-9", 1.0, workflow_id="C-3").result(timeout=10)
    with pytest.raises(ValueError, match="card declined"):
        app.start(wf["declined"], workflow_id="C-4").result(timeout=10)
    entries = {wid: app.journal(wid)[0] for wid in ("C-1", "C-2", "C-3", "C-4")}
    assert (entries["C-3"].note or "").startswith("deduplicated")
    assert entries["C-4"].error is not None
    now = app.clock()
    for wid, e in entries.items():
        assert 0.0 <= e.ended_at - e.started_at < 30.0, (wid, e.started_at, e.ended_at)
        assert abs(e.ended_at - now) < 60.0, wid  # the store's clock, not ours
