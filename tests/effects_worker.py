"""Child process for the outcome-unknown tests: an effect step whose process dies
between applying the effect at the receiver and recording it.

``python tests/effects_worker.py DB LEDGER RULE CRASH`` where RULE is retry,
reconcile, escalate or reconcile-raises, and CRASH is ``after`` (die after the
receiver applied the charge) or ``before`` (die before calling the receiver). The
process dies only on the first attempt: a marker file next to LEDGER remembers it.
Prints one JSON line with the workflow's status and result when it finishes.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import crashsafe

DB, LEDGER, RULE, CRASH = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
MARKER = Path(LEDGER + ".crashed")


def ledger() -> sqlite3.Connection:
    conn = sqlite3.connect(LEDGER, timeout=30, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT, amount REAL)")
    conn.execute("CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, amount REAL, "
                 "charge_id TEXT)")
    return conn


def receiver_charge(key: str, amount: float) -> str:
    """A payment API that honours idempotency keys and logs every call."""
    conn = ledger()
    conn.execute("INSERT INTO calls VALUES (?, ?)", (key, amount))
    conn.execute("INSERT INTO charges VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING",
                 (key, amount, f"ch-{key}"))
    charge_id = conn.execute("SELECT charge_id FROM charges WHERE key = ?", (key,)).fetchone()[0]
    conn.close()
    return str(charge_id)


def reconcile(key: str, amount: float) -> Any:
    if RULE == "reconcile-raises":
        raise ConnectionError("payments API unreachable while reconciling")
    conn = ledger()
    row = conn.execute("SELECT charge_id FROM charges WHERE key = ?", (key,)).fetchone()
    conn.close()
    return str(row[0]) if row else crashsafe.NOT_APPLIED


app = crashsafe.App(f"sqlite:///{DB}")
rule = "reconcile" if RULE.startswith("reconcile") else RULE


@app.step(effect=True, on_unknown=rule, reconcile=reconcile if rule == "reconcile" else None)
def charge(amount: float) -> str:
    key = crashsafe.current().idempotency_key
    assert key is not None
    if CRASH == "before" and not MARKER.exists():
        MARKER.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    charge_id = receiver_charge(key, amount)
    if CRASH == "after" and not MARKER.exists():
        MARKER.touch()
        os.kill(os.getpid(), signal.SIGKILL)  # the charge landed; its record did not
    if CRASH == "after-twice":
        deaths = int(MARKER.read_text()) if MARKER.exists() else 0
        if deaths < 2:
            MARKER.write_text(str(deaths + 1))
            os.kill(os.getpid(), signal.SIGKILL)
    return charge_id


@app.workflow(name="checkout")
def checkout(amount: float) -> str:
    return charge(amount)


def main() -> None:
    app.recover()
    handle = app.start(checkout, 42.0, workflow_id="order-1")
    if "--no-wait" in sys.argv:
        print(json.dumps({"status": str(handle.status())}), flush=True)
        return
    result = handle.result(timeout=60)
    print(json.dumps({"status": str(handle.status()), "result": result}), flush=True)
    app.close()


if __name__ == "__main__":
    main()
