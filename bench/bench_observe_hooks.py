"""What the observability hooks themselves cost, in instructions, in one thread.

bench_observe_cg.py counts whole processes, whose threads (committer, heartbeat, span
export) never interleave the same way twice: its counts move by a few thousand
instructions a step from one run to the next. This script counts only the hooks: it
runs one real workflow of S steps once, records the calls the engine made to its
reporting hooks, and replays them R times on fresh runs (the ``start`` span and its
stamp, ``begin``, each step, the last commit, ``end``), under
``valgrind --tool=callgrind``, for R and 6 R replays; the difference, divided by 5 R,
is what one workflow's hooks cost, with nothing else counted. The reporting thread is
pinned (it would report from another thread what the replay reports in batches).

    python bench/bench_observe_hooks.py              # metrics, unsampled, on
    python bench/bench_observe_hooks.py --off 283765 # also as a share of "off" a step

``--off``: instructions a step of the plain engine (``seq_off`` from
bench_observe_cg.py), to print each as a share of it, and 1 in 10 sampled derived as
0.9 x unsampled + 0.1 x on. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
MODES = ("metrics", "unsampled", "on")


def _provider(mode: str) -> Any:
    if mode == "metrics":
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(
        0.0 if mode == "unsampled" else 1.0)))
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=1 << 20))
    return provider


def child(mode: str, replays: int, steps: int, db_dir: str) -> None:
    import crashsafe
    import crashsafe._instrument as instrument
    from crashsafe.observe import prometheus

    instrument.SWEEP_S = 1e6
    prometheus.instrument()
    provider = _provider(mode)
    app = crashsafe.App(f"sqlite:///{os.path.join(db_dir, 'hooks.db')}",
                        tracing=provider if provider is not None else False)
    calls: list[tuple[str, Any]] = []
    records: list[Any] = []
    real_step, real_committed, real_begin = (instrument.Run.step, instrument.Run.committed,
                                             instrument.begin)

    def step(run: Any, e: Any) -> None:
        calls.append(("step", e))
        real_step(run, e)

    def committed(run: Any, ops: Any, t0: int) -> None:
        calls.append(("committed", ops))
        real_committed(run, ops, t0)

    def begin(app_: Any, rec: Any, resumed: int, stamp: Any = None) -> Any:
        records.append(rec)
        return real_begin(app_, rec, resumed, stamp)

    instrument.Run.step, instrument.Run.committed = step, committed  # type: ignore[method-assign]
    instrument.begin = begin

    @app.step(name="hooked_step")
    def hooked_step(i: int) -> dict[str, Any]:
        return {"i": i, "ok": True, "text": "x" * 32}

    @app.workflow(name="hooked")
    def hooked(n: int) -> int:
        for i in range(n):
            hooked_step(i)
        return n

    app.start(hooked, steps, workflow_id="recorded").result(timeout=60)
    instrument.Run.step, instrument.Run.committed = real_step, real_committed  # type: ignore[method-assign]
    instrument.begin = real_begin
    if [kind for kind, _ in calls].count("step") != steps:
        raise SystemExit(f"recorded {calls!r}: expected {steps} plain step results")
    rec, tracer = records[0], app._tracer()

    class Record:  # the recorded workflow row, with the inputs its start stamps
        id, name, version, token = rec.id, rec.name, rec.version, rec.token

        def __init__(self, inputs: bytes) -> None:
            self.inputs = inputs

    unstamped = rec.inputs

    def one() -> None:
        inputs, stamp = tracer.stamp_start(unstamped, rec.name, rec.id) \
            if tracer is not None else (unstamped, None)
        run = instrument.begin(app, Record(inputs), 0, stamp)
        if run is None:
            raise SystemExit("nothing listens: the hooks were not called")
        scope = run.enter()
        for kind, what in calls:
            if kind == "step":
                run.step(what)
            else:
                run.committed(what, time.time_ns())
        run.leave(scope)
        run.end("ok", None, 0)

    for _ in range(50):  # warm
        one()
    for _ in range(replays):
        one()
    app.close()
    if provider is not None:
        provider.shutdown()


def count(mode: str, replays: int, steps: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, str(SCRIPT), "--child", mode, "--replays",
                        str(replays), "--steps", str(steps), "--db-dir", tmp],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = Path(out).read_text(encoding="utf-8", errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"{mode}: callgrind wrote no total")
    return int(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--replays", type=int, default=100, help="R (the larger count: 6 R)")
    p.add_argument("--steps", type=int, default=20, help="steps per workflow (S)")
    p.add_argument("--off", type=float, help="instructions a step of seq_off, for shares")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--db-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.replays, args.steps, args.db_dir)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    print(f"counting the hooks of {', '.join(modes)} under callgrind ({args.replays} and "
          f"{6 * args.replays} replays of a {args.steps}-step workflow)...", file=sys.stderr)
    per_workflow = {}
    for mode in modes:
        small, large = count(mode, args.replays, args.steps), \
            count(mode, 6 * args.replays, args.steps)
        per_workflow[mode] = (large - small) / (5 * args.replays)
    rows = {m: (n, n / args.steps) for m, n in per_workflow.items()}
    if "unsampled" in rows and "on" in rows:
        step = 0.9 * rows["unsampled"][1] + 0.1 * rows["on"][1]
        rows["1 in 10 (derived)"] = (step * args.steps, step)
    print(f"{'hooks':<18} {'per workflow':>14} {'per step':>10} {'of off':>8}")
    for name, (wf, st) in rows.items():
        share = f"{st / args.off * 100:.1f} %" if args.off else ""
        print(f"{name:<18} {wf:>14,.0f} {st:>10,.0f} {share:>8}")


if __name__ == "__main__":
    main()
