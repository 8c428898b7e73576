"""``crashsafe demo``: run the support agent, SIGKILL it at random moments, restart it,
and check the outcome against the independent ledger.

The pieces ``crashsafe chaos`` reuses live here too: :func:`spawn` (a child process
and its JSON events), :func:`journal_snapshot`, the :class:`Operator` who answers
escalated tickets, and :func:`verify` (the ledger and consistency checks).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .. import _codec
from .._app import App
from .._progress import Progress, quiet
from ..exceptions import CrashsafeError
from ..stores import ListFilter, Status, Store, open_store
from ..stores.sqlite import parse_sqlite_url
from .agent import (
    MAX_LLM_ATTEMPTS,
    make_ticket,
    order_facts,
    person_approves,
    refund_rule,
    true_label,
)
from .agent import expected_result as expected_result

RUN_LIMIT = 110.0  # seconds; the demo promises to finish in under two minutes
AGENT = "crashsafe.demo.agent"


@dataclass
class Child:
    """A child process (the agent, or a ``crashsafe chaos`` worker) and the JSON events
    it printed, one per stdout line, each with its time ``t``."""

    proc: subprocess.Popen[str]
    spawned: float
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    _flags: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _readers: list[threading.Thread] = field(default_factory=list)

    def flag(self, event: str) -> threading.Event:
        """Set once the child has printed ``event``."""
        with self._lock:
            return self._flags.setdefault(event, threading.Event())

    def first(self, event: str) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if e.get("event") == event), None)

    def recovery_s(self, event: str = "first_step", timeout: float = 5.0) -> float | None:
        """Seconds from this child's spawn to its first ``event`` (by default its first
        step body); None if it printed none."""
        self.flag(event).wait(timeout)
        first = self.first(event)
        return float(first["t"]) - self.spawned if first else None

    def kill(self) -> None:
        """SIGKILL the child and wait for it to be gone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        """Wait for the exited child and for its output to be read to the end."""
        self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)

    def stderr_tail(self) -> str:
        return "".join(self.stderr).strip()[-800:]


def spawn(args: list[str], module: str = AGENT, env: dict[str, str] | None = None) -> Child:
    """Run ``python -m module *args`` with extra ``env``; read its events as they come."""
    spawned = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env={**os.environ, **env} if env else None,
    )
    child = Child(proc, spawned)

    def read_events() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a print() of the workload, not an event
                if isinstance(event, dict):
                    child.events.append(event)
                    child.flag(str(event.get("event"))).set()

    def read_stderr() -> None:
        # Drained as it comes, so a chatty child never blocks on a full pipe.
        assert proc.stderr is not None
        with proc.stderr:
            child.stderr.extend(proc.stderr)

    for target in (read_events, read_stderr):
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        child._readers.append(thread)
    return child


Snapshot = dict[tuple[str, int], tuple[Any, ...]]


