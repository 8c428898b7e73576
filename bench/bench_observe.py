"""What observability costs: step throughput with instrumentation off and on.

Cases (``seq_*``: one workflow at a time; ``async_*``: 100 async workflows at once):

* ``off``: a plain App.
* ``on``: Prometheus counters (``crashsafe.observe.prometheus.instrument()``) and
  OpenTelemetry tracing through the real SDK, every span sampled: a TracerProvider
  with a BatchSpanProcessor into an exporter that counts the spans and drops them (an
  InMemorySpanExporter would keep every span of the run alive, and the garbage
  collector's passes over them would be counted as crashsafe's cost).
* ``sampled``: as ``on``, with head sampling of one workflow in ten
  (``ParentBased(TraceIdRatioBased(0.1))``): a sampled workflow has all its spans,
  the others none.
* ``unsampled``: as ``sampled``, with every workflow sampled out (what the nine in
  ten that make no span still cost).
* ``all``: ``on`` plus JSON log lines at INFO written to a file.
* ``trace``, ``metrics``, ``logs``: one part alone, to see what each costs.

Workload as in bench_steps.py: W workflows x S trivial steps on SQLite
(``synchronous=FULL``), in a fresh child process with a fresh database per
measurement, repetitions interleaved.

    python bench/bench_observe.py --reps 9            # W=200, S=20
    python bench/bench_observe.py --reps 3 --cases seq_off,seq_trace,seq_metrics

The gate (issue 7): metrics and tracing cost < 5 % of step throughput, on / off >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h

SCRIPT = Path(__file__).resolve()
RESULT_TIMEOUT_S = 300.0
GATE = 0.95

# (numerator, denominator, target or None). Ratios are of steps/s.
RATIOS: list[tuple[str, str, float | None]] = [
    ("seq_on", "seq_off", GATE),
    ("async_on", "async_off", GATE),
    ("seq_sampled", "seq_off", GATE),
    ("async_sampled", "async_off", GATE),
    ("seq_all", "seq_off", None),
    ("async_all", "async_off", None),
] + [(f"{mode}_{part}", f"{mode}_off", None) for mode in ("seq", "async")
     for part in ("trace", "metrics", "logs")]


class _Observed:
    """Everything "on" turns on, and what it produced (checked, so "on" is not a no-op)."""

    def __init__(self, log_path: str, parts: frozenset[str]) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Counting(SpanExporter):
            def __init__(self) -> None:
                self.spans = self.steps = 0

            def export(self, spans: Any) -> SpanExportResult:
                self.spans += len(spans)
                self.steps += sum(1 for s in spans if s.name.startswith("step "))
                return SpanExportResult.SUCCESS

        from crashsafe.observe import prometheus
        from crashsafe.observe.logs import JsonFormatter

        self.parts = parts
        self.exporter = Counting()
        self.provider: Any = None
        ratio = 0.1 if "trace10" in parts else 0.0 if "trace0" in parts else None
        if "trace" in parts or ratio is not None:
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

            # "trace10": head sampling of 1 workflow in 10, decided at its start span and
            # followed by all its spans (the usual production setting for busy services);
            # "trace0": every workflow sampled out (what the other nine cost)
            self.provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio))) \
                if ratio is not None else TracerProvider()
            self.provider.add_span_processor(BatchSpanProcessor(self.exporter,
                                                                max_queue_size=1 << 20))
        self.counters = prometheus.instrument() if "metrics" in parts else None
        self.handler: logging.Handler | None = None
        self.log_path = log_path
        if "logs" in parts:
            self.handler = logging.FileHandler(log_path)
            self.handler.setFormatter(JsonFormatter())
            logger = logging.getLogger("crashsafe")
            logger.addHandler(self.handler)
            logger.setLevel(logging.INFO)

    def produced(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.provider is not None:
            self.provider.force_flush()
            out.update(spans=self.exporter.spans, step_spans=self.exporter.steps)
        if self.counters is not None:
            out["counted_steps"] = sum(self.counters.snapshot()[0]["steps"].values())
        if self.handler is not None:
            self.handler.flush()
            with open(self.log_path, encoding="utf-8") as f:
                out["log_lines"] = sum(1 for _ in f)
        return out


def _app(args: argparse.Namespace, parts: frozenset[str]) -> tuple[Any, _Observed | None]:
    import crashsafe

    observed = _Observed(str(Path(args.db).with_suffix(".log")), parts) if parts else None
    provider = observed.provider if observed is not None else None
    app = crashsafe.App(f"sqlite:///{args.db}",
                        tracing=provider if provider is not None else False)
    app.launch()
    return app, observed


def _done(args: argparse.Namespace, started: tuple[float, float],
          observed: _Observed | None, app: Any) -> h.JsonDict:
    elapsed = time.perf_counter() - started[0]
    cpu = time.process_time() - started[1]  # every thread of the process
    steps = args.workflows * args.steps
    transactions = app._committer.transactions
    app.close()
    result: h.JsonDict = {"elapsed_s": elapsed, "steps": steps, "steps_per_s": steps / elapsed,
                          "us_per_step": elapsed / steps * 1e6,
                          "cpu_us_per_step": cpu / steps * 1e6,
                          "steps_per_transaction": steps / max(1, transactions)}
    if observed is not None:
        result.update(observed.produced())
        if "trace" in observed.parts:
            assert result["step_spans"] == steps, result
        if "trace0" in observed.parts:
            assert result["spans"] == 0, result
        if "trace10" in observed.parts:  # whole workflows, about one in ten
            assert result["step_spans"] % args.steps == 0, result
            if args.workflows >= 100:
                assert 0 < result["step_spans"] < steps / 3, result
        if "metrics" in observed.parts:
            assert result["counted_steps"] == steps, result
        if "logs" in observed.parts:  # one per workflow at INFO
            assert result["log_lines"] >= args.workflows, result
    return result


def _seq(args: argparse.Namespace, parts: frozenset[str]) -> h.JsonDict:
    app, observed = _app(args, parts)

    @app.step()
    def step(i: int) -> dict[str, Any]:
        return {"i": i, "ok": True, "text": "x" * 32}

    @app.workflow()
    def workflow(n: int) -> int:
        for i in range(n):
            step(i)
        return n

    started = (time.perf_counter(), time.process_time())
    for w in range(args.workflows):
        out = app.start(workflow, args.steps, workflow_id=f"w-{w}").result(
            timeout=RESULT_TIMEOUT_S)
        assert out == args.steps, out
    return _done(args, started, observed, app)


def _async(args: argparse.Namespace, parts: frozenset[str]) -> h.JsonDict:
    app, observed = _app(args, parts)

    @app.step()
    async def step(i: int) -> dict[str, Any]:
        return {"i": i, "ok": True, "text": "x" * 32}

    @app.workflow()
    async def workflow(n: int) -> int:
        for i in range(n):
            await step(i)
        return n

    async def main() -> tuple[float, float]:
        gate = asyncio.Semaphore(args.concurrency)

        async def one(w: int) -> None:
            async with gate:
                handle = await app.start_async(workflow, args.steps, workflow_id=f"w-{w}")
                out = await handle.result_async(timeout=RESULT_TIMEOUT_S)
                assert out == args.steps, out

        started = (time.perf_counter(), time.process_time())
        await asyncio.gather(*(one(w) for w in range(args.workflows)))
        return started

    started = asyncio.run(main())
    return _done(args, started, observed, app)


# What each case turns on. "on": metrics and tracing, every span sampled; "sampled":
# metrics and tracing with 1 workflow in 10 sampled; "all": "on" and JSON logs at INFO;
# the single parts are there to see what each costs.
PARTS = {
    "off": frozenset(),
    "on": frozenset({"trace", "metrics"}),
    "sampled": frozenset({"trace10", "metrics"}),
    "unsampled": frozenset({"trace0", "metrics"}),
    "all": frozenset({"trace", "metrics", "logs"}),
    "trace": frozenset({"trace"}),
    "metrics": frozenset({"metrics"}),
    "logs": frozenset({"logs"}),
}


def _case(run: Any, parts: frozenset[str]) -> h.CaseFn:
    return lambda a: run(a, parts)


CASES: dict[str, h.CaseFn] = {
    f"{mode}_{part}": _case(fn, parts)
    for mode, fn in (("seq", _seq), ("async", _async)) for part, parts in PARTS.items()}
DEFAULT_CASES = ["seq_off", "seq_on", "seq_sampled", "seq_all",
                 "async_off", "async_on", "async_sampled", "async_all"]


def report(measurements: list[h.Measurement], cases: list[str],
           args: argparse.Namespace) -> bool:
    rows = []
    for case in cases:
        sps = h.metric_stats(measurements, case, "steps_per_s")
        us = h.metric_stats(measurements, case, "us_per_step")
        cpu = h.metric_stats(measurements, case, "cpu_us_per_step")
        spans = h.metric_stats(measurements, case, "spans")
        rows.append([case, str(sps.n if sps else 0), h.fmt(sps.median if sps else None),
                     h.fmt(sps.max if sps else None), h.fmt(us.median if us else None, 1),
                     h.fmt(us.min if us else None, 1), h.fmt(cpu.median if cpu else None, 1),
                     h.fmt(cpu.min if cpu else None, 1), h.fmt(spans.median if spans else None)])
    h.print_table(f"{args.workflows} workflows x {args.steps} steps, {args.reps} interleaved "
                  f"reps (async: {args.concurrency} in flight)",
                  ["case", "runs", "steps/s med", "steps/s best", "µs/step med",
                   "µs/step min", "CPU µs/step med", "CPU µs/step min", "spans/run"], rows)
    ok = True
    ratio_rows = []
    for num, den, target in RATIOS:
        if num not in cases or den not in cases:
            continue
        a = h.metric_stats(measurements, num, "steps_per_s")
        b = h.metric_stats(measurements, den, "steps_per_s")
        med = h.ratio(a.median if a else None, b.median if b else None)
        best = h.ratio(a.max if a else None, b.max if b else None)
        paired = h.Stats.of(h.paired_ratios(measurements, num, den, "steps_per_s"))
        verdict = ""
        if target is not None and med is not None:
            verdict = "ok" if med >= target else "BELOW"
            ok = ok and med >= target
        ratio_rows.append([f"{num} / {den}", h.fmt(med, 3), h.fmt(best, 3),
                           h.fmt(paired.median if paired else None, 3),
                           f"{h.fmt(paired.min, 3)} .. {h.fmt(paired.max, 3)}" if paired
                           else "-", "" if target is None else f">= {target:.2f}", verdict])
    h.print_table("on / off, steps/s, same run (verdict on the ratio of medians)",
                  ["ratio", "of medians", "of bests", "per-rep median", "per-rep range",
                   "target", ""], ratio_rows)
    return ok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflows", type=int, default=200, help="workflows per run (W)")
    p.add_argument("--steps", type=int, default=20, help="steps per workflow (S)")
    p.add_argument("--concurrency", type=int, default=100,
                   help="workflows in flight in the async cases")
    h.add_common_args(p, default_reps=5)
    args = p.parse_args(argv)
    if args.case:
        h.child_main(CASES, args)
        return
    cases = h.select_cases(list(CASES), args.cases or ",".join(DEFAULT_CASES))
    h.log(f"bench_observe: {h.environment()}")
    child_args = ["--workflows", str(args.workflows), "--steps", str(args.steps),
                  "--concurrency", str(args.concurrency)]
    measurements = h.run_interleaved(SCRIPT, cases, args.reps, child_args,
                                     tmp_root=args.tmpdir, timeout=args.timeout,
                                     progress=h.log)
    ok = report(measurements, cases, args)
    if args.json:
        h.write_json(args.json, {"benchmark": "observe", "environment": h.environment(),
                                 "measurements": h.measurements_json(measurements)})
    if any(not m.ok for m in measurements) or not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
