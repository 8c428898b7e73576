"""A small workload that leaves every kind of sealed payload in a store, including the
ones no live workflow's journal leads to: for the key rotation and verify tests."""

from __future__ import annotations

import time
from dataclasses import dataclass

import crashsafe


@dataclass
class Left:
    """What :func:`fill` left, to look up raw."""

    live: str
    """A finished workflow with a signal, an effect outcome and rolled-back entries."""
    dropped: list[str]
    """Workflows retention dropped; their effect outcomes stay (no expiry)."""
    keys: dict[str, str]
    """workflow id -> the idempotency key of its effect."""


def fill(app: crashsafe.App, dropped: int = 3) -> Left:
    @app.step(name="charge", effect=True)
    def charge(i: int) -> str:
        return str(crashsafe.current().idempotency_key)

    @app.step(name="note")
    def note(text: str) -> str:
        return f"noted {text}"

    @app.workflow(name="pay")
    def pay(i: int) -> str:
        return charge(i)

    @app.workflow(name="agent")
    def agent(i: int) -> str:
        key = charge(i)
        crashsafe.checkpoint({"i": i}, label="start")
        approval = crashsafe.wait_for("approve", timeout=30)
        return f"{key} {note(str(approval))}"

    keys = {f"gone-{i}": app.start(pay, i, workflow_id=f"gone-{i}").result(timeout=30)
            for i in range(dropped)}
    time.sleep(0.05)  # the store's clock (SQLite's: milliseconds) past the last finish
    report = app.gc(finished_older_than=0)
    assert report.workflows_dropped == dropped, report
    handle = app.start(agent, 100, workflow_id="live")
    app.signal("live", "approve", {"by": "ops"})
    keys["live"] = handle.result(timeout=30).split()[0]
    app.rollback("live", to="start", reason="operator rollback")
    app.handle("live").result(timeout=30)
    assert [e.kind for _, _, e in app.rewound("live")] == ["wait", "signal", "step"], \
        app.rewound("live")
    return Left("live", [f"gone-{i}" for i in range(dropped)], keys)
