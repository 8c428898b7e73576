"""``crashsafe gc`` killed with SIGKILL: at every crash point it reaches (SQLite), at a
sample of them (PostgreSQL), and at random instants. After each kill every kept
checkpoint reads back to the state it had before, nothing running was touched, no
workflow is half dropped, and running gc again finishes the job."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

import crashsafe
from crashsafe import App, Status
from helpers import POSTGRES_URL, drop_postgres_schema, new_postgres_schema, postgres_url

KEEP = 2
GC = ["gc", "--keep-checkpoints", str(KEEP), "--older-than", "1d", "--batch", "3"]


def _fill(url: str) -> None:
    """Finished workflows to compact, old ones (with children) to drop, one waiting."""
    app = App(url, checkpoint_full_every=4)

    @app.workflow(name="kid")
    def kid(n: int) -> int:
        crashsafe.checkpoint({"kid": n, "pad": "k" * 300})
        return n

    @app.workflow(name="chat")
    def chat(n: int, child: bool) -> int:
        messages: list[str] = []
        for turn in range(n):
            messages.append(f"turn {turn} " + "m" * 400)
            crashsafe.checkpoint({"messages": messages, "turn": turn}, label=f"t{turn}")
        return kid(n) if child else n

    @app.workflow(name="waiter")
    def waiter() -> str:
        for i in range(6):
            crashsafe.checkpoint({"i": i, "pad": "w" * 300})
        return str(crashsafe.wait_for("go"))

    for i in range(10):
        app.start(chat, 6 + i % 5, i % 3 == 0, workflow_id=f"keep-{i}").result(timeout=30)
    for i in range(5):
        app.start(chat, 5, True, workflow_id=f"old-{i}").result(timeout=30)
    app.start(waiter, workflow_id="live")
    deadline = time.monotonic() + 10
    while app.get_workflow("live").status is not Status.WAITING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    app.close()


def _backdate(url: str, schema: str | None, path: Path | None) -> None:
    query = "UPDATE workflows SET updated_at = updated_at - 172800 WHERE id LIKE 'old-%'"
    if path is not None:
        conn = sqlite3.connect(path)
        with conn:
            assert conn.execute(query).rowcount == 10
        conn.close()
    else:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(
                psycopg.sql.Identifier(schema or "")))
            assert conn.execute(query).rowcount == 10


def _snapshot(url: str) -> dict[str, Any]:
    """Per workflow: its status, every checkpoint's state (None where pruned), and
    its raw journal when it is not finished."""
    app = App(url)
    out: dict[str, Any] = {}
    try:
        for rec in app.list_workflows(limit=10_000):
            states = {c.n: (None if c.pruned else app.checkpoint_state(rec.id, f"#{c.n}"))
                      for c in app.checkpoints(rec.id)}
            journal = None if rec.status.terminal else [
                (e.index, e.output, e.note) for e in app.journal(rec.id)]
            out[rec.id] = {"status": rec.status, "states": states, "journal": journal,
                           "parent": rec.parent_id}
        out["__orphan_rows__"] = _orphan_rows(app)
    finally:
        app.close()
    return out


def _orphan_rows(app: App) -> int:
    """Journal rows of workflows that no longer exist (a half-dropped workflow)."""
    known = {r.id for r in app.list_workflows(limit=10_000)}
    return sum(len(app.store.load_journal(w)) for w in
               [f"old-{i}" for i in range(5)] + [f"old-{i}/5" for i in range(5)]
               if w not in known)


def _check(before: dict[str, Any], now: dict[str, Any], complete: bool) -> None:
    assert now["__orphan_rows__"] == 0, "a workflow was half dropped"
    for wid, was in before.items():
        if wid == "__orphan_rows__":
            continue
        got = now.get(wid)
        if wid.startswith("old-"):
            assert got is None or got == was or not complete, wid
            if complete:
                assert got is None, f"{wid} should be dropped"
            continue
        assert got is not None, f"{wid} was dropped"
        if was["journal"] is not None:  # not finished: untouched, byte for byte
            assert got == was, wid
            continue
        kept = {n: s for n, s in got["states"].items() if s is not None}
        assert len(kept) >= min(KEEP, len(was["states"])), (wid, sorted(kept))
        for n, state in kept.items():
            assert state == was["states"][n], (wid, n)  # reads back identical
        assert set(got["states"]) == set(was["states"])  # stubs keep their place
        if complete:
            assert sorted(kept) == sorted(was["states"])[-KEEP:], wid


def _gc(url: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crashsafe", "--db", url, *GC],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CRASHSAFE_CRASH_AT", "CRASHSAFE_CRASH_TRACE", "CRASHSAFE_KEYS")}
    env.update(extra)
    return env


def _sqlite_integrity(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def _copy(source: Path, target: Path) -> str:
    """A copy of a closed SQLite database (with its WAL, should one be left)."""
    for ext in ("", "-wal", "-shm"):
        Path(f"{target}{ext}").unlink(missing_ok=True)
        if Path(f"{source}{ext}").exists() and ext != "-shm":
            shutil.copy(f"{source}{ext}", f"{target}{ext}")
    return f"sqlite:///{target}"


def _crash_points(url: str, trace: Path) -> int:
    res = _gc(url, _env(CRASHSAFE_CRASH_TRACE=str(trace)))
    assert res.returncode == 0, res.stderr
    return len(trace.read_text().splitlines())


@pytest.mark.slow
def test_gc_killed_at_every_crash_point_sqlite(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.db"
    _fill(f"sqlite:///{pristine}")
    _backdate("", None, pristine)
    before = _snapshot(f"sqlite:///{pristine}")
    work = tmp_path / "work.db"

    def fresh() -> str:
        return _copy(pristine, work)

    points = _crash_points(fresh(), tmp_path / "trace.txt")
    reference = _snapshot(f"sqlite:///{work}")
    _check(before, reference, complete=True)
    assert points >= 10, points  # several transactions, each with points around COMMIT
    for at in range(1, points + 1):
        url = fresh()
        res = _gc(url, _env(CRASHSAFE_CRASH_AT=str(at)))
        assert res.returncode == -signal.SIGKILL, (at, res.returncode, res.stderr)
        _sqlite_integrity(work)
        _check(before, _snapshot(url), complete=False)
        res = _gc(url, _env())  # run again: finishes the job
        assert res.returncode == 0, (at, res.stderr)
        final = _snapshot(url)
        _check(before, final, complete=True)
        assert final == reference, at


@pytest.mark.slow
def test_gc_killed_at_random_instants_sqlite(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(10**6)
    print(f"seed {seed}")
    rng = random.Random(seed)
    pristine = tmp_path / "pristine.db"
    _fill(f"sqlite:///{pristine}")
    _backdate("", None, pristine)
    before = _snapshot(f"sqlite:///{pristine}")
    work = tmp_path / "work.db"
    started = time.monotonic()
    assert _gc(_copy(pristine, work), _env()).returncode == 0
    took = time.monotonic() - started  # an uninterrupted run, imports included
    for trial in range(4):
        url = _copy(pristine, work)
        proc = subprocess.Popen([sys.executable, "-m", "crashsafe", "--db", url, *GC],
                                env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4 * took, 0.9 * took))  # imports take most of the first half
        proc.send_signal(signal.SIGKILL)
        print(f"trial {trial}: exit code {proc.wait()}")
        _sqlite_integrity(work)
        _check(before, _snapshot(url), complete=False)
        assert _gc(url, _env()).returncode == 0, (seed, trial)
        _check(before, _snapshot(url), complete=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_gc_killed_at_crash_points_postgres(which: str, tmp_path: Path) -> None:
    schema = new_postgres_schema()
    url = postgres_url(schema)
    try:
        _fill(url)
        _backdate(url, schema, None)
        before = _snapshot(url)
        # Count the points on a twin schema, then kill this one at the chosen point.
        twin = new_postgres_schema()
        try:
            twin_url = postgres_url(twin)
            _fill(twin_url)
            _backdate(twin_url, twin, None)
            points = _crash_points(twin_url, tmp_path / "trace.txt")
        finally:
            drop_postgres_schema(twin)
        at = {"first": 1, "middle": points // 2, "last": points - 1}[which]
        res = _gc(url, _env(CRASHSAFE_CRASH_AT=str(at)))
        assert res.returncode == -signal.SIGKILL, (at, res.returncode, res.stderr)
        _check(before, _snapshot(url), complete=False)
        assert _gc(url, _env()).returncode == 0
        _check(before, _snapshot(url), complete=True)
    finally:
        drop_postgres_schema(schema)