def journal_snapshot(db_path: str, prefix: str) -> Snapshot:
    """Every committed journal entry of the workflows whose ids start with ``prefix``:
    (workflow id, index) -> (kind, name, output, error)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT workflow_id, idx, kind, name, output, error FROM journal "
            "WHERE substr(workflow_id, 1, ?) = ?",
            (len(prefix), prefix),
        ).fetchall()
    finally:
        conn.close()
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def lost_entries(snapshots: Snapshot, final: Snapshot) -> int:
    """Entries seen committed after some kill that are missing or different at the end."""
    return sum(1 for key, entry in snapshots.items() if final.get(key) != entry)


class Operator:
    """The demo's operator: answers each ticket waiting for approval after a short think,
    approving by :func:`person_approves`."""

    def __init__(self, store: Store, prefix: str, limit: int, rng: random.Random,
                 think: tuple[float, float] = (0.2, 0.6)) -> None:
        self._store = store
        self._app = App(store=store)
        self._prefix = prefix
        self._limit = limit
        self._rng = rng
        self._think = think
        self._first_seen: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        """Workflow id -> when the operator answered it."""

    def answer(self) -> None:
        waiting = self._store.list_workflows(ListFilter(status=Status.WAITING,
                                                        id_prefix=self._prefix,
                                                        limit=self._limit))
        now = time.time()
        for rec in waiting:
            if rec.id in self.answered:
                continue
            seen = self._first_seen.setdefault(rec.id, now + self._rng.uniform(*self._think))
            if now < seen:
                continue
            ticket = make_ticket(int(rec.id.rsplit("-T", 1)[1]))
            order = order_facts(ticket["order_id"])
            amount = refund_rule(order, true_label(ticket["text"]))["amount"]
            try:
                self._app.signal(rec.id, "approval", {"approved": person_approves(amount),
                                                      "by": "demo-operator"})
            except CrashsafeError:
                continue  # it moved on meanwhile (cancelled or finished); nothing to answer
            self.answered[rec.id] = now


def run_demo(url: str, *, tickets: int, kills: int, seed: int | None, concurrency: int,
             fault_rate: float, as_json: bool, console: Console,
             progress: Progress = quiet) -> int:
    """Run the demo; return the process exit code (0 only if every invariant holds).
    ``progress(done, total, note)`` is called with the tickets completed so far."""
    if not url.startswith("sqlite:"):
        console.print(f"[red]error:[/] the demo needs a SQLite file URL, got {url!r}")
        return 2
    if tickets < 1 or kills < 0 or concurrency < 1 or not 0 <= fault_rate < 1:
        console.print("[red]error:[/] need --tickets >= 1, --kills >= 0, --concurrency >= 1 "
                      "and 0 <= --fault-rate < 1")
        return 2
    try:
        db_path, _ = parse_sqlite_url(url)
        store = open_store(url)  # creates and migrates the file before the agent starts
    except CrashsafeError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 10**6)
    rng = random.Random(seed)
    run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{seed}"
    ledger_path = str(Path(db_path).with_name(Path(db_path).stem + "-demo-ledger.db"))
    for suffix in ("", "-wal", "-shm"):
        Path(ledger_path + suffix).unlink(missing_ok=True)
    args = ["--db", url, "--ledger", ledger_path, "--run", run_id, "--tickets", str(tickets),
            "--concurrency", str(concurrency), "--fault-rate", str(fault_rate)]
    thresholds = sorted(
        max(1, min(tickets - 1, int(tickets * ((k + 1) / (kills + 1) + rng.uniform(-0.08, 0.08)))))
        for k in range(kills)
    ) if tickets > 1 else []
    if not as_json:
        console.print(f"crashsafe demo: {tickets} support tickets, {kills} kill -9s, "
                      f"LLM fault rate {fault_rate:.0%}, seed {seed}")
        console.print(f"database {url}   ledger {ledger_path}   run id {run_id}",
                      highlight=False)

    started = time.time()
    kill_log: list[dict[str, Any]] = []
    snapshots: Snapshot = {}
    children: list[Child] = []
    failure: str | None = None
    prefix = f"{run_id}-"
    operator = Operator(store, prefix, tickets + 10, rng)

    def completed() -> int:
        rows = store.list_workflows(ListFilter(status=Status.SUCCEEDED, id_prefix=prefix,
                                               limit=tickets + 10))
        return len(rows)

    best = 0  # completed only grows; a read racing a kill must not show it shrinking

    def report_progress() -> int:
        nonlocal best
        count = completed()
        best = max(best, count)
        progress(best, tickets, f"tickets (kills {len(kill_log)}/{kills})")
        return count

    progress(0, tickets, f"tickets (kills 0/{kills})")
    child = spawn([*args, "--seed", str(rng.randrange(10**9))])
    children.append(child)
    while True:
        time.sleep(0.05)
        operator.answer()
        done_count = report_progress()
        if time.time() - started > RUN_LIMIT:
            failure = f"the run did not finish within {RUN_LIMIT:.0f} s"
            child.kill()
            break
        if child.proc.poll() is not None:
            child.reap()
            if child.flag("done").is_set() and child.proc.returncode == 0:
                break
            failure = (f"the agent process exited with code {child.proc.returncode}: "
                       f"{child.stderr_tail()}")
            break
        if len(kill_log) < len(thresholds) and done_count >= thresholds[len(kill_log)]:
            time.sleep(rng.uniform(0.0, 0.3))  # a random instant, not a step boundary
            child.kill()
            killed_at = time.time()
            snapshots.update(journal_snapshot(db_path, prefix))
            child = spawn([*args, "--seed", str(rng.randrange(10**9))])
            children.append(child)
            kill_log.append({"killed_at": killed_at - started,
                             "completed_before": done_count})
    report_progress()

    for entry, kid in zip(kill_log, children[1:], strict=False):
        entry["recovery_s"] = kid.recovery_s()
    resumed_entries = sum(int(e.get("recorded", 0)) for kid in children for e in kid.events
                          if e.get("event") == "resumed")
    elapsed = time.time() - started
    store.close()
    report = verify(url, db_path, ledger_path, prefix, range(tickets), snapshots)
    report.update(seed=seed, run_id=run_id, kills=len(kill_log), kill_log=kill_log,
                  replayed_entries=resumed_entries, elapsed_s=round(elapsed, 2),
                  database=url, ledger=ledger_path, escalated=len(operator.answered))
    if len(kill_log) < kills and failure is None:
        failure = f"only {len(kill_log)} of {kills} kills happened before the run finished"
    if failure:
        report["failure"] = failure
    ok = failure is None and report["ok"]
    report["ok"] = ok
    if as_json:
        console.print_json(json.dumps(report))
    else:
        _print_report(console, report)
    return 0 if ok else 1


def verify(url: str, db_path: str, ledger_path: str, prefix: str, tickets: range,
           snapshots: Snapshot) -> dict[str, Any]:
    """Check a finished run of the tickets numbered ``tickets`` (workflow ids
    ``{prefix}T{i:03d}``) against the ledger and against an uninterrupted run's results;
    ``snapshots`` holds the journal entries seen committed after each kill."""
    store = open_store(url)
    try:
        rows = store.list_workflows(ListFilter(id_prefix=prefix, limit=len(tickets) + 10))
    finally:
        store.close()
    by_id = {r.id: r for r in rows}
    succeeded = [r for r in rows if r.status is Status.SUCCEEDED]
    final = journal_snapshot(db_path, prefix)
    lost = lost_entries(snapshots, final)
    inconsistent: list[str] = []
    for i in tickets:
        wid = f"{prefix}T{i:03d}"
        rec = by_id.get(wid)
        if rec is None or rec.status is not Status.SUCCEEDED:
            continue
        got = _codec.decode(rec.output or b"null")
        want = expected_result(make_ticket(i))
        if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items()):
            inconsistent.append(wid)
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=30)
    try:
        dup_refunds = conn.execute(
            "SELECT COUNT(*) FROM (SELECT order_id FROM refunds GROUP BY order_id "
            "HAVING COUNT(*) > 1)").fetchone()[0]
        refunds = conn.execute("SELECT COUNT(*) FROM refunds").fetchone()[0]
        calls = conn.execute("SELECT COUNT(*) FROM payment_calls").fetchone()[0]
        executions = conn.execute("SELECT workflow_id, idx, attempt, pid, at FROM executions "
                                  "WHERE substr(workflow_id, 1, ?) = ?",
                                  (len(prefix), prefix)).fetchall()
    finally:
        conn.close()
    runs: dict[tuple[str, int], set[int]] = defaultdict(set)
    for wid, idx, _attempt, pid, _at in executions:
        runs[(wid, idx)].add(pid)
    rerun_after_kill = sum(len(pids) - 1 for pids in runs.values())
    committed_at = _commit_times(db_path, prefix)
    after_commit = sum(1 for wid, idx, _a, _p, at in executions
                       if (wid, idx) in committed_at and at > committed_at[(wid, idx)])
    expected_refunds = sum(1 for i in tickets if expected_result(make_ticket(i))["refunded"] > 0)
    most_attempts = max((a for _w, _i, a, _p, _t in executions if a is not None), default=0)
    retried = _retried_by_class(db_path, prefix)
    ok = (len(succeeded) == len(tickets) and lost == 0 and dup_refunds == 0
          and not inconsistent and after_commit == 0 and refunds == expected_refunds
          and most_attempts <= MAX_LLM_ATTEMPTS)
    return {
        "ok": ok, "tickets": len(tickets), "completed": len(succeeded),
        "lost_committed_steps": lost, "duplicate_refunds": dup_refunds,
        "refunds": refunds, "expected_refunds": expected_refunds, "payment_calls": calls,
        "deduplicated_payment_calls": calls - refunds,
        "step_bodies_run": len(executions), "journal_steps": len(
            [k for k in final if k in runs]),
        "rerun_after_kill": rerun_after_kill, "reexecuted_committed_steps": after_commit,
        "inconsistent_results": inconsistent,
        "most_attempts": most_attempts, "retried_by_class": retried,
    }


def _retried_by_class(db_path: str, prefix: str) -> dict[str, int]:
    """Failed attempts that were retried, by failure class, from the attempts table."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT failure_class, COUNT(*) FROM attempts WHERE substr(workflow_id, 1, ?) = ? "
            "AND next_at IS NOT NULL GROUP BY failure_class ORDER BY failure_class",
            (len(prefix), prefix)).fetchall()
    finally:
        conn.close()
    return {str(cls): int(n) for cls, n in rows}


