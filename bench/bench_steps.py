"""Per-step durability overhead: crashsafe against raw SQLite, DBOS and LangGraph.

Workload: W workflows x S trivial steps, each step returning a small dict, each
workflow with its own id. Every case runs in a fresh child process on a fresh
database file; the repetitions of all cases are interleaved.

    python bench/bench_steps.py                      # W=200, S=20, 5 reps, all cases
    python bench/bench_steps.py --workflows 20 --reps 1 --cases raw_full,crashsafe_seq

See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import _harness as h

if TYPE_CHECKING:
    import crashsafe

SCRIPT = Path(__file__).resolve()

# (numerator, denominator, target or None). Ratios are of steps/s.
RATIOS: list[tuple[str, str, float | None]] = [
    ("crashsafe_seq", "raw_full", 0.70),
    ("crashsafe_async_concurrent", "raw_full", 3.0),
    ("crashsafe_thread_concurrent", "raw_full", 3.0),
    ("crashsafe_seq_normal", "raw_normal", None),
    ("crashsafe_seq", "dbos", None),
    ("crashsafe_seq", "dbos_wal", None),
    ("crashsafe_seq", "langgraph_sync", None),
    ("dbos_wal", "dbos", None),
]

RESULT_TIMEOUT_S = 300.0


def _done(args: argparse.Namespace, started: float, **extra: Any) -> h.JsonDict:
    """Build the child's result from the end of the timed section."""
    elapsed = time.perf_counter() - started
    steps = args.workflows * args.steps
    return {
        "elapsed_s": elapsed,
        "workflows": args.workflows,
        "steps": steps,
        "steps_per_s": steps / elapsed,
        "us_per_step": elapsed / steps * 1e6,
        **extra,
    }


def _add_db_bytes(args: argparse.Namespace, result: h.JsonDict) -> None:
    """Size of what the case left on disk, measured after it closed its database."""
    result["db_bytes"] = sum(
        os.path.getsize(args.db + sfx) for sfx in ("", "-wal") if os.path.exists(args.db + sfx)
    )


def _journal_mode(db: str) -> str:
    # closing(): a sqlite3 connection's own context manager commits but does not close,
    # and a connection left open would keep the WAL file from being checkpointed away.
    with closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


def _step_output(i: int) -> dict[str, Any]:
    return {"i": i, "ok": True}


# ------------------------------------------------------------------- raw SQLite


