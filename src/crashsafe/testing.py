"""Helpers for testing code built on crashsafe.

``MemoryStore`` keeps everything in memory; two apps sharing one can play a crashed
process and its successor in a single test::

    store = MemoryStore()
    first = App(store=store); register(first)
    first.start(...)
    simulate_crash(first)          # like kill -9: nothing more is recorded
    second = App(store=store); register(second)
    second.recover()               # resumes from the journal

For real crashes, run the workload in a subprocess and SIGKILL it; crashsafe's own
suite does both.
"""

from __future__ import annotations

from ._app import App
from .stores.memory import MemoryStore


def simulate_crash(app: App, wait: float = 5.0) -> None:
    """Make ``app`` behave like a process killed at this instant.

    Its running workflows stop at their next durable call without recording
    anything more (work between their last commit and now is lost, as in a real
    crash), its background thread stops, and its executor is marked dead so
    another app sharing the store may recover its workflows at once.
    """
    app._abandon(wait)
    if app._launched:
        app.store.stop_executor(app.executor_id)


__all__ = ["MemoryStore", "simulate_crash"]
