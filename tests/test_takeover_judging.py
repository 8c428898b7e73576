"""Who may be taken over after the store itself stalled (RELIABILITY.md R6).

A late heartbeat proves a worker dead only while the judge's own heartbeats get
through. When the store stalls for everyone (on SQLite, a process paused while it
holds the write lock; on PostgreSQL, a server restart), every heartbeat is late at
once; taking over on that evidence would take workflows from live workers. These run
two apps on one real SQLite file and stall it by holding its write lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import crashsafe
from crashsafe import App, Status
from crashsafe.exceptions import ConfigurationError, StoreError
from helpers import wait_until

LEASE = 1.0


def _app(db: Path) -> App:
    return App(f"sqlite:///{db}", lease=LEASE, heartbeat_interval=0.2, recovery_interval=0.1)


def _register(app: App) -> Any:
    @app.workflow(name="parked")
    def parked() -> Any:
        return crashsafe.wait_for("go", timeout=60)

    return parked


def _hold_write_lock(db: Path, seconds: float) -> None:
    """Stall the file for everyone, as a paused writer would."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_a_stall_of_the_store_does_not_make_live_workers_look_dead(tmp_path: Path) -> None:
    db = tmp_path / "stall.db"
    owner, judge = _app(db), _app(db)
    try:
        flow = _register(owner)
        _register(judge)
        owner.start(flow, workflow_id="w1")
        wait_until(lambda: owner.store.get_workflow("w1").status is Status.WAITING,  # type: ignore[union-attr]
                   what="the workflow to park")
        judge.launch()
        before = owner.store.get_workflow("w1")
        assert before is not None and before.owner == owner.executor_id
        _hold_write_lock(db, 3 * LEASE)  # every heartbeat is late when this ends
        time.sleep(2 * LEASE)  # several sweeps of the judge after the stall
        after = judge.store.get_workflow("w1")
        assert after is not None
        assert (after.owner, after.token) == (owner.executor_id, before.token), (
            "a live worker's workflow was taken over after a store stall")
        owner.signal("w1", "go", 7)
        assert owner.handle("w1").result(timeout=10) == 7
    finally:
        judge.close()
        owner.close()


def test_a_worker_whose_heartbeats_stop_is_still_taken_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "hung.db"
    owner, judge = _app(db), _app(db)
    try:
        flow = _register(owner)
        _register(judge)
        owner.start(flow, workflow_id="w1")
        wait_until(lambda: owner.store.get_workflow("w1").status is Status.WAITING,  # type: ignore[union-attr]
                   what="the workflow to park")
        judge.launch()
        hung = threading.Event()

        def no_heartbeat(executor_id: str, at: float) -> None:
            hung.set()
            raise StoreError("heartbeat hangs (test)")

        # The owner's process lives on but its heartbeats stop getting through: that
        # is what a late heartbeat means, and the judge's own beats are on time.
        monkeypatch.setattr(owner.store, "heartbeat", no_heartbeat)
        wait_until(hung.is_set, what="the owner's heartbeat to stop")
        wait_until(lambda: judge.store.get_workflow("w1").owner == judge.executor_id,  # type: ignore[union-attr]
                   timeout=6 * LEASE, what="the judge to take the workflow over")
        judge.signal("w1", "go", 8)
        assert judge.handle("w1").result(timeout=10) == 8
    finally:
        judge.close()
        owner.close()


def test_a_heartbeat_not_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_interval=5 s is not shorter"):
        App("memory://", lease=5, heartbeat_interval=5)
    app = App("memory://", lease=1.0)
    assert app.heartbeat_interval == 0.25  # a quarter of a short lease by default
    assert App("memory://").heartbeat_interval == 2.0
