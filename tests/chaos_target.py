"""Workflows for ``crashsafe chaos MODULE:WORKFLOW`` in tests/test_chaos.py.

``pipeline`` is deterministic: killed and restarted anywhere, it must end with the
result of an uninterrupted run. ``unjournaled`` is not: its result uses a random
number drawn outside any step, so every run (and every replay) draws a new one, which
the campaign must report as a result that differs from the uninterrupted run.
"""

from __future__ import annotations

import random
import time

import crashsafe

# `crashsafe chaos` runs the workflows on databases of its own; this one is never opened.
app = crashsafe.App("sqlite:///chaos-target-unused.db")


@app.step
def add(acc: int, i: int) -> int:
    time.sleep(0.01)
    return (acc * 31 + i) % 1_000_003


@app.workflow
def pipeline(n: int, start: int = 0) -> int:
    acc = start
    for i in range(n):
        acc = add(acc, i)
    crashsafe.sleep(0.01)
    return acc


@app.workflow
def unjournaled(n: int) -> float:
    acc = 0
    for i in range(n):
        acc = add(acc, i)
    return acc + random.random()  # not journaled: a bug the campaign must catch
