"""The ``on_corrupt`` policy (RELIABILITY R3): real stored bytes are damaged with SQL
UPDATEs on the raw tables (bit flips, truncation, swaps between workflows) of a SQLite
file and a PostgreSQL schema; then the workflow is recovered and must roll back to its
last good checkpoint and finish with the right result (default), fail with the typed
error, or wait for a person, as its policy says, without touching other workflows.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest
from typer.testing import CliRunner

import crashsafe
from crashsafe import App, CorruptRecordError, Status
from crashsafe._corruption import MAX_ROLLBACKS, SIGNAL, record_event
from crashsafe._escalation import Escalation
from crashsafe.cli.main import cli
from crashsafe.testing import simulate_crash
from helpers import POSTGRES_URL, AppFactory, Database, wait_idle, wait_until

TURNS = 5
CRASH_TURN = 4  # the first app dies in this turn's `think`
# Per turn t: think at 3t, send at 3t+1, checkpoint "turn-t" at 3t+2.


class Raw:
    """Reads and writes the stored bytes below crashsafe (parameterized SQL only)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _connect(self) -> Any:
        if self.db.kind == "sqlite":
            return sqlite3.connect(self.db.path)
        conn = psycopg.connect(POSTGRES_URL, autocommit=True)
        conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(
            psycopg.sql.Identifier(self.db.schema or "")))
        return conn

    def _q(self, text: str) -> str:
        return text if self.db.kind == "sqlite" else text.replace("?", "%s")

    def journal(self, wid: str, idx: int) -> bytes:
        conn = self._connect()
        try:
            row = conn.execute(self._q("SELECT output FROM journal WHERE workflow_id = ? "
                                       "AND idx = ?"), (wid, idx)).fetchone()
            return bytes(row[0])
        finally:
            conn.close()

    def set_journal(self, wid: str, idx: int, data: bytes) -> None:
        conn = self._connect()
        try:
            cur = conn.execute(self._q("UPDATE journal SET output = ? WHERE workflow_id = ? "
                                       "AND idx = ?"), (data, wid, idx))
            assert cur.rowcount == 1
            conn.commit()
        finally:
            conn.close()

    def inputs(self, wid: str) -> bytes:
        conn = self._connect()
        try:
            row = conn.execute(self._q("SELECT inputs FROM workflows WHERE id = ?"),
                               (wid,)).fetchone()
            return bytes(row[0])
        finally:
            conn.close()

    def set_inputs(self, wid: str, data: bytes) -> None:
        conn = self._connect()
        try:
            conn.execute(self._q("UPDATE workflows SET inputs = ? WHERE id = ?"), (data, wid))
            conn.commit()
        finally:
            conn.close()

    def set_attempt_error(self, wid: str, idx: int, data: bytes) -> None:
        conn = self._connect()
        try:
            cur = conn.execute(self._q("UPDATE attempts SET error = ? WHERE workflow_id = ? "
                                       "AND idx = ?"), (data, wid, idx))
            assert cur.rowcount >= 1
            conn.commit()
        finally:
            conn.close()

    def all_journal(self, wid: str) -> list[tuple[int, bytes | None]]:
        conn = self._connect()
        try:
            rows = conn.execute(self._q("SELECT idx, output FROM journal WHERE workflow_id = ? "
                                        "ORDER BY idx"), (wid,)).fetchall()
            return [(int(i), None if o is None else bytes(o)) for i, o in rows]
        finally:
            conn.close()


def flip(data: bytes) -> bytes:
    at = len(data) // 2
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database = Database(request.param, tmp_path)
    yield database
    database.close()


@pytest.fixture
def apps(db: Database) -> Iterator[AppFactory]:
    factory = AppFactory(db)
    yield factory
    factory.close()


