"""Hedged requests: when a call is slow, start a second one; the first success wins.

A hedge is part of one attempt of one step: the step's journal entry records the
winner's result and a note saying who won and when the hedge started, so replay
returns the same answer and never calls again. In an async step the losing call is
cancelled; a sync step runs its calls in threads and a loser cannot be stopped (Python
cannot kill a thread), so it finishes in the background and its result is dropped —
use hedging on sync steps only for calls that are safe to complete twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from .retry import seconds


@dataclass(frozen=True, slots=True)
class Hedge:
    """``@app.step(hedge=Hedge(...))``: start another call after ``after`` seconds
    without an answer."""

    after: float | timedelta | Literal["p95"] = "p95"
    """Seconds, or ``"p95"``: the 95th percentile of this step's recent latency in this
    process (``initial`` until 20 calls were seen)."""
    initial: float | timedelta = 1.0
    """The delay used for ``"p95"`` before there is enough history."""
    max_extra: int = 1
    """Extra calls per attempt."""
    alternative: Callable[..., Any] | None = None
    """Called (with the step's arguments) for the hedges instead of the step itself,
    e.g. the same request to another provider."""
    max_per_workflow: int | None = None
    """Cost budget: hedges one workflow may start in all; past it, no more hedging."""

    def __post_init__(self) -> None:
        if self.after != "p95":
            object.__setattr__(self, "after", seconds(self.after, "Hedge.after"))
        object.__setattr__(self, "initial", seconds(self.initial, "Hedge.initial"))
        if not isinstance(self.max_extra, int) or self.max_extra < 1:
            raise ValueError("Hedge.max_extra must be an int of at least 1")
        if self.max_per_workflow is not None and self.max_per_workflow < 0:
            raise ValueError("Hedge.max_per_workflow must be >= 0")

    def delay(self, p95: float | None) -> float:
        if self.after == "p95":
            return p95 if p95 is not None else float(self.initial)  # type: ignore[arg-type]
        return float(self.after)  # type: ignore[arg-type]


@dataclass(slots=True)
class Outcome:
    value: Any
    winner: int
    """0: the original call; 1..: the hedges, in start order."""
    started: list[float]
    """Seconds after the first call at which each call started."""
    elapsed: float

    def note(self) -> str:
        starts = ", ".join(f"{s:.2f} s" for s in self.started[1:])
        who = "the original call" if self.winner == 0 else f"hedge {self.winner}"
        return (f"hedged: {len(self.started) - 1} extra call(s) started at {starts}; "
                f"{who} answered after {self.elapsed:.2f} s")


def run_sync(calls: list[Callable[[], Any]], delay: float,
             check: Callable[[], None]) -> Outcome:
    """Run ``calls[0]``; every ``delay`` seconds without an answer start the next one.
    Returns the first success; when every call started so far has failed, raises the
    last failure. ``check`` is called while waiting and may raise to stop
    (cancellation, shutdown)."""
    results: queue.SimpleQueue[tuple[int, bool, Any]] = queue.SimpleQueue()
    t0 = time.monotonic()
    started: list[float] = []

    def launch(i: int) -> None:
        run = contextvars.copy_context().run

        def target() -> None:
            try:
                results.put((i, True, run(calls[i])))
            except BaseException as exc:  # handed to the caller
                results.put((i, False, exc))

        started.append(time.monotonic() - t0)
        threading.Thread(target=target, name="crashsafe-hedge", daemon=True).start()

    launch(0)
    next_launch = delay
    failed = 0
    while True:
        more = len(started) < len(calls)
        wait = min(0.25, max(0.0, next_launch - (time.monotonic() - t0))) if more else 0.25
        try:
            i, ok, value = results.get(timeout=wait)
        except queue.Empty:
            check()
            if more and time.monotonic() - t0 >= next_launch:
                launch(len(started))
                next_launch += delay
            continue
        if ok:
            return Outcome(value, i, started, time.monotonic() - t0)
        failed += 1
        if failed < len(started):
            continue
        # Every call made so far failed: that is the attempt's failure, for the retry
        # policy to judge. Hedges answer slowness, never failures (a hedge after a
        # failure would be a retry that bypasses the policy).
        raise value


async def run_async(calls: list[Callable[[], Awaitable[Any]]], delay: float) -> Outcome:
    """The async form of :func:`run_sync`: losers are cancelled."""
    t0 = time.monotonic()
    started: list[float] = []
    tasks: dict[asyncio.Task[Any], int] = {}

    def launch(i: int) -> None:
        started.append(time.monotonic() - t0)
        tasks[asyncio.ensure_future(calls[i]())] = i

    launch(0)
    last: BaseException | None = None
    try:
        while tasks:
            timeout = delay if len(started) < len(calls) else None
            done, _ = await asyncio.wait(tasks, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                launch(len(started))
                continue
            for task in done:
                i = tasks.pop(task)
                exc = task.exception()
                if exc is None:
                    return Outcome(task.result(), i, started, time.monotonic() - t0)
                last = exc
            if not tasks:
                break  # every call made failed: the attempt failed (see run_sync)
        raise last if last is not None else RuntimeError("hedge: no call was made")
    finally:
        for task in tasks:
            task.cancel()
