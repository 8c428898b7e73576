"""One worker of the lease race (``chaos/lease_race.py`` starts N of these).

``python chaos/race_worker.py --db URL --ledger URL [--lease S --heartbeat S --sweep S
--concurrency N --step-ms MS --same-host]``

Builds an App with a short lease, declares the ``race`` queue and serves it until
SIGTERM. Its workflows (``race_sync`` and ``race_async``, same shape) run STEPS steps
that each compute a deterministic value, log the body's execution to the ledger with
the fencing token the run believes it holds, apply a keyed effect there, and return
the value with who computed it (executor, token, run id), so the journal itself says
which run's result it kept.

By default the worker pretends to run on a host of its own (liveness of the other
workers by heartbeat age, as between machines): on one host crashsafe judges a
worker by its pid, and a SIGSTOPped process still has one, so its workflows would
never be taken over (``--same-host`` keeps the real host name to show exactly that).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from race_ledger import Ledger

import crashsafe
import crashsafe._recovery
from crashsafe._context import _WORKFLOW

QUEUE = "race"


def step_value(n: int, i: int, acc: int) -> int:
    return (acc * 31 + n * 7 + i) % 1_000_003


def expected_values(n: int, steps: int) -> list[int]:
    """The value each step of workflow ``n`` must record, in order."""
    acc, out = n, []
    for i in range(steps):
        acc = step_value(n, i, acc)
        out.append(acc)
    return out


def workflow_id(n: int) -> str:
    return f"race-{n:06d}"


def _token() -> int | None:
    # The token this run's lease was granted with: what every write of the run carries.
    # (Read from the workflow context; crashsafe has no public accessor for it.)
    ctx = _WORKFLOW.get()
    return None if ctx is None else ctx.token


def build(app: crashsafe.App, ledger: Ledger | None, step_ms: float = 2.0) -> tuple[Any, Any]:
    """Register the race's steps and workflows on ``app`` (the runner registers them
    too, with no ledger, to enqueue by name)."""
    pid = os.getpid()
    me = app.executor_id
    rng = random.Random()

    def body(n: int, i: int, acc: int) -> tuple[dict[str, Any], str, int | None, str]:
        cur = crashsafe.current()
        token = _token()
        run = uuid.uuid4().hex[:16]
        assert ledger is not None and cur.idempotency_key is not None
        assert cur.step_index == i, (cur.step_index, i)
        ledger.body(cur.workflow_id, i, cur.attempt, me, pid, token, run)
        return ({"v": step_value(n, i, acc), "ex": me, "tok": token, "run": run},
                cur.idempotency_key, token, run)

    def pause() -> float:
        return rng.uniform(0.0, 2 * step_ms / 1000.0)

    @app.step(name="race_step")
    def race_step(n: int, i: int, acc: int) -> dict[str, Any]:
        out, key, token, run = body(n, i, acc)
        time.sleep(pause())  # a body takes a moment: kills and stops land inside some
        assert ledger is not None
        ledger.effect(key, workflow_id(n), i, out["v"], me, pid, token, run)
        return out

    @app.step(name="race_astep")
    async def race_astep(n: int, i: int, acc: int) -> dict[str, Any]:
        out, key, token, run = await asyncio.to_thread(body, n, i, acc)
        await asyncio.sleep(pause())
        assert ledger is not None
        await asyncio.to_thread(ledger.effect, key, workflow_id(n), i, out["v"], me, pid,
                                token, run)
        return out

    @app.workflow(name="race_sync")
    def race_sync(n: int, steps: int) -> dict[str, Any]:
        token = _token()
        if ledger is not None:
            ledger.run(workflow_id(n), me, pid, token)
        acc = n
        for i in range(steps):
            acc = race_step(n, i, acc)["v"]
        return {"v": acc, "ex": me, "tok": token}

    @app.workflow(name="race_async")
    async def race_async(n: int, steps: int) -> dict[str, Any]:
        token = _token()
        if ledger is not None:
            await asyncio.to_thread(ledger.run, workflow_id(n), me, pid, token)
        acc = n
        for i in range(steps):
            acc = (await race_astep(n, i, acc))["v"]
        return {"v": acc, "ex": me, "tok": token}

    return race_sync, race_async


def watch_outcomes(app: crashsafe.App, ledger: Ledger) -> None:
    """Log every run that ends otherwise than "ok" (a thin wrapper on the engine's
    end-of-run hook; a refused stale write ends a run as "aborted")."""
    pid = os.getpid()
    finish = app._finish

    def logged(ex: Any, outcome: Any) -> None:
        if outcome.kind != "ok":
            err = outcome.error
            try:
                ledger.outcome(ex.ctx.workflow_id, app.executor_id, pid, ex.ctx.token,
                               outcome.kind, type(err).__name__ if err is not None else None,
                               getattr(err, "stale_token", None), str(err)[:300])
            except Exception as exc:  # the witness must not change what it watches
                print(f"ledger write failed: {exc}", file=sys.stderr, flush=True)
        finish(ex, outcome)

    app._finish = logged  # type: ignore[method-assign]


def watch_background(app: crashsafe.App, ledger: Ledger, threshold: float) -> None:
    """Log when the background thread (heartbeat, sweeps, queue polls) falls behind:
    a gap between heartbeats longer than ``threshold``, and any sweep (``recover``,
    which claims dead workers' workflows) or queue poll slower than ``threshold``. A
    live worker whose heartbeat stops looks dead to the others."""
    pid = os.getpid()
    me = app.executor_id
    store = app.store
    beat = store.heartbeat
    last = [time.monotonic()]

    def note(what: str, seconds: float) -> None:
        try:
            ledger.stall(me, pid, what, seconds, time.time())
        except Exception as exc:
            print(f"ledger write failed: {exc}", file=sys.stderr, flush=True)

    def heartbeat(executor_id: str, at: float) -> None:
        t0 = time.monotonic()
        beat(executor_id, at)
        now = time.monotonic()
        if now - t0 > threshold:
            note("slow heartbeat write", now - t0)
        if now - last[0] > threshold:
            note("heartbeat gap", now - last[0])
        last[0] = now

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                if time.monotonic() - t0 > threshold:
                    note(name, time.monotonic() - t0)
        return run

    store.heartbeat = heartbeat  # type: ignore[method-assign]
    app.recover = timed("slow recover (claims)", app.recover)  # type: ignore[method-assign]
    app._poll_queues = timed("slow queue poll", app._poll_queues)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--heartbeat", type=float, default=0.25)
    p.add_argument("--sweep", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--same-host", action="store_true")
    p.add_argument("--grace", type=float, default=5.0)
    args = p.parse_args(argv)
    if not args.same_host:
        # Judge the other workers by heartbeat age, as crashsafe does across machines.
        crashsafe._recovery.HOSTNAME = f"race-host-{os.getpid()}"
    app = crashsafe.App(args.db, lease=args.lease, heartbeat_interval=args.heartbeat,
                        recovery_interval=args.sweep)
    ledger = Ledger(args.ledger)
    build(app, ledger, args.step_ms)
    watch_outcomes(app, ledger)
    watch_background(app, ledger, args.lease / 2)
    app.queue(QUEUE, worker_concurrency=args.concurrency)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app.serve([QUEUE], concurrency=args.concurrency)
    print(f"ready {app.executor_id}", flush=True)
    stop.wait()
    app.close(timeout=args.grace)
    ledger.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
