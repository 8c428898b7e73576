"""kill -9 at random instants against real child processes (RELIABILITY.md R1, R9).

Every campaign prints its seed; rerun one with CRASHSAFE_TEST_SEED=<seed>.
The checks use an independent ledger written by the step bodies themselves, not
crashsafe's tables: which bodies ran, when, with which idempotency key, and which
keyed effects the receiver applied.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashsafe.stores import Status
from crashsafe.stores.sealed import sealed
from crashsafe.stores.sqlite import SQLiteStore

sys.path.insert(0, str(Path(__file__).parent))
from kill_worker import expected

WORKER = str(Path(__file__).with_name("kill_worker.py"))
CAMPAIGNS = 5
KILLS_PER_CAMPAIGN = 10
WORKFLOWS = 24
STEPS = 30


def _seed() -> int:
    env = os.environ.get("CRASHSAFE_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(10**9)


def _spawn(db: Path, ledger: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, str(db), str(ledger), str(WORKFLOWS), str(STEPS), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker did not get ready: {line!r} {err[-2000:]}")


def _journal(db: Path) -> dict[tuple[str, int], tuple[str, bytes | None, float]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT workflow_id, idx, name, output, ended_at FROM journal")
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("campaign", range(CAMPAIGNS))
def test_random_kills_lose_nothing_and_duplicate_nothing(tmp_path: Path, campaign: int) -> None:
    seed = _seed()
    print(f"kill campaign {campaign}: seed={seed}")
    rng = random.Random(seed)
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    SQLiteStore(f"sqlite:///{db}").close()  # schema exists before the first reader looks
    snapshots: dict[tuple[str, int], tuple[str, bytes | None, float]] = {}
    kills = 0
    for _ in range(KILLS_PER_CAMPAIGN):
        proc = _spawn(db, ledger)
        _wait_ready(proc)
        time.sleep(rng.uniform(0.0, 0.12))
        if proc.poll() is not None:
            break  # finished before this kill point
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        for key, val in _journal(db).items():
            old = snapshots.setdefault(key, val)
            assert old[:2] == val[:2], f"seed={seed}: journal entry {key} changed after a kill"
    proc = _spawn(db, ledger)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"seed={seed}: final run failed: {err[-3000:]}"
    assert "done" in out
    assert kills >= 5, f"seed={seed}: only {kills} kills landed mid-run"

    final = _journal(db)
    lost = [k for k, v in snapshots.items() if final.get(k, (None, None))[:2] != v[:2]]
    assert lost == [], f"seed={seed}: committed journal entries lost: {lost[:5]}"

    store = sealed(SQLiteStore(f"sqlite:///{db}"), None)  # payloads opened and verified
    for n in range(WORKFLOWS):
        rec = store.get_workflow(f"wf-{n:03d}")
        assert rec is not None and rec.status is Status.SUCCEEDED, f"seed={seed}: wf-{n:03d}"
        assert rec.output == str(expected(n, STEPS)).encode(), (
            f"seed={seed}: wf-{n:03d} result differs from an uninterrupted run"
        )
    store.close()

    conn = sqlite3.connect(str(ledger))
    executions = conn.execute("SELECT workflow_id, idx, key, at FROM executions").fetchall()
    effects = conn.execute("SELECT workflow_id, idx, COUNT(*) FROM effects "
                           "GROUP BY workflow_id, idx").fetchall()
    keys_per_step = conn.execute(
        "SELECT workflow_id, idx, COUNT(DISTINCT key) FROM executions GROUP BY workflow_id, idx"
    ).fetchall()
    conn.close()
    # A committed step never runs again: no body started after its journal commit.
    rerun = [(w, i) for w, i, _k, at in executions if at > final[(w, i)][2]]
    assert rerun == [], f"seed={seed}: committed steps re-executed: {rerun[:5]}"
    # Exactly one applied effect per step, and one stable key across every re-run.
    assert len(effects) == WORKFLOWS * STEPS
    assert all(count == 1 for _w, _i, count in effects)
    assert all(count == 1 for _w, _i, count in keys_per_step), f"seed={seed}: unstable keys"


@pytest.mark.slow
def test_poison_workflow_is_dead_lettered_after_max_recoveries(tmp_path: Path) -> None:
    db, ledger = tmp_path / "state.db", tmp_path / "ledger.db"
    runs = 0
    outputs = []
    for _ in range(8):  # more restarts than max_recoveries: it must stop by itself
        proc = _spawn(db, ledger, "--poison")
        out, err = proc.communicate(timeout=60)
        runs += 1
        outputs.append(out)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert "dead_letter poison-1" in outputs[-1]
    store = SQLiteStore(f"sqlite:///{db}")
    rec = store.get_workflow("poison-1")
    assert rec is not None and rec.status is Status.DEAD_LETTER
    assert rec.reason is not None and "recovered 3 times" in rec.reason
    store.close()
    conn = sqlite3.connect(str(ledger))
    executions = conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0]
    conn.close()
    # The first run plus exactly max_recoveries (3) recoveries ran the body; never more.
    assert executions == 4
    assert runs == 5