def _raw(args: argparse.Namespace, synchronous: str, rows_per_commit: int) -> h.JsonDict:
    conn = sqlite3.connect(args.db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(
        "CREATE TABLE journal (workflow_id TEXT NOT NULL, idx INTEGER NOT NULL,"
        " output BLOB NOT NULL, PRIMARY KEY (workflow_id, idx))"
    )
    insert = "INSERT INTO journal (workflow_id, idx, output) VALUES (?, ?, ?)"
    pending = 0
    started = time.perf_counter()
    for w in range(args.workflows):
        wid = f"w-{w}"
        for i in range(args.steps):
            if pending == 0:
                conn.execute("BEGIN")
            conn.execute(insert, (wid, i, json.dumps(_step_output(i)).encode()))
            pending += 1
            if pending == rows_per_commit:
                conn.execute("COMMIT")
                pending = 0
    if pending:
        conn.execute("COMMIT")
    result = _done(args, started, commits=-(-args.workflows * args.steps // rows_per_commit))
    rows = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    conn.close()
    assert rows == result["steps"], rows
    return result


def case_raw_full(args: argparse.Namespace) -> h.JsonDict:
    return _raw(args, "FULL", 1)


def case_raw_normal(args: argparse.Namespace) -> h.JsonDict:
    return _raw(args, "NORMAL", 1)


def case_raw_full_batch100(args: argparse.Namespace) -> h.JsonDict:
    return _raw(args, "FULL", 100)


# ------------------------------------------------------------------------- DBOS


def _dbos(args: argparse.Namespace, wal: bool) -> h.JsonDict:
    if wal:
        # Not a DBOS option: switch the (new, empty) file to WAL before DBOS opens it.
        with closing(sqlite3.connect(args.db)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    from dbos import DBOS, SetWorkflowID

    DBOS(
        config={
            "name": "bench",
            "system_database_url": f"sqlite:///{args.db}",
            "log_level": "WARNING",
        }
    )

    @DBOS.step()
    def step(i: int) -> dict[str, Any]:
        return _step_output(i)

    @DBOS.workflow()
    def workflow(n: int) -> int:
        for i in range(n):
            step(i)
        return n

    DBOS.launch()
    started = time.perf_counter()
    for w in range(args.workflows):
        with SetWorkflowID(f"w-{w}"):
            out = workflow(args.steps)
        assert out == args.steps, out
    result = _done(args, started, journal_mode=_journal_mode(args.db))
    DBOS.destroy()
    return result


def case_dbos(args: argparse.Namespace) -> h.JsonDict:
    return _dbos(args, wal=False)


def case_dbos_wal(args: argparse.Namespace) -> h.JsonDict:
    return _dbos(args, wal=True)


# -------------------------------------------------------------------- LangGraph


class ChainState(TypedDict):
    i: int
    out: dict[str, Any]


def case_langgraph_sync(args: argparse.Namespace) -> h.JsonDict:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph

    def make_node(i: int) -> Callable[[ChainState], dict[str, Any]]:
        def node(state: ChainState) -> dict[str, Any]:
            return {"i": i, "out": _step_output(i)}

        return node

    builder = StateGraph(ChainState)
    prev = START
    for i in range(args.steps):
        builder.add_node(f"s{i}", make_node(i))  # type: ignore[call-overload]
        builder.add_edge(prev, f"s{i}")
        prev = f"s{i}"
    builder.add_edge(prev, END)
    conn = sqlite3.connect(args.db, check_same_thread=False)
    graph = builder.compile(checkpointer=SqliteSaver(conn))
    started = time.perf_counter()
    for w in range(args.workflows):
        config: RunnableConfig = {"configurable": {"thread_id": f"w-{w}"}}
        out = graph.invoke({"i": -1, "out": {}}, config, durability="sync")
        assert out["i"] == args.steps - 1, out
    result = _done(args, started, journal_mode=_journal_mode(args.db))
    conn.close()
    return result


# -------------------------------------------------------------------- crashsafe


def _crashsafe_app(args: argparse.Namespace, synchronous: str | None = None) -> crashsafe.App:
    """Open the app and launch it now, so schema creation is outside the clock."""
    import crashsafe

    url = f"sqlite:///{args.db}"
    if synchronous:
        url += f"?synchronous={synchronous}"
    app = crashsafe.App(url)
    app.launch()
    return app


def _crashsafe_sync_workflow(app: crashsafe.App) -> crashsafe.Workflow[[int], int]:
    @app.step()
    def step(i: int) -> dict[str, Any]:
        return _step_output(i)

    @app.workflow()
    def workflow(n: int) -> int:
        for i in range(n):
            step(i)
        return n

    return workflow


def _crashsafe_seq(args: argparse.Namespace, synchronous: str | None) -> h.JsonDict:
    app = _crashsafe_app(args, synchronous)
    workflow = _crashsafe_sync_workflow(app)
    started = time.perf_counter()
    for w in range(args.workflows):
        handle = app.start(workflow, args.steps, workflow_id=f"w-{w}")
        out = handle.result(timeout=RESULT_TIMEOUT_S)
        assert out == args.steps, out
    result = _done(args, started, journal_mode=_journal_mode(args.db))
    app.close()
    return result


def case_crashsafe_seq(args: argparse.Namespace) -> h.JsonDict:
    return _crashsafe_seq(args, None)


def case_crashsafe_seq_normal(args: argparse.Namespace) -> h.JsonDict:
    return _crashsafe_seq(args, "normal")


def case_crashsafe_thread_concurrent(args: argparse.Namespace) -> h.JsonDict:
    app = _crashsafe_app(args)
    workflow = _crashsafe_sync_workflow(app)
    in_flight: deque[Any] = deque()
    started = time.perf_counter()
    # Sliding window: keep `concurrency` workflows running; the workflows are all
    # alike, so waiting on the oldest first is close to waiting on whichever ends first.
    for w in range(args.workflows):
        if len(in_flight) >= args.concurrency:
            out = in_flight.popleft().result(timeout=RESULT_TIMEOUT_S)
            assert out == args.steps, out
        in_flight.append(app.start(workflow, args.steps, workflow_id=f"w-{w}"))
    while in_flight:
        out = in_flight.popleft().result(timeout=RESULT_TIMEOUT_S)
        assert out == args.steps, out
    result = _done(args, started, concurrency=args.concurrency, journal_mode=_journal_mode(args.db))
    app.close()
    return result


def case_crashsafe_async_concurrent(args: argparse.Namespace) -> h.JsonDict:
    app = _crashsafe_app(args)

    @app.step()
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
    result = _done(args, started, concurrency=args.concurrency, journal_mode=_journal_mode(args.db))
    app.close()
    return result


CASES: dict[str, h.CaseFn] = {
    "raw_full": case_raw_full,
    "raw_normal": case_raw_normal,
    "raw_full_batch100": case_raw_full_batch100,
    "dbos": case_dbos,
    "dbos_wal": case_dbos_wal,
    "langgraph_sync": case_langgraph_sync,
    "crashsafe_seq": case_crashsafe_seq,
    "crashsafe_seq_normal": case_crashsafe_seq_normal,
    "crashsafe_async_concurrent": case_crashsafe_async_concurrent,
    "crashsafe_thread_concurrent": case_crashsafe_thread_concurrent,
}


# ----------------------------------------------------------------------- parent


def report(
    measurements: list[h.Measurement], cases: list[str], args: argparse.Namespace
) -> h.JsonDict:
    rows: list[list[str]] = []
    summary: h.JsonDict = {}
    for case in cases:
        sps = h.metric_stats(measurements, case, "steps_per_s")
        us = h.metric_stats(measurements, case, "us_per_step")
        db = h.metric_stats(measurements, case, "db_bytes")
        failed = len(h.failures(measurements, case))
        summary[case] = {
            "steps_per_s": sps.__dict__ if sps else None,
            "us_per_step": us.__dict__ if us else None,
            "db_bytes": db.__dict__ if db else None,
            "failed": failed,
        }
        rows.append(
            [
                case,
                f"{sps.n if sps else 0}" + (f" ({failed} failed)" if failed else ""),
                h.fmt(sps.median if sps else None),
                h.fmt(sps.max if sps else None),
                h.fmt(us.median if us else None, 1),
                h.fmt(us.min if us else None, 1),
                h.fmt(us.max if us else None, 1),
                h.fmt(db.median / 1024 if db else None),
            ]
        )
    h.print_table(
        f"{args.workflows} workflows x {args.steps} steps, {args.reps} interleaved reps"
        f" (concurrent cases: {args.concurrency} in flight)",
        [
            "case",
            "runs",
            "steps/s med",
            "steps/s best",
            "µs/step med",
            "µs/step min",
            "µs/step max",
            "db KiB",
        ],
        rows,
    )

    ratio_rows: list[list[str]] = []
    ratios: list[h.JsonDict] = []
    for num, den, target in RATIOS:
        if num not in cases or den not in cases:
            continue
        a = h.metric_stats(measurements, num, "steps_per_s")
        b = h.metric_stats(measurements, den, "steps_per_s")
        med = h.ratio(a.median if a else None, b.median if b else None)
        best = h.ratio(a.max if a else None, b.max if b else None)
        paired = h.Stats.of(h.paired_ratios(measurements, num, den, "steps_per_s"))
        verdict = "" if target is None or med is None else ("ok" if med >= target else "BELOW")
        ratios.append(
            {
                "num": num,
                "den": den,
                "of_medians": med,
                "of_bests": best,
                "per_rep": paired.__dict__ if paired else None,
                "target": target,
            }
        )
        ratio_rows.append(
            [
                f"{num} / {den}",
                h.fmt(med, 2),
                h.fmt(best, 2),
                h.fmt(paired.median if paired else None, 2),
                f"{h.fmt(paired.min, 2)} .. {h.fmt(paired.max, 2)}" if paired else "-",
                "" if target is None else f">= {target:.2f}",
                verdict,
            ]
        )
    if ratio_rows:
        h.print_table(
            "ratios of steps/s, same run (verdict on the ratio of medians)",
            ["ratio", "of medians", "of bests", "per-rep median", "per-rep range", "target", ""],
            ratio_rows,
        )
    return {"summary": summary, "ratios": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workflows", type=int, default=200, help="workflows per run (W)")
    p.add_argument("--steps", type=int, default=20, help="steps per workflow (S)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="workflows in flight for the concurrent crashsafe cases (C)",
    )
    h.add_common_args(p, default_reps=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        h.child_main(CASES, args, _add_db_bytes)
        return
    cases = h.select_cases(list(CASES), args.cases)
    env = h.environment()
    h.log(f"bench_steps: {env}")
    child_args = [
        "--workflows",
        str(args.workflows),
        "--steps",
        str(args.steps),
        "--concurrency",
        str(args.concurrency),
    ]
    measurements = h.run_interleaved(
        SCRIPT,
        cases,
        args.reps,
        child_args,
        tmp_root=args.tmpdir,
        timeout=args.timeout,
        progress=h.log,
    )
    out = report(measurements, cases, args)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "steps",
                "environment": env,
                "params": {
                    "workflows": args.workflows,
                    "steps": args.steps,
                    "reps": args.reps,
                    "concurrency": args.concurrency,
                    "cases": cases,
                },
                **out,
                "measurements": h.measurements_json(measurements),
            },
        )
    if any(not m.ok for m in measurements):
        sys.exit(1)


if __name__ == "__main__":
    main()
