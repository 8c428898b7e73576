"""Retention (``app.gc``, ``crashsafe gc``, ``App(retention=...)``): dropping finished
workflows, keeping the last N checkpoints with deltas compacted first. Every store kind."""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import pytest

import crashsafe
from crashsafe import App, Retention, Status, _recovery_log
from crashsafe._checkpoint import state_hash
from crashsafe._retention import compact
from helpers import AppFactory, wait_until


def _chat(app: App) -> Any:
    @app.step(name="llm")
    def llm(history: list[dict[str, str]]) -> str:
        return f"reply {len(history)}"

    @app.workflow(name="chat")
    def chat(n: int) -> int:
        messages: list[dict[str, str]] = []
        for turn in range(n):
            messages.append({"role": "user", "content": f"question {turn} " + "x" * 300})
            messages.append({"role": "assistant", "content": llm(messages)})
            crashsafe.checkpoint({"messages": messages, "turn": turn}, label=f"turn-{turn}")
        return len(messages)

    return chat


def _states(app: App, wid: str) -> dict[int, Any]:
    """Every checkpoint whose state is kept, by ordinal."""
    return {c.n: app.checkpoint_state(wid, f"#{c.n}") for c in app.checkpoints(wid)
            if not c.pruned}


def _hashes_hold(app: App, wid: str) -> None:
    for c in app.checkpoints(wid):
        if not c.pruned:
            assert state_hash(app.checkpoint_state(wid, f"#{c.n}"))[0] == c.hash, (wid, c.n)


def test_keep_checkpoints_compacts_deltas_first(make_app: AppFactory) -> None:
    app = make_app(checkpoint_full_every=10)
    chat = _chat(app)
    for wid in ("c1", "c2"):
        assert app.start(chat, 20, workflow_id=wid).result(timeout=20) == 40
    before = _states(app, "c1")
    hashes = [c.hash for c in app.checkpoints("c1")]
    assert [c.full for c in app.checkpoints("c1")][17] is False  # a delta on #10

    report = app.gc(keep_checkpoints=3)
    assert (report.checkpoints_pruned, report.checkpoints_rebased) == (2 * 17, 2)
    infos = app.checkpoints("c1")
    assert [c.pruned for c in infos] == [True] * 17 + [False] * 3
    assert [c.hash for c in infos] == hashes  # the metadata stays, hash included
    assert infos[17].full and not infos[18].full  # rebased: a full snapshot now
    from crashsafe import _codec

    rebased = _codec.decode(app.journal("c1")[infos[17].index].output or b"", "checkpoint")
    assert not {"delta", "zd", "prev", "base"} & set(rebased), sorted(rebased)
    assert _states(app, "c1") == {n: before[n] for n in (17, 18, 19)}
    _hashes_hold(app, "c1")
    _hashes_hold(app, "c2")
    with pytest.raises(crashsafe.CheckpointPrunedError, match="dropped by retention"):
        app.checkpoint_state("c1", "turn-16")
    assert app.checkpoint_state("c1")["turn"] == 19

    again = app.gc(keep_checkpoints=3)  # idempotent
    assert (again.checkpoints_pruned, again.checkpoints_rebased) == (0, 0)
    fewer = app.gc(keep_checkpoints=1)
    assert (fewer.checkpoints_pruned, fewer.checkpoints_rebased) == (4, 2)
    assert app.checkpoint_state("c1") == before[19]
    _hashes_hold(app, "c1")


