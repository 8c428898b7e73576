"""The workload of ``bench_workers.py``, for crashsafe and for DBOS.

crashsafe's worker processes load this file with the real command line::

    crashsafe worker bench/_workers_app.py:app --queues bench --concurrency K

so ``app`` is built at import from environment variables set by the benchmark:

* ``CRASHSAFE_DATABASE``: the PostgreSQL URL (a fresh schema per measurement);
* ``BENCH_LEASE``, ``BENCH_HEARTBEAT``, ``BENCH_SWEEP``: ``App(lease=...,
  heartbeat_interval=..., recovery_interval=...)`` (crashsafe's defaults when unset);
* ``BENCH_FAKE_HOST``: pretend this process runs on a host of that name, so the other
  workers can judge it only by its heartbeat and lease, as they would a worker on
  another machine (on one host they see exactly when its pid is gone);
* ``BENCH_LEDGER_DIR``: where the ledger steps append one line per execution.

DBOS's workflows are defined by :func:`dbos_define`, called by every DBOS process
(workers and enqueuer) so that they register the same names.
"""

from __future__ import annotations

import os
import time
from typing import Any

import crashsafe

STEP_SLEEP_S = float(os.environ.get("BENCH_STEP_SLEEP", "0.02"))

if os.environ.get("BENCH_FAKE_HOST"):
    # Bench-only simulation of workers on separate machines: crashsafe decides that a
    # worker on *this* host is dead by its pid, one on another host by its lease.
    import crashsafe._app as _cs_app
    import crashsafe._recovery as _cs_recovery

    _cs_recovery.HOSTNAME = _cs_app.HOSTNAME = os.environ["BENCH_FAKE_HOST"]


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def step_output(i: int) -> dict[str, Any]:
    return {"i": i, "ok": True}


# ------------------------------------------------------------------------ ledger

_ledger_fd: int | None = None


def ledger(workflow_id: str, index: int) -> None:
    """Append one line per step execution to this process's own ledger file.

    ``write`` on an ``O_APPEND`` descriptor lands in the kernel at once, so a SIGKILL
    right after it loses nothing; the store under test is not involved at all.
    """
    global _ledger_fd
    if _ledger_fd is None:
        path = os.path.join(os.environ["BENCH_LEDGER_DIR"], f"ledger-{os.getpid()}.log")
        _ledger_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_ledger_fd, f"{workflow_id} {index} {os.getpid()} {time.time():.6f}\n".encode())


def read_ledger(directory: str) -> list[tuple[str, int, int, float]]:
    """Every ledger line of every process: (workflow id, step index, pid, time)."""
    rows: list[tuple[str, int, int, float]] = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith("ledger-"):
            continue
        with open(os.path.join(directory, name), encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:  # a line cut by the SIGKILL is incomplete: skip it
                    rows.append((parts[0], int(parts[1]), int(parts[2]), float(parts[3])))
    return rows


# --------------------------------------------------------------------- crashsafe

app = crashsafe.App(
    lease=_seconds("BENCH_LEASE", 30.0),
    heartbeat_interval=_seconds("BENCH_HEARTBEAT", 2.0),
    recovery_interval=_seconds("BENCH_SWEEP", 5.0),
)
bench_queue = app.queue("bench")


@app.step(name="trivial")
def trivial(i: int) -> dict[str, Any]:
    return step_output(i)


@app.workflow(name="trivial_sync")
def trivial_sync(n: int) -> int:
    for i in range(n):
        trivial(i)
    return n


@app.step(name="trivial_async")
async def trivial_async_step(i: int) -> dict[str, Any]:
    return step_output(i)


@app.workflow(name="trivial_async")
async def trivial_async(n: int) -> int:
    for i in range(n):
        await trivial_async_step(i)
    return n


@app.step(name="slow")
def slow(workflow_id: str, i: int) -> dict[str, Any]:
    ledger(workflow_id, i)
    time.sleep(STEP_SLEEP_S)
    return step_output(i)


@app.workflow(name="slow_sync")
def slow_sync(workflow_id: str, n: int) -> int:
    for i in range(n):
        slow(workflow_id, i)
    return n


# -------------------------------------------------------------------------- DBOS


def dbos_define() -> dict[str, Any]:
    """Register DBOS's versions of the workflows (call before ``DBOS.launch()``)."""
    from dbos import DBOS

    @DBOS.step(name="trivial")
    def dbos_trivial(i: int) -> dict[str, Any]:
        return step_output(i)

    @DBOS.workflow(name="trivial_sync")
    def dbos_trivial_sync(n: int) -> int:
        for i in range(n):
            dbos_trivial(i)
        return n

    @DBOS.step(name="slow")
    def dbos_slow(workflow_id: str, i: int) -> dict[str, Any]:
        ledger(workflow_id, i)
        time.sleep(STEP_SLEEP_S)
        return step_output(i)

    @DBOS.workflow(name="slow_sync")
    def dbos_slow_sync(workflow_id: str, n: int) -> int:
        for i in range(n):
            dbos_slow(workflow_id, i)
        return n

    return {"trivial_sync": dbos_trivial_sync, "slow_sync": dbos_slow_sync}
