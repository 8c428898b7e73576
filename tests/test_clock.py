"""R7: a worker whose wall clock is an hour ahead steals nothing early.

Leases are measured on the store's clock (SQLite reads the operating system's clock
itself; PostgreSQL's server clock), not on the worker's ``time.time()``. Real
processes; the victim keeps heartbeating while the skewed worker looks for orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashsafe.stores.sqlite import SQLiteStore

HERE = Path(__file__).parent
WORKER = str(HERE / "clock_worker.py")


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _victim(db: Path) -> subprocess.Popen[str]:
    proc = _spawn("victim", str(db))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
    return proc


@pytest.mark.slow
def test_a_skewed_worker_does_not_take_a_live_workers_workflow(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    SQLiteStore(f"sqlite:///{db}").close()
    victim = _victim(db)
    try:
        skewed = _spawn("skewed", str(db), "3")
        out, err = skewed.communicate(timeout=60)
        assert "claimed 0" in out, (out, err)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.slow
def test_control_a_worker_trusting_its_own_clock_would_steal(tmp_path: Path) -> None:
    """The same setup with the store's clock ignored: the live workflow is stolen at
    once. This is what the test above would catch if leases used the worker's clock."""
    db = tmp_path / "state.db"
    SQLiteStore(f"sqlite:///{db}").close()
    victim = _victim(db)
    try:
        skewed = _spawn("skewed", str(db), "1", "--own-clock")
        out, err = skewed.communicate(timeout=60)
        assert "took held-1" in out, (out, err)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.slow
def test_a_skewed_worker_takes_over_a_dead_worker_after_the_lease(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    SQLiteStore(f"sqlite:///{db}").close()
    victim = _victim(db)
    skewed = _spawn("skewed", str(db), "20")  # generous: this machine may be loaded
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    assert skewed.stdout is not None
    line = skewed.stdout.readline()
    took_after = time.monotonic() - killed_at
    assert line.strip() == "took held-1", (line, skewed.stderr.read() if skewed.stderr else "")
    skewed.kill()
    skewed.wait()
    # Not early (the lease is 2 s after the last heartbeat) and not stuck.
    assert took_after >= 1.5, f"taken over {took_after:.2f} s after the kill: too early"
    assert took_after < 10.0, f"taken over only after {took_after:.2f} s"
