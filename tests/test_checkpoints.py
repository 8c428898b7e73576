"""Agent-state checkpoints: deltas, reading any checkpoint, replay verification, fork.
Every store kind."""

from __future__ import annotations

import random as _random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import crashsafe
from crashsafe import App, Status
from crashsafe.testing import simulate_crash
from helpers import AppFactory, wait_idle


def _chat(app: App, turns: int, crash_at: int | None = None,
          noisy: bool = False) -> Any:
    @app.step(name="llm")
    def llm(history: list[dict[str, str]]) -> str:
        return f"reply {len(history)}"

    @app.workflow(name="chat")
    def chat(n: int) -> int:
        messages: list[dict[str, str]] = []
        for turn in range(n):
            messages.append({"role": "user", "content": f"question {turn} " + "x" * 200})
            messages.append({"role": "assistant", "content": llm(messages)})
            state: dict[str, Any] = {"messages": messages, "turn": turn}
            if noisy:
                state["mood"] = _random.random()  # not journaled: a replay diverges
            crashsafe.checkpoint(state, label=f"turn-{turn}")
            if crash_at is not None and turn == crash_at:
                simulate_crash(app, wait=0)
        return len(messages)

    return chat


def test_checkpoints_store_deltas_and_read_back_any_point(app: App) -> None:
    chat = _chat(app, 20)
    assert app.start(chat, 20, workflow_id="c1").result(timeout=20) == 40
    infos = app.checkpoints("c1")
    assert [c.n for c in infos] == list(range(20))
    assert [c.full for c in infos] == [n % 10 == 0 for n in range(20)]
    # A growing message list is stored as what was appended.
    full_bytes = sum(c.size for c in infos)
    stored = sum(c.stored for c in infos)
    assert stored * 5 < full_bytes, (stored, full_bytes)
    for n in (0, 7, 10, 19):
        state = app.checkpoint_state("c1", f"#{n}")
        assert state["turn"] == n and len(state["messages"]) == 2 * (n + 1)
    assert app.checkpoint_state("c1", "turn-3")["turn"] == 3
    assert app.checkpoint_state("c1")["turn"] == 19  # the latest
    with pytest.raises(crashsafe.CheckpointNotFoundError, match="no checkpoint 'nope'"):
        app.checkpoint_state("c1", "nope")


def test_a_replay_after_a_crash_verifies_each_checkpoint(make_app: AppFactory) -> None:
    first = make_app()
    first.start(_chat(first, 6, crash_at=2), 6, workflow_id="c2")
    wait_idle(first)
    assert len(first.checkpoints("c2")) == 3
    second = make_app()
    _chat(second, 6)
    (handle,) = second.recover()
    assert handle.result(timeout=20) == 12
    assert [c.n for c in second.checkpoints("c2")] == list(range(6))


def test_a_replay_whose_state_differs_is_reported_as_divergence(make_app: AppFactory) -> None:
    first = make_app()
    first.start(_chat(first, 4, crash_at=1, noisy=True), 4, workflow_id="c3")
    wait_idle(first)
    second = make_app()
    _chat(second, 4, noisy=True)
    (handle,) = second.recover()
    with pytest.raises(crashsafe.DeadLetteredError, match="state hash"):
        handle.result(timeout=20)
    assert second.get_workflow("c3").status is Status.DEAD_LETTER


def test_fork_from_a_checkpoint_reruns_only_what_follows(app: App) -> None:
    calls: list[int] = []

    @app.step(name="work")
    def work(i: int) -> int:
        calls.append(i)
        return i * i

    @app.workflow(name="pipeline")
    def pipeline() -> list[int]:
        out = []
        for i in range(4):
            out.append(work(i))
            crashsafe.checkpoint({"done": out}, label=f"after-{i}")
        return out

    assert app.start(pipeline, workflow_id="orig").result(timeout=10) == [0, 1, 4, 9]
    assert calls == [0, 1, 2, 3]
    handle = app.fork("orig", at="after-1", new_id="orig-b")
    assert handle.result(timeout=10) == [0, 1, 4, 9]
    assert calls == [0, 1, 2, 3, 2, 3]  # steps 0 and 1 came from the copied journal
    assert app.checkpoint_state("orig-b", "after-1") == {"done": [0, 1]}
    notes = [e.note for e in app.journal("orig-b")]
    assert notes[:4] == ["copied from 'orig'"] * 4 and notes[4] is None
    assert [c.label for c in app.checkpoints("orig")] == [f"after-{i}" for i in range(4)]


