"""Resident memory of many workflows parked in a durable sleep, in one process.

Each case runs in a fresh child process with a fresh database. The child runs one
warm-up workflow to completion (so lazily created pools, threads and imports are in
the baseline), reads VmRSS, starts N workflows that each run one step and then park in
a durable sleep, waits until all N are parked, lets the process settle, reads VmRSS
again, and then waits for every workflow to finish.

    python bench/bench_memory.py                       # N=1000, sleep 10 s, 1 rep
    python bench/bench_memory.py --workflows 200 --sleep 5 --cases crashsafe_async

The baseline_* cases park plain threads / asyncio tasks the same way, for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _harness as h

if TYPE_CHECKING:
    import crashsafe

SCRIPT = Path(__file__).resolve()
SETTLE_S = 0.5
RESULT_TIMEOUT_S = 600.0


class Gauge:
    """Counts workflows that reached the sleep and that came back from it.

    ``next()`` on an ``itertools.count`` is atomic under the GIL, so this is safe to
    bump from crashsafe's worker threads and its event loop alike.
    """

    def __init__(self) -> None:
        self._parked = itertools.count()
        self._woke = itertools.count()
        self.parked = 0
        self.woke = 0

    def park(self) -> None:
        self.parked = next(self._parked) + 1

    def wake(self) -> None:
        self.woke = next(self._woke) + 1


def _wait_until(cond: Callable[[], bool], deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _measure(
    args: argparse.Namespace,
    gauge: Gauge,
    start_all: Callable[[], Callable[[], None]],
    count_recorded: Callable[[], int] | None = None,
) -> h.JsonDict:
    """Shared measurement: baseline RSS, start N, wait parked, RSS, wait done.

    ``start_all`` starts the N workflows (after the warm-up, which the caller has run
    and which counts as one parked and one woken) and returns a function that waits
    for all of them to finish. ``count_recorded``, if given, counts from the store how
    many of the N have their sleep durably recorded; it runs after the RSS reading so
    its own allocations are not measured.
    """
    n = args.workflows
    base_parked, base_woke = gauge.parked, gauge.woke
    rss_before = h.rss_kib()
    started = time.perf_counter()
    wait_all = start_all()
    all_parked = _wait_until(lambda: gauge.parked - base_parked >= n, args.sleep - SETTLE_S)
    park_s = time.perf_counter() - started
    time.sleep(SETTLE_S)
    rss_parked = h.rss_kib()
    parked = gauge.parked - base_parked
    recorded = count_recorded() if count_recorded is not None else None
    woke_early = gauge.woke - base_woke
    wait_all()
    total_s = time.perf_counter() - started
    delta = rss_parked - rss_before
    return {
        "workflows": n,
        "sleep_s": args.sleep,
        "parked": parked,
        # Valid only if every workflow was parked at once when RSS was read.
        "valid": all_parked and woke_early == 0 and recorded in (None, n),
        "sleep_recorded": recorded,
        "woke_before_measure": woke_early,
        "park_s": park_s,
        "total_s": total_s,
        "rss_before_mib": rss_before / 1024,
        "rss_parked_mib": rss_parked / 1024,
        "rss_delta_mib": delta / 1024,
        "kib_per_workflow": delta / n,
        "peak_rss_mib": h.peak_rss_kib() / 1024,
        "rss_end_mib": h.rss_kib() / 1024,
    }


# -------------------------------------------------------------------- crashsafe


def _crashsafe_app(args: argparse.Namespace) -> crashsafe.App:
    import crashsafe

    app = crashsafe.App(f"sqlite:///{args.db}")
    app.launch()
    return app


def _start_and_measure(
    args: argparse.Namespace, app: crashsafe.App, workflow: Any, gauge: Gauge
) -> h.JsonDict:
    app.start(workflow, 0.01, workflow_id="warm-up").result(timeout=RESULT_TIMEOUT_S)

    def start_all() -> Callable[[], None]:
        handles = [
            app.start(workflow, args.sleep, workflow_id=f"w-{w}") for w in range(args.workflows)
        ]

        def wait_all() -> None:
            for handle in handles:
                out = handle.result(timeout=RESULT_TIMEOUT_S)
                assert out == {"slept": True}, out

        return wait_all

    def count_recorded() -> int:
        return sum(
            any(e.kind == "sleep" for e in app.journal(f"w-{w}")) for w in range(args.workflows)
        )

    result = _measure(args, gauge, start_all, count_recorded)
    app.close()
    return result


def case_crashsafe_sync(args: argparse.Namespace) -> h.JsonDict:
    import crashsafe

    app = _crashsafe_app(args)
    gauge = Gauge()

    @app.step()
    def step(seconds: float) -> dict[str, Any]:
        return {"seconds": seconds}

    @app.workflow()
    def workflow(seconds: float) -> dict[str, Any]:
        step(seconds)
        gauge.park()
        crashsafe.sleep(seconds)
        gauge.wake()
        return {"slept": True}

    return _start_and_measure(args, app, workflow, gauge)


def case_crashsafe_async(args: argparse.Namespace) -> h.JsonDict:
    import crashsafe

    app = _crashsafe_app(args)
    gauge = Gauge()

    @app.step()
    async def step(seconds: float) -> dict[str, Any]:
        return {"seconds": seconds}

    @app.workflow()
    async def workflow(seconds: float) -> dict[str, Any]:
        await step(seconds)
        gauge.park()
        await crashsafe.sleep_async(seconds)
        gauge.wake()
        return {"slept": True}

    return _start_and_measure(args, app, workflow, gauge)


# -------------------------------------------------------------------- baselines


def case_baseline_threads(args: argparse.Namespace) -> h.JsonDict:
    """N plain threads in time.sleep: the floor for one-thread-per-workflow."""
    gauge = Gauge()

    def body(seconds: float) -> None:
        gauge.park()
        time.sleep(seconds)
        gauge.wake()

    warm = threading.Thread(target=body, args=(0.01,))
    warm.start()
    warm.join()

    def start_all() -> Callable[[], None]:
        threads = [threading.Thread(target=body, args=(args.sleep,)) for _ in range(args.workflows)]
        for t in threads:
            t.start()

        def wait_all() -> None:
            for t in threads:
                t.join()

        return wait_all

    return _measure(args, gauge, start_all)


def case_baseline_asyncio(args: argparse.Namespace) -> h.JsonDict:
    """N plain asyncio tasks in asyncio.sleep, on a loop in a background thread."""
    gauge = Gauge()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    async def body(seconds: float) -> None:
        gauge.park()
        await asyncio.sleep(seconds)
        gauge.wake()

    asyncio.run_coroutine_threadsafe(body(0.01), loop).result()

    def start_all() -> Callable[[], None]:
        futures = [
            asyncio.run_coroutine_threadsafe(body(args.sleep), loop) for _ in range(args.workflows)
        ]

        def wait_all() -> None:
            for f in futures:
                f.result()

        return wait_all

    result = _measure(args, gauge, start_all)
    loop.call_soon_threadsafe(loop.stop)
    runner.join()
    loop.close()
    return result


CASES: dict[str, h.CaseFn] = {
    "crashsafe_sync": case_crashsafe_sync,
    "crashsafe_async": case_crashsafe_async,
    "baseline_threads": case_baseline_threads,
    "baseline_asyncio": case_baseline_asyncio,
}


# ----------------------------------------------------------------------- parent


def _median(stats: dict[str, h.Stats | None], metric: str, digits: int = 1) -> str:
    s = stats[metric]
    return h.fmt(s.median if s else None, digits)


def report(
    measurements: list[h.Measurement], cases: list[str], args: argparse.Namespace
) -> h.JsonDict:
    rows: list[list[str]] = []
    summary: h.JsonDict = {}
    for case in cases:
        ok = [m for m in measurements if m.case == case and m.ok]
        invalid = sum(1 for m in ok if not m.result.get("valid"))
        failed = len(h.failures(measurements, case))
        stats = {
            metric: h.metric_stats(measurements, case, metric)
            for metric in (
                "rss_before_mib",
                "rss_parked_mib",
                "rss_delta_mib",
                "kib_per_workflow",
                "peak_rss_mib",
                "park_s",
                "total_s",
            )
        }
        summary[case] = {k: (v.__dict__ if v else None) for k, v in stats.items()}
        summary[case].update(failed=failed, invalid=invalid)

        note = []
        if failed:
            note.append(f"{failed} failed")
        if invalid:
            note.append(f"{invalid} not all parked")
        kib = stats["kib_per_workflow"]
        rows.append(
            [
                case,
                f"{len(ok)}" + (f" ({', '.join(note)})" if note else ""),
                _median(stats, "rss_before_mib"),
                _median(stats, "rss_parked_mib"),
                _median(stats, "rss_delta_mib"),
                _median(stats, "kib_per_workflow"),
                h.fmt(kib.min if kib else None, 1),
                _median(stats, "peak_rss_mib"),
                _median(stats, "park_s", 2),
                _median(stats, "total_s", 2),
            ]
        )
    h.print_table(
        f"{args.workflows} workflows parked in a {args.sleep:g} s durable sleep, one process"
        f" ({args.reps} reps; medians unless marked)",
        [
            "case",
            "runs",
            "RSS before MiB",
            "RSS parked MiB",
            "delta MiB",
            "KiB/workflow",
            "KiB/wf min",
            "VmHWM MiB",
            "park s",
            "total s",
        ],
        rows,
    )
    return {"summary": summary}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workflows", type=int, default=1000, help="workflows parked at once (N)")
    p.add_argument(
        "--sleep",
        type=float,
        default=10.0,
        help="durable sleep in seconds; must outlast starting and parking all N",
    )
    h.add_common_args(p, default_reps=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        h.child_main(CASES, args)
        return
    cases = h.select_cases(list(CASES), args.cases)
    env = h.environment()
    h.log(f"bench_memory: {env}")
    child_args = ["--workflows", str(args.workflows), "--sleep", str(args.sleep)]
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
                "benchmark": "memory",
                "environment": env,
                "params": {
                    "workflows": args.workflows,
                    "sleep_s": args.sleep,
                    "reps": args.reps,
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