class Agent:
    """An agent of TURNS turns: think (a step), send (a step with a compensation), and a
    checkpoint of the growing message list after each turn."""

    def __init__(self, app: App, *, crash: bool, on_corrupt: str | None = None,
                 checkpoints: bool = True, together: int = 1) -> None:
        self.thought: list[tuple[str, int]] = []
        self.undone: list[str] = []
        # The crash stops every workflow of the app: it waits (a while, at most) until
        # ``together`` of them have reached the crash turn, so that none is still
        # behind it on a loaded machine.
        arrived = threading.Condition()
        at_crash: set[str] = set()

        @app.step(name="think")
        def think(wid: str, turn: int) -> str:
            if crash and turn == CRASH_TURN:
                with arrived:
                    at_crash.add(wid)
                    arrived.notify_all()
                    arrived.wait_for(lambda: len(at_crash) >= together, timeout=30)
                simulate_crash(app, wait=0)
            self.thought.append((wid, turn))
            return f"reply-{turn}"

        @app.step(name="send", compensate=lambda text: self.undone.append(text))
        def send(text: str) -> str:
            return f"sent {text}"

        @app.workflow(name="agent", on_corrupt=on_corrupt)
        def agent(wid: str) -> list[str]:
            messages: list[str] = []
            for turn in range(TURNS):
                reply = think(wid, turn)
                send(reply)
                messages.append(reply)
                if checkpoints:
                    crashsafe.checkpoint({"messages": messages}, label=f"turn-{turn}")
                else:
                    crashsafe.now()  # keep the same journal layout
            return messages

        self.flow = agent


EXPECTED = [f"reply-{t}" for t in range(TURNS)]


def crashed(apps: AppFactory, ids: list[str], **kw: Any) -> App:
    """Run the agents on a first app until it dies in turn CRASH_TURN."""
    first = apps()
    agent = Agent(first, crash=True, together=len(ids), **kw)
    for wid in ids:
        first.start(agent.flow, wid, workflow_id=wid)
    wait_idle(first, timeout=10)
    for wid in ids:
        assert first.get_workflow(wid).status is Status.RUNNING
    return first


def finished_other(apps: AppFactory) -> list[str]:
    """Finish one unrelated workflow whose committed data must stay intact."""
    app = apps()
    agent = Agent(app, crash=False)
    result: list[str] = app.start(agent.flow, "other", workflow_id="other").result(timeout=10)
    app.close()  # so that it does not recover the crashed ones in the background
    return result


def verify_cli(db: Database) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["--db", db.url, "verify"])
    return res.exit_code, res.output


# -- the default policy: roll back to the last good checkpoint -----------------------------
@pytest.mark.parametrize("damage", [flip, truncate], ids=["bit-flip", "truncation"])
@pytest.mark.parametrize(("bad", "checkpoint"), [(7, 5), (8, 5), (1, None)],
                         ids=["step-result", "checkpoint", "before-any-checkpoint"])
def test_a_damaged_journal_record_rolls_back_to_the_last_good_checkpoint(
        db: Database, apps: AppFactory, damage: Callable[[bytes], bytes], bad: int,
        checkpoint: int | None) -> None:
    other = finished_other(apps)
    crashed(apps, ["wf"])
    raw = Raw(db)
    raw_other = raw.all_journal("other")
    raw.set_journal("wf", bad, damage(raw.journal("wf", bad)))

    code, out = verify_cli(db)
    assert code == 1 and "'wf'" in out and f"index {bad}" in out and "'other'" not in out

    second = apps()
    agent = Agent(second, crash=False)
    handles = second.recover()
    assert [h.workflow_id for h in handles] == ["wf"]
    assert handles[0].result(timeout=10) == EXPECTED  # the right result
    cut = 0 if checkpoint is None else checkpoint + 1
    # Only the rolled-back turns ran again, newest compensation first; the damaged
    # send (index 7) could not be compensated, its result being unreadable.
    first_turn = cut // 3
    assert agent.thought == [("wf", t) for t in range(first_turn, TURNS)]
    sends = [f"sent reply-{t}" for t in range(first_turn, CRASH_TURN) if 3 * t + 1 != bad]
    assert agent.undone == sorted(sends, reverse=True)

    audit = second.rewound("wf")
    assert sorted(e.index for _, _, e in audit) == list(range(cut, 3 * CRASH_TURN))
    reasons = {why for _, why, _ in audit}
    assert len(reasons) == 1
    why = reasons.pop()
    assert why.startswith(f"corrupt record: record 'output' at index {bad} of workflow 'wf'")
    assert (f"rolled back to checkpoint 'turn-{checkpoint // 3}' (index {checkpoint})"
            if checkpoint is not None else "rolled back to the start") in why
    damaged = next(e for _, _, e in audit if e.index == bad)
    assert damaged.output is None and "unreadable" in (damaged.note or "")
    assert second.checkpoint_state("wf", f"turn-{TURNS - 1}") == {"messages": EXPECTED}

    # Another workflow's committed data is untouched, byte for byte, and still reads.
    assert raw.all_journal("other") == raw_other
    assert second.handle("other").result(timeout=1) == other
    code, out = verify_cli(db)
    assert code == 0, out


