"""The reference workload of the crash-point sweep, run as a child process.

``python tests/sweep_worker.py DB LEDGER``

Two workflows run one after the other, so the sequence of crash points is the same
in every run: ``sweep-sync`` (a ``def`` workflow) and then ``sweep-async`` (an
``async def`` one), four steps each, with one journaled ``crashsafe.now()`` and one
durable sleep in each workflow's code. Every step has its own name, so a crash
point's label says which step it belongs to.

Every step body logs its execution (workflow, index, name, idempotency key, the
journaled instant it was given, pid, time) and applies a keyed side effect in
LEDGER, a separate SQLite file crashsafe never touches: the independent witness the
sweep checks. The effects table is a receiver that honours idempotency keys.

Recovers first, starts both workflows with fixed ids (a restart gets the existing
ones back), checks each result, prints ``done`` and exits 0.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from typing import Any

import crashsafe

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (workflow_id TEXT, idx INTEGER, name TEXT, key TEXT,
                                       stamp TEXT, pid INTEGER, at REAL);
CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, workflow_id TEXT, idx INTEGER,
                                    value INTEGER, at REAL);
"""

STEPS = 4
# (workflow id, workflow number) in the order they run.
WORKFLOWS = (("sweep-sync", 1), ("sweep-async", 2))
RESULT_TIMEOUT = 60.0


def step_value(workflow_no: int, i: int, acc: int) -> int:
    return (acc * 31 + workflow_no * 7 + i) % 1_000_003


def expected(workflow_no: int) -> int:
    """The result of an uninterrupted run of workflow number ``workflow_no``."""
    acc = workflow_no
    for i in range(STEPS):
        acc = step_value(workflow_no, i, acc)
    return acc


class Ledger:
    """The receiver: logs every body execution, applies each keyed effect once."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(LEDGER_SCHEMA)
        self.lock = threading.Lock()

    def effect(self, started: float, value: int, stamp: str | None) -> None:
        cur = crashsafe.current()
        key = cur.idempotency_key
        assert key is not None and cur.step_index is not None
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO executions VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (cur.workflow_id, cur.step_index, cur.step_name, key, stamp,
                               os.getpid(), started))
            # The receiver honours the key: a repeated key is not applied again.
            self.conn.execute("INSERT INTO effects VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (key) DO NOTHING",
                              (key, cur.workflow_id, cur.step_index, value, time.time()))
            self.conn.execute("COMMIT")


def build(db: str, ledger_path: str) -> tuple[crashsafe.App, Any, Any]:
    app = crashsafe.App(f"sqlite:///{db}")
    ledger = Ledger(ledger_path)

    def body(workflow_no: int, i: int, acc: int, stamp: str | None = None) -> int:
        started = time.time()
        value = step_value(workflow_no, i, acc)
        ledger.effect(started, value, stamp)
        return value

    @app.step(name="sync.reserve")
    def reserve(workflow_no: int, i: int, acc: int) -> int:
        return body(workflow_no, i, acc)

    @app.step(name="sync.charge")
    def charge(workflow_no: int, i: int, acc: int, stamp: str) -> int:
        return body(workflow_no, i, acc, stamp)

    @app.step(name="sync.ship")
    def ship(workflow_no: int, i: int, acc: int) -> int:
        return body(workflow_no, i, acc)

    @app.step(name="sync.notify")
    def notify(workflow_no: int, i: int, acc: int) -> int:
        return body(workflow_no, i, acc)

    @app.workflow(name="sweep_sync")
    def sweep_sync(workflow_no: int) -> int:
        acc = reserve(workflow_no, 0, workflow_no)
        # Journaled alone: it is committed on its own just before charge's body runs.
        stamp = crashsafe.now().isoformat()
        acc = charge(workflow_no, 1, acc, stamp)
        crashsafe.sleep(0.01)
        acc = ship(workflow_no, 2, acc)
        return notify(workflow_no, 3, acc)

    @app.step(name="async.fetch")
    async def fetch(workflow_no: int, i: int, acc: int) -> int:
        return body(workflow_no, i, acc)

    @app.step(name="async.think")
    async def think(workflow_no: int, i: int, acc: int, stamp: str) -> int:
        return body(workflow_no, i, acc, stamp)

    @app.step(name="async.act")
    async def act(workflow_no: int, i: int, acc: int) -> int:
        return body(workflow_no, i, acc)

    @app.step(name="async.report")
    async def report(workflow_no: int, i: int, acc: int) -> int:
        return body(workflow_no, i, acc)

    @app.workflow(name="sweep_async")
    async def sweep_async(workflow_no: int) -> int:
        acc = await fetch(workflow_no, 0, workflow_no)
        # The instant rides along with the sleep's record: one two-row transaction.
        stamp = crashsafe.now().isoformat()
        await crashsafe.sleep_async(0.01)
        acc = await think(workflow_no, 1, acc, stamp)
        acc = await act(workflow_no, 2, acc)
        return await report(workflow_no, 3, acc)

    return app, sweep_sync, sweep_async


def main() -> int:
    db, ledger_path = sys.argv[1], sys.argv[2]
    app, sweep_sync, sweep_async = build(db, ledger_path)
    for handle in app.recover():
        handle.result(timeout=RESULT_TIMEOUT)
    for (workflow_id, workflow_no), wf in zip(WORKFLOWS, (sweep_sync, sweep_async),
                                              strict=True):
        result = app.start(wf, workflow_no, workflow_id=workflow_id).result(
            timeout=RESULT_TIMEOUT)
        if result != expected(workflow_no):
            print(f"wrong result {workflow_id}: {result!r} != {expected(workflow_no)}",
                  flush=True)
            return 1
    print("done", flush=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