def test_checkpoint_misuse_is_a_clear_error(app: App) -> None:
    @app.step(name="inside")
    def inside() -> None:
        crashsafe.checkpoint({"x": 1})

    @app.workflow(name="bad")
    def bad() -> None:
        inside()

    with pytest.raises(crashsafe.NotInWorkflowError, match="not inside a step"):
        app.start(bad, workflow_id="bad").result(timeout=10)
    with pytest.raises(crashsafe.NotInWorkflowError):
        crashsafe.checkpoint({"x": 1})


def test_show_at_and_fork_from_the_command_line(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from crashsafe.cli.main import cli

    url = f"sqlite:///{tmp_path}/cli.db"
    app = App(url)
    chat = _chat(app, 3)
    app.start(chat, 3, workflow_id="cli-1").result(timeout=10)
    app.close()
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", url, "show", "cli-1", "--at", "turn-1"])
    assert res.exit_code == 0, res.output
    assert '"turn": 1' in res.output and "question 1" in res.output
    res = runner.invoke(cli, ["--db", url, "show", "cli-1", "--at", "#9"])
    assert res.exit_code == 2 and "no checkpoint '#9'" in res.output
    res = runner.invoke(cli, ["--db", url, "fork", "cli-1", "--at", "turn-0", "--id", "cli-2"])
    assert res.exit_code == 0 and "forked cli-1 into cli-2" in res.output
    # The command line registers no code: a serving process with the workflow runs it.
    worker = App(url)
    _chat(worker, 3)
    (handle,) = worker.recover()
    assert handle.workflow_id == "cli-2" and handle.result(timeout=10) == 6
    assert [c.label for c in worker.checkpoints("cli-2")] == ["turn-0", "turn-1", "turn-2"]
    worker.close()


def test_rollback_to_a_checkpoint_compensates_and_resumes(app: App) -> None:
    ran: list[str] = []
    undone: list[str] = []
    answers = iter(["first answer", "second answer", "third answer"])

    @app.step(name="send", compensate=lambda text: undone.append(text))
    def send(text: str) -> str:
        ran.append(text)
        return text

    @app.step(name="draft")
    def draft() -> str:
        return next(answers)

    @app.workflow(name="mailer")
    def mailer() -> str:
        crashsafe.checkpoint({"stage": "start"}, label="start")
        text = draft()
        send(text)
        crashsafe.checkpoint({"stage": "sent", "text": text}, label="sent")
        return text

    assert app.start(mailer, workflow_id="m1").result(timeout=10) == "first answer"
    handle = app.rollback("m1", to="start", reason="the reply was wrong")
    assert handle.result(timeout=10) == "second answer"  # draft and send ran again
    assert ran == ["first answer", "second answer"]
    assert undone == ["first answer"]  # the rolled-back send was compensated
    audit = app.rewound("m1")
    assert [(e.index, e.kind) for _, _, e in audit] == [(1, "step"), (2, "step"),
                                                        (3, "checkpoint")]
    assert all(why.startswith("the reply was wrong; 1 compensation(s) ran")
               for _, why, _ in audit)
    assert audit[0][2].output == b'"first answer"'  # kept readable for audit
    assert app.checkpoint_state("m1", "sent") == {"stage": "sent", "text": "second answer"}
    rec = app.get_workflow("m1")
    assert rec.status is Status.SUCCEEDED and rec.token >= 1


def test_rollback_from_the_command_line_and_show_lists_the_audit(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from crashsafe.cli.main import cli

    url = f"sqlite:///{tmp_path}/rb.db"
    app = App(url)
    _chat(app, 3)
    app.start("chat", 3, workflow_id="rb-1").result(timeout=10)
    app.close()
    runner = CliRunner()
    # This command registers no step, so it cannot run their compensations: refused...
    res = runner.invoke(cli, ["--db", url, "rollback", "rb-1", "--to", "turn-0"])
    assert res.exit_code == 1, res.output
    said = " ".join(res.output.split())
    assert "'llm' (#2), 'llm' (#4)" in said and "pass --force" in said
    assert App(url).rewound("rb-1") == []
    # ...unless forced.
    res = runner.invoke(cli, ["--db", url, "rollback", "rb-1", "--to", "turn-0", "--force"])
    assert res.exit_code == 0, res.output
    assert "rolled back rb-1: 4 entries kept for audit" in res.output
    res = runner.invoke(cli, ["--db", url, "show", "rb-1"])
    assert "rolled back" in res.output and "#5 checkpoint turn-2" in res.output
    worker = App(url)
    _chat(worker, 3)
    (handle,) = worker.recover()
    assert handle.result(timeout=10) == 6
    worker.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12)


@given(_json, _json)
def test_a_delta_always_rebuilds_the_new_state(old: Any, new: Any) -> None:
    from crashsafe._checkpoint import diff, patch

    assert patch(old, diff(old, new)) == new
    grown = [old, new]
    assert patch([old], diff([old], grown)) == grown  # a growing list: only the tail