@pytest.mark.parametrize("encrypted", [False, True], ids=["checksummed", "encrypted"])
def test_records_swapped_between_workflows_are_both_rolled_back(
        db: Database, apps: AppFactory, monkeypatch: pytest.MonkeyPatch,
        encrypted: bool) -> None:
    if encrypted:  # then the GCM tag is what refuses the swapped ciphertexts
        key = base64.b64encode(os.urandom(32)).decode()
        monkeypatch.setenv("CRASHSAFE_KEYS", f"k1={key}")
    else:
        monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    finished_other(apps)
    crashed(apps, ["wa", "wb"])
    raw = Raw(db)
    a, b = raw.journal("wa", 4), raw.journal("wb", 4)
    assert a != b  # different ciphertexts / contexts even for equal values
    raw.set_journal("wa", 4, b)
    raw.set_journal("wb", 4, a)
    code, out = verify_cli(db)
    assert code == 1 and "'wa'" in out and "'wb'" in out

    second = apps()
    agent = Agent(second, crash=False)
    handles = {h.workflow_id: h for h in second.recover()}
    assert set(handles) == {"wa", "wb"}
    for wid, h in handles.items():
        assert h.result(timeout=10) == EXPECTED
        assert all(why.startswith(f"corrupt record: record 'output' at index 4 of workflow "
                                  f"{wid!r}") and "checkpoint 'turn-0' (index 2)" in why
                   for _, why, _ in second.rewound(wid))
    assert sorted(agent.thought) == sorted([(w, t) for w in ("wa", "wb") for t in range(1, 5)])
    assert verify_cli(db)[0] == 0


# -- "fail" and "escalate" ---------------------------------------------------------------------
def test_on_corrupt_fail_fails_with_the_typed_error_and_changes_nothing(
        db: Database, apps: AppFactory) -> None:
    crashed(apps, ["wf"], on_corrupt="fail")
    raw = Raw(db)
    raw.set_journal("wf", 7, flip(raw.journal("wf", 7)))
    before = raw.all_journal("wf")

    second = apps()
    agent = Agent(second, crash=False, on_corrupt="fail")
    second.recover()
    with pytest.raises(CorruptRecordError, match="record 'output' at index 7 of workflow 'wf'"):
        second.handle("wf").result(timeout=10)
    rec = second.get_workflow("wf")
    assert rec.status is Status.FAILED
    assert (rec.reason or "").startswith("corrupt record: record 'output' at index 7")
    assert raw.all_journal("wf") == before  # nothing rolled back, nothing rewritten
    assert second.rewound("wf") == [] and agent.thought == [] and agent.undone == []
    second.recover()  # no loop: a failed workflow is not picked up again
    assert agent.thought == []