def test_a_rebased_packed_delta_keeps_none_of_its_packing(make_app: AppFactory) -> None:
    """The oldest kept checkpoint of a long agent is a *packed* delta (a zstd frame
    against the step results before it): rewritten as a full snapshot, it keeps no
    frame, dictionary recipe or delta, so the stored checkpoints shrink."""
    from crashsafe import _codec
    from crashsafe._checkpoint_pack import DELTA_FIELDS

    app = make_app(checkpoint_full_every=10)
    words = [f"w{i}" for i in range(3000)]

    @app.step(name="llm")
    def llm(turn: int) -> str:
        pick = random.Random(turn)
        return " ".join(pick.choice(words) for _ in range(300))

    @app.workflow(name="agent")
    def agent(turns: int) -> int:
        messages: list[str] = []
        for turn in range(turns):
            messages.append(llm(turn))
            crashsafe.checkpoint({"messages": messages})
        return turns

    assert app.start(agent, 30, workflow_id="long").result(timeout=30) == 30

    def records() -> list[tuple[int, dict[str, Any]]]:
        return [(len(e.output or b""), _codec.decode(e.output or b"", "checkpoint"))
                for e in app.journal("long") if e.kind == "checkpoint"]

    before = records()
    assert {"zd", "prev", "base"} <= set(before[27][1]), sorted(before[27][1])
    report = app.gc(keep_checkpoints=3)
    assert (report.checkpoints_pruned, report.checkpoints_rebased) == (27, 1)
    after = records()
    assert "full" in after[27][1] and not set(DELTA_FIELDS) & set(after[27][1]), \
        sorted(after[27][1])
    assert all("zd" in m for _, m in after[28:])  # the later deltas stay packed
    assert sum(n for n, _ in after) < 0.9 * sum(n for n, _ in before)
    _hashes_hold(app, "long")


def test_compaction_refuses_a_plan_whose_states_would_not_read_back() -> None:
    from crashsafe import _codec
    from crashsafe.stores.base import JournalEntry

    def entry(i: int, doc: dict[str, Any]) -> JournalEntry:
        return JournalEntry("w", i, "checkpoint", "c", _codec.encode(doc, "c")[0], None, 1,
                            1.0, 1.0)

    good = [entry(0, {"n": 0, "hash": state_hash([1])[0], "size": 3, "full": [1],
                      "full_n": 0}),
            entry(1, {"n": 1, "hash": state_hash([1, 2])[0], "size": 5,
                      "delta": {"append": [2]}, "full_n": 0})]
    out, pruned, rebased = compact(good, 1)
    assert (pruned, rebased, [e.index for e in out]) == (1, 1, [1, 0])
    # A recorded hash the state does not match (a damaged record): nothing is planned.
    bad = [good[0], entry(1, {"n": 1, "hash": "0" * 64, "size": 5,
                              "delta": {"append": [2]}, "full_n": 0})]
    with pytest.raises(crashsafe.CrashsafeError, match="state"):
        compact(bad, 1)


def test_running_workflows_are_never_touched(make_app: AppFactory) -> None:
    app = make_app()

    @app.workflow(name="waiter")
    def waiter() -> str:
        for i in range(6):
            crashsafe.checkpoint({"i": i, "pad": "y" * 200})
        return str(crashsafe.wait_for("go"))

    handle = app.start(waiter, workflow_id="live")
    wait_until(lambda: app.get_workflow("live").status is Status.WAITING, what="waiting")
    journal = [(e.index, e.output, e.note) for e in app.journal("live")]
    report = app.gc(keep_checkpoints=1, finished_older_than=0)
    assert (report.workflows_dropped, report.checkpoints_pruned) == (0, 0)
    assert [(e.index, e.output, e.note) for e in app.journal("live")] == journal
    app.signal("live", "go", "now")
    assert handle.result(timeout=10) == "now"
    assert app.gc(keep_checkpoints=1).checkpoints_pruned == 5


def test_a_rollback_to_a_pruned_checkpoint_replays_and_reads_back(
        make_app: AppFactory) -> None:
    app = make_app(checkpoint_full_every=4)
    chat = _chat(app)
    assert app.start(chat, 12, workflow_id="r1").result(timeout=20) == 24
    before = _states(app, "r1")
    app.gc(keep_checkpoints=2)
    # Back to turn 3, whose state is gone: replay still checks its hash, and the
    # checkpoints recorded anew afterwards start from a full snapshot.
    app.rollback("r1", to="turn-3")
    assert app.handle("r1").result(timeout=20) == 24
    infos = app.checkpoints("r1")
    assert [c.pruned for c in infos] == [True] * 4 + [False] * 8
    assert infos[4].full
    assert app.checkpoint_state("r1") == before[11]
    _hashes_hold(app, "r1")


