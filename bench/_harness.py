"""Shared plumbing for the benchmark scripts in this folder.

Every benchmark script is both the parent and the child:

* run without ``--case`` it is the *parent*: it runs every selected case in a fresh
  child process (``python <script> --case NAME --db PATH ...``), each with a fresh
  database file in its own temporary directory, interleaving the repetitions of all
  cases so that slow phases of a noisy machine hit every case alike;
* run with ``--case`` it is the *child*: it runs that one case, times only the
  measured part itself, and prints one ``BENCH_RESULT {json}`` line on stdout.

The parent then reports min and median per metric and the ratios between cases,
all from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "

JsonDict = dict[str, Any]
CaseFn = Callable[[argparse.Namespace], JsonDict]


# --------------------------------------------------------------------------- child


def child_main(
    cases: Mapping[str, CaseFn],
    args: argparse.Namespace,
    finish: Callable[[argparse.Namespace, JsonDict], None] | None = None,
) -> None:
    """Run ``args.case`` in this process and print its result line.

    ``finish`` may add to the result after the case has returned (and so has closed
    its database), e.g. the size of the file it left.
    """
    fn = cases.get(args.case)
    if fn is None:
        raise SystemExit(f"unknown case {args.case!r}; known: {', '.join(cases)}")
    result = fn(args)
    result.setdefault("case", args.case)
    if finish is not None:
        finish(args, result)
    # Flush whatever the libraries printed first so the result line stands alone.
    sys.stderr.flush()
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def rss_kib() -> int:
    """Resident set size of this process in KiB (``VmRSS`` from /proc/self/status)."""
    return _proc_status_kib("VmRSS")


def peak_rss_kib() -> int:
    """Peak resident set size of this process in KiB (``VmHWM``)."""
    return _proc_status_kib("VmHWM")


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


# -------------------------------------------------------------------------- parent


@dataclass
class Measurement:
    """One child run: which case, which repetition, and what it reported."""

    case: str
    rep: int
    ok: bool
    result: JsonDict = field(default_factory=dict)
    error: str = ""
    wall_s: float = 0.0


def interleave(cases: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """Yield ``(rep, case)`` with all cases in each repetition, rotating the order.

    Rotating the start means no case always runs first (cold page cache) or right
    after the same neighbour.
    """
    n = len(cases)
    for rep in range(reps):
        shift = rep % n if n else 0
        for case in [*cases[shift:], *cases[:shift]]:
            yield rep, case


def run_child(
    script: Path,
    case: str,
    extra_args: Sequence[str],
    *,
    tmp_root: str | None,
    timeout: float,
    db_name: str = "bench.db",
) -> Measurement:
    """Run one case in a fresh interpreter with a fresh database in a new temp dir."""
    tmpdir = tempfile.mkdtemp(prefix=f"crashsafe-bench-{case}-", dir=tmp_root)
    db_path = os.path.join(tmpdir, db_name)
    cmd = [sys.executable, str(script), "--case", case, "--db", db_path, *extra_args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=tmpdir,  # anything a library writes to its working directory lands here
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return Measurement(case, -1, False, error=f"timed out after {exc.timeout:.0f} s")
    finally:
        wall = time.perf_counter() - started
        shutil.rmtree(tmpdir, ignore_errors=True)
    line = next(
        (ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_PREFIX)),
        None,
    )
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:]
        return Measurement(
            case, -1, False, error=f"exit {proc.returncode}: " + "\n".join(tail), wall_s=wall
        )
    return Measurement(case, -1, True, result=json.loads(line[len(RESULT_PREFIX) :]), wall_s=wall)


def run_interleaved(
    script: Path,
    cases: Sequence[str],
    reps: int,
    extra_args: Sequence[str],
    *,
    tmp_root: str | None = None,
    timeout: float = 900.0,
    progress: Callable[[str], None] | None = None,
) -> list[Measurement]:
    """Run ``reps`` repetitions of every case, interleaved, each in its own child."""
    out: list[Measurement] = []
    total = reps * len(cases)
    for i, (rep, case) in enumerate(interleave(cases, reps), 1):
        m = run_child(script, case, extra_args, tmp_root=tmp_root, timeout=timeout)
        m.rep = rep
        out.append(m)
        if progress is not None:
            status = "ok" if m.ok else "FAILED"
            progress(f"[{i}/{total}] rep {rep + 1} {case}: {status} ({m.wall_s:.1f} s)")
            if not m.ok:
                progress("    " + m.error.replace("\n", "\n    "))
    return out


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class Stats:
    """Summary of one metric over the successful repetitions of one case."""

    n: int
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(len(values), min(values), statistics.median(values), max(values))


def metric_stats(measurements: Sequence[Measurement], case: str, metric: str) -> Stats | None:
    """Stats of ``metric`` over the successful runs of ``case``."""
    values = [
        float(m.result[metric])
        for m in measurements
        if m.case == case and m.ok and metric in m.result
    ]
    return Stats.of(values)


def failures(measurements: Sequence[Measurement], case: str) -> list[Measurement]:
    return [m for m in measurements if m.case == case and not m.ok]


def paired_ratios(
    measurements: Sequence[Measurement], num: str, den: str, metric: str
) -> list[float]:
    """``num / den`` of ``metric`` within each repetition where both cases succeeded.

    Runs of one repetition are close in time, so their ratio cancels slow phases of
    the machine better than a ratio of medians taken over the whole run.
    """
    by_rep: dict[tuple[str, int], float] = {
        (m.case, m.rep): float(m.result[metric])
        for m in measurements
        if m.ok and m.case in (num, den) and metric in m.result
    }
    reps = sorted({rep for _, rep in by_rep})
    return [
        by_rep[(num, rep)] / by_rep[(den, rep)]
        for rep in reps
        if (num, rep) in by_rep and (den, rep) in by_rep and by_rep[(den, rep)]
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------- reporting


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a table with rich when it is importable, else as aligned plain text."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is optional
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        return
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    # A fixed wide console keeps the table readable when stdout is a file or pipe.
    Console(width=max(100, shutil.get_terminal_size((140, 40)).columns)).print(table)


def environment() -> JsonDict:
    """What the numbers were measured on, for the report and the JSON file."""
    versions: JsonDict = {}
    for dist in ("crashsafe", "dbos", "langgraph", "langgraph-checkpoint-sqlite", "sqlalchemy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str, payload: JsonDict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def measurements_json(measurements: Sequence[Measurement]) -> list[JsonDict]:
    return [
        {
            "case": m.case,
            "rep": m.rep,
            "ok": m.ok,
            "wall_s": round(m.wall_s, 3),
            "result": m.result,
            "error": m.error,
        }
        for m in measurements
    ]


def add_common_args(parser: argparse.ArgumentParser, default_reps: int) -> None:
    """Flags every benchmark script shares (parent and child)."""
    parser.add_argument("--cases", help="comma-separated subset of cases to run")
    parser.add_argument("--reps", type=int, default=default_reps, help="repetitions per case")
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    parser.add_argument(
        "--tmpdir", help="where the per-run database directories go (default: system temp)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a child run is killed"
    )
    # Child side only; the parent fills these in.
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)


def select_cases(all_cases: Sequence[str], spec: str | None) -> list[str]:
    if not spec:
        return list(all_cases)
    chosen = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in all_cases]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(all_cases)}")
    return chosen


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