@pytest.mark.parametrize("action", ["rollback", "fail"])
def test_on_corrupt_escalate_parks_for_a_person_who_decides(
        db: Database, apps: AppFactory, action: str) -> None:
    crashed(apps, ["wf"], on_corrupt="escalate")
    raw = Raw(db)
    raw.set_journal("wf", 7, truncate(raw.journal("wf", 7)))

    asked: list[Escalation] = []
    second = apps(on_escalate=asked.append)
    agent = Agent(second, crash=False, on_corrupt="escalate")
    second.recover()
    wait_until(lambda: second.get_workflow("wf").status is Status.WAITING, what="parked")
    rec = second.get_workflow("wf")
    assert "record 'output' at index 7 of workflow 'wf'" in (rec.reason or "")
    assert f"crashsafe signal wf {SIGNAL}" in (rec.reason or "")
    wait_until(lambda: asked, what="the on_escalate hook")
    assert asked[0].signal == SIGNAL and asked[0].actions == ("rollback", "fail", "retry")
    assert agent.thought == []  # nothing ran while waiting

    second.signal("wf", SIGNAL, {"action": action})
    if action == "rollback":
        wait_until(lambda: second.get_workflow("wf").status is Status.SUCCEEDED,
                   what="the rolled-back workflow to finish")
        assert second.handle("wf").result(timeout=10) == EXPECTED
        assert agent.thought == [("wf", t) for t in range(2, TURNS)]
    else:
        wait_until(lambda: second.get_workflow("wf").status is Status.FAILED, what="failed")
        with pytest.raises(CorruptRecordError):
            second.handle("wf").result(timeout=1)
        assert agent.thought == []


# -- what rollback cannot repair must not loop ------------------------------------------------
def test_a_damaged_workflow_record_fails_without_looping_and_others_recover(
        db: Database, apps: AppFactory) -> None:
    crashed(apps, ["bad", "good"])
    raw = Raw(db)
    raw.set_inputs("bad", flip(raw.inputs("bad")))

    second = apps(recovery_interval=0.05)
    agent = Agent(second, crash=False)
    handles = second.recover()  # one damaged row does not stop the sweep
    assert "good" in {h.workflow_id for h in handles}
    assert second.handle("good").result(timeout=10) == EXPECTED
    wait_until(lambda: second.store.inner.get_workflow("bad").status  # type: ignore[attr-defined]
               is Status.FAILED, what="the damaged workflow to fail")
    raw_rec = second.store.inner.get_workflow("bad")  # type: ignore[attr-defined]
    assert "record 'inputs' at index -1 of workflow 'bad'" in raw_rec.reason
    assert "rolling back cannot remove this record" in raw_rec.reason
    for _ in range(3):
        second.recover()  # it stays failed: no retry loop
    assert [w for w, _ in agent.thought if w == "bad"] == []
    with pytest.raises(CorruptRecordError, match="'inputs'"):
        second.handle("bad").result(timeout=1)
    # A listing (crashsafe ls, the dashboard) still shows every workflow.
    listed = {r.id: r for r in second.list_workflows()}
    assert {"bad", "good"} <= set(listed)
    assert listed["bad"].inputs == b"" and (listed["bad"].reason or "").startswith(
        "unreadable: record 'inputs' at index -1 of workflow 'bad'")
    assert listed["good"].status is Status.SUCCEEDED


def test_damage_with_no_checkpoint_rolls_back_to_the_start(db: Database,
                                                          apps: AppFactory) -> None:
    crashed(apps, ["wf"], checkpoints=False)
    raw = Raw(db)
    raw.set_journal("wf", 4, flip(raw.journal("wf", 4)))
    second = apps()
    agent = Agent(second, crash=False, checkpoints=False)
    second.recover()
    assert second.handle("wf").result(timeout=10) == EXPECTED
    assert agent.thought == [("wf", t) for t in range(TURNS)]  # from the start
    assert all("rolled back to the start" in why for _, why, _ in second.rewound("wf"))


def test_damage_that_keeps_coming_back_fails_after_max_rollbacks(db: Database,
                                                                 apps: AppFactory) -> None:
    first = crashed(apps, ["wf"])
    for n in range(MAX_ROLLBACKS):  # as if the disk had damaged it that often already
        record_event(first, "wf", CorruptRecordError(f"earlier damage {n}", "wf", 7, "output"),
                     "rollback", "rolled back to checkpoint 'turn-1' (index 5)")
    raw = Raw(db)
    raw.set_journal("wf", 7, flip(raw.journal("wf", 7)))
    second = apps()
    agent = Agent(second, crash=False)
    second.recover()
    with pytest.raises(CorruptRecordError):
        second.handle("wf").result(timeout=10)
    assert f"already rolled back {MAX_ROLLBACKS} times" in (second.get_workflow("wf").reason
                                                              or "")
    assert agent.thought == [] and second.rewound("wf") == []


