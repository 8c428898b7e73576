"""A workload for the kill -9 tests, run as a child process.

``python tests/kill_worker.py DB LEDGER WORKFLOWS STEPS [--poison]``

Runs WORKFLOWS workflows (half sync, half async) of STEPS steps each. Every step
body logs its execution and applies a keyed side effect in LEDGER, a separate
SQLite file crashsafe never touches: the independent witness the tests check.
Prints ``ready`` once recovery is done and ``done`` when every workflow finished.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

import crashsafe

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (workflow_id TEXT, idx INTEGER, key TEXT, pid INTEGER,
                                       at REAL);
CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, workflow_id TEXT, idx INTEGER,
                                    value INTEGER, at REAL);
"""


def step_value(workflow_no: int, i: int, acc: int) -> int:
    return (acc * 31 + workflow_no * 7 + i) % 1_000_003


def expected(workflow_no: int, steps: int) -> int:
    acc = workflow_no
    for i in range(steps):
        acc = step_value(workflow_no, i, acc)
    return acc


class Ledger:
    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(LEDGER_SCHEMA)
        self.lock = threading.Lock()

    def effect(self, value: int) -> None:
        cur = crashsafe.current()
        assert cur.idempotency_key is not None
        with self.lock:
            self.conn.execute("INSERT INTO executions VALUES (?, ?, ?, ?, ?)",
                              (cur.workflow_id, cur.step_index, cur.idempotency_key,
                               os.getpid(), time.time()))
            # The receiver honours the key: a repeated key is not applied again.
            self.conn.execute("INSERT INTO effects VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (key) DO NOTHING",
                              (cur.idempotency_key, cur.workflow_id, cur.step_index, value,
                               time.time()))


def build(db: str, ledger_path: str, max_recoveries: int = 20
          ) -> tuple[crashsafe.App, Any, Any, Any]:
    app = crashsafe.App(f"sqlite:///{db}", max_recoveries=max_recoveries)
    ledger = Ledger(ledger_path)

    @app.step(name="work")
    def work(workflow_no: int, i: int, acc: int) -> int:
        value = step_value(workflow_no, i, acc)
        time.sleep(0.002)
        ledger.effect(value)
        return value

    @app.step(name="awork")
    async def awork(workflow_no: int, i: int, acc: int) -> int:
        value = step_value(workflow_no, i, acc)
        await asyncio.sleep(0.002)
        ledger.effect(value)
        return value

    @app.workflow(name="pipeline")
    def pipeline(workflow_no: int, steps: int) -> int:
        acc = workflow_no
        for i in range(steps):
            acc = work(workflow_no, i, acc)
        return acc

    @app.workflow(name="apipeline")
    async def apipeline(workflow_no: int, steps: int) -> int:
        acc = workflow_no
        for i in range(steps):
            acc = await awork(workflow_no, i, acc)
        return acc

    @app.step(name="poison")
    def poison() -> None:
        ledger.effect(0)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.workflow(name="poisoned")
    def poisoned() -> None:
        poison()

    return app, pipeline, apipeline, poisoned


def main() -> int:
    db, ledger_path, workflows, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
        int(sys.argv[4])
    app, pipeline, apipeline, poisoned = build(db, ledger_path,
                                               3 if "--poison" in sys.argv else 20)
    handles = app.recover()
    print("ready", flush=True)
    if "--poison" in sys.argv:
        handles.append(app.start(poisoned, workflow_id="poison-1"))
    else:
        for n in range(workflows):
            wf = pipeline if n % 2 == 0 else apipeline
            handles.append(app.start(wf, n, steps, workflow_id=f"wf-{n:03d}"))
    for h in handles:
        try:
            h.result(timeout=120)
        except crashsafe.DeadLetteredError as exc:
            print(f"dead_letter {h.workflow_id}: {exc}", flush=True)
    print("done", flush=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
