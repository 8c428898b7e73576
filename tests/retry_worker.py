"""A child process for the durable-retry kill tests.

``python tests/retry_worker.py DB LEDGER MODE`` runs (or recovers) one workflow whose
step always fails. Every execution of the step body is logged in LEDGER, a SQLite file
crashsafe never touches. MODE ``poison``: attempt 1 raises, later attempts SIGKILL this
process. MODE ``always-fails``: every attempt raises ConnectionError, 0.3 s backoff.
Prints ``succeeded ...`` or ``failed <ErrorType>`` when the workflow ends.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys

import crashsafe

db, ledger_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
ledger = sqlite3.connect(ledger_path, isolation_level=None, check_same_thread=False)
ledger.execute("PRAGMA synchronous=FULL")
ledger.execute("CREATE TABLE IF NOT EXISTS executions (attempt INTEGER, pid INTEGER)")

app = crashsafe.App(f"sqlite:///{db}", recovery_interval=0.2)
policy = crashsafe.RetryPolicy(max_attempts=4 if mode == "poison" else 5,
                               initial_delay=0.3, backoff=1.0, jitter="none")


@app.step(retry=policy)
def call_tool() -> str:
    attempt = crashsafe.current().attempt or 0
    ledger.execute("INSERT INTO executions VALUES (?, ?)", (attempt, os.getpid()))
    if mode == "poison" and attempt > 1:
        os.kill(os.getpid(), signal.SIGKILL)
    raise ConnectionError(f"attempt {attempt} failed")


@app.workflow()
def flow() -> str:
    return call_tool()


handle = app.start(flow, workflow_id="retry-kill")
try:
    print("succeeded", handle.result(timeout=60), flush=True)
except Exception as exc:
    print("failed", type(exc).__name__, exc, flush=True)
app.close()
