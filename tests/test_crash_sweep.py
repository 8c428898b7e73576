"""The crash-point sweep (RELIABILITY.md R2), SQLite's approach: crash at point i, for all i.

A clean run of ``sweep_worker.py`` with ``CRASHSAFE_CRASH_TRACE`` lists the N crash
points of the reference workload (before and after every store statement and commit,
the commit being the fsync, and around every step body). Then, for every i in 1..N,
on a fresh database and ledger: run with ``CRASHSAFE_CRASH_AT=i`` (the process
SIGKILLs itself at its i-th point), snapshot the journal as the kill left it, rerun
without faults, and check against the independent ledger and the database:

* both workflows succeeded with the result of an uninterrupted run;
* every step has exactly one applied effect and one idempotency key across all of
  its executions, and ran exactly as often as the crash allows: once, plus once more
  only if the kill came after its body started and before its journal entry was
  committed;
* no step body started after its journal entry's ``ended_at`` (no committed step ran
  again), and every body that got the workflow's journaled ``crashsafe.now()`` got
  the recorded instant;
* no journal entry or finished workflow seen right after the kill is lost or changed;
* ``PRAGMA integrity_check`` is ``ok`` for the database and the ledger.

The workload is deterministic (one workflow at a time), so point i of a crash run is
point i of the clean run; each crash run traces too, and the sweep checks that the
point it died at carries the clean run's label, so every point is covered.

Reproduce one point by hand::

    CRASHSAFE_CRASH_AT=<i> python tests/sweep_worker.py /tmp/s.db /tmp/l.db
    python tests/sweep_worker.py /tmp/s.db /tmp/l.db
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crashsafe._seal import RecordContext, Sealer

sys.path.insert(0, str(Path(__file__).parent))
from sweep_worker import STEPS, WORKFLOWS, expected

WORKER = str(Path(__file__).with_name("sweep_worker.py"))
JOBS = int(os.environ.get("CRASHSAFE_SWEEP_JOBS", "2"))
RUN_TIMEOUT = 120.0
# A crash run whose i-th point is not the clean run's i-th point (a timing accident:
# the heartbeat thread's first write came early) is repeated this many times at most.
ATTEMPTS = 3

Row = tuple[Any, ...]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CRASHSAFE_CRASH_AT", "CRASHSAFE_CRASH_TRACE")}
    env.update(extra)
    return env


def _run(db: Path, ledger: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, WORKER, str(db), str(ledger)], env=_env(**extra),
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )


def _labels(trace: Path) -> list[str]:
    """The trace's labels in order; line n of the file is point n."""
    if not trace.exists():
        return []
    out: list[str] = []
    for n, line in enumerate(trace.read_text(encoding="utf-8").splitlines(), 1):
        num, _, label = line.partition(" ")
        assert int(num) == n, f"{trace}: line {n} is point {num}"
        out.append(label)
    return out


def _rows(db: Path, sql: str) -> list[Row]:
    # Read-only, so reading the state a kill left behind does not change it.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _journal(db: Path) -> dict[tuple[str, int], Row]:
    rows = _rows(db, "SELECT workflow_id, idx, kind, name, output, error, attempts, "
                     "started_at, ended_at, note FROM journal")
    return {(r[0], r[1]): r[2:] for r in rows}


def _finished(db: Path) -> dict[str, Row]:
    rows = _rows(db, "SELECT id, status, output, error FROM workflows "
                     "WHERE status NOT IN ('running', 'waiting')")
    return {r[0]: r[1:] for r in rows}


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@dataclass
class Reference:
    """What the clean run recorded: the point labels and the journal's shape."""

    labels: list[str]
    shape: dict[tuple[str, int], tuple[str, str]]  # (workflow, idx) -> (kind, name)
    step_outputs: dict[tuple[str, int], bytes]


