"""``crashsafe chaos``: a kill -9 campaign on the built-in support agent or on your workflow.

Every trial gets a fresh database in a directory of its own, runs the workload in a
child process, SIGKILLs the child at an instant drawn from the trial's seed (or lets
it kill itself at a chosen crash point, see ``_faults``), restarts it until the work is
done, and then checks what survived:

* every journal entry seen committed after a kill is still there, unchanged;
* nothing is left running or waiting once the last restart had ``stuck_after`` seconds;
* each workflow's result equals that of an uninterrupted run;
* ``PRAGMA integrity_check`` is ok for every SQLite file the trial wrote;
* for the built-in workload, the payments ledger (which crashsafe never touches) holds
  each refund once: no keyed effect applied twice, none missing.

Trial ``i`` of a campaign with seed ``S`` has seed ``S + i``, and everything random in a
trial (kill instants, tickets, fault rolls) derives from its seed, so
``crashsafe chaos --seed S+i --trials 1`` with the campaign's other options replays that
trial's kill points.

Run as ``python -m crashsafe.chaos --target MODULE:WORKFLOW ...``, this module is the
child process of a campaign on a user workflow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from . import _codec
from ._app import App
from ._errors import describe
from ._progress import Progress, quiet
from ._workflow import Workflow
from .demo.agent import emit
from .demo.runner import Child, Operator, Snapshot, journal_snapshot, lost_entries, spawn, verify
from .exceptions import ConfigurationError
from .stores import ListFilter, Status, WorkflowRecord, open_store

PREFIX = "chaos-"
"""Every workflow of a trial has an id starting with this (children too)."""
FAULT_RATE = 0.03  # the demo's share of failing LLM calls, so retries are exercised too
UNKNOWN = "outcome unknown"


@dataclass(frozen=True)
class Settings:
    """A campaign's knobs; a workload's own (tickets, latency, arguments) are its fields."""

    trials: int
    seed: int
    kills_per_trial: int = 1
    crash_at: int | None = None
    """Instead of a timed kill, the child kills itself at its N-th crash point."""
    kill_window: float | None = None
    """Kill instants are drawn from [0, window) seconds after the child says it started;
    None: the workload's default (see :attr:`Workload.kill_window`)."""
    stuck_after: float = 30.0
    """A workflow not finished this long after the last restart is stuck."""
    directory: Path | None = None
    """Where the trials' directories go (default: a temporary directory)."""


@dataclass
class Trial:
    """What one trial did and found."""

    number: int
    seed: int
    plan: list[float]
    """Kill instants (seconds after the child started), or the crash point per kill."""
    directory: Path
    kills: int = 0
    recovery_s: list[float] = field(default_factory=list)
    workflows: int = 0
    consistent: int = 0
    lost: int = 0
    stuck: int = 0
    corrupt: int = 0
    """SQLite files (database, ledger) whose ``PRAGMA integrity_check`` is not ok."""
    duplicates: int | None = None
    reruns: int | None = None
    unknown: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


class Run(Protocol):
    """One trial's instance of a workload."""

    db_url: str
    db_path: str

    def child_args(self) -> list[str]: ...

    def tick(self) -> None:
        """Called every few milliseconds while a child runs."""

    def check(self, snapshots: Snapshot, trial: Trial) -> None:
        """Fill in the workload's own checks; record each violation."""

    def close(self) -> None: ...


class Workload(Protocol):
    name: str
    module: str
    """The child process: ``python -m module``."""
    recovery_event: str
    """The child's event that ends a recovery (its time minus the restart's)."""
    recovery_label: str
    compare: bool
    """Whether final results are checked against an uninterrupted run's."""
    kill_window: float
    """The window kill instants are drawn from; :meth:`prepare` sets it from
    :attr:`Settings.kill_window` or the workload's default."""

    def prepare(self, root: Path, settings: Settings) -> None:
        """Once per campaign, before the first trial."""

    def start(self, directory: Path, rng: random.Random) -> Run: ...