def _tree(app: App) -> dict[str, Any]:
    applied: list[str] = []

    @app.step(name="pay", effect=True)
    def pay(order: str) -> str:
        key = crashsafe.current().idempotency_key
        assert key is not None
        applied.append(key)
        return f"paid {order}"

    @app.workflow(name="kid")
    def kid(order: str) -> str:
        return pay(order)

    @app.workflow(name="parent")
    def parent(order: str) -> str:
        crashsafe.checkpoint({"order": order})
        return str(kid(order))

    return {"parent": parent, "applied": applied}


def test_finished_older_than_drops_whole_families_and_keeps_effect_keys(
        make_app: AppFactory) -> None:
    app = make_app()
    flows = _tree(app)
    assert app.start(flows["parent"], "o-1", workflow_id="old").result(timeout=20) == \
        "paid o-1"
    old_child = [r.id for r in app.list_workflows(name="kid")]
    assert len(old_child) == 1
    time.sleep(1.0)
    assert app.start(flows["parent"], "o-2", workflow_id="young").result(timeout=20) == \
        "paid o-2"
    store = app.store
    age = store.clock() - app.get_workflow("old").updated_at - 0.5
    usage = store.usage()  # type: ignore[attr-defined]
    event = {"at": 1.0, "from": "gone", "seen": 0.5, "by": "me", "outcome": "claimed"}
    for wid in ("old", "young"):
        _recovery_log.append(store, wid, event)

    report = app.gc(finished_older_than=age)
    assert report.workflows_dropped == 2  # "old" and its child
    # Its recovery log goes with it; the kept workflow's stays.
    assert app.recoveries("old") == [] and app.recoveries("young") == [event]
    assert app.list_workflows(name="parent")[0].id == "young"
    with pytest.raises(crashsafe.UnknownWorkflowError):
        app.get_workflow(old_child[0])
    assert store.load_journal("old") == [] and store.load_journal(old_child[0]) == []
    after = store.usage()  # type: ignore[attr-defined]
    assert after["workflows"] == usage["workflows"] - 2
    assert after["journal"] < usage["journal"]
    assert after["effects"] == usage["effects"]  # dedup rows stay until they expire
    # The same workflow started again does not pay twice: the key still deduplicates.
    assert app.start(flows["parent"], "o-1", workflow_id="old").result(timeout=20) == \
        "paid o-1"
    assert len(flows["applied"]) == 2
    assert app.gc(finished_older_than=age).workflows_dropped == 0  # the new one is young


def test_a_child_is_not_dropped_while_its_parent_is_kept(make_app: AppFactory) -> None:
    app = make_app()

    @app.workflow(name="kid2")
    def kid2() -> str:
        return "done"

    @app.workflow(name="slow_parent")
    def slow_parent() -> str:
        first = str(kid2())
        return first + str(crashsafe.wait_for("go"))

    handle = app.start(slow_parent, workflow_id="p")
    wait_until(lambda: app.get_workflow("p").status is Status.WAITING, what="waiting")
    assert app.gc(finished_older_than=0).workflows_dropped == 0
    app.signal("p", "go", "!")
    assert handle.result(timeout=10) == "done!"  # its replay would need the child
    time.sleep(0.05)
    assert app.gc(finished_older_than=0).workflows_dropped == 2


def test_partials_of_missing_workflows_are_dropped(make_app: AppFactory) -> None:
    app = make_app()
    chat = _chat(app)
    app.start(chat, 1, workflow_id="a:b").result(timeout=10)
    store = app.store
    for key in ("partial:gone:3", "partial:a:b:1", "partial:a:7"):
        store.update_shared(key, lambda cur, now: (b"x", None))
    report = app.gc(keep_checkpoints=1)
    assert report.partials_dropped == 2
    assert [k for k, _, _ in store.list_shared("partial:")] == ["partial:a:b:1"]


