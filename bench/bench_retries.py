"""Resilience policies: their cost on the hot path, and retries across kill -9.

Three measurements, all in one run (each case in a fresh child process with a fresh
database file, repetitions interleaved):

* hot path: W workflows x S trivial steps (as in bench_steps.py) with (a) a plain
  ``@app.step()``, (b) ``retry=RetryPolicy(max_attempts=5)`` and no failure, (c) (b)
  plus a closed breaker, (d) (c) plus a rate limit that never blocks; sequential
  (``seq_*``) and C async workflows at once (``async_*``); ratios to (a);
* retries across restarts, crashsafe vs DBOS 3.4: a step that always raises
  ``ConnectionError``, 5 attempts 0.2 s apart; every body execution is logged to a
  separate ledger file; the worker process is SIGKILLed ~0.1 s after each new
  execution (during the backoff) and restarted, until the workflow ends or 10
  restarts happened (then the last process is left alone to finish);
* kill during a backoff -> next attempt (crashsafe): a 2 s backoff, a kill 0.5 s into
  it; time from the restart command to the next attempt, against the remaining delay.

    python bench/bench_retries.py                    # W=200, S=20, C=100, 3 reps
    python bench/bench_retries.py --reps 1 --cases seq_plain,seq_retry_breaker_limit

See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import _harness as h
from bench_steps import RESULT_TIMEOUT_S, _crashsafe_app, _done, _step_output

SCRIPT = Path(__file__).resolve()

CONFIGS = ("plain", "retry", "retry_breaker", "retry_breaker_limit")
HOT_CASES = [f"{mode}_{cfg}" for mode in ("seq", "async") for cfg in CONFIGS]
CONFIG_LABELS = {
    "plain": "(a) plain",
    "retry": "(b) retry",
    "retry_breaker": "(c) retry+breaker",
    "retry_breaker_limit": "(d) retry+breaker+limit",
}

WORKFLOW_ID = "flaky-1"
TERMINAL = {
    "crashsafe": {"succeeded", "failed", "cancelled", "dead_letter"},
    "dbos": {"SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"},
}
WORKER_TIMEOUT_S = 120.0


# ------------------------------------------------------------------ 1. hot path


def _policies(app: Any, config: str) -> dict[str, Any]:
    """The ``@app.step`` options of one configuration."""
    import crashsafe

    opts: dict[str, Any] = {}
    if config != "plain":
        opts["retry"] = crashsafe.RetryPolicy(max_attempts=5)
    if config in ("retry_breaker", "retry_breaker_limit"):
        opts["breaker"] = app.breaker("dep")
    if config == "retry_breaker_limit":
        opts["limits"] = [app.rate_limit("rpm", rate=1e9)]
    return opts


def _check_hot(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """After the app closed: every step is journaled, and the limit was really used."""
    with closing(sqlite3.connect(args.db)) as conn:
        steps = conn.execute("SELECT count(*) FROM journal WHERE kind = 'step'").fetchone()[0]
        shared = [r[0] for r in conn.execute("SELECT key FROM shared ORDER BY key")]
        attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    assert steps == args.workflows * args.steps, steps
    assert attempts == 0, attempts  # no failure, so no attempt rows
    if config == "retry_breaker_limit":
        assert "rate:rpm" in shared, shared
    return {"shared_keys": shared}


def _hot_seq(args: argparse.Namespace, config: str) -> h.JsonDict:
    app = _crashsafe_app(args, args.synchronous)

    @app.step(**_policies(app, config))
    def step(i: int) -> dict[str, Any]:
        return _step_output(i)

    @app.workflow()
    def workflow(n: int) -> int:
        for i in range(n):
            step(i)
        return n

    started = time.perf_counter()
    for w in range(args.workflows):
        out = app.start(workflow, args.steps, workflow_id=f"w-{w}").result(
            timeout=RESULT_TIMEOUT_S
        )
        assert out == args.steps, out
    result = _done(args, started)
    app.close()
    result.update(_check_hot(args, config))
    return result


def _hot_async(args: argparse.Namespace, config: str) -> h.JsonDict:
    app = _crashsafe_app(args, args.synchronous)

    @app.step(**_policies(app, config))
    async def step(i: int) -> dict[str, Any]:
        return _step_output(i)

    @app.workflow()
    async def workflow(n: int) -> int:
        for i in range(n):
            await step(i)
        return n

    async def main() -> float:
        gate = asyncio.Semaphore(args.concurrency)

        async def one(w: int) -> None:
            async with gate:
                handle = await app.start_async(workflow, args.steps, workflow_id=f"w-{w}")
                out = await handle.result_async(timeout=RESULT_TIMEOUT_S)
                assert out == args.steps, out

        started = time.perf_counter()
        await asyncio.gather(*(one(w) for w in range(args.workflows)))
        return started

    started = asyncio.run(main())
    result = _done(args, started, concurrency=args.concurrency)
    app.close()
    result.update(_check_hot(args, config))
    return result


def _hot_case(name: str) -> h.CaseFn:
    mode, config = name.split("_", 1)
    run = _hot_seq if mode == "seq" else _hot_async
    return lambda args: run(args, config)


# ------------------------------------------------- 2./3. the worker and its ledger


class Ledger:
    """An independent record of every body execution: a separate SQLite file."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS executions (t REAL NOT NULL, pid INTEGER NOT NULL,"
            " attempt INTEGER)"
        )

    def add(self, attempt: int | None) -> None:
        self.conn.execute(
            "INSERT INTO executions (t, pid, attempt) VALUES (?, ?, ?)",
            (time.time(), os.getpid(), attempt),
        )

    def rows(self) -> list[tuple[float, int, int | None]]:
        return list(self.conn.execute("SELECT t, pid, attempt FROM executions ORDER BY rowid"))