# -- the built-in workload: the demo's support agent ---------------------------------------
class SupportAgent:
    """The demo's support agent, fast: four tickets in flight, delays scaled down."""

    name = "support agent (built-in)"
    module = "crashsafe.demo.agent"
    recovery_event = "first_step"
    recovery_label = "restart to the first step body run by the new process"
    compare = True

    def __init__(self, tickets: int = 4, latency_scale: float = 0.1) -> None:
        self.tickets = tickets
        self.latency_scale = latency_scale
        # The first ~2/3 of an uninterrupted run: nearly every first kill lands mid-work,
        # and later kills reach the later work, which each restart resumes.
        self.kill_window = latency_scale

    def prepare(self, root: Path, settings: Settings) -> None:
        if settings.kill_window is not None:
            self.kill_window = settings.kill_window

    def start(self, directory: Path, rng: random.Random) -> AgentRun:
        return AgentRun(self, directory, rng)


class AgentRun:
    def __init__(self, workload: SupportAgent, directory: Path, rng: random.Random) -> None:
        self.w = workload
        self.db_path = str(directory / "state.db")
        self.db_url = f"sqlite:///{self.db_path}"
        self.ledger = str(directory / "ledger.db")
        self.store = open_store(self.db_url)  # the schema exists before the agent starts
        first = rng.randrange(1000)
        self.tickets = range(first, first + workload.tickets)
        self._rng = random.Random(rng.randrange(2**32))
        # The operator's draws depend on timing, so it gets a generator of its own.
        scale = workload.latency_scale
        self.operator = Operator(self.store, PREFIX, workload.tickets + 10,
                                 random.Random(rng.randrange(2**32)),
                                 think=(0.2 * scale, 0.6 * scale))

    def child_args(self) -> list[str]:
        n = str(self.w.tickets)
        return ["--db", self.db_url, "--ledger", self.ledger, "--run", PREFIX.rstrip("-"),
                "--tickets", n, "--first-ticket", str(self.tickets.start),
                "--concurrency", n, "--fault-rate", str(FAULT_RATE),
                "--latency-scale", str(self.w.latency_scale),
                "--seed", str(self._rng.randrange(10**9))]

    def tick(self) -> None:
        self.operator.answer()

    def check(self, snapshots: Snapshot, trial: Trial) -> None:
        _integrity(self.ledger, "ledger", trial)
        r = verify(self.db_url, self.db_path, self.ledger, PREFIX, self.tickets, snapshots)
        trial.workflows = r["tickets"]
        trial.consistent = r["completed"] - len(r["inconsistent_results"])
        trial.duplicates = r["duplicate_refunds"]
        trial.reruns = r["rerun_after_kill"]
        problems = {
            "refunds applied twice for one order": r["duplicate_refunds"],
            "committed steps run again": r["reexecuted_committed_steps"],
            "results differ from an uninterrupted run": len(r["inconsistent_results"]),
            "tickets not completed": r["tickets"] - r["completed"],
        }
        trial.violations += [f"{what}: {n}" for what, n in problems.items() if n]
        if r["refunds"] != r["expected_refunds"]:
            trial.violations.append(f"refunds at the ledger: {r['refunds']}, "
                                    f"expected {r['expected_refunds']}")

    def close(self) -> None:
        self.store.close()


# -- a user workflow -----------------------------------------------------------------------
def load_workflow(target: str) -> tuple[App, Workflow[Any, Any]]:
    """Import ``MODULE:WORKFLOW`` (MODULE as ``crashsafe worker`` takes it) and return its
    App and the workflow, named by attribute or by its registered name."""
    from .cli.main import load_app

    module_name, sep, name = target.rpartition(":")
    if not sep or not module_name or not name:
        raise ConfigurationError(
            f"name the workflow as MODULE:WORKFLOW (for example shop:process_order), "
            f"got {target!r}")
    app = load_app(module_name)
    key = Path(module_name).stem if module_name.endswith(".py") or "/" in module_name \
        else module_name
    found = getattr(sys.modules.get(key), name, None)
    wf = found if isinstance(found, Workflow) and found.app is app else app._lookup(name)
    if wf is None:
        raise ConfigurationError(
            f"{module_name!r} has no workflow {name!r}; its App registers "
            f"{sorted(app._workflows) or 'none'}")
    return app, wf


