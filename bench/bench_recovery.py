"""Recovery after kill -9: how fast work resumes.

Two measurements, each repeated (fresh database per repetition), min and median:

* ``first-step``: 100 sync workflows of 10 slow steps run in a child process that is
  SIGKILLed half-way; we time from the restart command (spawning a new process,
  interpreter start-up and imports included) to the moment the first resumed step
  body starts, and to the moment every workflow has finished.
* ``pending-10k``: 10,000 async workflows are parked in a durable sleep, the process
  is SIGKILLed, the timers come due; we time from the restart command until all
  10,000 are claimed and scheduled, and until all 10,000 have finished (one more step
  each).

    python bench/bench_recovery.py [--reps 3] [--pending 10000] [--json out.json]

The restarted process uses the default durability (``synchronous=FULL``). Peers do
not publish this figure; PEERS.md records DBOS at 1.48 s to the first resumed step
for 100 killed workflows on this machine (measured separately).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- child


def _child(mode: str, db: str, count: int) -> None:
    import asyncio

    import crashsafe

    url = f"sqlite:///{db}" + ("?synchronous=normal" if mode == "park" else "")
    app = crashsafe.App(url)
    first: list[float] = []

    def mark() -> None:
        if not first:
            first.append(time.time())
            print(f"first {first[0]!r}", flush=True)

    @app.step(name="slow")
    def slow(i: int) -> int:
        mark()
        time.sleep(0.02)
        return i

    @app.workflow(name="ten_slow_steps")
    def ten_slow_steps(n: int) -> int:
        return sum(slow(i) for i in range(10)) + n

    @app.step(name="a")
    async def a(n: int) -> int:
        return n

    @app.step(name="b")
    async def b(n: int) -> int:
        mark()
        return n + 1

    @app.workflow(name="parked")
    async def parked(n: int) -> int:
        await a(n)
        await crashsafe.sleep_async(1.0)
        return await b(n)

    if mode == "load":
        handles = [app.start(ten_slow_steps, n, workflow_id=f"w{n}") for n in range(count)]
        for h in handles:
            h.result()
    elif mode == "park":
        for n in range(count):
            app.start(parked, n, workflow_id=f"p{n}")
        print("parked-started", flush=True)
        while True:
            time.sleep(3600)
    else:
        handles = app.recover()
        print(f"recovered {time.time()!r} {len(handles)}", flush=True)

        async def wait_all() -> None:
            await asyncio.gather(*(h.result_async() for h in handles))

        asyncio.run(wait_all())
        print(f"done {time.time()!r}", flush=True)
    app.close()


# --------------------------------------------------------------------------- parent


def _count(db: str, sql: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def _spawn(mode: str, db: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--child", mode, db, str(count)],
                            stdout=subprocess.PIPE, text=True)


def _events(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=600)
    events: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("first", "recovered", "done"):
            events[parts[0]] = float(parts[1])
    return events


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def first_step_once(tmp: str) -> dict[str, float]:
    db = os.path.join(tmp, "first.db")
    proc = _spawn("load", db, 100)
    target = 100 * 10 // 2
    while _count(db, "SELECT COUNT(*) FROM journal") < target:
        time.sleep(0.01)
    _kill(proc)
    t0 = time.time()
    ev = _events(_spawn("resume", db, 100))
    return {"first_resumed_step_s": ev["first"] - t0, "all_finished_s": ev["done"] - t0}


def pending_once(tmp: str, count: int) -> dict[str, float]:
    db = os.path.join(tmp, "pending.db")
    proc = _spawn("park", db, count)
    while _count(db, "SELECT COUNT(*) FROM journal WHERE kind = 'sleep'") < count:
        time.sleep(0.1)
    _kill(proc)
    time.sleep(1.1)  # let every durable timer come due
    t0 = time.time()
    ev = _events(_spawn("resume", db, count))
    done = _count(db, "SELECT COUNT(*) FROM workflows WHERE status = 'succeeded'")
    if done != count:
        raise SystemExit(f"only {done} of {count} parked workflows finished")
    return {"claimed_and_scheduled_s": ev["recovered"] - t0, "first_resumed_step_s":
            ev["first"] - t0, "all_finished_s": ev["done"] - t0}


def _summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"min": min(s[k] for s in samples),
                "median": statistics.median(s[k] for s in samples)} for k in samples[0]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pending", type=int, default=10_000)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    first: list[dict[str, float]] = []
    pending: list[dict[str, float]] = []
    for rep in range(a.reps):
        with tempfile.TemporaryDirectory() as tmp:
            first.append(first_step_once(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            pending.append(pending_once(tmp, a.pending))
        print(f"rep {rep + 1}/{a.reps}: {first[-1]} {pending[-1]}", file=sys.stderr)
    report: dict[str, Any] = {
        "first_step_100_workflows": _summary(first),
        f"pending_{a.pending}": _summary(pending),
        "reps": a.reps,
    }
    print(f"{'measurement':48} {'min':>9} {'median':>9}")
    for group, metrics in report.items():
        if not isinstance(metrics, dict):
            continue
        for name, s in metrics.items():
            print(f"{group + ' / ' + name:48} {s['min']:8.3f}s {s['median']:8.3f}s")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