def _worker_crashsafe(args: argparse.Namespace, ledger: Ledger) -> str:
    import crashsafe

    app = crashsafe.App(f"sqlite:///{args.db}")
    policy = crashsafe.RetryPolicy(
        max_attempts=args.attempts, initial_delay=args.delay, backoff=1.0, jitter="none"
    )

    @app.step(retry=policy)
    def call_dependency() -> None:
        ledger.add(crashsafe.current().attempt)
        raise ConnectionError("dependency down")

    @app.workflow()
    def flaky() -> None:
        call_dependency()

    try:
        if args.restart:
            app.launch()  # recovers the workflow the killed process owned
            handle = app.handle(WORKFLOW_ID)
        else:
            handle = app.start(flaky, workflow_id=WORKFLOW_ID)
        handle.result(timeout=WORKER_TIMEOUT_S)
        outcome = "returned"
    except Exception as exc:
        outcome = type(exc).__name__
    app.close()
    return outcome


def _worker_dbos(args: argparse.Namespace, ledger: Ledger) -> str:
    from dbos import DBOS, SetWorkflowID

    DBOS(
        config={
            "name": "bench-retries",
            "system_database_url": f"sqlite:///{args.db}",
            "log_level": "ERROR",
            # Recovery at launch takes only PENDING workflows of this executor id and
            # application version: pin both so every restarted process qualifies.
            "executor_id": "local",
            "application_version": "bench-retries-1",
        }
    )

    @DBOS.step(
        retries_allowed=True,
        max_attempts=args.attempts,
        interval_seconds=args.delay,
        backoff_rate=1.0,
    )
    def call_dependency() -> None:
        status = DBOS.step_status  # its current_attempt counts from 0
        attempt = status.current_attempt if status is not None else None
        ledger.add(None if attempt is None else attempt + 1)
        raise ConnectionError("dependency down")

    @DBOS.workflow()
    def flaky() -> None:
        call_dependency()

    DBOS.launch()  # recovers this executor's PENDING workflows in a background thread
    try:
        handle: Any
        if args.restart:
            handle = DBOS.retrieve_workflow(WORKFLOW_ID)
        else:
            with SetWorkflowID(WORKFLOW_ID):
                handle = DBOS.start_workflow(flaky)
        handle.get_result()
        outcome = "returned"
    except Exception as exc:
        outcome = type(exc).__name__
    DBOS.destroy()
    return outcome


