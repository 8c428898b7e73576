"""Automatic, adaptive and selective checkpoints, and checkpoint metadata. Every store
kind; one kill -9 campaign against real child processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import random as _random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashsafe
from crashsafe import App, CheckpointPolicy, KeepLast, Selective, Status
from crashsafe._checkpoint import state_at
from crashsafe._checkpoint_policy import Tracker
from crashsafe._codec import decode, encode
from crashsafe.stores.base import JournalEntry
from crashsafe.testing import MemoryStore, simulate_crash
from helpers import AppFactory, wait_idle
from strategies import AGENT_KEYS, agent_states, same

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_policy_worker as worker


def _pipeline(app: App, policy: CheckpointPolicy, *, crash_at: int | None = None,
              pause: float = 0.0, track: bool = True, noisy: bool = False) -> Any:
    @app.step(name="work")
    def work(i: int) -> int:
        if pause:
            time.sleep(pause)
        return i * i

    @app.workflow(name="pipeline", checkpoint=policy)
    def pipeline(n: int) -> list[int]:
        done: list[int] = []
        if track:
            crashsafe.track(lambda: {"done": done, "mood": _random.random()} if noisy
                            else {"done": done})
        for i in range(n):
            done.append(work(i))
            if crash_at is not None and i == crash_at:
                simulate_crash(app, wait=0)
        return done

    return pipeline


def _resumed(app: App, wid: str) -> Any:
    # The app's own background sweep may claim the workflow before recover() does.
    app.recover()
    return app.handle(wid)


def _autos(app: App, wid: str) -> list[tuple[int, str]]:
    return [(c.index, c.hash) for c in app.checkpoints(wid) if c.auto]


def _meta(app: App, wid: str, index: int) -> dict[str, Any]:
    (entry,) = [e for e in app.journal(wid) if e.index == index]
    meta: dict[str, Any] = decode(entry.output or b"{}")
    return meta


# -- when they fire ----------------------------------------------------------------------
def test_every_n_steps_fires_before_the_next_call_and_restores_that_state(app: App) -> None:
    wf = _pipeline(app, CheckpointPolicy(every_steps=3))
    assert app.start(wf, 10, workflow_id="p1").result(timeout=20) == [i * i for i in range(10)]
    infos = [c for c in app.checkpoints("p1")]
    # steps at 0-2, checkpoint at 3, steps 4-6, checkpoint 7, steps 8-10, checkpoint 11,
    # step 12: one step since, so the end takes none.
    assert [c.index for c in infos] == [3, 7, 11]
    assert all(c.auto and c.label is None for c in infos)
    assert [e.kind for e in app.journal("p1")].count("step") == 10
    for n, c in enumerate(infos):
        assert app.checkpoint_state("p1", c.index) == {"done": [i * i for i in range(3 * n + 3)]}
    names = {e.index: e.name for e in app.journal("p1")}
    assert names[3] == "auto"


def test_each_step_also_checkpoints_the_end_and_explicit_ones_restart_the_count(
        app: App) -> None:
    @app.step(name="s")
    def s(i: int) -> int:
        return i

    @app.workflow(name="mixed", checkpoint=CheckpointPolicy(every_steps=2))
    def mixed() -> int:
        state = crashsafe.track({"n": 0})
        for i in range(5):
            state["n"] = s(i)
            if i == 2:
                crashsafe.checkpoint(state, label="by-hand")
        return int(state["n"])

    assert app.start(mixed, workflow_id="m1").result(timeout=20) == 4
    kinds = [(e.index, e.kind, e.name) for e in app.journal("m1")]
    # s0 s1 [auto] s2 [by-hand] s3 s4 [auto at the end]
    assert kinds == [(0, "step", "s"), (1, "step", "s"), (2, "checkpoint", "auto"),
                     (3, "step", "s"), (4, "checkpoint", "by-hand"), (5, "step", "s"),
                     (6, "step", "s"), (7, "checkpoint", "auto")]
    assert [c.auto for c in app.checkpoints("m1")] == [True, False, True]
    assert app.checkpoint_state("m1") == {"n": 4}

    @app.workflow(name="each", checkpoint=CheckpointPolicy(every_steps=1))
    def each() -> None:
        crashsafe.track(lambda: {"x": 1})
        s(0)
        s(1)

    app.start(each, workflow_id="e1").result(timeout=20)
    assert [c.index for c in app.checkpoints("e1")] == [1, 3]


def test_nothing_tracked_records_nothing(app: App) -> None:
    wf = _pipeline(app, CheckpointPolicy(every_steps=1), track=False)
    app.start(wf, 4, workflow_id="nt").result(timeout=20)
    assert app.checkpoints("nt") == []


def test_every_seconds_follows_the_journaled_step_times(app: App) -> None:
    wf = _pipeline(app, CheckpointPolicy(every_seconds=0.05), pause=0.02)
    app.start(wf, 12, workflow_id="t1").result(timeout=30)
    journal = app.journal("t1")
    autos = [e.index for e in journal if e.kind == "checkpoint"]
    assert autos, "no checkpoint in 12 steps of 20 ms with every_seconds=0.05"
    # Recompute every decision from the recorded times alone: a checkpoint stands
    # exactly where the time since the previous one (or the first step's start) first
    # reached 50 ms by the latest step's recorded end.
    expected, since = [], None
    for e in journal:
        if e.kind == "checkpoint":
            since = e.started_at
            continue
        since = e.started_at if since is None else since
        if e.ended_at - since >= 0.05:
            expected.append(e.index + 1)
            since = None  # reset by the checkpoint read next
    assert autos == expected


def test_after_child_checkpoints_once_each_child_returned(app: App) -> None:
    @app.workflow(name="kid")
    def kid(i: int) -> int:
        return i + 100

    @app.workflow(name="parent", checkpoint=CheckpointPolicy(after_child=True))
    def parent() -> list[int]:
        got: list[int] = []
        crashsafe.track(lambda: {"got": got})
        for i in range(3):
            got.append(kid(i))
        return got

    assert app.start(parent, workflow_id="par").result(timeout=20) == [100, 101, 102]
    journal = [(e.kind, e.name) for e in app.journal("par")]
    assert journal == [("child", "kid"), ("checkpoint", "auto")] * 3
    assert app.checkpoint_state("par") == {"got": [100, 101, 102]}
    assert app.checkpoint_state("par", "#0") == {"got": [100]}


def test_an_async_workflow_checkpoints_through_its_commits(app: App) -> None:
    @app.step(name="as")
    async def astep(i: int) -> int:
        await asyncio.sleep(0)
        return i

    @app.workflow(name="aw", checkpoint=CheckpointPolicy(every_steps=2))
    async def aw() -> int:
        seen: list[int] = []
        crashsafe.track(lambda: {"seen": seen})
        for i in range(4):
            seen.append(await astep(i))
        return len(seen)

    got: Any = app.start(aw, workflow_id="aw1").result(timeout=20)
    assert got == 4
    assert [c.index for c in app.checkpoints("aw1")] == [2, 5]
    assert app.checkpoint_state("aw1") == {"seen": [0, 1, 2, 3]}


# -- replay -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [CheckpointPolicy(every_steps=2),
                                    CheckpointPolicy(every_steps=3, after_child=True,
                                                     select=Selective(
                                                         truncate={"done": KeepLast(2)}))])
def test_replay_after_a_crash_meets_the_same_positions_and_hashes(
        make_app: AppFactory, policy: CheckpointPolicy) -> None:
    ref = make_app()
    wf = _pipeline(ref, policy)
    ref.start(wf, 9, workflow_id="ref").result(timeout=20)
    reference = _autos(ref, "ref")
    assert len(reference) >= 3

    first = make_app()
    first.start(_pipeline(first, policy, crash_at=4), 9, workflow_id="crashed")
    wait_idle(first)
    before = _autos(first, "crashed")
    assert 0 < len(before) < len(reference)
    second = make_app()
    _pipeline(second, policy)
    assert _resumed(second, "crashed").result(timeout=20) == [i * i for i in range(9)]
    assert _autos(second, "crashed") == reference


def test_an_automatic_checkpoint_whose_replayed_state_differs_is_divergence(
        make_app: AppFactory) -> None:
    first = make_app()
    first.start(_pipeline(first, CheckpointPolicy(every_steps=1), crash_at=2, noisy=True), 5,
                workflow_id="noisy")
    wait_idle(first)
    assert len(first.checkpoints("noisy")) >= 2
    second = make_app()
    _pipeline(second, CheckpointPolicy(every_steps=1), noisy=True)
    with pytest.raises(crashsafe.DeadLetteredError, match="checkpoint 'auto' with state hash"):
        _resumed(second, "noisy").result(timeout=20)
    assert second.get_workflow("noisy").status is Status.DEAD_LETTER


def test_a_changed_policy_is_reported_as_nondeterminism(make_app: AppFactory) -> None:
    first = make_app()
    first.start(_pipeline(first, CheckpointPolicy(every_steps=2), crash_at=4), 8,
                workflow_id="pol")
    wait_idle(first)
    second = make_app()
    _pipeline(second, CheckpointPolicy(every_steps=3))
    with pytest.raises(crashsafe.DeadLetteredError, match="checkpoint 'auto'"):
        _resumed(second, "pol").result(timeout=20)


def test_check_only_replay_accepts_recorded_automatic_checkpoints(make_app: AppFactory) -> None:
    from crashsafe._replay import replay_workflow

    first = make_app()
    first.start(_pipeline(first, CheckpointPolicy(every_steps=1)), 4,
                workflow_id="chk").result(timeout=20)
    same = make_app()
    _pipeline(same, CheckpointPolicy(every_steps=1))
    report = replay_workflow(same, same.get_workflow("chk"))
    assert report.verdict == "ok", report
    changed = make_app()
    _pipeline(changed, CheckpointPolicy(every_steps=2))
    report = replay_workflow(changed, changed.get_workflow("chk"))
    assert report.verdict == "nondeterminism" and "checkpoint 'auto'" in report.detail


def test_patched_looks_past_a_due_automatic_checkpoint(make_app: AppFactory) -> None:
    def build(app: App, crash: bool) -> Any:
        @app.step(name="s")
        def s(i: int) -> int:
            return i

        @app.workflow(name="patchy", checkpoint=CheckpointPolicy(every_steps=1))
        def patchy() -> list[Any]:
            crashsafe.track({"k": 1})
            out: list[Any] = [s(0)]
            out.append(crashsafe.patched("new-path"))
            out.append(s(1))
            if crash:
                simulate_crash(app, wait=0)
            out.append(s(2))
            return out

        return patchy

    first = make_app()
    first.start(build(first, crash=True), workflow_id="pt")
    wait_idle(first)
    kinds = [(e.kind, e.name) for e in first.journal("pt")]
    assert kinds[:4] == [("step", "s"), ("checkpoint", "auto"), ("patch", "new-path"),
                         ("step", "s")]
    second = make_app()
    build(second, crash=False)
    assert _resumed(second, "pt").result(timeout=20) == [0, True, 1, 2]


@pytest.mark.slow
def test_kill_9_anywhere_leaves_the_positions_and_hashes_of_an_uncrashed_run(
        tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASHSAFE_TEST_SEED") or _random.SystemRandom().randrange(10**9))
    print(f"automatic checkpoint kill campaign: seed={seed}")
    rng = _random.Random(seed)
    workflows, steps = 6, 40
    ref = App(store=MemoryStore())
    agent, aagent = worker.build(ref, pause=0.0)
    for h in worker.start_all(ref, agent, aagent, workflows, steps):
        h.result(timeout=30)
    reference = {f"agent-{n:02d}": _autos(ref, f"agent-{n:02d}") for n in range(workflows)}
    ref.close()

    db = tmp_path / "state.db"
    script = str(Path(__file__).with_name("checkpoint_policy_worker.py"))
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, script, str(db), str(workflows), str(steps)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr
        time.sleep(rng.uniform(0.02, 0.2))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate()
    last = subprocess.run([sys.executable, script, str(db), str(workflows), str(steps)],
                          capture_output=True, text=True, timeout=120)
    assert last.returncode == 0 and last.stdout.split()[-1] == "done", last.stderr[-2000:]
    app = App(f"sqlite:///{db}")
    try:
        for wid, want in reference.items():
            assert app.get_workflow(wid).status is Status.SUCCEEDED
            assert _autos(app, wid) == want, (wid, seed)
            journal = app.journal(wid)
            for c in app.checkpoints(wid):  # every stored state reads back to its hash
                got = crashsafe._checkpoint.state_hash(state_at(journal, c))[0]
                assert got == c.hash, (wid, c.n, seed)
    finally:
        app.close()
    print(f"{kills} kills")
    assert kills >= 2, f"the workers finished before most kills (seed {seed}): make them slower"


# -- adaptive -------------------------------------------------------------------------------
def _entries(latencies: list[float]) -> list[JournalEntry]:
    out, at = [], 1000.0
    for i, lat in enumerate(latencies):
        out.append(JournalEntry("w", i, "step", "s", b"null", None, 1, at, at + lat))
        at += lat
    return out


def _tracker(**policy: Any) -> Tracker:
    t = Tracker()
    t.use(CheckpointPolicy(**policy))
    return t


def test_adaptive_tightens_when_redoing_the_steps_would_exceed_the_target() -> None:
    t = _tracker(every_steps=10, recovery_target=1.0)
    for e in _entries([0.3] * 4):
        t.observe(e)
    # Ten steps of 0.3 s would take 3 s to redo: at most 3 fit in the 1 s target.
    assert t.next_interval(cost=0.001) == 3
    # And a step that takes the work since the last checkpoint over the target makes
    # one due at once, whatever the interval.
    t = _tracker(every_steps=50, recovery_target=1.0)
    t.observe(_entries([0.4])[0])
    assert not t.due()
    t.observe(_entries([0.7])[0])
    assert t.due()


def test_adaptive_loosens_when_checkpoints_cost_more_than_their_share() -> None:
    t = _tracker(every_steps=1, recovery_target=60.0, max_overhead=0.1)
    for e in _entries([0.01] * 3):
        t.observe(e)
    # A 5 ms checkpoint every 10 ms step is 50 %; 10 % needs one per 5 steps.
    assert t.next_interval(cost=0.005) == 5
    # Cheap checkpoints leave the interval where it is.
    assert t.next_interval(cost=0.0001) == 1


def test_adaptive_puts_the_recovery_target_before_the_overhead() -> None:
    t = _tracker(every_steps=1, recovery_target=0.05, max_overhead=0.1)
    for e in _entries([0.01] * 2):
        t.observe(e)
    assert t.next_interval(cost=0.005) == 5  # 5 x 10 ms = the 50 ms target
    assert t.next_interval(cost=0.05) == 5   # would want 50 steps; the target caps it


def test_adaptive_decisions_are_recorded_and_read_back_on_replay(
        make_app: AppFactory) -> None:
    policy = CheckpointPolicy(recovery_target=0.05, every_steps=8)
    first = make_app()
    first.start(_pipeline(first, policy, pause=0.02, crash_at=6), 12, workflow_id="ad")
    wait_idle(first)
    autos = [c for c in first.checkpoints("ad") if c.auto]
    assert autos
    for c in autos:
        meta = _meta(first, "ad", c.index)
        assert meta["next"] <= 3 and meta["us"] >= 0  # 20 ms steps, 50 ms target
    second = make_app()
    _pipeline(second, policy, pause=0.02)
    _resumed(second, "ad").result(timeout=30)
    after = [c.index for c in second.checkpoints("ad") if c.auto]
    assert after[:len(autos)] == [c.index for c in autos]
    # Every gap between checkpoints respects the interval recorded before it (or the
    # target made one due earlier): at most `next` steps apart.
    journal = second.journal("ad")
    for a, b in itertools.pairwise(after):
        steps_between = sum(1 for e in journal if a < e.index < b and e.kind == "step")
        assert 1 <= steps_between <= _meta(second, "ad", a)["next"]


def test_retention_keeps_what_a_replay_of_the_policy_reads(app: App) -> None:
    from crashsafe._replay import replay_workflow

    policy = CheckpointPolicy(recovery_target=0.05, every_steps=8)
    app.start(_pipeline(app, policy, pause=0.02), 10, workflow_id="kept").result(timeout=30)
    before = {c.index: _meta(app, "kept", c.index) for c in app.checkpoints("kept")}
    assert len(before) >= 3
    app.gc(keep_checkpoints=1)
    infos = app.checkpoints("kept")
    assert sum(c.pruned for c in infos) == len(before) - 1
    for c in infos:
        assert _meta(app, "kept", c.index)["next"] == before[c.index]["next"]
    assert replay_workflow(app, app.get_workflow("kept")).verdict == "ok"


def test_adaptive_grows_the_interval_of_cheap_fast_steps_when_overhead_is_tight(
        app: App) -> None:
    policy = CheckpointPolicy(recovery_target=60.0, every_steps=1, max_overhead=0.01)

    @app.step(name="quick")
    def quick(i: int) -> int:
        time.sleep(0.001)
        return i

    @app.workflow(name="big", checkpoint=policy)
    def big() -> None:
        blob = {"text": "y" * 200_000, "n": 0}
        crashsafe.track(blob)
        for i in range(30):
            blob["n"] = quick(i)

    app.start(big, workflow_id="big").result(timeout=30)
    nexts = [_meta(app, "big", c.index)["next"] for c in app.checkpoints("big")]
    assert nexts[0] > 1, nexts  # hashing 200 KB costs more than 1 % of a 1 ms step
    assert len(nexts) < 30 // 2


# -- selective -------------------------------------------------------------------------------
def test_selective_keeps_essentials_and_truncates_without_a_budget(app: App) -> None:
    sel = Selective(essential=["task", "plan"], truncate={"messages": KeepLast(3, head=1)},
                    drop=["scratch"])

    @app.workflow(name="sel")
    def sel_wf() -> None:
        crashsafe.checkpoint({"task": "t", "plan": [1, 2], "scratch": "x" * 50,
                              "messages": list(range(10)), "other": 1}, select=sel)

    app.start(sel_wf, workflow_id="s1").result(timeout=10)
    (info,) = app.checkpoints("s1")
    assert app.checkpoint_state("s1") == {"task": "t", "plan": [1, 2], "messages": [0, 7, 8, 9],
                                          "other": 1}
    assert info.dropped == ("scratch",)
    assert info.truncated == {"messages": (4, 10)}
    assert not info.over_budget


def test_selective_respects_the_budget_dropping_the_largest_non_essential_first(
        app: App) -> None:
    sel = Selective(essential=["task"], truncate={"messages": KeepLast(5)}, budget_bytes=2_000)
    states = {
        "fits": {"task": "t", "messages": ["m" * 10] * 20, "notes": "n" * 100},
        "cut": {"task": "t", "messages": ["m" * 100] * 20, "notes": "n" * 100},
        "drop": {"task": "t", "messages": ["m" * 100] * 20, "notes": "n" * 1500,
                 "small": 1},
        "over": {"task": "t" * 3000, "messages": ["m"] * 3},
    }

    @app.workflow(name="budget", checkpoint=CheckpointPolicy(every_steps=1, select=sel))
    def budget() -> None:
        for label, state in states.items():
            crashsafe.checkpoint(state, label=label)

    app.start(budget, workflow_id="b1").result(timeout=10)
    infos = {c.label: c for c in app.checkpoints("b1")}
    fits = app.checkpoint_state("b1", "fits")
    assert fits == states["fits"] and infos["fits"].truncated == {}  # under budget: whole
    cut = app.checkpoint_state("b1", "cut")
    assert cut["messages"] == ["m" * 100] * 5 and cut["notes"] == "n" * 100
    assert infos["cut"].truncated == {"messages": (5, 20)} and infos["cut"].size <= 2_000
    drop = app.checkpoint_state("b1", "drop")
    assert drop == {"task": "t", "messages": ["m" * 100] * 5, "small": 1}
    assert infos["drop"].dropped == ("notes",) and infos["drop"].size <= 2_000
    over = app.checkpoint_state("b1", "over")
    assert over == {"task": "t" * 3000}  # the essential stays, whatever its size
    assert infos["over"].over_budget and set(infos["over"].dropped) == {"messages"}


@settings(max_examples=300, deadline=None)
@given(state=agent_states(), data=st.data())
def test_selective_keeps_essentials_and_fits_the_budget_or_says_so(
        state: dict[str, Any], data: st.DataObject) -> None:
    keys = sorted(state)
    # Rules mostly name keys the state has, and budgets fall around its size.
    essential = data.draw(st.lists(st.sampled_from(keys or AGENT_KEYS), max_size=2,
                                   unique=True), label="essential")
    rest = [k for k in keys or AGENT_KEYS if k not in essential]
    truncate = {k: KeepLast(data.draw(st.integers(0, 8)), data.draw(st.integers(0, 2)))
                for k in data.draw(st.lists(st.sampled_from(rest), max_size=2, unique=True)
                                   if rest else st.just([]), label="truncate")}
    drop = data.draw(st.lists(st.sampled_from([k for k in rest if k not in truncate] or [""]),
                              max_size=1), label="drop")
    whole = len(encode(state, "state")[0])
    budget = data.draw(st.none() | st.integers(1, 3000)
                       | st.integers(max(1, whole // 3), whole * 2), label="budget")
    sel = Selective(essential=essential, truncate=truncate, drop=drop, budget_bytes=budget)
    plain = decode(encode(state, "state")[0])
    kept, info = sel.apply(plain)
    info = info or {}
    size = len(encode(kept, "kept")[0])
    for k in essential:
        assert (k in kept) == (k in state) and (k not in kept or same(kept[k], plain[k]))
    assert set(kept) <= set(keys) - set(drop)
    assert sorted(info.get("drop", [])) == sorted(set(keys) - set(kept))
    for k, v in kept.items():
        done = truncate[k].apply(plain[k]) if k in truncate else None
        if k in info.get("cut", {}):
            assert done is not None and same(v, done[0])
            assert info["cut"][k] == [done[1], done[2]]
        else:
            assert same(v, plain[k])
    if budget is None:
        assert set(info.get("cut", {})) == {k for k in truncate if k in state
                                            and truncate[k].apply(plain[k]) is not None}
    elif info.get("over"):
        assert size > budget and set(kept) <= set(essential)
    else:
        assert size <= budget
    if budget is not None:
        undropped = {k: v for k, v in plain.items() if k not in drop}
        if len(encode(undropped, "state")[0]) <= budget:  # it fits: nothing else is done
            assert same(kept, undropped) and "cut" not in info and "over" not in info
    if not info:
        assert same(kept, plain)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(every=st.integers(1, 4), n=st.integers(1, 9), data=st.data(),
       truncate=st.booleans())
def test_positions_after_a_crash_anywhere_equal_an_uncrashed_run(
        every: int, n: int, data: st.DataObject, truncate: bool) -> None:
    crash_at = data.draw(st.integers(0, n - 1), label="crash_at")
    policy = CheckpointPolicy(every_steps=every, select=Selective(
        truncate={"done": KeepLast(2)}) if truncate else None)
    store = MemoryStore()
    apps = [App(store=store) for _ in range(3)]
    try:
        ref, first, second = apps
        ref.start(_pipeline(ref, policy), n, workflow_id="ref").result(timeout=20)
        first.start(_pipeline(first, policy, crash_at=crash_at), n, workflow_id="v")
        wait_idle(first)
        _pipeline(second, policy)
        assert _resumed(second, "v").result(timeout=20) == [i * i for i in range(n)]
        assert _autos(second, "v") == _autos(ref, "ref")
        assert [(c.n, c.dropped, c.truncated) for c in second.checkpoints("v")] == \
            [(c.n, c.dropped, c.truncated) for c in ref.checkpoints("ref")]
    finally:
        for a in reversed(apps):
            a.close(timeout=1.0)


def test_selective_misuse_is_a_clear_error(app: App) -> None:
    with pytest.raises(crashsafe.ConfigurationError, match="essential and truncated"):
        Selective(essential=["messages"], truncate={"messages": KeepLast(2)})
    with pytest.raises(crashsafe.ConfigurationError, match="list of keys"):
        Selective(essential="task")
    with pytest.raises(crashsafe.ConfigurationError, match="needs a trigger"):
        CheckpointPolicy()
    with pytest.raises(crashsafe.ConfigurationError, match="every_steps"):
        CheckpointPolicy(every_steps=0)

    @app.workflow(name="notdict")
    def notdict() -> None:
        crashsafe.checkpoint([1, 2], select=Selective(drop=["x"]))

    with pytest.raises(crashsafe.SerializationError, match="must be a dict"):
        app.start(notdict, workflow_id="nd").result(timeout=10)
    with pytest.raises(crashsafe.NotInWorkflowError):
        crashsafe.track({})


# -- metadata ---------------------------------------------------------------------------------
def test_metadata_round_trips_and_absent_fields_cost_nothing(app: App) -> None:
    @app.step(name="flaky")
    def flaky() -> None:
        raise ValueError("upstream said no")

    @app.step(name="ok")
    def ok() -> int:
        return 1

    @app.workflow(name="meta", checkpoint=CheckpointPolicy(every_steps=2))
    def meta_wf() -> None:
        crashsafe.checkpoint({"a": 1}, label="bare")
        crashsafe.track({"b": 2})
        crashsafe.record_usage(120, model="gpt-x")
        crashsafe.checkpoint({"a": 2}, label="explicit", tokens=999, model="other")
        ok()
        try:
            flaky()
        except ValueError:
            pass
        crashsafe.record_usage(30)
        ok()
        ok()

    app.start(meta_wf, workflow_id="md").result(timeout=10)
    infos = app.checkpoints("md")
    bare, explicit, auto1, auto2 = infos
    assert (bare.tokens, bare.model, bare.error, bare.auto) == (None, None, None, False)
    assert set(_meta(app, "md", bare.index)) == {"n", "label", "hash", "size", "full",
                                                   "full_n", "stored"}
    assert (explicit.tokens, explicit.model) == (999, "other")
    assert (auto1.tokens, auto1.model, auto1.auto) == (150, "gpt-x", True)
    assert auto1.error is not None and "'flaky'" in auto1.error
    assert "ValueError: upstream said no" in auto1.error
    assert auto2.error is None  # only failures since the previous checkpoint
    # The model is stored when it changes and read forward; tokens at every checkpoint.
    assert (auto2.model, auto2.tokens) == ("gpt-x", 150)
    assert "model" in _meta(app, "md", auto1.index)
    assert "model" not in _meta(app, "md", auto2.index)


def test_an_explicit_checkpoint_records_the_failure_before_it_without_a_policy(
        app: App) -> None:
    @app.step(name="boom")
    def boom() -> None:
        raise KeyError("missing order; Authorization: Bearer sk-canary0123456789abcdef")

    @app.workflow(name="plain")
    def plain() -> None:
        try:
            boom()
        except KeyError:
            pass
        crashsafe.checkpoint({"after": "failure"}, label="one")
        crashsafe.checkpoint({"after": "nothing"}, label="two")

    app.start(plain, workflow_id="pl").result(timeout=10)
    one, two = app.checkpoints("pl")
    assert one.error is not None and "'boom' (index 0) failed: KeyError" in one.error
    assert "missing order" in one.error and "canary" not in one.error  # credentials masked
    assert two.error is None


def test_record_usage_inside_a_step_is_refused(app: App) -> None:
    @app.step(name="inner")
    def inner() -> None:
        crashsafe.record_usage(5)

    @app.workflow(name="usage")
    def usage() -> None:
        inner()

    with pytest.raises(crashsafe.NotInWorkflowError, match="not inside a step"):
        app.start(usage, workflow_id="u1").result(timeout=10)