def call_args(text: str) -> tuple[list[Any], dict[str, Any]]:
    """``--args``: a JSON list (positional arguments) or object (keyword arguments)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"--args is not valid JSON ({exc}); quote it for your shell, "
                                 """for example '["ORD-1", 20]'""") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    raise ConfigurationError(f"--args must be a JSON list or object, got {text!r}")


Outcome = tuple[str, Any]


def outcome(rec: WorkflowRecord) -> Outcome:
    """A finished workflow's status and result (or error, or reason)."""
    if rec.status is Status.SUCCEEDED:
        return rec.status.value, _codec.decode(rec.output or b"null", f"result of {rec.id!r}")
    if rec.status is Status.FAILED:
        return rec.status.value, describe(rec.error)
    return rec.status.value, rec.reason


class UserWorkflow:
    """``MODULE:WORKFLOW`` run with the same arguments in every trial."""

    module = "crashsafe.chaos"
    recovery_event = "resumed"
    recovery_label = "restart to the killed workflows resumed by the new process"

    def __init__(self, target: str, args: str, workflows: int, compare: bool) -> None:
        self.name = target
        self.args = args
        self.ids = [f"{PREFIX}W{i:03d}" for i in range(workflows)]
        self.compare = compare
        self.kill_window = 0.0
        self.baseline: dict[str, Outcome] = {}

    def prepare(self, root: Path, settings: Settings) -> None:
        took = self.run_uninterrupted(root / "uninterrupted", settings.stuck_after)
        self.kill_window = settings.kill_window if settings.kill_window is not None else took

    def start(self, directory: Path, rng: random.Random) -> UserRun:
        return UserRun(self, directory)

    def run_uninterrupted(self, directory: Path, stuck_after: float) -> float:
        """Run once without a kill, in a fresh database: record each workflow's outcome
        (what the trials must reproduce) and return how long the run took."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        run = self.start(directory, random.Random(0))
        child = spawn(run.child_args(), module=self.module)
        try:
            child.proc.wait(stuck_after)
        except subprocess.TimeoutExpired:
            pass
        child.kill()
        started, done = child.first("started"), child.first("done")
        if child.proc.returncode != 0 or started is None or done is None:
            raise ConfigurationError(
                f"the uninterrupted run of {self.name} did not finish within {stuck_after:g} s "
                f"(exit code {child.proc.returncode}): {child.stderr_tail() or 'no output'}")
        store = open_store(run.db_url)
        try:
            for wid in self.ids:
                rec = store.get_workflow(wid)
                assert rec is not None and rec.status.terminal
                self.baseline[wid] = outcome(rec)
        finally:
            store.close()
        return float(done["t"] - started["t"])


class UserRun:
    def __init__(self, workload: UserWorkflow, directory: Path) -> None:
        self.w = workload
        self.db_path = str(directory / "state.db")
        self.db_url = f"sqlite:///{self.db_path}"
        open_store(self.db_url).close()  # the schema exists before the first snapshot

    def child_args(self) -> list[str]:
        return ["--target", self.w.name, "--db", self.db_url, "--args", self.w.args,
                "--workflows", str(len(self.w.ids))]

    def tick(self) -> None:
        pass

    def check(self, snapshots: Snapshot, trial: Trial) -> None:
        trial.workflows = len(self.w.ids)
        if not self.w.compare:
            return
        store = open_store(self.db_url)
        try:
            records = {wid: store.get_workflow(wid) for wid in self.w.ids}
        finally:
            store.close()
        differ = []
        for wid, rec in records.items():
            if rec is None or not rec.status.terminal:
                continue  # counted as stuck
            if outcome(rec) == self.w.baseline[wid]:
                trial.consistent += 1
            else:
                differ.append(f"{wid} ended {outcome(rec)!r}, uninterrupted "
                              f"{self.w.baseline[wid]!r}")
        if differ:
            trial.violations.append("results differ from an uninterrupted run: "
                                    + "; ".join(differ)[:600])

    def close(self) -> None:
        pass


# -- one trial -----------------------------------------------------------------------------
def _supervise(child: Child, run: Run, kill_at: float | None, give_up: float) -> str:
    """Watch ``child`` until it exits (``exited``), the kill instant comes (``killed``,
    or ``exited`` if it had finished its work by then) or ``give_up`` passes (``stuck``)."""
    next_tick = 0.0
    while True:
        now = time.time()
        if child.proc.poll() is not None:
            child.reap()
            return "exited"
        if kill_at is not None and now >= kill_at and not child.flag("done").is_set():
            child.kill()
            return "killed"
        if now >= give_up:
            child.kill()
            return "stuck"
        if now >= next_tick:
            run.tick()
            next_tick = time.time() + 0.02
        # Short naps: the kill instant is met within a few milliseconds.
        time.sleep(0.005 if kill_at is None else max(0.0, min(kill_at - now, 0.005)))


def _kill_at(child: Child, delay: float, give_up: float) -> float | None:
    """The instant ``delay`` seconds after the child said it started."""
    while not child.flag("started").wait(0.05):
        if child.proc.poll() is not None or time.time() >= give_up:
            return None
    started = child.first("started")
    return float(started["t"]) + delay if started else None


def run_trial(workload: Workload, settings: Settings, number: int, root: Path) -> Trial:
    """Run trial ``number`` of the campaign: kill, restart until done, check."""
    seed = settings.seed + number
    rng = random.Random(seed)
    crash_at = settings.crash_at
    plan: list[float] = (
        [crash_at] * settings.kills_per_trial if crash_at is not None
        else [round(rng.uniform(0.0, workload.kill_window), 4)
              for _ in range(settings.kills_per_trial)])
    directory = root / f"trial-{number:05d}-seed-{seed}"
    shutil.rmtree(directory, ignore_errors=True)  # the same trial, run before in this --dir
    directory.mkdir(parents=True)
    trial = Trial(number, seed, plan, directory)
    run = workload.start(directory, rng)
    snapshots: Snapshot = {}
    restarted: list[Child] = []
    try:
        for k in range(len(plan) + 1):
            last = k == len(plan)
            env = {"CRASHSAFE_CRASH_AT": str(crash_at)} if crash_at and not last else None
            child = spawn(run.child_args(), module=workload.module, env=env)
            if k:
                restarted.append(child)
            give_up = time.time() + settings.stuck_after
            kill_at = None if last or crash_at else _kill_at(child, plan[k], give_up)
            how = _supervise(child, run, kill_at, give_up)
            code = child.proc.returncode
            if how == "exited" and code == -signal.SIGKILL and crash_at and not last:
                how = "killed"  # it reached the crash point
            if how == "killed":
                trial.kills += 1
                snapshots.update(journal_snapshot(run.db_path, PREFIX))
                continue
            if how == "stuck":
                trial.violations.append(f"the child process still ran {settings.stuck_after:g} s "
                                        "after its start; killed")
            elif code != 0 or not child.flag("done").is_set():
                trial.violations.append(f"the child process exited with code {code}: "
                                        f"{child.stderr_tail() or 'no output'}")
            break  # finished (before any planned kill that is left), stuck or crashed
        trial.recovery_s = [r for r in (c.recovery_s(workload.recovery_event, timeout=0)
                                        for c in restarted) if r is not None]
        _check(run, snapshots, trial)
    finally:
        run.close()
    return trial


def _check(run: Run, snapshots: Snapshot, trial: Trial) -> None:
    """The checks every workload gets; then the workload's own."""
    trial.lost = lost_entries(snapshots, journal_snapshot(run.db_path, PREFIX))
    store = open_store(run.db_url)
    try:
        rows = store.list_workflows(ListFilter(id_prefix=PREFIX, limit=100_000))
    finally:
        store.close()
    trial.stuck = sum(1 for r in rows if not r.status.terminal)
    trial.unknown = _unknown_outcomes(run.db_path)
    _integrity(run.db_path, "database", trial)
    if trial.lost:
        trial.violations.append(f"committed journal entries lost or changed: {trial.lost}")
    if trial.stuck:
        trial.violations.append(f"stuck workflows (not finished after the last restart): "
                                f"{trial.stuck}")
    run.check(snapshots, trial)