@pytest.mark.parametrize("policy", ["rollback", "fail", "escalate"])
def test_a_damaged_attempt_read_while_running_follows_the_policy(
        db: Database, apps: AppFactory, policy: str) -> None:
    """Damage met mid-run (a recorded attempt, read when the step runs) takes the same
    policy path as damage met while loading."""
    first = apps()
    tries: list[int] = []

    def build(app: App, crash: bool) -> Any:
        @app.step(name="prep")
        def prep() -> str:
            return "ready"

        @app.step(name="flaky", retry=crashsafe.RetryPolicy(max_attempts=3, initial_delay=0.01,
                                                              jitter=False))
        def flaky() -> str:
            tries.append(len(tries))
            if crash and len(tries) == 1:
                raise ConnectionError("transient")
            if crash and len(tries) == 2:
                simulate_crash(app, wait=0)
            return "done"

        @app.workflow(name="retrying", on_corrupt=policy)
        def retrying() -> str:
            prep()
            crashsafe.checkpoint({"stage": "prepared"}, label="prepared")
            return flaky()

        return retrying

    first.start(build(first, True), workflow_id="wf")
    wait_idle(first, timeout=10)
    raw = Raw(db)
    raw.set_attempt_error("wf", 2, b"\xc5CS\x01garbage")
    second = apps()
    tries.clear()
    build(second, False)
    second.recover()
    if policy == "escalate":
        wait_until(lambda: second.get_workflow("wf").status is Status.WAITING, what="parked")
        assert "'attempt-error:1' at index 2" in (second.get_workflow("wf").reason or "")
        assert tries == []
        second.signal("wf", SIGNAL, {"action": "rollback"})
    if policy == "fail":
        with pytest.raises(CorruptRecordError, match="'attempt-error:1' at index 2"):
            second.handle("wf").result(timeout=10)
        assert tries == []
        assert [e["action"] for e in second.corruption_events("wf")] == ["fail"]
        return
    assert second.handle("wf").result(timeout=10) == "done"
    assert second.rewound("wf") == []  # the step had not recorded its result yet
    events = second.corruption_events("wf")
    assert [(e["kind"], e["index"], e["action"]) for e in events][-1] == (
        "attempt-error:1", 2, "rollback")
    assert events[-1]["detail"] == "rolled back to checkpoint 'prepared' (index 1)"
    assert tries == [0]  # the step ran again once, from its first attempt


def test_an_async_workflow_rolls_back_too(db: Database, apps: AppFactory) -> None:
    ran: list[int] = []

    def build(app: App, crash: bool) -> Any:
        @app.step(name="turn")
        async def turn(n: int) -> str:
            if crash and n == 3:
                simulate_crash(app, wait=0)
            ran.append(n)
            return f"r{n}"

        @app.workflow(name="async_agent")
        async def async_agent() -> list[str]:
            out = []
            for n in range(4):
                out.append(await turn(n))
                crashsafe.checkpoint({"out": out}, label=f"t{n}")
            return out

        return async_agent

    first = apps()
    first.start(build(first, True), workflow_id="aw")
    wait_idle(first, timeout=10)
    raw = Raw(db)
    raw.set_journal("aw", 2, flip(raw.journal("aw", 2)))  # turn 1's result
    ran.clear()
    second = apps()
    build(second, False)
    second.recover()
    assert second.handle("aw").result(timeout=10) == ["r0", "r1", "r2", "r3"]
    assert ran == [1, 2, 3]  # back to checkpoint t0, then on
    assert [e["action"] for e in second.corruption_events("aw")] == ["rollback"]
