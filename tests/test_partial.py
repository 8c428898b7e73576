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


def _stream_partial_app(app: App, seen: list[Any], crash_after: int | None) -> Any:
    @app.step(name="stream")
    def stream() -> str:
        partial = crashsafe.current().partial
        seen.append(partial)
        text = partial or ""
        rest = TOKENS[len(text.split()):]
        for n, token in enumerate(crashsafe.stream_partial(iter(rest), every=10), 1):
            text += token
            if crash_after is not None and n == crash_after:
                simulate_crash(app, wait=0)
                return "lost with the crashed process"
        return text

    @app.workflow(name="writer")
    def writer() -> str:
        return stream()

    return writer


def test_stream_partial_saves_every_n_chunks_across_two_crashes(make_app: AppFactory) -> None:
    seen: list[Any] = []
    first = make_app()
    first.start(_stream_partial_app(first, seen, crash_after=15), workflow_id="s2")
    wait_idle(first)
    second = make_app()
    _stream_partial_app(second, seen, crash_after=12)  # 10 + 12 = token 22, saved at 20
    second.recover()
    wait_idle(second)
    third = make_app()
    _stream_partial_app(third, seen, crash_after=None)
    (handle,) = third.recover()
    assert handle.result(timeout=10) == "".join(TOKENS)
    # Saved at 10 in the first run; at 10 + 10 = 20 in the second (its own count).
    assert seen == [None, "".join(TOKENS[:10]), "".join(TOKENS[:20])]


def test_astream_partial_continues_an_async_stream(make_app: AppFactory) -> None:
    seen: list[Any] = []

    async def tokens(start: int) -> Any:
        for token in TOKENS[start:]:
            yield token

    def build(app: App, crash_after: int | None) -> Any:
        @app.step(name="stream")
        async def stream() -> str:
            partial = crashsafe.current().partial
            seen.append(partial)
            text = partial or ""
            n = 0
            async for token in crashsafe.astream_partial(tokens(len(text.split())), every=7):
                text += token
                n += 1
                if crash_after is not None and n == crash_after:
                    simulate_crash(app, wait=0)
                    return "lost"
            return text

        @app.workflow(name="awriter")
        async def writer() -> str:
            return await stream()

        return writer

    first = make_app()
    first.start(build(first, 16), workflow_id="s3")
    wait_idle(first)
    second = make_app()
    build(second, None)
    (handle,) = second.recover()
    assert handle.result(timeout=10) == "".join(TOKENS)
    assert seen == [None, "".join(TOKENS[:14])]  # saved at 7 and 14


def test_stream_partial_refuses_non_text_and_bad_every(make_app: AppFactory) -> None:
    app = make_app()

    @app.step(name="bad")
    def bad(every: Any, chunks: list[Any]) -> str:
        return "".join(crashsafe.stream_partial(iter(chunks), every=every))

    @app.workflow(name="badflow")
    def flow(every: Any, chunks: list[Any]) -> str:
        return bad(every, chunks)

    with pytest.raises(ValueError, match="every must be an int >= 1"):
        app.start(flow, 0, ["a"], workflow_id="b1").result(timeout=10)
    with pytest.raises(TypeError, match="chunks must be str, got int"):
        app.start(flow, 2, ["a", 1], workflow_id="b2").result(timeout=10)
    with pytest.raises(crashsafe.NotInWorkflowError, match="inside a step"):
        list(crashsafe.stream_partial(iter(["x"])))