def _integrity(path: str, what: str, trial: Trial) -> None:
    """``PRAGMA integrity_check`` of a SQLite file the trial left behind."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        result = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()
    if result != "ok":
        trial.corrupt += 1
        trial.violations.append(f"integrity_check of the {what}: {result[:200]}")


def _unknown_outcomes(db_path: str) -> Counter[str]:
    """How each unknown outcome was resolved, from the timeline notes that record it."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        notes = [r[0] for r in conn.execute(
            "SELECT note FROM journal WHERE substr(note, 1, ?) = ? "
            "AND substr(workflow_id, 1, ?) = ?",
            (len(UNKNOWN), UNKNOWN, len(PREFIX), PREFIX))]
    finally:
        conn.close()
    return Counter(note.split(": ", 1)[1] if ": " in note else note for note in notes)


# -- the campaign --------------------------------------------------------------------------
def run_campaign(workload: Workload, settings: Settings, *, as_json: bool,
                 console: Console, progress: Progress = quiet) -> int:
    """Run every trial, print the report; return the exit code (0: no violation).
    ``progress(done, total, note)`` is called after each trial."""
    root = settings.directory or Path(tempfile.mkdtemp(prefix="crashsafe-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    kills = (f"{settings.kills_per_trial} kill -9 per trial at crash point {settings.crash_at}"
             if settings.crash_at is not None else
             f"{settings.kills_per_trial} kill -9 per trial")
    if not as_json:
        console.print(f"crashsafe chaos: {settings.trials} trials of {workload.name}, "
                      f"{kills}, seed {settings.seed}", highlight=False)
    started = time.time()
    workload.prepare(root, settings)
    trials: list[Trial] = []
    progress(0, settings.trials, "trials")
    for number in range(settings.trials):
        trial = run_trial(workload, settings, number, root)
        trials.append(trial)
        if trial.violations and not as_json:
            console.print(
                f"[bold red]trial {number} failed[/] (seed {trial.seed}, kept in "
                f"{trial.directory}): {'; '.join(trial.violations)}", highlight=False)
        if not trial.violations:
            shutil.rmtree(trial.directory, ignore_errors=True)
        failed = sum(1 for t in trials if t.violations)
        progress(len(trials), settings.trials,
                 f"trials (kills {sum(t.kills for t in trials)}, failed {failed})")
    report = summarize(workload, settings, trials, time.time() - started)
    if report["ok"] and settings.directory is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        report["directory"] = str(root)
    if as_json:
        console.print_json(json.dumps(report))
    else:
        print_report(console, report)
    return 0 if report["ok"] else 1


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summarize(workload: Workload, settings: Settings, trials: list[Trial],
              elapsed: float) -> dict[str, Any]:
    """The campaign's report, as ``--json`` prints it."""
    kills = sum(t.kills for t in trials)
    recovery = [r for t in trials for r in t.recovery_s]
    ledger = all(t.duplicates is not None for t in trials)
    reruns = sum(t.reruns or 0 for t in trials)
    unknown: Counter[str] = sum((t.unknown for t in trials), Counter())
    workflows = sum(t.workflows for t in trials)
    consistent = sum(t.consistent for t in trials) if workload.compare else None
    failing = [t for t in trials if t.violations]

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return {
        "ok": not failing,
        "workload": workload.name,
        "seed": settings.seed,
        "trials": len(trials),
        "failed_trials": len(failing),
        "kills_per_trial": settings.kills_per_trial,
        "crash_at": settings.crash_at,
        "kill_window_s": None if settings.crash_at is not None else round(workload.kill_window, 4),
        "kills": kills,
        "kills_planned": sum(len(t.plan) for t in trials),
        "recovery_s": {"measures": workload.recovery_label,
                       "samples": len(recovery), "p50": rounded(_percentile(recovery, 50)),
                       "p95": rounded(_percentile(recovery, 95)),
                       "max": rounded(max(recovery, default=None))},
        "lost_committed_steps": sum(t.lost for t in trials),
        "duplicate_keyed_effects": sum(t.duplicates or 0 for t in trials) if ledger else None,
        "stuck_workflows": sum(t.stuck for t in trials),
        "integrity_check_failures": sum(t.corrupt for t in trials),
        "reexecuted_bodies": reruns if ledger else None,
        "reexecutions_per_killed_step": (round(reruns / kills, 4) if kills else 0.0)
        if ledger else None,
        "outcome_unknown": {"count": sum(unknown.values()), "resolved": dict(unknown)},
        "workflows": workflows,
        "consistent_workflows": consistent,
        "state_consistency_pct": None if consistent is None
        else round(100.0 * consistent / workflows, 2),
        "failing": [{"trial": t.number, "seed": t.seed, "violations": t.violations,
                     "directory": str(t.directory)} for t in failing],
        "elapsed_s": round(elapsed, 1),
        "trial_log": [{"trial": t.number, "seed": t.seed, "plan": t.plan, "kills": t.kills,
                       "ok": not t.violations} for t in trials],
    }


def print_report(console: Console, r: dict[str, Any]) -> None:
    def mark(good: bool) -> str:
        return "[green]ok[/]" if good else "[bold red]FAIL[/]"

    def secs(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f} s"

    table = Table(title="crashsafe chaos report", box=None, header_style="bold",
                  title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("")
    table.add_row("trials (failed)", f"{r['trials']} ({r['failed_trials']})",
                  mark(not r["failed_trials"]))
    table.add_row("kill -9s (landed / planned)", f"{r['kills']} / {r['kills_planned']}", "")
    rec = r["recovery_s"]
    table.add_row(f"recovery p50 / p95 / max ({rec['samples']} samples)",
                  f"{secs(rec['p50'])} / {secs(rec['p95'])} / {secs(rec['max'])}", "")
    table.add_row("committed steps lost", str(r["lost_committed_steps"]),
                  mark(r["lost_committed_steps"] == 0))
    dup = r["duplicate_keyed_effects"]
    table.add_row("duplicate keyed effects at the ledger",
                  "not checked (no ledger)" if dup is None else str(dup),
                  "" if dup is None else mark(dup == 0))
    table.add_row("stuck workflows", str(r["stuck_workflows"]), mark(r["stuck_workflows"] == 0))
    table.add_row("SQLite files failing integrity_check", str(r["integrity_check_failures"]),
                  mark(r["integrity_check_failures"] == 0))
    per_kill = r["reexecutions_per_killed_step"]
    table.add_row("re-executions per kill (bodies a kill hit before their commit)",
                  "not checked (no ledger)" if per_kill is None
                  else f"{per_kill:.2f} ({r['reexecuted_bodies']} bodies)", "")
    unknown = r["outcome_unknown"]
    table.add_row("outcomes unknown after a kill", str(unknown["count"]), "")
    for how, n in sorted(unknown["resolved"].items()):
        table.add_row(f"  resolved: {how}", str(n), "")
    pct = r["state_consistency_pct"]
    if pct is None:
        table.add_row("results equal to an uninterrupted run", "not checked (--no-compare)", "")
    else:
        table.add_row("results equal to an uninterrupted run",
                      f"{r['consistent_workflows']}/{r['workflows']} ({pct:g} %)",
                      mark(r["consistent_workflows"] == r["workflows"]))
    console.print(table)
    for f in r["failing"][:20]:
        console.print(f"[bold red]trial {f['trial']}[/] seed {f['seed']}: "
                      f"{'; '.join(f['violations'])}", highlight=False)
    if len(r["failing"]) > 20:
        console.print(f"... and {len(r['failing']) - 20} more failing trials (see --json)")
    verdict = "[bold green]all invariants hold[/]" if r["ok"] else "[bold red]INVARIANT VIOLATED[/]"
    console.print(f"{verdict} in {r['elapsed_s']:.1f} s (seed {r['seed']}; to replay a trial, "
                  "rerun with its seed and --trials 1)", highlight=False)
    if r.get("directory"):
        console.print(f"trial directories kept in {r['directory']}", highlight=False)


# -- the child process of a campaign on a user workflow ------------------------------------
def worker(argv: list[str] | None = None) -> int:
    """Run (or resume) the trial's workflows to the end, printing JSON events."""
    p = argparse.ArgumentParser(prog="python -m crashsafe.chaos")
    p.add_argument("--target", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--args", default="[]")
    p.add_argument("--workflows", type=int, default=1)
    a = p.parse_args(argv)
    app, wf = load_workflow(a.target)
    app._store = open_store(a.db)  # the trial's database, never the one the App names
    app._owns_store = True
    args, kwargs = call_args(a.args)
    emit("started")
    for handle in app.recover():
        emit("resumed", workflow_id=handle.workflow_id)
    handles = [app.start(wf, *args, workflow_id=f"{PREFIX}W{i:03d}", **kwargs)
               for i in range(a.workflows)]
    for h in handles:
        # A failed workflow is an outcome too: the parent reads it from the store.
        with contextlib.suppress(Exception):
            h.result()
    emit("done")
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker())