def check_final(db: Path, ledger: Path, ref: Reference, before_kill: list[str] | None,
                journal_at_kill: dict[tuple[str, int], Row],
                finished_at_kill: dict[str, Row]) -> list[str]:
    """Every invariant of the final state; returns the violations (empty when all hold).

    ``before_kill`` is the labels of the points the crashed run passed before dying
    (None for an uninterrupted run).
    """
    problems: list[str] = []
    for name, path in (("database", db), ("ledger", ledger)):
        if (res := _integrity(path)) != "ok":
            problems.append(f"integrity_check of the {name}: {res}")

    workflows = {r[0]: r[1:] for r in _rows(db, "SELECT id, status, output FROM workflows")}
    if set(workflows) != {wid for wid, _ in WORKFLOWS}:
        problems.append(f"workflows in the store: {sorted(workflows)}")
    for wid, no in WORKFLOWS:
        status, output = workflows.get(wid, (None, None))
        if output is not None:  # stored sealed: checksum and context verified here
            output = Sealer().open(output, RecordContext(wid, -1, "output"))
        if status != "succeeded" or output != str(expected(no)).encode():
            problems.append(f"{wid}: status {status!r} output {output!r}, an uninterrupted "
                            f"run gives 'succeeded' {expected(no)}")

    final = _journal(db)
    shape = {k: (v[0], v[1]) for k, v in final.items()}
    if shape != ref.shape:
        problems.append(f"journal shape {sorted(shape.items())} != clean run's "
                        f"{sorted(ref.shape.items())}")
    for key, out in ref.step_outputs.items():
        if key in final and final[key][2] != out:
            problems.append(f"step {key}: output {final[key][2]!r} != clean run's {out!r}")
    lost = {k: v for k, v in journal_at_kill.items() if final.get(k) != v}
    if lost:
        problems.append(f"journal entries committed before the kill lost or changed: "
                        f"{sorted(lost)}")
    changed = {k for k, v in finished_at_kill.items() if workflows.get(k) != v[:2]}
    if changed:
        problems.append(f"workflows finished before the kill changed since: {sorted(changed)}")

    conn = sqlite3.connect(str(ledger))
    try:
        executions = conn.execute(
            "SELECT workflow_id, idx, name, key, stamp, at FROM executions").fetchall()
        effects = conn.execute("SELECT key, workflow_id, idx FROM effects").fetchall()
    finally:
        conn.close()

    steps = {k: v for k, v in ref.shape.items() if v[0] == "step"}
    assert len(steps) == STEPS * len(WORKFLOWS)
    applied = Counter((w, i) for _k, w, i in effects)
    for (wid, idx), (_kind, name) in sorted(steps.items()):
        runs = [e for e in executions if (e[0], e[1]) == (wid, idx)]
        if applied[(wid, idx)] != 1:
            problems.append(f"step {wid}#{idx} {name}: {applied[(wid, idx)]} effects applied")
        keys = {e[3] for e in runs}
        if keys != {f"{wid}:{idx}"}:
            problems.append(f"step {wid}#{idx} {name}: idempotency keys {sorted(keys)}")
        if before_kill is None:
            want = 1
        else:
            started = f"step {name!r}: before body" in before_kill
            want = int(started) + int((wid, idx) not in journal_at_kill)
        if len(runs) != want:
            problems.append(f"step {wid}#{idx} {name}: body ran {len(runs)} times, "
                            f"expected {want}")
        entry = final.get((wid, idx))
        if entry is not None:
            late = [at for *_e, at in runs if at > entry[6]]
            if late:
                problems.append(f"step {wid}#{idx} {name}: re-executed after its journal "
                                f"commit at {entry[6]}: bodies started at {late}")
    for wid, _no in WORKFLOWS:
        now = [v for (w, _i), v in final.items() if w == wid and v[0] == "now"]
        recorded = None
        if len(now) == 1:
            idx = next(i for (w, i), v in final.items() if w == wid and v[0] == "now")
            plain = Sealer().open(now[0][2], RecordContext(wid, idx, "output"))
            recorded = json.loads(plain)["$dt"]
        stamps = {e[4] for e in executions if e[0] == wid and e[4] is not None}
        if recorded is None or stamps != {recorded}:
            problems.append(f"{wid}: step bodies got instants {sorted(stamps)}, the journal "
                            f"recorded {recorded!r}")
    return problems


def clean_reference(base: Path) -> tuple[Reference, list[str]]:
    """Run the workload once without faults, tracing its crash points.

    The background thread's first heartbeat comes 0.25 s after launch, well after
    the workload (about 60 ms); a run slow enough to let it in is repeated, so the
    reference holds the workload's own points only.
    """
    for attempt in range(1, ATTEMPTS + 1):
        work = base / f"clean-{attempt}"
        work.mkdir(parents=True)
        db, ledger, trace = work / "state.db", work / "ledger.db", work / "trace"
        proc = _run(db, ledger, CRASHSAFE_CRASH_TRACE=str(trace))
        assert proc.returncode == 0, f"clean run failed: {proc.stdout}{proc.stderr[-3000:]}"
        assert "done" in proc.stdout
        labels = _labels(trace)
        if not any(label.endswith(("heartbeat", "recovering workflows")) for label in labels):
            break
    else:
        pytest.fail(f"{ATTEMPTS} clean runs all outlasted the first heartbeat (0.25 s)")
    journal = _journal(db)
    ref = Reference(
        labels=labels,
        shape={k: (v[0], v[1]) for k, v in journal.items()},
        step_outputs={k: v[2] for k, v in journal.items() if v[0] == "step"},
    )
    return ref, check_final(db, ledger, ref, None, {}, {})