def worker_main(args: argparse.Namespace) -> None:
    ledger = Ledger(args.ledger)
    run = _worker_crashsafe if args.worker == "crashsafe" else _worker_dbos
    outcome = run(args, ledger)
    print(f"OUTCOME {outcome}", flush=True)


# ------------------------------------------------------------ the kill harness


def _spawn(args: argparse.Namespace, system: str, ledger: str, *, attempts: int, delay: float,
           restart: bool, log_path: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(SCRIPT), "--worker", system, "--db", args.db, "--ledger", ledger,
           "--attempts", str(attempts), "--delay", str(delay)]
    if restart:
        cmd.append("--restart")
    with open(log_path, "a") as log_file:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


def _workflow_row(system: str, db: str) -> tuple[str | None, int | None]:
    """The workflow's status and recovery count as its own database records them."""
    sql = (
        "SELECT status, recovery_attempts FROM workflows WHERE id = ?"
        if system == "crashsafe"
        else "SELECT status, recovery_attempts FROM workflow_status WHERE workflow_uuid = ?"
    )
    try:
        # Read-write on purpose: after a kill DBOS's rollback journal may be hot, and
        # SQLite rolls it back on open exactly as the next DBOS process would.
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            row = conn.execute(sql, (WORKFLOW_ID,)).fetchone()
    except sqlite3.OperationalError:
        return None, None
    return (None, None) if row is None else (str(row[0]), row[1])


def _status(system: str, db: str) -> str | None:
    return _workflow_row(system, db)[0]


def _wait_new(ledger: Ledger, seen: int, proc: subprocess.Popen[str],
              deadline: float) -> list[tuple[float, int, int | None]]:
    """Poll the ledger until it has rows past ``seen`` (or the worker exits)."""
    while True:
        rows = ledger.rows()
        if len(rows) > seen or proc.poll() is not None:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError("no new execution in the ledger")
        time.sleep(0.003)


