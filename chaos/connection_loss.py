"""R5: the PostgreSQL connection killed at every statement of a workflow, COMMIT included.

Each trial runs one reference workflow through a real ``crashsafe.App`` on
``postgresql://...?schema=<fresh>``: two plain steps (one fails once and is retried),
a child workflow, an effect step whose idempotency key is applied at an independent
ledger (a SQLite file crashsafe never opens), a wait for a signal, a durable sleep and
a last step. The App reaches the server through :class:`pgproxy.CutProxy`, which
numbers every statement (round trip) of the run and cuts the connection carrying
statement *N*: before the server sees it, after it ran but before its answer, or by
``pg_terminate_backend`` the moment it arrives (see ``pgproxy.MODES``).

Two flavours of trial:

* **inline**: the App keeps running; the store must resolve the cut by itself (a
  retry, re-reading the keyed rows, asking ``pg_xact_status``) or surface a typed
  error that the engine's recovery, or the caller retrying with the same workflow id,
  gets past;
* **restart**: the App runs in a child process that is SIGKILLed at the cut, as a
  machine dies with its connection; a new process recovers the workflow.

Per trial it checks: the workflow and its child succeeded with the result of an
uninterrupted run; the journals hold exactly the uninterrupted run's entries (none
lost, none twice), and every entry seen right after a kill is still there unchanged;
the ledger applied the keyed charge exactly once; the effect's key is done and no
intent is left; one signal row; two workflow rows. For a cut statement that commits
(a COMMIT, or a write that is its own transaction) it learns from the server whether
it landed, and, in the inline flavour, checks that the store's own answer agreed.

    python chaos/connection_loss.py --trials 1000 --seed 5

``--seed S`` fixes the order in which (statement, mode) pairs are swept and which
trials restart; each failing trial prints a command that replays its cut alone.
Uses ``$CRASHSAFE_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pgproxy import MODES, Cut, CutProxy, Statement  # type: ignore[import-not-found]
from psycopg import sql

import crashsafe
from crashsafe import _codec
from crashsafe.stores import open_store
from crashsafe.stores.base import CreateWorkflow, FinishWorkflow, JournalEntry, Requeue
from crashsafe.stores.postgres import PostgresStore

POSTGRES_URL = os.environ.get("CRASHSAFE_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/test")
WORKFLOW_ID = "order-1"
CHILD_ID = f"{WORKFLOW_ID}/2"
CHARGE_KEY = f"charge:{WORKFLOW_ID}"
SIGNAL = "approval"
APPROVAL = {"approved": True, "by": "ops"}
STUCK_AFTER = 30.0
HERE = Path(__file__).resolve()


def schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}&application_name={schema}"


# -- the independent ledger ---------------------------------------------------------------
class Ledger:
    """A payments service and an activity log, in a SQLite file of its own. ``apply``
    does not deduplicate: every call is a charge, so a key charged twice shows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS calls (step TEXT, workflow TEXT, at REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS charges (key TEXT, amount INTEGER)")
            db.execute("CREATE TABLE IF NOT EXISTS lookups (key TEXT, found INTEGER)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def called(self, step: str, workflow: str) -> int:
        """Log one execution of a step body; how many there have been."""
        with contextlib.closing(self._db()) as db:
            db.execute("INSERT INTO calls VALUES (?, ?, ?)", (step, workflow, time.time()))
            return int(db.execute("SELECT count(*) FROM calls WHERE step = ? AND workflow = ?",
                                  (step, workflow)).fetchone()[0])

    def charge(self, key: str, amount: int) -> dict[str, Any]:
        with contextlib.closing(self._db()) as db:
            db.execute("INSERT INTO charges VALUES (?, ?)", (key, amount))
        return {"charge": f"ch-{key}", "amount": amount}

    def lookup(self, key: str) -> dict[str, Any] | None:
        with contextlib.closing(self._db()) as db:
            row = db.execute("SELECT amount FROM charges WHERE key = ? LIMIT 1",
                             (key,)).fetchone()
            db.execute("INSERT INTO lookups VALUES (?, ?)", (key, row is not None))
        return None if row is None else {"charge": f"ch-{key}", "amount": int(row[0])}

    def counts(self) -> tuple[Counter[str], Counter[str], int]:
        """Body executions per step, charges per key, reconcile lookups."""
        with contextlib.closing(self._db()) as db:
            calls = Counter({r[0]: int(r[1]) for r in db.execute(
                "SELECT step, count(*) FROM calls GROUP BY step")})
            charges = Counter({r[0]: int(r[1]) for r in db.execute(
                "SELECT key, count(*) FROM charges GROUP BY key")})
            lookups = int(db.execute("SELECT count(*) FROM lookups").fetchone()[0])
        return calls, charges, lookups


# -- the reference workflow -----------------------------------------------------------------
def build_app(url: str, ledger: Ledger) -> tuple[crashsafe.App, Any]:
    """A fresh App on ``url`` with the reference workflow registered; returns it and
    the workflow."""
    app = crashsafe.App(url, recovery_interval=0.2, heartbeat_interval=1.0, lease=5.0)

    @app.step(name="quote")
    def quote(order_id: str) -> dict[str, Any]:
        ledger.called("quote", order_id)
        return {"order": order_id, "amount": 42}

    @app.step(name="check_stock",
              retry=crashsafe.RetryPolicy(max_attempts=3, initial_delay=0, jitter=False))
    def check_stock(order_id: str) -> int:
        if ledger.called("check_stock", order_id) == 1:
            raise ConnectionError("warehouse timed out")  # the first call only
        return 7

    @app.step(name="hold")
    def hold(order_id: str) -> str:
        ledger.called("hold", order_id)
        return f"held-{order_id}"

    @app.workflow(name="reserve")
    def reserve(order_id: str) -> str:
        return hold(order_id)

    def charge_lookup(key: str, order_id: str, amount: int) -> Any:
        found = ledger.lookup(key)
        return crashsafe.NOT_APPLIED if found is None else found

    @app.step(name="charge", effect=True, on_unknown="reconcile", reconcile=charge_lookup)
    def charge(order_id: str, amount: int) -> dict[str, Any]:
        ledger.called("charge", order_id)
        key = crashsafe.current().idempotency_key
        assert key is not None
        return ledger.charge(key, amount)

    @app.step(name="notify")
    def notify(order_id: str, approval: dict[str, Any]) -> str:
        ledger.called("notify", order_id)
        return f"{order_id} approved by {approval['by']}"

    @app.workflow(name="order")
    def order(order_id: str) -> dict[str, Any]:
        q = quote(order_id)
        stock = check_stock(order_id)
        held = reserve(order_id)
        paid = charge(order_id, q["amount"], key=f"charge:{order_id}")  # type: ignore[call-arg]
        approval = crashsafe.wait_for(SIGNAL, timeout=120)
        crashsafe.sleep(0.01)
        note = notify(order_id, approval)
        return {"quote": q, "stock": stock, "held": held, "paid": paid, "note": note}

    return app, order


def drive(app: crashsafe.App, order: Any, typed: Counter[str], deadline: float) -> Any:
    """What a caller does: start the workflow (idempotent by id), send the signal
    unless it is there already, wait for the result. A typed store error is retried
    (and counted in ``typed``); anything else propagates."""
    def attempt(what: str, fn: Any) -> Any:
        while True:
            try:
                return fn()
            except crashsafe.StoreError as exc:
                typed[f"{what}: {type(exc).__name__}"] += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    handle = attempt("app.start", lambda: app.start(order, WORKFLOW_ID, workflow_id=WORKFLOW_ID))

    def send() -> None:
        if app.store.get_signal(WORKFLOW_ID, SIGNAL, 0) is None:
            app.signal(WORKFLOW_ID, SIGNAL, APPROVAL)

    attempt("app.signal", send)
    return attempt("handle.result", lambda: handle.result(
        timeout=max(0.1, deadline - time.monotonic())))


# -- observing the store's own answers --------------------------------------------------------
class StoreAnswers:
    """Records, in this process, what the PostgreSQL store concluded about COMMITs whose
    answer was lost (it re-reads keyed rows or asks ``pg_xact_status``). Wraps three
    private methods of ``PostgresStore``; if they are renamed, answers are not seen
    and the report says so."""

    METHODS = {"_landed": "re-read keyed rows", "_entry_landed": "re-read keyed rows",
               "_committed": "pg_xact_status"}

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool | None]] = []
        self.available = all(hasattr(PostgresStore, m) for m in self.METHODS)
        self._originals: dict[str, Any] = {}
        if not self.available:
            return
        for name, how in self.METHODS.items():
            self._originals[name] = original = getattr(PostgresStore, name)
            setattr(PostgresStore, name, self._wrap(original, how))

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(PostgresStore, name, original)
        self._originals.clear()

    def _wrap(self, original: Any, how: str) -> Any:
        def wrapper(store: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(store, *args, **kwargs)
            if original.__name__ == "_landed" and not _keyed(args[0]):
                # Nothing keyed to re-read: the store re-applies (upserts, conditional
                # updates), which is safe whether or not the first try landed.
                self.calls.append(("nothing keyed, re-applied (safe to repeat)", None))
            else:
                self.calls.append((how, bool(result)))
            return result

        return wrapper


def _keyed(batches: Any) -> bool:
    keyed = (JournalEntry, CreateWorkflow, FinishWorkflow, Requeue)
    return any(isinstance(op, keyed) for ops in batches for op in ops)


# -- a trial ------------------------------------------------------------------------------------
@dataclass
class Result:
    trial: int
    cut_at: int
    mode: str
    restart: bool
    outage: int = 0
    cut: bool = False
    outage_cuts: int = 0
    statements: int = 0
    """Statements this trial sent through the proxy (its first process, on restart)."""
    statement: str = ""
    kind: str = ""
    landed: bool | None = None
    how_known: str = ""
    store_answer: str = ""
    typed_errors: dict[str, int] = field(default_factory=dict)
    engine_store_errors: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    reexecuted: int = 0
    charges: int = 0
    """Times the ledger charged the effect's key (1 is right)."""
    lookups: int = 0
    unknown_notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class EngineLog(logging.Handler):
    """Counts the engine's "workflow ... stopped: <store error>" reports."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.stopped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "stopped" in record.getMessage():
            self.stopped += 1


class Campaign:
    def __init__(self, base_url: str, workdir: Path) -> None:
        self.base_url = base_url
        self.workdir = workdir
        self.proxy = CutProxy(base_url)
        self.admin = psycopg.connect(base_url, autocommit=True)
        self.answers = StoreAnswers()
        self.engine_log = EngineLog()
        engine, pool = logging.getLogger("crashsafe"), logging.getLogger("psycopg")
        self._logging = (engine.propagate, pool.level)
        engine.addHandler(self.engine_log)
        engine.propagate = False  # the cuts' warnings would drown the report
        pool.setLevel(logging.CRITICAL)  # pools discarding cut connections
        self.reference: dict[str, Any] | None = None
        self.calibration: list[Statement] = []
        self.statement_counts: list[int] = []
        self.statements = 0
        self.child: subprocess.Popen[str] | None = None
        self.proxy.on_cut = self._on_cut

    def close(self) -> None:
        self.proxy.close()
        self.admin.close()
        self.answers.restore()
        engine = logging.getLogger("crashsafe")
        engine.removeHandler(self.engine_log)
        engine.propagate, level = self._logging
        logging.getLogger("psycopg").setLevel(level)

    # -- schema and state ---------------------------------------------------------------
    def _new_schema(self) -> str:
        schema = f"cl_{uuid.uuid4().hex[:12]}"
        PostgresStore(schema_url(self.base_url, schema)).close()  # tables, not counted
        return schema

    def _drop_schema(self, schema: str) -> None:
        self.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name = %s AND pid != pg_backend_pid()", (schema,))
        self.admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(schema)))

    def _rows(self, schema: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.admin.cursor() as cur:
            cur.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            rows = cur.execute(query, params).fetchall()
            cur.execute("RESET search_path")
        return rows

    def _state(self, schema: str) -> dict[str, Any]:
        """What the trial left, read through crashsafe's own store (so payloads are
        opened and checked as the engine reads them) and, for keys and counts, SQL."""
        store = open_store(schema_url(self.base_url, schema))
        try:
            workflows: dict[str, tuple[str, bytes | None]] = {}
            journal: dict[tuple[str, int], tuple[Any, ...]] = {}
            for (wid,) in self._rows(schema, "SELECT id FROM workflows ORDER BY id"):
                rec = store.get_workflow(wid)
                assert rec is not None
                workflows[wid] = (rec.status.value, rec.output)
                for e in store.load_journal(wid):
                    journal[(wid, e.index)] = (e.kind, e.name, e.output, e.error, e.note)
        finally:
            store.close()
        return {
            "journal": journal,
            "workflows": workflows,
            "effects": self._rows(schema, "SELECT key, workflow_id, idx, state FROM effects"),
            "intents": self._rows(schema, "SELECT workflow_id, idx FROM intents"),
            "signals": self._rows(schema, "SELECT workflow_id, name, seq FROM signals"),
        }

    # -- running ------------------------------------------------------------------------
    def _on_cut(self, cut: Cut) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            child.wait()

    def _run_inline(self, url: str, ledger: Ledger, typed: Counter[str]) -> Any:
        """Drive the workflow in this process, on a thread watched for hangs: a call
        that never returns is reported with where it stands, not waited on forever."""
        app, order = build_app(url, ledger)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = drive(app, order, typed, time.monotonic() + STUCK_AFTER)
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=work, name="r5-caller", daemon=True)
        worker.start()
        worker.join(STUCK_AFTER + 5)
        if worker.is_alive():
            where = _stack(worker)
            threading.Thread(target=app.close, daemon=True).start()  # may hang too
            raise Stuck(f"the caller's call has not returned after {STUCK_AFTER + 5:g} s; "
                        f"it stands at: {where}")
        closer = threading.Thread(target=app.close, name="r5-close", daemon=True)
        closer.start()
        closer.join(15)
        if closer.is_alive():
            raise Stuck(f"App.close() has not returned after 15 s; it stands at: "
                        f"{_stack(closer)}")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _spawn(self, phase: str, url: str, ledger: Ledger) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(HERE), "--child", phase, "--url", url,
             "--ledger", str(ledger.path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _run_restart(self, schema: str, url: str, ledger: Ledger,
                     res: Result) -> dict[tuple[str, int], tuple[Any, ...]] | None:
        """First process through the proxy (killed at the cut), then a recovering one
        straight to the server. Returns the journal seen right after the kill."""
        self.child = self._spawn("start", url, ledger)
        try:
            out, err = _communicate(self.child)
        finally:
            first, self.child = self.child, None
        seen = None
        if first.returncode == -signal.SIGKILL:
            seen = self._state(schema)["journal"]
        elif first.returncode != 0:
            res.violations.append(f"first process failed ({first.returncode}): "
                                  f"{err.strip()[-500:]}")
            return seen
        second = self._spawn("recover", schema_url(self.base_url, schema), ledger)
        out, err = _communicate(second)
        if second.returncode != 0:
            res.violations.append(f"recovering process failed ({second.returncode}): "
                                  f"{err.strip()[-500:]}")
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                for k, v in json.loads(line).get("typed", {}).items():
                    res.typed_errors[k] = res.typed_errors.get(k, 0) + v
        return seen

    def calibrate(self, runs: int = 3) -> None:
        """Uninterrupted runs: the reference result and journal (the first run's), and
        how many statements the workload sends (the median: a background heartbeat or
        a poll more or less makes runs differ by a few)."""
        counts = []
        for run in range(runs):
            schema = self._new_schema()
            try:
                with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
                    ledger = Ledger(Path(tmp) / "ledger.db")
                    self.proxy.reset()
                    typed: Counter[str] = Counter()
                    value = self._run_inline(
                        self.proxy.url(schema=schema, application_name=schema), ledger, typed)
                    counts.append(len(self.proxy.statements))
                    state = self._state(schema)
                    if typed or self.engine_log.stopped:
                        raise RuntimeError(f"the uninterrupted run met errors: {dict(typed)}")
                    if run == 0:
                        self.calibration = list(self.proxy.statements)
                        self.reference = {"value": value, "state": state, "kinds": Counter(
                            s.kind for s in self.proxy.statements)}
                    elif _plain(value) != _plain(self.reference and self.reference["value"]):
                        raise RuntimeError("two uninterrupted runs gave different results")
            finally:
                self._drop_schema(schema)
        self.statements = sorted(counts)[len(counts) // 2]
        self.statement_counts = counts

    def trial(self, number: int, cut_at: int, mode: str, restart: bool,
              outage: int = 0) -> Result:
        assert self.reference is not None
        res = Result(number, cut_at, mode, restart, outage)
        started = time.monotonic()
        schema = self._new_schema()
        self.answers.calls.clear()
        self.engine_log.stopped = 0
        try:
            with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
                ledger = Ledger(Path(tmp) / "ledger.db")
                self.proxy.reset()
                self.proxy.plan(cut_at, mode, outage)
                url = self.proxy.url(schema=schema, application_name=schema)
                seen = None
                value: Any = None
                if restart:
                    seen = self._run_restart(schema, url, ledger, res)
                    self.proxy.plan(0, mode)
                    value = self._final_value(schema)
                else:
                    typed: Counter[str] = Counter()
                    try:
                        value = self._run_inline(url, ledger, typed)
                    except Exception as exc:
                        res.violations.append(f"the workflow did not finish: "
                                              f"{type(exc).__name__}: {exc}")
                    res.typed_errors = dict(typed)
                    res.engine_store_errors = self.engine_log.stopped
                self._check(schema, ledger, value, seen, res)
        finally:
            self._drop_schema(schema)
        res.seconds = round(time.monotonic() - started, 3)
        return res

    def _final_value(self, schema: str) -> Any:
        status, output = self._state(schema)["workflows"].get(WORKFLOW_ID, ("absent", None))
        if status != "succeeded":
            return None
        return _codec.decode(output or b"null", "the workflow's result")

    # -- checking ---------------------------------------------------------------------
    def _check(self, schema: str, ledger: Ledger, value: Any,
               seen: dict[tuple[str, int], tuple[Any, ...]] | None, res: Result) -> None:
        assert self.reference is not None
        cut = self.proxy.settle()
        if cut is not None:
            res.cut = True
            res.statement = cut.statement.label()
            res.kind = cut.statement.kind
            res.landed = cut.landed
            res.how_known = cut.how_known
        state = self._state(schema)
        ref = self.reference["state"]
        if _plain(value) != _plain(self.reference["value"]):
            res.violations.append(f"result {value!r} != uninterrupted {self.reference['value']!r}")
        for wid, (status, _) in ref["workflows"].items():
            got = state["workflows"].get(wid)
            if got is None or got[0] != status:
                res.violations.append(f"workflow {wid}: {got and got[0]} (expected {status})")
        if set(state["workflows"]) != set(ref["workflows"]):
            res.violations.append(f"workflows {sorted(state['workflows'])}")
        journal, expected = state["journal"], ref["journal"]
        started = WORKFLOW_ID in state["workflows"]  # else it never began: nothing to lose
        for key, entry in expected.items():
            got = journal.get(key)
            if got is None:
                if started:
                    res.lost.append(f"{key[0]}#{key[1]} {entry[0]} {entry[1]}")
            elif got[:2] != entry[:2] or (entry[0] in ("step", "child", "signal")
                                          and got[2:4] != entry[2:4]):
                res.violations.append(f"journal {key}: {got[:4]} != {entry[:4]}")
            if got is not None and got[4] and "outcome unknown" in str(got[4]):
                res.unknown_notes.append(str(got[4]))
        for key in set(journal) - set(expected):
            res.duplicates.append(f"{key[0]}#{key[1]} {journal[key][0]} {journal[key][1]}")
        for key, entry in (seen or {}).items():
            if journal.get(key) != entry:
                res.lost.append(f"seen after the kill, then changed or gone: {key}")
        calls, charges, lookups = ledger.counts()
        res.lookups = lookups
        res.charges = charges[CHARGE_KEY]
        if charges != Counter({CHARGE_KEY: 1}):
            res.violations.append(f"charges at the ledger: {dict(charges)} (want 1 of "
                                  f"{CHARGE_KEY})")
        ref_calls = Counter({"quote": 1, "check_stock": 2, "hold": 1, "charge": 1, "notify": 1})
        res.reexecuted = sum(max(0, calls[k] - n) for k, n in ref_calls.items())
        if state["effects"] != ref["effects"]:
            res.violations.append(f"effects: {state['effects']}")
        if state["intents"]:
            res.violations.append(f"intents left: {state['intents']}")
        if state["signals"] != ref["signals"]:
            res.violations.append(f"signals: {state['signals']}")
        if res.lost:
            res.violations.append(f"lost journal entries: {res.lost}")
        if res.duplicates:
            res.violations.append(f"duplicate journal entries: {res.duplicates}")
        res.outage_cuts = len(self.proxy.also_cut)
        res.statements = len(self.proxy.statements)
        if not res.restart and not res.outage_cuts and cut is not None \
                and cut.statement.commits:
            self._check_answer(cut, res)

    def _check_answer(self, cut: Cut, res: Result) -> None:
        """The store's last word on the cut COMMIT must be the server's truth."""
        if not self.answers.available:
            res.store_answer = "not observable"
            return
        calls = self.answers.calls
        if cut.mode == "terminate" and cut.statement.answered:
            # The answer reached the client before the backend died: nothing was
            # unknown about this statement; the next one on the link found it dead.
            res.store_answer = "answer reached the client before the link died"
        elif calls:
            how, landed = calls[-1]
            res.store_answer = how if landed is None else \
                f"{how}: {'landed' if landed else 'not landed'}"
            if cut.landed is not None and landed is not None and landed != cut.landed:
                res.violations.append(f"the store concluded {res.store_answer!r} but the "
                                      f"COMMIT {'landed' if cut.landed else 'did not land'}")
        elif cut.statement.kind == "commit" and cut.xid is None:
            res.store_answer = "read-only transaction: nothing to resolve"
        elif cut.statement.kind == "autocommit write" and not calls:
            res.store_answer = "repeated (an upsert or update, safe to repeat)"
        else:
            res.store_answer = "no resolution needed"


def _communicate(child: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return child.communicate(timeout=STUCK_AFTER * 2)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        return out, f"{err}\nstuck: killed after {STUCK_AFTER * 2:g} s"


class Stuck(Exception):
    """A call of the App hung."""


def _stack(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "?"
    lines = traceback.format_stack(frame)[-6:]
    return " <- ".join(" ".join(line.split()) for line in reversed(lines))


def _spread(values: list[int]) -> dict[str, int]:
    ordered = sorted(values) or [0]
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str)) if value is not None else None


# -- schedule, report, command line ------------------------------------------------------------
def schedule(statements: int, trials: int, seed: int, restart_share: float,
             modes: tuple[str, ...]) -> list[tuple[int, str, bool]]:
    """Every (statement, mode) pair once per round, in an order drawn from ``seed``;
    a share of trials restarts the process at the cut."""
    pairs = [(n, m) for m in modes for n in range(1, statements + 1)]
    rng = random.Random(seed)
    plan: list[tuple[int, str, bool]] = []
    while len(plan) < trials:
        rnd = pairs[:]
        rng.shuffle(rnd)
        plan.extend((n, m, rng.random() < restart_share) for n, m in rnd)
    return plan[:trials]


def report(results: list[Result], campaign: Campaign, seed: int, elapsed: float,
           as_json: bool, save: Path | None = None) -> bool:
    ok = all(not r.violations for r in results)
    cuts = [r for r in results if r.cut]
    commits = [r for r in cuts if r.kind in ("commit", "autocommit write")]
    landed = Counter("landed" if r.landed else "not landed" if r.landed is False
                     else "undetermined" for r in commits)
    summary: dict[str, Any] = {
        "ok": ok, "seed": seed, "trials": len(results),
        "failed_trials": sum(bool(r.violations) for r in results),
        "statements_per_run": campaign.statements,
        "statements_per_calibration_run": campaign.statement_counts,
        "statements_per_inline_trial": _spread([r.statements for r in results
                                                if not r.restart]),
        "statement_kinds_per_run": dict(campaign.reference["kinds"]) if campaign.reference
        else {},
        "cuts": len(cuts),
        "cuts_by_mode": dict(Counter(r.mode for r in cuts)),
        "cuts_by_kind": dict(Counter(r.kind for r in cuts)),
        "restart_trials": sum(r.restart for r in results),
        "outage_per_trial": max((r.outage for r in results), default=0),
        "outage_cuts": sum(r.outage_cuts for r in results),
        "commit_cuts": {
            "count": len(commits),
            "explicit_commit": sum(r.kind == "commit" for r in commits),
            "autocommit_write": sum(r.kind == "autocommit write" for r in commits),
            "truth": dict(landed),
            "by_mode": {m: dict(Counter("landed" if r.landed else "not landed"
                                        if r.landed is False else "undetermined"
                                        for r in commits if r.mode == m)) for m in MODES},
            "store_answers_inline": dict(Counter(r.store_answer for r in commits
                                                 if not r.restart)),
            "resolved_by_recovery_after_restart": dict(Counter(
                "landed" if r.landed else "not landed" if r.landed is False
                else "undetermined" for r in commits if r.restart)),
        },
        "lost_journal_entries": sum(len(r.lost) for r in results),
        "duplicate_journal_entries": sum(len(r.duplicates) for r in results),
        "hung_trials": sum(any("Stuck" in v or "stuck" in v for v in r.violations)
                           for r in results),
        "duplicate_keyed_effects": sum(r.charges > 1 for r in results),
        "results_equal_to_uninterrupted": sum(not any(v.startswith(("result", "the workflow"))
                                                      for v in r.violations) for r in results),
        "typed_errors_seen_by_caller": dict(sum((Counter(r.typed_errors) for r in results),
                                                Counter())),
        "engine_store_errors_recovered": sum(r.engine_store_errors for r in results),
        "reexecuted_bodies": sum(r.reexecuted for r in results),
        "reconcile_lookups": sum(r.lookups for r in results),
        "outcome_unknown_notes": dict(Counter(n.split(": ", 1)[-1] for r in results
                                              for n in r.unknown_notes)),
        "store_answers_observable": campaign.answers.available,
        "elapsed_s": round(elapsed, 1),
        "failing": [asdict(r) for r in results if r.violations],
    }
    if save is not None:
        save.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return ok
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="crashsafe connection-loss campaign (R5)", show_header=True)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("")

    def row(name: str, value: Any, good: bool | None = None) -> None:
        table.add_row(name, str(value), "" if good is None else "ok" if good else "FAIL")

    cc = summary["commit_cuts"]
    row("trials (failed)", f"{len(results)} ({summary['failed_trials']})",
        summary["failed_trials"] == 0)
    row("statements per uninterrupted run (median of 3)",
        f"{campaign.statements} {campaign.statement_counts}")
    spread = summary["statements_per_inline_trial"]
    row("statements per inline trial (min / median / max)",
        f"{spread['min']} / {spread['median']} / {spread['max']}")
    row("connections cut (planned cut fell)", f"{len(cuts)} / {len(results)}")
    for mode in MODES:
        row(f"  {mode}", summary["cuts_by_mode"].get(mode, 0))
    for kind, n in sorted(summary["cuts_by_kind"].items(), key=lambda kv: -kv[1]):
        row(f"  cut at: {kind}", n)
    row("trials that also killed the process", summary["restart_trials"])
    if summary["outage_per_trial"]:
        row(f"statements cut by the outage after each cut (up to "
            f"{summary['outage_per_trial']})", summary["outage_cuts"])
    row("cuts at a statement that commits", cc["count"])
    row("  explicit COMMIT / autocommit write", f"{cc['explicit_commit']} / "
        f"{cc['autocommit_write']}")
    for truth, n in sorted(cc["truth"].items()):
        row(f"  it {truth}" if truth != "undetermined" else "  undetermined (race)", n)
    for answer, n in sorted(cc["store_answers_inline"].items(), key=lambda kv: -kv[1]):
        row(f"  store: {answer}", n)
    for truth, n in sorted(cc["resolved_by_recovery_after_restart"].items()):
        row(f"  after a restart, {truth}: recovered", n)
    row("lost journal entries", summary["lost_journal_entries"],
        summary["lost_journal_entries"] == 0)
    row("duplicate journal entries", summary["duplicate_journal_entries"],
        summary["duplicate_journal_entries"] == 0)
    row("trials where a call hung", summary["hung_trials"], summary["hung_trials"] == 0)
    row("duplicate keyed effects at the ledger", summary["duplicate_keyed_effects"],
        summary["duplicate_keyed_effects"] == 0)
    row("results equal to an uninterrupted run",
        f"{summary['results_equal_to_uninterrupted']}/{len(results)}",
        summary["results_equal_to_uninterrupted"] == len(results))
    for what, n in sorted(summary["typed_errors_seen_by_caller"].items()):
        row(f"typed error, caller retried: {what}", n)
    row("store errors the engine recovered from", summary["engine_store_errors_recovered"])
    row("step bodies run again", summary["reexecuted_bodies"])
    for note, n in sorted(summary["outcome_unknown_notes"].items()):
        row(f"effect outcome unknown: {note}", n)
    console.print(table)
    for r in results:
        if r.violations:
            console.print(f"[red]trial {r.trial}[/red] cut at statement {r.cut_at} "
                          f"({r.mode}{', restart' if r.restart else ''}; {r.statement!r}): "
                          f"{r.violations}")
            console.print(f"  replay: python chaos/connection_loss.py --cut {r.cut_at} "
                          f"--mode {r.mode}{' --restart' if r.restart else ''}"
                          f"{f' --outage {r.outage}' if r.outage else ''}")
    verdict = "all invariants hold" if ok else "INVARIANTS VIOLATED"
    console.print(f"{verdict} in {elapsed:.1f} s (seed {seed})")
    return ok


def child_main(phase: str, url: str, ledger_path: str) -> int:
    """A campaign's child process: ``start`` runs the workflow through the proxy (and
    is killed at the cut); ``recover`` takes over what the killed one left."""
    logging.basicConfig(level=logging.CRITICAL)
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)
    app, order = build_app(url, Ledger(Path(ledger_path)))
    typed: Counter[str] = Counter()
    try:
        if phase == "recover":
            app.launch()  # takes over the dead process's workflows
        drive(app, order, typed, time.monotonic() + STUCK_AFTER)
    finally:
        app.close()
    print(json.dumps({"typed": dict(typed)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--restart-share", type=float, default=0.2,
                        help="share of trials whose process is SIGKILLed at the cut (0.2)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cut", type=int, help="replay one cut: this statement number")
    parser.add_argument("--mode", choices=MODES, default="drop-reply")
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--outage", type=int, default=0,
                        help="after each cut, also cut the next K statements (any "
                             "connection), so the store's own retry fails too and the "
                             "engine must recover (0: one cut per run, the R5 gate)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--save", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--url", default=POSTGRES_URL)
    parser.add_argument("--child", choices=("start", "recover"), help=argparse.SUPPRESS)
    parser.add_argument("--ledger", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.url, args.ledger)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    try:
        psycopg.connect(args.url, connect_timeout=5).close()
    except psycopg.Error as exc:
        print(f"PostgreSQL at {args.url} is unreachable ({exc}); start it or set "
              "CRASHSAFE_TEST_POSTGRES", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crashsafe-r5-") as tmp:
        campaign = Campaign(args.url, Path(tmp))
        try:
            campaign.calibrate()
            if args.cut is not None:
                plan = [(args.cut, args.mode, args.restart)]
            else:
                modes = tuple(m for m in args.modes.split(",") if m)
                plan = schedule(campaign.statements, args.trials, seed, args.restart_share,
                                modes)
            results = run_plan(campaign, plan, quiet=args.json, outage=args.outage)
        finally:
            campaign.close()
        ok = report(results, campaign, seed, time.monotonic() - started, args.json,
                    args.save)
    return 0 if ok else 1


def run_plan(campaign: Campaign, plan: list[tuple[int, str, bool]],
             quiet: bool = False, outage: int = 0) -> list[Result]:
    results: list[Result] = []
    stop = threading.Event()
    for i, (n, mode, restart) in enumerate(plan):
        if stop.is_set():
            break
        res = campaign.trial(i, n, mode, restart, outage)
        results.append(res)
        if not quiet:
            mark = "FAIL" if res.violations else "ok"
            print(f"[{i + 1}/{len(plan)}] cut {n:>3} {mode:<12} "
                  f"{'restart' if restart else 'inline ':<7} {res.kind or '-':<16} "
                  f"{'' if res.landed is None else 'landed' if res.landed else 'not landed':<10}"
                  f" {res.seconds:.2f}s {mark}", file=sys.stderr, flush=True)
            if res.violations:
                print(f"    {res.violations}", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