@dataclass
class PointResult:
    i: int
    label: str
    attempts: int
    reexecuted: int  # bodies that ran twice: killed after the body, before its commit
    problems: list[str]


def sweep_point(base: Path, i: int, ref: Reference) -> PointResult:
    """Crash at point ``i``, recover, check. Never raises for a violated invariant."""
    label = ref.labels[i - 1]
    problems: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        work = base / f"p{i:03d}-{attempt}"
        work.mkdir()
        db, ledger, trace = work / "state.db", work / "ledger.db", work / "trace"
        crash = _run(db, ledger, CRASHSAFE_CRASH_AT=str(i), CRASHSAFE_CRASH_TRACE=str(trace))
        reached = _labels(trace)
        if reached[:i] != ref.labels[:i]:
            pairs = zip(reached, ref.labels, strict=False)
            diff = next((n for n, (a, b) in enumerate(pairs, 1) if a != b), len(reached) + 1)
            problems = [f"crash run took another path than the clean run: it reached "
                        f"{len(reached)} points and differs first at point {diff}"]
            continue  # not this point: try again
        if crash.returncode != -signal.SIGKILL:
            problems = [f"crash run exited {crash.returncode}, not killed at point {i}: "
                        f"{crash.stdout}{crash.stderr[-2000:]}"]
            break
        journal_at_kill = _journal(db)
        finished_at_kill = _finished(db)
        rerun = _run(db, ledger)
        if rerun.returncode != 0 or "done" not in rerun.stdout:
            # Nothing injects a fault into the rerun: it must finish.
            problems = [f"recovery run exited {rerun.returncode}: "
                        f"{rerun.stdout}{rerun.stderr[-3000:]}"]
            break
        problems = check_final(db, ledger, ref, reached[:i - 1], journal_at_kill,
                               finished_at_kill)
        conn = sqlite3.connect(str(ledger))
        twice = conn.execute("SELECT COUNT(*) FROM (SELECT key FROM executions GROUP BY key "
                             "HAVING COUNT(*) > 1)").fetchone()[0]
        conn.close()
        return PointResult(i, label, attempt, twice, problems)
    return PointResult(i, label, ATTEMPTS, 0, problems)


@pytest.mark.slow
def test_crash_at_every_point_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    t0 = time.monotonic()
    ref, problems = clean_reference(tmp_path / "clean")
    assert problems == [], f"the uninterrupted run already breaks invariants: {problems}"
    n = len(ref.labels)
    assert n > 20, f"only {n} crash points: is CRASHSAFE_CRASH_TRACE still honoured?"
    per_label = Counter(ref.labels)
    steps = [name for kind, name in ref.shape.values() if kind == "step"]
    for name in steps:  # every effect call is bracketed by two points
        assert per_label[f"step {name!r}: before body"] == 1, name
        assert per_label[f"step {name!r}: after body"] == 1, name
    assert sum(label.startswith("store:") for label in ref.labels) >= 2 * len(steps)
    print(f"\ncrash sweep: {n} crash points in the reference workload")
    for label, count in per_label.items():  # in order of first appearance
        print(f"  {count:3d}  {label}")

    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        results = list(pool.map(lambda i: sweep_point(tmp_path, i, ref), range(1, n + 1)))

    elapsed = time.monotonic() - t0
    covered = [r.i for r in results if not r.problems]
    retried = [r.i for r in results if r.attempts > 1]
    twice = sum(r.reexecuted for r in results)
    print(f"crash sweep: {len(covered)}/{n} points passed in {elapsed:.1f} s "
          f"({JOBS} jobs); {twice} step bodies re-ran after a kill between body and commit "
          f"(absorbed by their keys); crash runs repeated for timing: {retried or 'none'}")
    failures = [f"point {r.i} ({r.label}): {p}" for r in results for p in r.problems]
    assert failures == [], (
        f"{len(failures)} violations; reproduce with CRASHSAFE_CRASH_AT=<i> python "
        f"{WORKER} DB LEDGER, then the same without CRASHSAFE_CRASH_AT:\n"
        + "\n".join(failures[:40])
    )
    assert sorted(covered) == list(range(1, n + 1))