def test_dry_run_counts_and_changes_nothing(make_app: AppFactory) -> None:
    app = make_app(checkpoint_full_every=5)
    chat = _chat(app)
    for i in range(3):
        app.start(chat, 8, workflow_id=f"d{i}").result(timeout=20)
    journals = {f"d{i}": [(e.output, e.note) for e in app.journal(f"d{i}")] for i in range(3)}
    usage = app.store.usage()  # type: ignore[attr-defined]
    dry = app.gc(keep_checkpoints=2, dry_run=True)
    assert dry.dry_run and dry.checkpoints_pruned == 3 * 6
    assert {w: [(e.output, e.note) for e in app.journal(w)] for w in journals} == journals
    time.sleep(0.05)
    dry_drop = app.gc(finished_older_than=0, dry_run=True)
    assert dry_drop.workflows_dropped == 3
    assert app.store.usage() == usage  # type: ignore[attr-defined]
    real = app.gc(keep_checkpoints=2)
    assert (real.checkpoints_pruned, real.checkpoints_rebased) == (
        dry.checkpoints_pruned, dry.checkpoints_rebased)


def test_progress_is_monotone_and_complete(make_app: AppFactory) -> None:
    app = make_app()
    chat = _chat(app)
    for i in range(7):
        app.start(chat, 3, workflow_id=f"p{i}").result(timeout=20)
    time.sleep(0.05)
    calls: list[tuple[int, int]] = []
    app.gc(keep_checkpoints=1, finished_older_than=3600, batch=2,
           progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)
    assert len(calls) == 1 + 4  # after each batch of 2
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    assert {t for _, t in calls} == {7}


def test_bad_arguments_say_what_to_do(make_app: AppFactory) -> None:
    app = make_app()
    with pytest.raises(crashsafe.ConfigurationError, match="keep_checkpoints must be an int"):
        app.gc(keep_checkpoints=0)
    with pytest.raises(ValueError, match="finished_older_than"):
        app.gc(finished_older_than=-1)
    with pytest.raises(crashsafe.ConfigurationError, match="interval"):
        Retention(keep_checkpoints=2, interval=0)


def test_the_automatic_policy_compacts_then_drops(make_app: AppFactory) -> None:
    app = make_app(recovery_interval=0.05, retention=Retention(
        keep_checkpoints=2, interval=0.1, settle=0.0, batch=2, max_per_pass=3))
    chat = _chat(app)
    for i in range(5):
        app.start(chat, 6, workflow_id=f"a{i}").result(timeout=20)
    wait_until(lambda: all(sum(c.pruned for c in app.checkpoints(f"a{i}")) == 4
                           for i in range(5)), timeout=20, what="automatic compaction")
    for i in range(5):
        _hashes_hold(app, f"a{i}")
    state, _ = app.store.read_shared("crashsafe:retention")
    assert state is not None  # the shared schedule and cursor
    # One pass per interval across all processes: the next policy takes over the store.
    app.close()
    dropper = make_app(retention=Retention(finished_older_than=0.2, interval=0.1),
                       recovery_interval=0.05)
    dropper.launch()
    wait_until(lambda: not dropper.list_workflows(name="chat"), timeout=20,
               what="automatic drop")