def _restarts(args: argparse.Namespace, system: str) -> h.JsonDict:
    """Kill the worker ~kill_after s after each new execution; restart it; repeat."""
    tmp = os.path.dirname(os.path.abspath(args.db))
    ledger_path = os.path.join(tmp, "ledger.db")
    log_path = os.path.join(tmp, "worker.log")
    ledger = Ledger(ledger_path)
    spawn_kw: dict[str, Any] = {"attempts": 5, "delay": 0.2, "log_path": log_path}
    deadline = time.monotonic() + args.timeout - 30
    started = time.perf_counter()
    proc = _spawn(args, system, ledger_path, restart=False, **spawn_kw)
    seen = kills = restarts = 0
    kill_delays: list[float] = []
    restart_at: float | None = None
    restart_to_exec: list[float] = []
    executions_while_killing = 0
    status: str | None = None
    outcome = ""
    try:
        while True:
            rows = _wait_new(ledger, seen, proc, deadline)
            if len(rows) > seen:
                if restart_at is not None:
                    restart_to_exec.append(rows[seen][0] - restart_at)
                    restart_at = None
                seen = len(rows)
            if proc.poll() is not None:  # ended by itself
                out, _ = proc.communicate()
                outcome = next((ln.split(" ", 1)[1] for ln in out.splitlines()
                                if ln.startswith("OUTCOME ")), f"exit {proc.returncode}")
                status = _status(system, args.db)
                break
            if restarts >= args.max_restarts:
                continue  # leave the last process alone until it ends
            time.sleep(max(0.0, rows[-1][0] + args.kill_after - time.time()))
            if proc.poll() is not None or _status(system, args.db) in TERMINAL[system]:
                continue  # the workflow ended meanwhile: let the process exit by itself
            kill_delays.append(time.time() - rows[-1][0])
            _kill(proc)
            kills += 1
            executions_while_killing = len(ledger.rows())
            seen = max(seen, executions_while_killing)
            status = _status(system, args.db)
            if status in TERMINAL[system]:  # it ended between the check and the kill
                outcome = "killed after it ended"
                break
            restarts += 1
            restart_at = time.time()
            proc = _spawn(args, system, ledger_path, restart=True, **spawn_kw)
    finally:
        if proc.poll() is None:  # only on an error: never leave a worker behind
            _kill(proc)
    wall = time.perf_counter() - started
    status, recoveries = _workflow_row(system, args.db)
    rows = ledger.rows()
    pids = [r[1] for r in rows]
    return {
        "system": system,
        "executions": len(rows),
        "executions_while_killing": executions_while_killing if restarts else len(rows),
        "processes": len(dict.fromkeys(pids)),
        "attempt_numbers": [r[2] for r in rows],
        "kills": kills,
        "restarts": restarts,
        "ended": status in TERMINAL[system],
        "status": status,
        "recovery_attempts": recoveries,
        "outcome": outcome,
        "ended_while_killing": restarts < args.max_restarts,
        "kill_after_exec_s": kill_delays,
        "restart_to_exec_s": restart_to_exec,
        "restart_to_exec_median_s": (
            sorted(restart_to_exec)[len(restart_to_exec) // 2] if restart_to_exec else None
        ),
        "wall_s": wall,
    }


def case_restarts_crashsafe(args: argparse.Namespace) -> h.JsonDict:
    return _restarts(args, "crashsafe")


def case_restarts_dbos(args: argparse.Namespace) -> h.JsonDict:
    return _restarts(args, "dbos")


def case_backoff_crashsafe(args: argparse.Namespace) -> h.JsonDict:
    """Kill 0.5 s into a 2 s backoff; time the restart to the next attempt."""
    tmp = os.path.dirname(os.path.abspath(args.db))
    ledger_path = os.path.join(tmp, "ledger.db")
    ledger = Ledger(ledger_path)
    delay, kill_into = 2.0, 0.5
    spawn_kw: dict[str, Any] = {
        "attempts": 3, "delay": delay, "log_path": os.path.join(tmp, "worker.log")
    }
    deadline = time.monotonic() + 60
    proc = _spawn(args, "crashsafe", ledger_path, restart=False, **spawn_kw)
    try:
        rows = _wait_new(ledger, 0, proc, deadline)
        assert rows and proc.poll() is None, rows
        time.sleep(max(0.0, rows[0][0] + kill_into - time.time()))
        _kill(proc)
        with closing(sqlite3.connect(args.db, timeout=30)) as conn:
            next_at = conn.execute(
                "SELECT next_at FROM attempts WHERE workflow_id = ? AND attempt = 1",
                (WORKFLOW_ID,),
            ).fetchone()[0]
        restart_at = time.time()
        proc = _spawn(args, "crashsafe", ledger_path, restart=True, **spawn_kw)
        rows = _wait_new(ledger, 1, proc, deadline)
        assert len(rows) >= 2, rows
    finally:
        if proc.poll() is None:
            _kill(proc)
    actual = rows[1][0] - restart_at
    planned = next_at - restart_at
    assert rows[1][2] == 2, rows  # the next attempt is attempt 2, not a new first one
    return {
        "delay_s": delay,
        "killed_into_backoff_s": kill_into,
        "planned_remaining_s": planned,
        "restart_to_next_attempt_s": actual,
        "late_s": actual - planned,
        "next_attempt_number": rows[1][2],
    }


CASES: dict[str, h.CaseFn] = {
    **{name: _hot_case(name) for name in HOT_CASES},
    "restarts_crashsafe": case_restarts_crashsafe,
    "restarts_dbos": case_restarts_dbos,
    "backoff_crashsafe": case_backoff_crashsafe,
}


# ----------------------------------------------------------------------- report


def _hot_report(measurements: list[h.Measurement], cases: list[str],
                args: argparse.Namespace) -> h.JsonDict:
    rows: list[list[str]] = []
    summary: h.JsonDict = {}
    for case in (c for c in HOT_CASES if c in cases):
        mode, config = case.split("_", 1)
        base = f"{mode}_plain"
        sps = h.metric_stats(measurements, case, "steps_per_s")
        us = h.metric_stats(measurements, case, "us_per_step")
        b = h.metric_stats(measurements, base, "steps_per_s") if base in cases else None
        med = h.ratio(sps.median if sps else None, b.median if b else None)
        best = h.ratio(sps.max if sps else None, b.max if b else None)
        paired = h.Stats.of(h.paired_ratios(measurements, case, base, "steps_per_s"))
        failed = len(h.failures(measurements, case))
        summary[case] = {
            "steps_per_s": sps.__dict__ if sps else None,
            "us_per_step": us.__dict__ if us else None,
            "ratio_to_plain_of_medians": med,
            "ratio_to_plain_of_bests": best,
            "ratio_to_plain_per_rep": paired.__dict__ if paired else None,
            "failed": failed,
        }
        rows.append([
            f"{mode:5} {CONFIG_LABELS[config]}",
            f"{sps.n if sps else 0}" + (f" ({failed} failed)" if failed else ""),
            h.fmt(sps.median if sps else None),
            h.fmt(sps.max if sps else None),
            h.fmt(us.median if us else None, 1),
            h.fmt(us.min if us else None, 1),
            h.fmt(med, 2),
            h.fmt(best, 2),
            f"{h.fmt(paired.min, 2)} .. {h.fmt(paired.max, 2)}" if paired else "-",
        ])
    if rows:
        h.print_table(
            f"1. hot path: {args.workflows} workflows x {args.steps} steps, no failures,"
            f" synchronous={(args.synchronous or 'full').upper()},"
            f" {args.reps} interleaved reps (async: {args.concurrency} in flight)",
            ["case", "runs", "steps/s med", "steps/s best", "µs/step med", "µs/step min",
             "/ (a) medians", "/ (a) bests", "/ (a) per rep"],
            rows,
        )
    return summary


def _restart_report(measurements: list[h.Measurement], cases: list[str],
                    args: argparse.Namespace) -> h.JsonDict:
    rows: list[list[str]] = []
    summary: h.JsonDict = {}
    seqs: list[str] = []
    for case in ("restarts_crashsafe", "restarts_dbos"):
        if case not in cases:
            continue
        runs = [m.result for m in measurements if m.case == case and m.ok]
        if not runs:
            rows.append([case, "0", "-", "-", "-", "-", "-", "-"])
            continue
        system = runs[0]["system"]
        ex = h.Stats.of([r["executions"] for r in runs])
        rs = h.Stats.of([r["restarts"] for r in runs])
        rec = h.Stats.of([r["recovery_attempts"] or 0 for r in runs])
        wall = h.Stats.of([r["wall_s"] for r in runs])
        gaps = h.Stats.of([g for r in runs for g in r["restart_to_exec_s"]])
        assert ex and rs and rec and wall
        ends = sorted({
            f"{r['status']}" + (" (while killed)" if r["ended_while_killing"]
                                else " (after kills stopped)")
            for r in runs
        })
        summary[case] = {"runs": runs}
        rows.append([
            system,
            str(len(runs)),
            f"{ex.min:.0f} / {ex.median:.0f}",
            f"{rs.min:.0f} / {rs.median:.0f}",
            f"{rec.min:.0f} / {rec.median:.0f}",
            "; ".join(ends),
            f"{wall.min:.2f} / {wall.median:.2f}",
            f"{gaps.min:.2f} / {gaps.median:.2f}" if gaps else "-",
        ])
        for r in runs:
            seqs.append(f"   {system}: attempt numbers the body saw: "
                        + " ".join(str(a) for a in r["attempt_numbers"])
                        + f"; result() raised {r['outcome']}")
    if rows:
        h.print_table(
            "2. retries across restarts: always-failing step, 5 attempts 0.2 s apart, SIGKILL"
            f" {args.kill_after:g} s after each execution, at most {args.max_restarts} restarts"
            " (min / median)",
            ["system", "runs", "executions", "restarts", "recoveries", "how it ended",
             "wall s", "restart -> exec s"],
            rows,
        )
        print("\n".join(seqs))
    if "restarts_crashsafe" in summary and "restarts_dbos" in summary:
        ratios = [
            d["executions"] / c["executions"]
            for c, d in zip(summary["restarts_crashsafe"]["runs"],
                            summary["restarts_dbos"]["runs"], strict=False)
        ]
        summary["dbos_over_crashsafe_executions"] = ratios
        print(f"   executions DBOS / crashsafe per repetition: "
              f"{', '.join(f'{r:.1f}' for r in ratios)}")
    return summary


def _backoff_report(measurements: list[h.Measurement], cases: list[str]) -> h.JsonDict:
    if "backoff_crashsafe" not in cases:
        return {}
    metrics = ["planned_remaining_s", "restart_to_next_attempt_s", "late_s"]
    labels = {
        "planned_remaining_s": "remaining delay at the restart (planned next attempt - restart)",
        "restart_to_next_attempt_s": "restart command -> next attempt's body",
        "late_s": "next attempt later than planned by",
    }
    rows: list[list[str]] = []
    summary: h.JsonDict = {}
    for metric in metrics:
        s = h.metric_stats(measurements, "backoff_crashsafe", metric)
        summary[metric] = s.__dict__ if s else None
        rows.append([labels[metric], h.fmt(s.min if s else None, 3),
                     h.fmt(s.median if s else None, 3), h.fmt(s.max if s else None, 3)])
    h.print_table(
        "3. crashsafe, SIGKILL 0.5 s into a 2 s backoff (attempt 1 failed), restart (s)",
        ["measurement", "min", "median", "max"],
        rows,
    )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workflows", type=int, default=200, help="workflows per hot-path run (W)")
    p.add_argument("--steps", type=int, default=20, help="steps per workflow (S)")
    p.add_argument("--concurrency", type=int, default=100,
                   help="workflows in flight for the async hot-path cases (C)")
    p.add_argument("--synchronous", choices=("full", "normal"), default=None,
                   help="hot-path cases only: SQLite synchronous level (default: crashsafe's"
                        " default, FULL); normal takes the fsync, and its noise, out")
    p.add_argument("--max-restarts", type=int, default=10,
                   help="restarts before the kill harness leaves the worker alone")
    p.add_argument("--kill-after", type=float, default=0.1,
                   help="seconds after each new execution before the SIGKILL")
    h.add_common_args(p, default_reps=3)
    # Worker side only (a process the kill harness starts and kills).
    p.add_argument("--worker", choices=("crashsafe", "dbos"), help=argparse.SUPPRESS)
    p.add_argument("--ledger", help=argparse.SUPPRESS)
    p.add_argument("--attempts", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--delay", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("--restart", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    if args.case:
        h.child_main(CASES, args)
        return
    cases = h.select_cases(list(CASES), args.cases)
    env = h.environment()
    h.log(f"bench_retries: {env}")
    child_args = [
        "--workflows", str(args.workflows), "--steps", str(args.steps),
        "--concurrency", str(args.concurrency), "--max-restarts", str(args.max_restarts),
        "--kill-after", str(args.kill_after), "--timeout", str(args.timeout),
    ]
    if args.synchronous:
        child_args += ["--synchronous", args.synchronous]
    started = time.perf_counter()
    measurements = h.run_interleaved(
        SCRIPT, cases, args.reps, child_args,
        tmp_root=args.tmpdir, timeout=args.timeout, progress=h.log,
    )
    print("command: python bench/bench_retries.py " + " ".join(argv or sys.argv[1:]))
    out = {
        "hot_path": _hot_report(measurements, cases, args),
        "restarts": _restart_report(measurements, cases, args),
        "backoff": _backoff_report(measurements, cases),
    }
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        h.write_json(args.json, {
            "benchmark": "retries",
            "environment": env,
            "params": {
                "workflows": args.workflows, "steps": args.steps, "reps": args.reps,
                "concurrency": args.concurrency, "max_restarts": args.max_restarts,
                "kill_after": args.kill_after, "cases": cases,
                "synchronous": args.synchronous or "full",
            },
            **out,
            "measurements": h.measurements_json(measurements),
        })
    if any(not m.ok for m in measurements):
        sys.exit(1)


if __name__ == "__main__":
    main()
