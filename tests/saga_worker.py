"""Child process for the compensation kill test.

``python tests/saga_worker.py DB LEDGER start|recover``: ``start`` runs a workflow
of 5 bookings that parks after the 3rd; the test cancels it; the process compensates and, with
SAGA_KILL_AT_UNDO=N, SIGKILLs itself right after the N-th compensation reached the
receiver (before it was recorded). ``recover`` finishes the compensations.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from typing import Any

import crashsafe

DB, LEDGER, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
KILL_AT = int(os.environ.get("SAGA_KILL_AT_UNDO", "0"))
calls = 0

app = crashsafe.App(f"sqlite:///{DB}")


def undo(result: dict[str, Any]) -> None:
    global calls
    conn = sqlite3.connect(LEDGER, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS undo_calls (booking TEXT)")
    conn.execute("CREATE TABLE IF NOT EXISTS undone (booking TEXT PRIMARY KEY)")
    conn.execute("INSERT INTO undo_calls VALUES (?)", (result["booked"],))
    conn.execute("INSERT INTO undone VALUES (?) ON CONFLICT DO NOTHING", (result["booked"],))
    conn.close()
    calls += 1
    if calls == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


@app.step(name="book", effect=True, compensate=undo)
def book(trip: str, i: int) -> dict[str, Any]:
    return {"booked": f"{trip}-{i}"}


@app.workflow(name="saga")
def saga(trip: str) -> None:
    for i in range(5):
        if i == 3:
            crashsafe.wait_for("never")  # cancelled here: 3 of 5 bookings done
        book(trip, i)


if __name__ == "__main__":
    if MODE == "start":
        handle = app.start(saga, "saga", workflow_id="saga-1")
    else:
        app.recover()
        handle = app.handle("saga-1")
    try:
        handle.result(timeout=60)
    except crashsafe.WorkflowCancelledError:
        pass
    print(json.dumps({"status": str(handle.status())}), flush=True)
    app.close()
