"""What observability costs, in instructions: bench_observe.py's sequential cases
counted by ``valgrind --tool=callgrind`` instead of timed.

This machine's timings of a 5 % effect drown in its noise (a repetition's on / off
ratio ranges over ±15 %). Instructions do not: the same run counts the same, whatever
else the machine does. Per case, the whole process is counted twice, with W and with
4 W workflows of S steps (each after the same warm-up run), and the difference is
divided by the 3 W x S extra steps: interpreter start, imports and set-up cancel out,
and each workflow's own work (its start span, run span, begin and end) is spread over
its S steps, as in the timed benchmark.

Two things are pinned so that both counts do the same work: the random generator
(which workflows a sampler keeps), and crashsafe's reporting thread, whose ticks
(every 0.1 s of *wall* time) age the waiting steps, and under callgrind (50 times
slower) would have steps reported in small batches that the timed runs report in
full ones.

    python bench/bench_observe_cg.py            # seq_off,seq_metrics,seq_unsampled,seq_on
    python bench/bench_observe_cg.py --cases seq_off,seq_trace,seq_logs --workflows 10

Needs valgrind. Sequential cases only: with many workflows at once, how the group
commit batches depends on timing, which callgrind changes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve()
DEFAULT = "seq_off,seq_metrics,seq_unsampled,seq_on"


def child(case: str, workflows: int, steps: int, db_dir: str) -> None:
    import random

    sys.path.insert(0, str(SCRIPT.parent))
    import bench_observe
    import crashsafe._instrument as instrument
    from crashsafe.observe import prometheus

    random.seed(7)
    instrument.SWEEP_S = 1e6
    for name, w in (("warm", 2), ("counted", workflows)):
        args = argparse.Namespace(workflows=w, steps=steps, concurrency=1,
                                  db=os.path.join(db_dir, f"{name}.db"))
        bench_observe.CASES[case](args)
        # What a case turned on stays on in this process: turn it off, so the counted
        # run has one set of counters and one log handler, as a timed run has.
        prometheus.uninstrument()
        logger = logging.getLogger("crashsafe")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def count(case: str, workflows: int, steps: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, str(SCRIPT), "--child", case, "--workflows",
                        str(workflows), "--steps", str(steps), "--db-dir", tmp],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = Path(out).read_text(encoding="utf-8", errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"{case}: callgrind wrote no total")
    return int(found.group(1))


def per_step(case: str, workflows: int, steps: int) -> float:
    small, large = count(case, workflows, steps), count(case, 4 * workflows, steps)
    return (large - small) / (3 * workflows * steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT)
    p.add_argument("--workflows", type=int, default=10, help="W (the larger count: 4 W)")
    p.add_argument("--steps", type=int, default=20, help="steps per workflow (S)")
    p.add_argument("--jobs", type=int, default=2, help="cases counted at once")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--db-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.workflows, args.steps, args.db_dir)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if not c.startswith("seq_")]
    if unknown:
        raise SystemExit(f"sequential cases only, not {', '.join(unknown)}")
    print(f"counting {', '.join(cases)} under callgrind ({args.workflows} and "
          f"{4 * args.workflows} workflows of {args.steps} steps)...", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool:
        counts = dict(zip(cases, pool.map(
            lambda c: per_step(c, args.workflows, args.steps), cases), strict=True))
    if "seq_unsampled" in counts and "seq_on" in counts:
        # Which workflows a 1-in-10 sampler keeps varies with the trace ids drawn, and
        # 10 or 40 workflows are too few to average it out: derive it exactly instead.
        counts["1 in 10 (derived)"] = 0.9 * counts["seq_unsampled"] + 0.1 * counts["seq_on"]
    base = counts.get("seq_off")
    print(f"{'case':<18} {'instructions/step':>18} {'vs seq_off':>11}")
    for case, n in counts.items():
        extra = f"{(n / base - 1) * 100:+.1f} %" if base and case != "seq_off" else ""
        print(f"{case:<18} {n:>18,.0f} {extra:>11}")


if __name__ == "__main__":
    main()