def test_sqlite_incremental_auto_vacuum_gives_pages_back(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "iv.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table exists
    conn.execute("VACUUM")
    conn.close()
    app = App(f"sqlite:///{path}")
    chat = _chat(app)
    for i in range(6):
        app.start(chat, 6, workflow_id=f"v{i}").result(timeout=20)
    before = app.store.usage()  # type: ignore[attr-defined]
    time.sleep(0.05)
    assert app.gc(finished_older_than=0).workflows_dropped == 6
    after = app.store.usage()  # type: ignore[attr-defined]
    app.close()
    assert after["free_bytes"] == 0  # handed back to the file system, not kept free
    assert after["bytes"] < before["bytes"]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_sqlite_reuses_the_pages_a_drop_freed(tmp_path: Any) -> None:
    app = App(f"sqlite:///{tmp_path / 'reuse.db'}")
    chat = _chat(app)
    for i in range(8):
        app.start(chat, 8, workflow_id=f"first-{i}").result(timeout=20)
    filled = app.store.usage()  # type: ignore[attr-defined]
    time.sleep(0.05)
    assert app.gc(finished_older_than=0).workflows_dropped == 8
    freed = app.store.usage()  # type: ignore[attr-defined]
    assert freed["free_bytes"] > (filled["bytes"] - freed["bytes"]) // 2 > 0
    for i in range(8):
        app.start(chat, 8, workflow_id=f"second-{i}").result(timeout=20)
    refilled = app.store.usage()  # type: ignore[attr-defined]
    app.close()
    # The same work again fits in the pages the drop freed: the file does not grow.
    total = refilled["bytes"] + refilled["free_bytes"]
    assert total <= filled["bytes"] + filled["free_bytes"] + 4 * 4096, (filled, refilled)


def test_a_plan_made_before_a_rollback_never_lands_on_the_re_run(
        make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from crashsafe import _retention

    app = make_app()
    counter = itertools.count()

    @app.step(name="tick")
    def tick() -> int:
        return next(counter)

    @app.workflow(name="w")
    def w() -> int:
        s: dict[str, Any] = {"pad": "x" * 2000, "msgs": []}
        for i in range(3):
            s["msgs"].append(tick())
            crashsafe.checkpoint(dict(s, msgs=list(s["msgs"])), label=f"c{i}")
        return int(s["msgs"][-1])

    assert app.start(w, workflow_id="A-1").result(timeout=10) == 2
    real = _retention.compact

    def racing(journal: Any, keep: int) -> Any:
        plan = real(journal, keep)  # finished -> planned; then, before it is applied:
        monkeypatch.setattr(_retention, "compact", real)
        app.rollback("A-1", to="c0")
        assert app.handle("A-1").result(timeout=10) == 4  # the same indexes, anew
        return plan

    monkeypatch.setattr(_retention, "compact", racing)
    report = app.gc(keep_checkpoints=1)
    assert (report.checkpoints_pruned, report.checkpoints_rebased) == (0, 0)
    assert [s.split(":")[0] for s in report.skipped] == ["A-1"]
    assert "changed since" in report.skipped[0]
    assert app.checkpoint_state("A-1")["msgs"] == [0, 3, 4]
    assert not any(c.pruned for c in app.checkpoints("A-1"))
    _hashes_hold(app, "A-1")
    # The next pass plans from the journal as it is now, and compacts it.
    report = app.gc(keep_checkpoints=1)
    assert report.skipped == [] and report.checkpoints_pruned == 2
    assert app.checkpoint_state("A-1")["msgs"] == [0, 3, 4]
    _hashes_hold(app, "A-1")


def test_a_malformed_checkpoint_record_skips_its_workflow_not_retention(
        make_app: AppFactory) -> None:
    import dataclasses

    from crashsafe import _codec, _retention

    app = make_app()
    chat = _chat(app)
    for wid in ("bad", "good"):
        app.start(chat, 4, workflow_id=wid).result(timeout=20)
    # A record that decodes, but lacks its ordinal, hash and size.
    first = next(e for e in app.store.load_journal("bad") if e.kind == "checkpoint")
    broken = dataclasses.replace(first, output=_codec.encode({"label": "turn-0"}, "x")[0])
    rec = app.get_workflow("bad")
    assert app.store.rewrite_finished_entries([broken], {"bad": (rec.token, rec.updated_at)})

    report = app.gc(keep_checkpoints=1)
    assert [s.split(":")[0] for s in report.skipped] == ["bad"]
    assert "CorruptRecordError" not in report.skipped[0]  # the message names it
    assert f"journal index {first.index} of workflow 'bad'" in report.skipped[0]
    assert sum(c.pruned for c in app.checkpoints("good")) == 3
    with pytest.raises(crashsafe.CorruptRecordError):
        _retention._meta(broken)

    # The automatic policy goes past it: its cursor advances, the next pass has nothing.
    app.start(chat, 4, workflow_id="later").result(timeout=20)
    policy = Retention(keep_checkpoints=1, interval=0.01, settle=0.0)
    time.sleep(0.05)  # finished strictly before the pass's "now" (the store's clock)
    first_pass = _retention.auto_pass(app.store, policy)
    assert first_pass is not None and first_pass.workflows_examined == 3
    assert [s.split(":")[0] for s in first_pass.skipped] == ["bad"]
    assert sum(c.pruned for c in app.checkpoints("later")) == 3
    time.sleep(0.02)
    second = _retention.auto_pass(app.store, policy)
    assert second is not None and second.workflows_examined == 0
