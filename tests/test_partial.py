"""Streaming steps keep their partial output across a crash. Every store kind."""

from __future__ import annotations

from typing import Any

import pytest

import crashsafe
from crashsafe import App
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_idle

TOKENS = [f"tok{i} " for i in range(30)]


def _streamer(app: App, seen: list[Any], crash_after: int | None) -> Any:
    @app.step(name="stream")
    def stream() -> str:
        partial = crashsafe.current().partial
        seen.append(partial)
        text = partial or ""
        for i in range(len(text.split()), len(TOKENS)):
            text += TOKENS[i]
            if (i + 1) % 10 == 0:
                crashsafe.save_partial(text)  # every 10 tokens
            if crash_after is not None and i + 1 == crash_after:
                simulate_crash(app, wait=0)
                return "lost with the crashed process"
        return text

    @app.workflow(name="writer")
    def writer() -> str:
        return stream()

    return writer


def test_a_rerun_step_continues_from_its_saved_partial_output(make_app: AppFactory) -> None:
    seen: list[Any] = []
    first = make_app()
    first.start(_streamer(first, seen, crash_after=25), workflow_id="s1")
    wait_idle(first)
    second = make_app()
    _streamer(second, seen, crash_after=None)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == "".join(TOKENS)
    assert seen == [None, "".join(TOKENS[:20])]  # the second run started at token 20
    assert second.store.read_shared("partial:s1:0")[0] is None  # dropped once recorded


def test_partial_outside_a_step_is_a_clear_error() -> None:
    with pytest.raises(crashsafe.NotInWorkflowError, match="inside a step"):
        crashsafe.save_partial("x")