def _commit_times(db_path: str, prefix: str) -> dict[tuple[str, int], float]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT workflow_id, idx, ended_at FROM journal WHERE kind = 'step' "
            "AND substr(workflow_id, 1, ?) = ?", (len(prefix), prefix)).fetchall()
    finally:
        conn.close()
    return {(r[0], r[1]): r[2] for r in rows}


def _print_report(console: Console, r: dict[str, Any]) -> None:
    def mark(good: bool) -> str:
        return "[green]ok[/]" if good else "[bold red]FAIL[/]"

    table = Table(title="crashsafe demo report", box=None, header_style="bold",
                  title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("")
    table.add_row("tickets completed", f"{r['completed']}/{r['tickets']}",
                  mark(r["completed"] == r["tickets"]))
    table.add_row("kill -9s", str(r["kills"]), "")
    for i, k in enumerate(r["kill_log"], 1):
        rec = k.get("recovery_s")
        text = f"{rec:.2f} s" if rec is not None else "n/a"
        table.add_row(f"  kill {i} at {k['killed_at']:.1f} s: restart to first resumed step",
                      text, mark(rec is not None and rec < 1.0))
    table.add_row("large refunds escalated to a person (answered by signal)",
                  str(r["escalated"]), "")
    table.add_row("step bodies run (ledger)", str(r["step_bodies_run"]), "")
    table.add_row("journal entries replayed instead of re-run", str(r["replayed_entries"]), "")
    table.add_row("steps re-run because a kill hit before their commit",
                  str(r["rerun_after_kill"]), "")
    table.add_row("committed steps run again", str(r["reexecuted_committed_steps"]),
                  mark(r["reexecuted_committed_steps"] == 0))
    table.add_row("committed steps lost", str(r["lost_committed_steps"]),
                  mark(r["lost_committed_steps"] == 0))
    table.add_row("refunds at the ledger", f"{r['refunds']} (expected {r['expected_refunds']})",
                  mark(r["refunds"] == r["expected_refunds"]))
    table.add_row("duplicate refunds at the ledger", str(r["duplicate_refunds"]),
                  mark(r["duplicate_refunds"] == 0))
    table.add_row("payment calls answered from the idempotency key",
                  str(r["deduplicated_payment_calls"]), "")
    retried = r.get("retried_by_class", {})
    table.add_row("LLM failures retried (journaled attempts, by class)",
                  f"{sum(retried.values())} ("
                  + (", ".join(f"{k} {v}" for k, v in retried.items()) or "none") + ")", "")
    table.add_row(f"most attempts of one step, kills included (limit {MAX_LLM_ATTEMPTS})",
                  str(r.get("most_attempts", 0)),
                  mark(r.get("most_attempts", 0) <= MAX_LLM_ATTEMPTS))
    table.add_row("results equal to an uninterrupted run",
                  f"{r['completed'] - len(r['inconsistent_results'])}/{r['completed']}",
                  mark(not r["inconsistent_results"]))
    console.print(table)
    if r.get("failure"):
        console.print(f"[bold red]failure:[/] {r['failure']}")
    verdict = "[bold green]all invariants hold[/]" if r["ok"] else "[bold red]INVARIANT VIOLATED[/]"
    console.print(f"{verdict} in {r['elapsed_s']:.1f} s (seed {r['seed']}). Inspect with "
                  f"`crashsafe ls` and `crashsafe show {r['run_id']}-T000`.", highlight=False)
