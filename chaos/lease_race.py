"""The lease race (RELIABILITY.md R6): N workers race for W queued workflows while
some are SIGKILLed (and replaced) and some are SIGSTOPped past their lease.

``python chaos/lease_race.py --workers 4 --workflows 10000 --steps 5 --lease 2 --seed 7``

What it does:

1. Makes a fresh database (default: a new schema on ``$CRASHSAFE_TEST_POSTGRES`` or
   ``postgresql://postgres@127.0.0.1:5432/test``; ``--db sqlite:///file.db`` for
   SQLite), an independent ledger beside it (a schema of its own, or a separate WAL
   file) and the audit triggers (see ``race_ledger.py``).
2. Enqueues W workflows of S steps on the queue ``race`` (half sync, half async).
3. Starts N ``race_worker.py`` processes serving the queue with a short lease.
4. Until every workflow has ended (or ``--deadline``): at random instants drawn from
   the seed (Poisson, ``--kill-rate`` and ``--stop-rate`` per second across the
   fleet) SIGKILLs a worker and starts a replacement, or SIGSTOPs one for 1.5 to 2.5
   leases and then SIGCONTs it, so it wakes up holding leases that were taken over.
5. Lets the last paused workers wake, stops everyone with SIGTERM, and checks:

   a. every workflow succeeded, its end recorded once, its result the expected one;
   b. no journal entry was changed, deleted or written twice, and each holds the
      expected value;
   c. no stale-token write was accepted: every journal row (and every workflow's end)
      was written by the run whose token was the workflow's token at that instant,
      as the database saw it inside the writing transaction; each token was granted
      once, to one holder; no committed step was run again by its current holder;
   d. nothing was held by a killed or paused worker longer than lease + sweep
      interval + ``--slack`` before another worker took it over (or, when no worker
      was up at that moment, that long after one came up); each violation says
      whether a paused worker was holding database locks meanwhile (sampled before
      its SIGCONT: an open PostgreSQL transaction, SQLite's write lock);
   e. duplicate step bodies (allowed: bodies are at-least-once) are counted, and the
      keyed effects at the ledger are exactly one per step (duplicates: 0).

Besides the checks it reports what the race cost: duplicate bodies, stale writes
refused, takeovers of workers that were neither killed nor paused (their heartbeat
was late; the workers log heartbeat gaps and slow store calls to the ledger, so the
table says why), and how long killed or paused workers' workflows waited.

It prints a table with the seed and exits 1 on any violation. Replay with the same
arguments and ``--seed``: the kill and stop instants and victims repeat (the
interleavings inside the workers do not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from race_ledger import Audit, Ledger, Location, quote_ident
from race_worker import QUEUE, build, expected_values, workflow_id
from rich.console import Console
from rich.table import Table

import crashsafe
from crashsafe.stores import ListFilter, Status

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "race_worker.py")
DEFAULT_POSTGRES = os.environ.get("CRASHSAFE_TEST_POSTGRES",
                                  "postgresql://postgres@127.0.0.1:5432/test")
TERMINAL = ("succeeded", "failed", "cancelled", "dead_letter")
ACTIVE = ("running", "waiting", "cancelling")


@dataclass
class Config:
    db: str | None = None
    """crashsafe URL of a fresh database; None: a new schema on DEFAULT_POSTGRES."""
    workers: int = 4
    workflows: int = 10_000
    steps: int = 5
    lease: float = 2.0
    heartbeat: float | None = None
    """Heartbeat interval (default lease / 8)."""
    sweep: float = 0.5
    """The workers' recovery_interval: how often each looks for dead workers' work."""
    seed: int | None = None
    kill_rate: float = 0.2
    """SIGKILLs per second across the fleet."""
    stop_rate: float = 0.1
    """SIGSTOPs per second across the fleet."""
    stop_for: tuple[float, float] = (1.5, 2.5)
    """A pause lasts this many leases (drawn uniformly)."""
    max_stopped: int | None = None
    """Workers paused at once at most (default: a quarter of the fleet, at least 1)."""
    kill_paused: bool = True
    """Kills may hit a paused worker (it then never wakes up)."""
    plan: list[tuple[float, str]] | None = None
    """Instead of rates: (seconds after the workers started, "kill" | "stop")."""
    concurrency: int = 8
    step_ms: float = 2.0
    slack: float = 1.0
    deadline: float = 600.0
    same_host: bool = False
    pool_max: int | None = None
    idle_tx_timeout: float | None = None
    """PostgreSQL: end a worker's transaction left idle this long (the server's
    ``idle_in_transaction_session_timeout``, through PGOPTIONS) - a paused worker then
    cannot hold row locks longer than that."""
    keep: bool = False
    directory: Path | None = None


@dataclass
class Worker:
    number: int
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    executor: str | None = None
    stopped_at: float | None = None
    cont_at: float | None = None
    killed: bool = False
    cont_due: float = 0.0


@dataclass
class Event:
    kind: str
    worker: int
    pid: int
    at: float
    until: float | None = None  # for a stop: when it was continued
    holds: str = ""
    """For a stop, seen just before the SIGCONT: what the paused worker held in the
    database ("open transaction, N waiting on its locks", "the SQLite write lock")."""


@dataclass
class Result:
    seed: int
    config: dict[str, Any]
    ok: bool = True
    violations: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, bool | None]] = field(default_factory=list)

    def row(self, name: str, value: Any, ok: bool | None = None, detail: str = "") -> None:
        self.rows.append((name, str(value), ok))
        if ok is False:
            self.ok = False
            self.violations.append(f"{name}: {value}{' - ' + detail if detail else ''}")


# -- setting up --------------------------------------------------------------------------
def _with_options(url: str, **opts: Any) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({k: str(v) for k, v in opts.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))


def prepare(cfg: Config, workdir: Path) -> tuple[Location, Location, bool]:
    """The database and ledger locations; True if we created the database (and drop it)."""
    created = cfg.db is None
    if cfg.db is None:
        schema = f"race_{uuid.uuid4().hex[:10]}"
        url = _with_options(DEFAULT_POSTGRES, schema=schema, application_name=schema)
    else:
        url = cfg.db
    db = Location.parse(url)
    if db.kind == "postgres":
        ledger_schema = f"{db.schema}_ledger"
        ledger = Location.parse(_with_options(url, schema=ledger_schema))
    else:
        assert db.path is not None
        ledger = Location.parse(f"sqlite:///{db.path}.ledger.db")
    return db, ledger, created


def drop(db: Location, ledger: Location) -> None:
    if db.kind != "postgres":
        return
    conn = Location.parse(_with_options(db.url, application_name="race_cleanup")).connect()
    try:
        for schema in (db.schema, ledger.schema):
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE (application_name = %s OR application_name LIKE %s) "
                         "AND pid != pg_backend_pid()", (schema, f"{schema}-w%"))
            conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema or '')} CASCADE")
    finally:
        conn.close()


def _table(db: Location, name: str) -> str:
    return f"{quote_ident(db.schema or '')}.{name}" if db.kind == "postgres" else name


def status_counts(conn: Any, db: Location) -> Counter[str]:
    rows = conn.execute(f"SELECT status, count(*) FROM {_table(db, 'workflows')} "  # noqa: S608
                        "GROUP BY status").fetchall()
    return Counter({str(s): int(c) for s, c in rows})


def enqueue(cfg: Config, db: Location) -> float:
    app = crashsafe.App(db.url)
    race_sync, race_async = build(app, None)
    q = app.queue(QUEUE)
    t0 = time.monotonic()

    def put(n: int) -> None:
        q.enqueue(race_sync if n % 2 == 0 else race_async, n, cfg.steps,
                  workflow_id=workflow_id(n))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(cfg.workflows)))
    elapsed = time.monotonic() - t0
    app.close()
    return elapsed


# -- the race ------------------------------------------------------------------------------
class Fleet:
    def __init__(self, cfg: Config, db: Location, ledger: Location, workdir: Path,
                 console: Console) -> None:
        self.cfg, self.workdir, self.console = cfg, workdir, console
        n = cfg.workers
        pool_max = cfg.pool_max or max(2, min(8, 48 // n))
        self.db = db
        self.app_name = dict(parse_qsl(urlsplit(db.url).query)).get("application_name") \
            or "lease_race"
        self.db_url = _with_options(db.url, pool_max=pool_max) if db.kind == "postgres" \
            else db.url
        self.ledger_url = ledger.url
        self.workers: list[Worker] = []
        self.retired: list[Worker] = []
        self.events: list[Event] = []
        self.crashed: list[str] = []
        self.spawned = 0

    def spawn(self) -> Worker:
        k = self.spawned
        self.spawned += 1
        out, err = self.workdir / f"worker-{k:03d}.out", self.workdir / f"worker-{k:03d}.err"
        cfg = self.cfg
        db_url = self.db_url
        if self.db.kind == "postgres":  # its sessions can be told apart in pg_stat_activity
            db_url = _with_options(db_url, application_name=f"{self.app_name}-w{k:03d}")
        args = [sys.executable, WORKER, "--db", db_url, "--ledger", self.ledger_url,
                "--lease", str(cfg.lease), "--heartbeat", str(cfg.heartbeat or cfg.lease / 8),
                "--sweep", str(cfg.sweep), "--concurrency", str(cfg.concurrency),
                "--step-ms", str(cfg.step_ms)]
        if cfg.same_host:
            args.append("--same-host")
        env = dict(os.environ)
        if cfg.idle_tx_timeout is not None and self.db.kind == "postgres":
            args[args.index("--db") + 1] = _with_options(
                args[args.index("--db") + 1], idle_tx_timeout=str(cfg.idle_tx_timeout))
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(args, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                    env=env)
        w = Worker(k, proc, out, err)
        self.workers.append(w)
        self.events.append(Event("spawn", k, proc.pid, time.time()))
        return w

    def ready(self, w: Worker) -> bool:
        if w.executor is None:
            for line in w.out.read_text(errors="replace").splitlines():
                if line.startswith("ready "):
                    w.executor = line.split()[1]
        return w.executor is not None

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.ready(w) for w in self.workers):
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.number} exited at start: "
                                       f"{w.err.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not get ready in time")
            time.sleep(0.05)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def kill(self, w: Worker) -> None:
        holds = self.held_by(w) if w.stopped_at is not None else ""
        now = time.time()
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        w.killed = True
        self.events.append(Event("kill", w.number, w.proc.pid, now))
        if w.stopped_at is not None:
            stop = self._close_stop(w, now)  # it never wakes
            if stop is not None:
                stop.holds = holds
        self.workers.remove(w)
        self.retired.append(w)
        self.spawn()

    def stop(self, w: Worker, seconds: float) -> None:
        now = time.time()
        w.proc.send_signal(signal.SIGSTOP)
        w.stopped_at, w.cont_at = now, None
        self.events.append(Event("stop", w.number, w.proc.pid, now, None))
        w.cont_due = time.monotonic() + seconds

    def cont(self, w: Worker) -> None:
        holds = self.held_by(w)
        now = time.time()
        w.proc.send_signal(signal.SIGCONT)
        stop = self._close_stop(w, now)
        if stop is not None:
            stop.holds = holds
        self.events.append(Event("cont", w.number, w.proc.pid, now))

    def held_by(self, w: Worker) -> str:
        """What the paused worker ``w`` holds in the database right now."""
        try:
            if self.db.kind == "postgres":
                return self._pg_held_by(w)
            return self._sqlite_held_by()
        except Exception as exc:  # a diagnostic only
            return f"unknown ({exc})"

    def _pg_held_by(self, w: Worker) -> str:
        conn = self.db.connect()
        try:
            me = f"{self.app_name}-w{w.number:03d}"
            # An open transaction waiting for its client: "idle in transaction", or
            # "active" reading from the client in the middle of a pipeline (psycopg's
            # executemany), which idle_in_transaction_session_timeout does not cover.
            rows = conn.execute(
                "SELECT pid, state, wait_event, left(query, 70) FROM pg_stat_activity "
                "WHERE application_name = %s AND xact_start IS NOT NULL", (me,)).fetchall()
            open_tx = [(pid, query) for pid, state, wait, query in rows if state and (
                "in transaction" in state or (state == "active" and wait == "ClientRead"))]
            if not open_tx:
                return ""
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
                "AND pg_blocking_pids(pid) && %s::int[]",
                (f"{self.app_name}-w%", [pid for pid, _ in open_tx])).fetchone()[0]
            last = "; ".join(" ".join((q or "").split()) for _, q in open_tx)
            return f"open transaction ({waiting} sessions waiting on its locks; last: {last})"
        finally:
            conn.close()

    def _sqlite_held_by(self) -> str:
        assert self.db.path is not None
        conn = sqlite3.connect(str(self.db.path), timeout=0.05, isolation_level=None)
        try:
            for _ in range(6):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError:
                    continue
                conn.execute("ROLLBACK")
                return ""
            return "the SQLite write lock"
        finally:
            conn.close()

    def _close_stop(self, w: Worker, now: float) -> Event | None:
        w.cont_at = now
        w.stopped_at = None
        for ev in reversed(self.events):
            if ev.kind == "stop" and ev.worker == w.number and ev.until is None:
                ev.until = now
                return ev
        return None

    def stopped(self) -> list[Worker]:
        return [w for w in self.workers if w.stopped_at is not None]

    def check_crashes(self) -> None:
        for w in list(self.workers):
            code = w.proc.poll()
            if code is not None and not w.killed:
                tail = w.err.read_text(errors="replace")[-1500:]
                self.crashed.append(f"worker {w.number} (pid {w.proc.pid}) exited with "
                                    f"{code}: {tail}")
                self.events.append(Event("crash", w.number, w.proc.pid, time.time()))
                self.workers.remove(w)
                self.retired.append(w)
                self.spawn()

    def shutdown(self) -> None:
        for w in self.stopped():
            self.cont(w)
        for w in self.live():
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
            self.events.append(Event("term", w.number, w.proc.pid, time.time()))
        deadline = time.monotonic() + 20
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                self.crashed.append(f"worker {w.number} did not stop within 20 s of SIGTERM")

    def kill_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
                w.proc.kill()
                w.proc.wait()


def race(cfg: Config, seed: int, db: Location, fleet: Fleet, console: Console,
         quiet: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    watch = db.connect()
    fleet.events.append(Event("start", -1, os.getpid(), time.time()))
    for _ in range(cfg.workers):
        fleet.spawn()
    fleet.wait_ready()
    t0 = time.monotonic()
    max_stopped = cfg.max_stopped or max(1, cfg.workers // 4)
    plan = sorted(cfg.plan or [])
    next_kill = t0 + rng.expovariate(cfg.kill_rate) if cfg.kill_rate > 0 and not plan \
        else float("inf")
    next_stop = t0 + rng.expovariate(cfg.stop_rate) if cfg.stop_rate > 0 and not plan \
        else float("inf")
    next_poll = next_print = t0
    done_at: float | None = None
    counts: Counter[str] = Counter()
    kills = stops = 0
    while True:
        now = time.monotonic()
        fleet.check_crashes()
        for w in fleet.stopped():
            if now >= w.cont_due:
                fleet.cont(w)
        if now >= next_poll:
            counts = status_counts(watch, db)
            ended = sum(counts[s] for s in TERMINAL)
            if not quiet and (now >= next_print or ended >= cfg.workflows):
                next_print = now + 5.0
                console.print(f"  {now - t0:6.1f} s  ended {ended:>6}/{cfg.workflows}  "
                              f"running {counts['running']:>4}  kills {kills:>3}  "
                              f"stops {stops:>3}  paused now {len(fleet.stopped())}",
                              highlight=False)
            if ended >= cfg.workflows:
                done_at = now
                break
            if now - t0 > cfg.deadline:
                break
            next_poll = now + 0.5
        action: str | None = None
        while plan and now - t0 >= plan[0][0]:
            action = plan.pop(0)[1]
            _act(action, fleet, rng, cfg, max_stopped)
            kills += action == "kill"
            stops += action == "stop"
        if now >= next_kill:
            _act("kill", fleet, rng, cfg, max_stopped)
            kills += 1
            next_kill = now + rng.expovariate(cfg.kill_rate)
        if now >= next_stop:
            if _act("stop", fleet, rng, cfg, max_stopped):
                stops += 1
            next_stop = now + rng.expovariate(cfg.stop_rate)
        time.sleep(0.02)
    elapsed = (done_at or time.monotonic()) - t0
    # Wake the paused: they try their stale writes now, and must be refused.
    for w in fleet.stopped():
        fleet.cont(w)
    time.sleep(max(1.0, cfg.sweep * 2))
    fleet.shutdown()
    watch.close()
    return {"race_s": round(elapsed, 1), "finished": done_at is not None,
            "final_counts": dict(counts)}


def _act(action: str, fleet: Fleet, rng: random.Random, cfg: Config, max_stopped: int) -> bool:
    if action == "kill":
        candidates = [w for w in fleet.live() if cfg.kill_paused or w.stopped_at is None]
        if not candidates:
            return False
        fleet.kill(rng.choice(candidates))
        return True
    candidates = [w for w in fleet.live() if w.stopped_at is None]
    if len(fleet.stopped()) >= max_stopped or len(candidates) < 2:
        return False  # keep at least one worker running
    fleet.stop(rng.choice(candidates), rng.uniform(*cfg.stop_for) * cfg.lease)
    return True


# -- checking --------------------------------------------------------------------------------
def check(cfg: Config, seed: int, db: Location, ledger_loc: Location, fleet: Fleet,
          figures: dict[str, Any]) -> Result:
    res = Result(seed, {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in asdict(cfg).items()})
    res.figures.update(figures)
    w_count, steps = cfg.workflows, cfg.steps
    expected = {workflow_id(n): expected_values(n, steps) for n in range(w_count)}
    audit = Audit(db, ledger_loc)
    ledger = Ledger(ledger_loc.url)
    try:
        _check(cfg, res, db, audit, ledger, fleet, expected, steps)
    finally:
        ledger.close()
    return res


def _check(cfg: Config, res: Result, db: Location, audit: Audit, ledger: Ledger,
           fleet: Fleet, expected: dict[str, list[int]], steps: int) -> None:
    bound = cfg.lease + cfg.sweep + cfg.slack
    app = crashsafe.App(db.url)
    store = app.store
    try:
        records = {r.id: r for r in store.list_workflows(ListFilter(limit=len(expected) + 10))}
        journals = {wid: store.load_journal(wid) for wid in expected}
    finally:
        app.close()
    conn = db.connect()
    try:
        executors = conn.execute(
            f"SELECT id, pid, started_at FROM {_table(db, 'executors')}"  # noqa: S608
        ).fetchall()
    finally:
        conn.close()
    wf_audit = audit.query("SELECT workflow_id, op, old_status, new_status, old_owner, "
                           "new_owner, old_token, new_token, output_set, at FROM {workflows} "
                           "ORDER BY seq")
    j_audit = audit.query("SELECT workflow_id, idx, op, db_token, db_owner, at FROM {journal} "
                          "ORDER BY seq")
    bodies = ledger.query("SELECT workflow_id, idx, executor, token, run, at FROM bodies")
    effects = ledger.query("SELECT key, workflow_id, idx, value FROM effects")
    repeats = ledger.query("SELECT count(*) FROM effect_repeats")[0][0]
    runs = ledger.query("SELECT workflow_id, executor, token, at FROM runs")
    outcomes = ledger.query("SELECT workflow_id, executor, token, kind, error_type, "
                            "stale_token, message, at FROM outcomes")
    stalls = ledger.query("SELECT executor, what, seconds, at FROM stalls")
    for ev in fleet.events:
        ledger.event(ev.kind, ev.worker, ev.pid, ev.at, "" if ev.until is None
                     else f"until {ev.until:.3f}")

    # (a) every workflow succeeded, once, with the expected result ----------------------
    statuses = Counter(r.status.value for r in records.values() if r.id in expected)
    missing = [wid for wid in expected if wid not in records]
    not_ok = [wid for wid, r in records.items() if wid in expected
              and r.status is not Status.SUCCEEDED]
    res.row("workflows succeeded", f"{statuses['succeeded']}/{len(expected)}",
            statuses["succeeded"] == len(expected),
            f"statuses {dict(statuses)}, missing {missing[:5]}, e.g. {not_ok[:5]}")
    wrong = []
    finish_by: dict[str, tuple[str, int]] = {}
    for wid, r in records.items():
        if wid not in expected or r.status is not Status.SUCCEEDED:
            continue
        out = json.loads(r.output or b"null")
        finish_by[wid] = (out.get("ex"), out.get("tok"))
        if out.get("v") != expected[wid][-1]:
            wrong.append(wid)
    res.row("results equal to the expected value", f"{len(finish_by) - len(wrong)}"
            f"/{len(finish_by)}", not wrong, f"e.g. {wrong[:5]}")
    ends: Counter[str] = Counter()
    outputs: Counter[str] = Counter()
    left_terminal: list[str] = []
    grants: dict[str, list[tuple[float, str | None, int]]] = defaultdict(list)
    bad_grants: list[str] = []
    end_rows: dict[str, tuple[str | None, int | None]] = {}
    for wid, op, old_s, new_s, _old_o, new_o, old_t, new_t, out_set, at in wf_audit:
        if op != "update":
            continue
        if new_s in TERMINAL and old_s not in TERMINAL:
            ends[wid] += 1
            end_rows[wid] = (new_o, new_t)
        if old_s in TERMINAL:
            left_terminal.append(wid)
        if out_set:
            outputs[wid] += 1
        if new_t != old_t:
            grants[wid].append((at, new_o, new_t))
            if new_t != old_t + 1 or new_o is None:
                bad_grants.append(f"{wid}: token {old_t}->{new_t} to {new_o}")
    double = [wid for wid, c in ends.items() if c > 1]
    res.row("ends recorded more than once (double completion)", len(double), not double,
            f"e.g. {double[:5]}")
    twice = [wid for wid, c in outputs.items() if c > 1]
    res.row("results written more than once", len(twice), not twice, f"e.g. {twice[:5]}")
    res.row("workflows changed after they ended", len(set(left_terminal)), not left_terminal,
            f"e.g. {left_terminal[:5]}")

    # (b) the journal: never changed, never written twice, the expected values -------
    changed = [(w, i, op) for w, i, op, *_ in j_audit if op != "insert"]
    res.row("journal rows updated or deleted", len(changed), not changed, f"e.g. {changed[:5]}")
    inserts: dict[tuple[str, int], list[tuple[int | None, str | None, float]]] = \
        defaultdict(list)
    for w, i, op, tok, owner, at in j_audit:
        if op == "insert":
            inserts[(w, i)].append((tok, owner, at))
    dup_rows = [k for k, v in inserts.items() if len(v) > 1]
    res.row("journal rows inserted twice", len(dup_rows), not dup_rows, f"e.g. {dup_rows[:5]}")
    bad_journal: list[str] = []
    writers: dict[tuple[str, int], dict[str, Any]] = {}
    for wid, entries in journals.items():
        if records.get(wid) is None or records[wid].status is not Status.SUCCEEDED:
            continue
        idxs = [e.index for e in entries]
        if idxs != list(range(steps)):
            bad_journal.append(f"{wid}: indices {idxs}")
            continue
        for e in entries:
            out = json.loads(e.output or b"null")
            if e.kind != "step" or e.error is not None or out.get("v") != expected[wid][e.index]:
                bad_journal.append(f"{wid}[{e.index}]: {e.kind} {e.name} {out}")
            writers[(wid, e.index)] = out
    res.row("journal entries wrong or missing (workflows that succeeded)", len(bad_journal),
            not bad_journal, f"e.g. {bad_journal[:3]}")

    # (c) fencing: each accepted write came from the token holder of that instant -------
    stale_accepted: list[str] = []
    for key, out in writers.items():
        rows = inserts.get(key)
        if not rows:
            stale_accepted.append(f"{key}: no audit row for the insert")
            continue
        db_tok, db_owner, _ = rows[0]
        if out.get("tok") != db_tok or out.get("ex") != db_owner:
            stale_accepted.append(f"{key}: written by {out.get('ex')} with token "
                                  f"{out.get('tok')}; the workflow's token was {db_tok} "
                                  f"({db_owner})")
    for wid, (ex, tok) in finish_by.items():
        row = end_rows.get(wid)
        if row is None or row != (ex, tok):
            stale_accepted.append(f"{wid} end: by {ex} with token {tok}; the workflow was "
                                  f"{row}")
    res.row("stale-token writes accepted (journal rows and ends)", len(stale_accepted),
            not stale_accepted, f"e.g. {stale_accepted[:3]}")
    res.row("token grants not +1 or without a holder", len(bad_grants), not bad_grants,
            f"e.g. {bad_grants[:3]}")
    holders: dict[tuple[str, int | None], set[str]] = defaultdict(set)
    for wid, ex, tok, _ in runs:
        holders[(wid, tok)].add(ex)
    for wid, _i, ex, tok, _run, _at in bodies:
        holders[(wid, tok)].add(ex)
    shared = [f"{k}: {sorted(v)}" for k, v in holders.items() if len(v) > 1]
    res.row("tokens held by two workers at once", len(shared), not shared, f"e.g. {shared[:3]}")
    refused = [o for o in outcomes if o[4] == "WorkflowNotRunning"]
    res.figures["stale_writes_refused"] = len(refused)
    commit_at = {k: v[0][2] for k, v in inserts.items()}
    rerun_by_holder: list[str] = []
    rerun_stale = 0
    for wid, i, ex, tok, run, at in bodies:
        done = commit_at.get((wid, i))
        w = writers.get((wid, i))
        if done is None or w is None or at <= done or run == w.get("run"):
            continue  # ran before the commit, or is the very run whose result was kept
        if tok == w.get("tok") and run != w.get("run"):
            rerun_by_holder.append(f"{wid}[{i}] by {ex} token {tok}")
        else:
            rerun_stale += 1
    res.row("committed steps run again by their current holder", len(rerun_by_holder),
            not rerun_by_holder, f"e.g. {rerun_by_holder[:3]}")
    res.figures["bodies_after_commit_by_stale_holders"] = rerun_stale
    no_witness = _no_witness(writers, bodies)
    res.row("journal results without a body execution at the ledger", len(no_witness),
            not no_witness, f"e.g. {no_witness[:3]}")

    # (d) nothing held by a dead or paused worker longer than lease + sweep ------------
    stuck = _stuck(cfg, fleet, executors, wf_audit, stalls, res, bound)
    behind = res.figures["held_too_long_behind_a_paused_lock_holder"]
    res.figures["held_too_long"] = len(stuck)
    res.row(f"held by a killed/paused worker > {bound:g} s (lease + sweep + slack)",
            f"{len(stuck)} ({behind} behind a paused lock holder)" if stuck else 0,
            not stuck, f"e.g. {stuck[:3]}")
    unended = [wid for wid in expected if records.get(wid) is not None
               and records[wid].status.value in (*ACTIVE, "enqueued")]
    res.row("workflows not ended at the end", len(unended), not unended, f"e.g. {unended[:5]}")

    # (e) duplicate bodies (allowed) and duplicate effects (never) ----------------------
    per_step = Counter((w, i) for w, i, *_ in bodies)
    dup_bodies = sum(c - 1 for c in per_step.values())
    res.figures["body_executions"] = len(bodies)
    res.figures["duplicate_body_executions"] = dup_bodies
    eff = Counter((w, i) for _k, w, i, _v in effects)
    bad_eff = [f"{k} {w}[{i}]={v}" for k, w, i, v in effects
               if k != f"{w}:{i}" or w not in expected or v != expected[w][i]]
    dup_eff = sum(c - 1 for c in eff.values() if c > 1)
    missing_eff = sum(1 for wid in expected for i in range(steps) if eff[(wid, i)] == 0)
    res.row("duplicate keyed effects at the ledger", dup_eff, dup_eff == 0)
    res.row("effects missing or with a wrong key/value", missing_eff + len(bad_eff),
            missing_eff + len(bad_eff) == 0, f"e.g. {bad_eff[:3]}")
    res.figures["effect_repeats_refused_by_key"] = repeats
    res.figures["outcomes"] = dict(Counter(f"{o[3]}:{o[4]}" for o in outcomes))
    if fleet.crashed:
        res.row("workers that crashed by themselves", len(fleet.crashed), False,
                fleet.crashed[0][:500])


def _no_witness(writers: dict[tuple[str, int], dict[str, Any]],
                bodies: list[tuple[Any, ...]]) -> list[str]:
    seen: dict[tuple[str, int], set[str]] = defaultdict(set)
    for wid, i, _e, _t, run, _a in bodies:
        seen[(wid, i)].add(run)
    return [f"{k}" for k, w in writers.items() if w.get("run") not in seen[k]]


def _availability(fleet: Fleet, registered: dict[int, float]) -> list[tuple[float, float]]:
    """(from, to) intervals during which some worker was up: registered in the store
    (it recovers orphans at once), and neither paused nor killed."""
    out: list[tuple[float, float]] = []
    by_worker: dict[int, list[Event]] = defaultdict(list)
    for ev in fleet.events:
        if ev.worker >= 0:
            by_worker[ev.worker].append(ev)
    for evs in by_worker.values():
        pid = evs[0].pid
        start: float | None = registered.get(pid)
        for ev in evs:
            if ev.kind in ("stop", "kill", "term", "crash") and start is not None:
                out.append((start, ev.at))
                start = None
            elif ev.kind == "cont" and pid in registered:
                start = ev.at
        if start is not None:
            out.append((start, float("inf")))
    return out


def _stuck(cfg: Config, fleet: Fleet, executors: list[tuple[Any, ...]],
           wf_audit: list[tuple[Any, ...]], stalls: list[tuple[Any, ...]], res: Result,
           bound: float) -> list[str]:
    """For every kill and pause: how long each workflow the victim held stayed with it."""
    ex_of_pid: dict[int, list[str]] = defaultdict(list)
    registered: dict[int, float] = {}
    for ex, pid, started in executors:
        ex_of_pid[int(pid)].append(str(ex))
        registered[int(pid)] = float(started)
    up = _availability(fleet, registered)
    need = cfg.sweep + cfg.slack

    def due(at: float) -> float:
        """When a takeover of work orphaned at ``at`` is due: ``bound`` later, and once
        some worker has been up (registered, neither paused nor killed) for a sweep
        interval + slack. No worker up, no takeover possible."""
        best = float("inf")
        for s, e in up:
            t = max(at + bound, s + need)
            if t <= e:
                best = min(best, t)
        return best

    # Ownership segments: (owner, start, end, next owner, next status).
    segs: dict[str, list[tuple[float, float | None, str | None, str | None, str]]] = \
        defaultdict(list)

    current: dict[str, tuple[str | None, str, float]] = {}
    for wid, op, _os, new_s, _oo, new_o, _ot, _nt, _out, at in wf_audit:
        if op == "delete":
            continue
        prev = current.get(wid)
        if prev is not None and prev[0] == new_o and prev[1] in ACTIVE and new_s in ACTIVE:
            continue  # the same holder, still active: one segment
        if prev is not None and prev[0] is not None and prev[1] in ACTIVE:
            segs[prev[0]].append((prev[2], at, new_o, new_s, wid))
        current[wid] = (new_o, new_s, at)
    for _wid, (owner, status, start) in current.items():
        if owner is not None and status in ACTIVE:
            segs[owner].append((start, None, None, None, _wid))
    durations: list[float] = []
    stuck: list[str] = []
    kills = stops = taken_while_paused = behind_lock = no_worker_up = 0
    premature: list[str] = []
    victims: dict[str, list[Event]] = defaultdict(list)
    for ev in fleet.events:
        if ev.kind not in ("kill", "stop"):
            continue
        for ex in ex_of_pid.get(ev.pid, []):
            victims[ex].append(ev)
        kills += ev.kind == "kill"
        stops += ev.kind == "stop"
        for ex in ex_of_pid.get(ev.pid, []):
            for start, end, next_owner, next_status, seg_wid in segs.get(ex, []):
                if not (start <= ev.at and (end is None or end > ev.at)):
                    continue
                if end is None:
                    stuck.append(f"{seg_wid} held by {ex} since its {ev.kind} at "
                                 f"{ev.at:.1f}, never taken over")
                    continue
                if ev.kind == "stop" and next_owner == ex:
                    # It woke up and went on with it before anyone took it over (or
                    # its last write landed as the pause began).
                    released = min(end, ev.until or end)
                else:
                    released = end
                    if ev.kind == "stop" and (ev.until is None or end < ev.until):
                        taken_while_paused += 1
                d = released - ev.at
                durations.append(d)
                if d <= bound:
                    continue
                if released <= due(ev.at):
                    no_worker_up += 1  # nobody was up to take it over: not the engine's fault
                    continue
                if any(e.kind == "stop" and e.holds and not e.holds.startswith("unknown")
                       and e.at <= end and (e.until or end) >= ev.at for e in fleet.events):
                    behind_lock += 1
                near = [f"{e.kind} of worker {e.worker} at {e.at - ev.at:+.2f} s"
                        for e in fleet.events if e is not ev
                        and e.kind in ("kill", "stop", "cont", "spawn")
                        and ev.at - cfg.lease <= e.at <= end]
                paused = "" if ev.until is None else f", continued at {ev.until - ev.at:+.2f} s"
                stuck.append(f"{seg_wid}: worker {ev.worker} ({ex}) {ev.kind} "
                             f"at {ev.at:.2f}{paused}; taken at {end - ev.at:+.2f} s by "
                             f"{next_owner} (status {next_status}); meanwhile: "
                             f"{'; '.join(near) or 'nothing'}")
    # Takeovers of workers that were neither dead nor paused (their heartbeat was late).
    grace = cfg.lease + cfg.sweep + cfg.slack
    why: Counter[str] = Counter()
    for wid, op, _os, _ns, old_o, new_o, old_t, new_t, _out, at in wf_audit:
        if op != "update" or old_o is None or new_o is None or old_o == new_o \
                or old_t == new_t:
            continue
        evs = victims.get(old_o, [])
        explained = any(e.at <= at and (e.kind == "kill" or e.until is None
                                        or at <= e.until + grace) for e in evs)
        if not explained:
            premature.append(f"{wid} from {old_o} at {at:.1f}")
            gaps = [(a - sec, a) for ex, what, sec, a in stalls
                    if ex == old_o and what == "heartbeat gap" and a - sec <= at <= a + 0.5]
            slow = [(a - sec, a) for ex, what, sec, a in stalls
                    if ex == old_o and what.startswith("slow") and a - sec <= at + 0.5
                    and a >= at - cfg.lease]
            near_lock = any(e.kind == "stop" and e.holds and not e.holds.startswith("unknown")
                            and e.at - cfg.lease <= at <= (e.until or at) + grace
                            for e in fleet.events)
            why[("blocked in a store call (heartbeat, sweep or poll)" if slow else
                 "heartbeat late, not blocked in a store call (CPU)" if gaps
                 else "no heartbeat gap recorded")
                + (", during/after a lock-holding pause" if near_lock else "")] += 1
    durations.sort()
    res.figures["kills"] = kills
    res.figures["stops"] = stops
    res.figures["leases_taken_over_while_paused"] = taken_while_paused
    res.figures["held_too_long_behind_a_paused_lock_holder"] = behind_lock
    res.figures["held_longer_while_no_worker_was_up"] = no_worker_up
    res.figures["pauses_holding_locks"] = [
        f"worker {e.worker} at {e.at:.2f} for {(e.until or e.at) - e.at:.2f} s: {e.holds}"
        for e in fleet.events if e.kind == "stop" and e.holds]
    res.figures["takeovers_of_live_workers"] = len(premature)
    res.figures["takeovers_of_live_workers_examples"] = premature[:5]
    res.figures["takeovers_of_live_workers_why"] = dict(why)
    paused: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for ex, evs in victims.items():
        paused[ex] += [(e.at, e.until or e.at) for e in evs if e.kind == "stop"]
    gaps_all = sorted(sec for ex, what, sec, a in stalls if what == "heartbeat gap"
                      and not any(s0 <= a and a - sec <= s1 for s0, s1 in paused[ex]))
    res.figures["heartbeat_gaps"] = {
        "over_half_lease": len(gaps_all),
        "over_lease": sum(1 for g in gaps_all if g >= cfg.lease),
        "max": round(gaps_all[-1], 2) if gaps_all else 0.0,
        "slow_sweeps_or_polls": sum(1 for _e, what, _s, _a in stalls
                                    if what.startswith("slow")),
    }
    if durations:
        res.figures["held_after_kill_or_stop_s"] = {
            "samples": len(durations),
            "p50": round(statistics.median(durations), 3),
            "p95": round(durations[int(0.95 * (len(durations) - 1))], 3),
            "max": round(durations[-1], 3),
            "bound": bound,
        }
    return stuck


# -- the command -----------------------------------------------------------------------------
def run(cfg: Config, console: Console | None = None, *, quiet: bool = False) -> Result:
    console = console or Console(stderr=True)
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(10**9)
    workdir = cfg.directory or Path(tempfile.mkdtemp(prefix="lease-race-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db, ledger_loc, created = prepare(cfg, workdir)
    console.print(f"lease race: seed={seed} workers={cfg.workers} workflows={cfg.workflows} "
                  f"steps={cfg.steps} lease={cfg.lease} db={db.kind} logs={workdir}",
                  highlight=False)
    t_all = time.monotonic()
    fleet = Fleet(cfg, db, ledger_loc, workdir, console)
    try:
        from crashsafe.stores import open_store

        open_store(db.url).close()  # create crashsafe's schema
        conn = db.connect()
        try:
            if status_counts(conn, db):
                raise SystemExit(f"{db.url} already holds workflows: give a fresh database")
        finally:
            conn.close()
        Ledger(ledger_loc.url, create=True).close()
        Audit(db, ledger_loc).install()
        enqueue_s = enqueue(cfg, db)
        console.print(f"  enqueued {cfg.workflows} workflows in {enqueue_s:.1f} s",
                      highlight=False)
        figures = race(cfg, seed, db, fleet, console, quiet)
        figures["enqueue_s"] = round(enqueue_s, 1)
        figures["workers_started"] = fleet.spawned
        if figures["race_s"]:
            figures["steps_per_s"] = round(cfg.workflows * cfg.steps / figures["race_s"], 1)
        result = check(cfg, seed, db, ledger_loc, fleet, figures)
    finally:
        fleet.kill_all()
        if created and not cfg.keep:
            drop(db, ledger_loc)
    result.figures["total_s"] = round(time.monotonic() - t_all, 1)
    result.figures["logs"] = str(workdir)
    return result


def report(res: Result, console: Console) -> None:
    cfg = res.config
    table = Table(title=f"lease race: {cfg['workers']} workers, {cfg['workflows']} workflows "
                        f"x {cfg['steps']} steps, lease {cfg['lease']} s, seed {res.seed}",
                  show_header=True)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("")
    for name, value, ok in res.rows:
        table.add_row(name, value, "" if ok is None else ("ok" if ok else "[red]FAIL[/]"))
    f = res.figures
    held = f.get("held_after_kill_or_stop_s")
    info = [
        ("race time (all enqueued -> all ended)", f"{f.get('race_s')} s"
         + ("" if f.get("finished") else " (deadline)")),
        ("steps committed per second", f.get("steps_per_s")),
        ("SIGKILLs / SIGSTOPs", f"{f.get('kills')} / {f.get('stops')}"),
        ("workers started (incl. replacements)", f.get("workers_started")),
        ("leases taken over while their holder was paused",
         f.get("leases_taken_over_while_paused")),
        ("stale writes refused (runs ended by the fence)", f.get("stale_writes_refused")),
        ("held after a kill/stop p50 / p95 / max",
         f"{held['p50']} / {held['p95']} / {held['max']} s ({held['samples']})"
         if held else "-"),
        ("... held longer because no worker was up (not counted)",
         f.get("held_longer_while_no_worker_was_up")),
        ("takeovers of workers neither killed nor paused", f.get("takeovers_of_live_workers")),
        ("... why", f.get("takeovers_of_live_workers_why")),
        ("live workers' heartbeat gaps > lease/2 (> lease; max)",
         "{over_half_lease} ({over_lease}; {max} s), slow sweeps/polls "
         "{slow_sweeps_or_polls}".format(**f["heartbeat_gaps"])
         if f.get("heartbeat_gaps") else "-"),
        ("pauses that caught the worker holding locks (open transaction / SQLite write "
         "lock)", len(f.get("pauses_holding_locks") or [])),
        ("step bodies run (duplicates, allowed)",
         f"{f.get('body_executions')} ({f.get('duplicate_body_executions')})"),
        ("... of which after their step was committed, by stale holders",
         f.get("bodies_after_commit_by_stale_holders")),
        ("repeated effects refused by the receiver's key", f.get("effect_repeats_refused_by_key")),
        ("runs that did not end ok, by kind", f.get("outcomes")),
    ]
    for name, value in info:
        table.add_row(name, str(value), "")
    console.print(table)
    verdict = "all invariants hold" if res.ok else f"{len(res.violations)} violation(s)"
    console.print(f"{verdict} (seed {res.seed}; total {f.get('total_s')} s; logs {f.get('logs')})",
                  highlight=False)
    for v in res.violations:
        console.print(f"[red]violation[/] {v}", highlight=False)


def parse(argv: list[str] | None) -> tuple[Config, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", help="crashsafe URL of a fresh database (sqlite:///file.db or "
                                "postgresql://...?schema=NAME); default: a new schema on "
                                "$CRASHSAFE_TEST_POSTGRES, dropped afterwards")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--workflows", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--heartbeat", type=float, default=None, help="default: lease / 8")
    p.add_argument("--sweep", type=float, default=0.5, help="recovery_interval (s)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kill-rate", type=float, default=0.2, help="SIGKILLs per second")
    p.add_argument("--stop-rate", type=float, default=0.1, help="SIGSTOPs per second")
    p.add_argument("--stop-for", type=float, nargs=2, default=(1.5, 2.5), metavar=("MIN", "MAX"),
                   help="a pause lasts MIN to MAX leases (default 1.5 2.5)")
    p.add_argument("--max-stopped", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=8, help="workflows per worker")
    p.add_argument("--step-ms", type=float, default=2.0, help="mean body time (ms)")
    p.add_argument("--slack", type=float, default=1.0)
    p.add_argument("--deadline", type=float, default=600.0)
    p.add_argument("--pool-max", type=int, default=None)
    p.add_argument("--pg-idle-tx-timeout", type=float, default=None, metavar="SECONDS",
                   help="PostgreSQL: the store's idle_tx_timeout URL option for the "
                        "workers (default: the store's, 30 s)")
    p.add_argument("--same-host", action="store_true",
                   help="keep the real host name: liveness by pid, not by heartbeat")
    p.add_argument("--keep", action="store_true", help="keep the Postgres schemas")
    p.add_argument("--dir", type=Path, default=None, help="where the worker logs go")
    p.add_argument("--json", default=None, help="also write the result to this file")
    a = p.parse_args(argv)
    cfg = Config(db=a.db, workers=a.workers, workflows=a.workflows, steps=a.steps,
                 lease=a.lease, heartbeat=a.heartbeat, sweep=a.sweep, seed=a.seed,
                 kill_rate=a.kill_rate, stop_rate=a.stop_rate, stop_for=tuple(a.stop_for),
                 max_stopped=a.max_stopped,
                 concurrency=a.concurrency, step_ms=a.step_ms, slack=a.slack,
                 deadline=a.deadline, pool_max=a.pool_max,
                 idle_tx_timeout=a.pg_idle_tx_timeout, same_host=a.same_host,
                 keep=a.keep, directory=a.dir)
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=110)
    res = run(cfg, console)
    report(res, console)
    if json_path:
        Path(json_path).write_text(json.dumps(
            {"ok": res.ok, "seed": res.seed, "config": res.config, "figures": res.figures,
             "checks": [{"check": n, "value": v, "ok": ok} for n, v, ok in res.rows],
             "violations": res.violations}, indent=2, default=str))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
