"""Hook points where the engine reports what it does: spans, counters and log lines.

The engine calls in at four places, always about records it has just made durable:

* a workflow run begins (:func:`begin`, from ``App._run``: a fresh start, or a run
  resumed after a crash, a suspension or a dequeue) and ends (:meth:`Run.end`, from
  ``App._finish``, with how the run ended);
* every commit of a run: :meth:`Run.step` for a step's plain result (one journal
  entry, no error, no note: nearly every commit), :meth:`Run.committed` for anything
  else (from ``WorkflowContext.commit``): attempt rows (start, failure class, planned
  delay), checkpoints, sleeps and waits are all journal records, so what is reported
  is what is durable;
* a recovery sweep's claims (:func:`recovered`, from ``App.recover``).

When nothing listens (no sink, the app does not trace, the ``crashsafe`` logger is
not enabled for INFO) :func:`begin` returns None, and a run costs the engine one
``is None`` test per commit.

Log lines and the :class:`Sink` objects (OpenTelemetry spans, Prometheus counters)
hear about a commit on the workflow's own thread, after the commit. A step's plain
result waits for company: it is reported with the next ones, :data:`BATCH` at most,
when anything else commits, or when the run ends. One pass over many records costs
far less than one call chain per record, which is what keeps observability within
its overhead budget (see docs/benchmarks.md). None waits much longer than
:data:`SWEEP_S`: a run whose oldest waiting step has waited about that long reports
its steps at its next step, and a reporting thread looks every ``SWEEP_S / 2``
seconds for runs whose steps have waited longer (a slow step after quick ones, or a
run blocked) and reports them. Otherwise no thread of ours does the work: it
would share the interpreter lock with the workflows, and did not make sequential
workflows faster (one back from its fsync waited for the lock) and made async ones
slower (it took the lock from the event loop; handing it the commits of busy runs
cost 100 async workflows at once about a tenth of their throughput). A step's times
are its journal entry's own (``started_at``, ``ended_at``), and a waiting step's age
is counted in the reporting thread's ticks (:data:`_tick`): a step reads no clock.
Exporting spans stays off the workflow's thread: that is the job of the OpenTelemetry
SDK's ``BatchSpanProcessor``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

from ._errors import describe
from ._secrets import redact_text
from .stores.base import AttemptRecord, JournalEntry

if TYPE_CHECKING:
    from ._app import App
    from .stores.base import Op, WorkflowRecord

log = logging.getLogger("crashsafe")

BATCH = 32
"""Step-result commits of one run reported together, at most."""
SWEEP_S = 0.2
"""Steps that waited about this long are reported at their run's next step, and by
the reporting thread if that does not come within another half of it."""
_now_ns = time.time_ns



class Sink:
    """A listener called on the workflow's own thread, right after what it hears about
    became durable, in the order things happened.

    It must be quick and never block: the workflow waits for it (hand slow work, like
    sending anything over the network, to a thread of its own). Sync workflows run on
    several threads at once, and commits that waited are reported from crashsafe's
    reporting thread (see the module), so what a sink shares between runs needs a lock;
    one run's calls never overlap. An exception it raises is logged and does not reach
    the workflow.
    ``t0``/``t1``/``at`` are wall-clock nanoseconds (``time.time_ns()``). Override
    what you need; every method does nothing by default.
    """

    def run_started(self, run: Run) -> None:
        """A workflow run began in this process."""

    def steps(self, run: Run, entries: Sequence[JournalEntry]) -> None:
        """Steps of ``run`` that succeeded, oldest first, each committed alone with no
        note (:func:`plain`). A step's own times are its entry's ``started_at`` and
        ``ended_at`` (the store's clock). By default :meth:`committed` once per step
        (``t0`` and ``t1`` its ``ended_at`` on our clock); override it to save the
        calls. Anything else ``run`` commits is reported after them."""
        for e in entries:
            t = int(e.ended_at * 1e9) - run.offset_ns
            self.committed(run, (e,), t, t)

    def committed(self, run: Run, ops: Sequence[Op], t0: int, t1: int) -> None:
        """``ops`` were committed by ``run`` between ``t0`` and ``t1``: at least one of
        them a journal entry or an attempt row (commits without either are not
        reported)."""

    def run_ended(self, run: Run, outcome: str, error: BaseException | None, at: int) -> None:
        """The run ended: ``ok``, ``error``, ``cancelled``, ``dead_letter``, ``aborted``
        (the process is stopping, or another one took the workflow), ``store_error``,
        ``suspended`` or ``requeued`` (parked for a distant retry)."""

    def recovered(self, claimed: int, dead_lettered: int) -> None:
        """A recovery sweep took over ``claimed`` workflows of dead processes and parked
        ``dead_lettered`` ones recovered too often."""


_sinks: tuple[Sink, ...] = ()
_sinks_lock = threading.Lock()


def add_sink(sink: Sink) -> None:
    """Feed ``sink`` from now on (runs already going are not fed)."""
    global _sinks
    with _sinks_lock:
        if sink not in _sinks:
            _sinks = (*_sinks, sink)


def remove_sink(sink: Sink) -> None:
    global _sinks
    with _sinks_lock:
        _sinks = tuple(s for s in _sinks if s is not sink)


_popleft = deque.popleft
_REPORTED = frozenset({JournalEntry, AttemptRecord})
"""What a commit must hold to be reported: the rest (a workflow's end row, a waiting
mark, a child's creation) is told by the run's start, end and steps."""


def _feed(sinks: Sequence[Sink], what: str, call: str, *args: Any) -> None:
    """Call ``call`` on every sink; a broken one must not stop the others, nor the run."""
    for sink in sinks:
        try:
            getattr(sink, call)(*args)
        except Exception:
            _failed(what)


class Run:
    """One workflow run being reported (see the module documentation)."""

    __slots__ = ("app", "debug", "lock", "name", "offset_ns", "pending", "replayed",
                 "resumed", "since", "sinks", "span", "span_id", "state", "token",
                 "trace_id", "tracing", "version", "workflow_id")

    def __init__(self, app: App, rec: WorkflowRecord, resumed: int,
                 sinks: tuple[Sink, ...]) -> None:
        self.app = app
        self.workflow_id = rec.id
        self.name = rec.name
        self.version = rec.version
        self.token = rec.token
        self.resumed = resumed
        """Journal entries recorded by earlier runs (0: a first run)."""
        self.sinks = sinks
        self.span: Any = None
        """The OpenTelemetry span of this run, when its app traces."""
        self.tracing: Any = None
        """Its app's :class:`~crashsafe.observe.otel.Tracing`, when it traces."""
        self.trace_id: str | None = None
        self.span_id: str | None = None
        self.state: dict[int, Any] = {}
        """Per-sink state, keyed by ``id(sink)``."""
        self.replayed = 0
        self.offset_ns = int(app._clock_offset * 1e9)
        """The store's clock minus ours: records are stamped on the store's clock."""
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.pending: deque[JournalEntry] = deque()
        """Step results not reported yet (appended without a lock: deques are
        thread-safe)."""
        self.since = 0
        """The reporting thread's tick (:data:`_tick`) when the oldest of them was
        committed (roughly: the reporting thread may take them meanwhile, which only
        makes the next report sooner)."""
        self.lock = threading.Lock()
        """Held while reporting, so one run's reports never overlap nor reorder."""

    def set_trace(self, trace_id: str | None, span_id: str | None) -> None:
        """Put the run's trace in its log lines."""
        self.trace_id, self.span_id = trace_id, span_id

    def enter(self) -> Any:
        """Make the run's span current on this thread (spans your workflow and step code
        opens become its children); returns what :meth:`leave` needs."""
        if self.span is None or self.tracing is None:
            return None
        try:
            return self.tracing.attach(self.span)
        except Exception:
            _failed("making a run's span current")
            return None

    def leave(self, token: Any) -> None:
        if token is not None and self.tracing is not None:
            try:
                self.tracing.detach(token)
            except Exception:
                _failed("leaving a run's span")

    def step(self, e: JournalEntry) -> None:
        """A step's plain result (:func:`plain`) was just committed, on the workflow's
        thread. It waits for company (see the module). Never raises."""
        pending = self.pending
        pending.append(e)
        n = len(pending)
        if n == 1:
            self.since = _tick  # not the clock: the reporting thread's ticks
            with _waiting_lock:
                _waiting.add(self)
        elif n >= BATCH or _tick - self.since >= 2:
            self.flush()

    def committed(self, ops: Sequence[Op], t0: int) -> None:
        """``ops`` were just committed (on the workflow's thread): reported at once,
        after the step results waiting. Never raises."""
        if plain(ops):
            self.step(ops[0])  # type: ignore[arg-type]
            return
        for op in ops:
            if type(op) in _REPORTED:
                break
        else:  # nothing a sink or a log line reads (a workflow's end: see end())
            return
        t1 = _now_ns()
        with self.lock:
            self._flush()
            for sink in self.sinks:
                try:
                    sink.committed(self, ops, t0, t1)
                except Exception:
                    _failed("a commit")
            try:
                self._log_commit(ops, t1 - t0)
            except Exception:
                _failed("a commit")

    def flush(self) -> None:
        """Report the step results waiting. Never raises."""
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        # Not a copy and clear: another thread may append meanwhile (the reporting
        # thread flushes a run whose thread goes on; an async workflow's child start
        # commits from a worker thread while its other tasks commit steps).
        pending = self.pending
        entries = list(map(_popleft, repeat(pending, len(pending))))  # one by one, in C
        with _waiting_lock:  # one appended meanwhile waits for the next flush
            if pending:
                _waiting.add(self)
            else:
                _waiting.discard(self)
        if not entries:
            return
        for sink in self.sinks:
            try:
                sink.steps(self, entries)
            except Exception:
                _failed("a commit")
        if self.debug:  # a step's plain result is logged only when debugging
            try:
                for e in entries:
                    self._log_commit((e,), 0)
            except Exception:
                _failed("a commit")

    def _log_commit(self, ops: Sequence[Op], latency_ns: int) -> None:
        for op in ops:
            if type(op) is JournalEntry:
                if op.kind == "step":
                    if op.error is not None:
                        self._step_failed(op)
                    elif self.debug:
                        self._log(logging.DEBUG, "step %r (index %d) finished after %d "
                                  "attempt(s)", op.name, op.index, op.attempts,
                                  step=op.name, step_index=op.index, attempt=op.attempts)
                elif op.kind in ("wait", "signal", "sleep", "checkpoint"):
                    self._timer(op, latency_ns)
            elif type(op) is AttemptRecord and op.ended_at is not None \
                    and op.failure_class and op.delay is not None:
                self._log(logging.INFO, "step %r (index %d) attempt %d failed (%s): "
                          "retrying in %.2f s (%s)", op.step, op.index, op.attempt,
                          op.failure_class, op.delay, op.delay_source or "backoff",
                          step=op.step, step_index=op.index, attempt=op.attempt,
                          failure_class=op.failure_class)

    def _step_failed(self, e: JournalEntry) -> None:
        self._log(logging.WARNING, "step %r (index %d) failed after %d attempt(s): %s",
                  e.name, e.index, e.attempts, redact_text(describe(e.error)[:500]),
                  step=e.name, step_index=e.index, attempt=e.attempts)

    def _timer(self, e: JournalEntry, latency_ns: int) -> None:
        if e.kind == "wait":
            self._log(logging.INFO, "waiting for signal %r", e.name, step_index=e.index)
        elif e.kind == "signal":
            how = "timed out" if e.error is not None else "arrived"
            self._log(logging.INFO, "signal %r %s", e.name, how, step_index=e.index)
        elif self.debug:
            what = "checkpoint" if e.kind == "checkpoint" else "durable sleep"
            self._log(logging.DEBUG, "%s %r (index %d) recorded in %.2f ms", what, e.name,
                      e.index, latency_ns / 1e6, step_index=e.index)

    def _log(self, level: int, msg: str, *args: Any, **fields: Any) -> None:
        if log.isEnabledFor(level):
            extra: dict[str, Any] = {"workflow_id": self.workflow_id, "workflow": self.name}
            if self.trace_id is not None:
                extra["trace_id"], extra["span_id"] = self.trace_id, self.span_id
            log.log(level, msg, *args, extra={**extra, **fields})

    def end(self, outcome: str, error: BaseException | None, replayed: int) -> None:
        """The run ended (on the workflow's thread). Never raises."""
        with self.lock:  # also after the reporting thread's: reports never overlap
            if self.pending:
                self._flush()
            elif self in _waiting:  # its steps reported by the reporting thread
                with _waiting_lock:
                    _waiting.discard(self)
        self.replayed = replayed
        if self.sinks:
            at = time.time_ns()
            for sink in self.sinks:  # _feed, without looking the method up by name
                try:
                    sink.run_ended(self, outcome, error, at)
                except Exception:
                    _failed("the end of a run")
        try:
            self._log_end(outcome, error)
        except Exception:
            _failed("the end of a run")

    def _log_end(self, outcome: str, error: BaseException | None) -> None:
        level = logging.WARNING if outcome in ("error", "dead_letter", "store_error") \
            else logging.INFO
        if log.isEnabledFor(level):
            detail = f": {redact_text(str(error))[:500]}" if error is not None \
                and outcome not in ("ok", "suspended", "requeued") else ""
            self._log(level, "workflow %s %s%s", self.workflow_id, _ENDED.get(outcome, outcome),
                      detail, outcome=outcome)


_ENDED = {
    "ok": "succeeded", "error": "failed", "cancelled": "was cancelled",
    "dead_letter": "was dead-lettered", "aborted": "stopped in this process",
    "store_error": "stopped on a store error", "suspended": "suspended until its next retry",
    "requeued": "went back to its queue until its next retry",
}


def plain(ops: Sequence[Op]) -> bool:
    """Whether a commit holds a step's plain result only: what waits for company."""
    if len(ops) != 1:
        return False
    e = ops[0]
    return type(e) is JournalEntry and e.error is None and e.note is None \
        and e.kind == "step"


_waiting: set[Run] = set()
"""Runs with commits not reported yet; the reporting thread looks at them."""
_waiting_lock = threading.Lock()
_sweeper: threading.Thread | None = None
_sweeper_lock = threading.Lock()


def _sweep() -> None:
    """The reporting thread: count :data:`_tick` up every ``SWEEP_S / 2`` seconds, and
    report the steps of runs whose oldest waiting step has waited three ticks (a run
    busy in a slow step, blocked, or whose steps come more than a tick apart). A run
    whose steps come quickly reports its own, a batch at a time or once its oldest
    has waited two ticks (see :meth:`Run.step`): this thread would take the
    interpreter lock from it (from the event loop, for async workflows)."""
    global _tick
    while True:
        time.sleep(SWEEP_S / 2)
        _tick += 1
        try:
            _sweep_once(_tick - 3)
        except Exception:  # it must outlive anything: no one restarts it
            _failed("waiting steps")


_tick = 0
"""Counted up by the reporting thread every ``SWEEP_S / 2`` seconds: what a waiting
step's age is measured in (a step reads it, not the clock, which may also jump)."""


def _sweep_once(limit: int) -> None:
    with _waiting_lock:
        runs = list(_waiting)
    for run in runs:
        try:
            run.pending[0]
        except IndexError:  # reported meanwhile (a step appending re-registers it)
            with _waiting_lock:
                if not run.pending:
                    _waiting.discard(run)
            continue
        if run.since <= limit:
            run.flush()


def _forget_sweeper() -> None:
    """In a forked child: the reporting thread did not come along."""
    global _sweeper
    _sweeper = None


if hasattr(os, "register_at_fork"):  # not on Windows (no fork there either)
    os.register_at_fork(after_in_child=_forget_sweeper)


def _start_sweeper() -> None:
    global _sweeper
    with _sweeper_lock:
        if _sweeper is None or not _sweeper.is_alive():
            _sweeper = threading.Thread(target=_sweep, name="crashsafe-report", daemon=True)
            _sweeper.start()


def begin(app: App, rec: WorkflowRecord, resumed: int, stamp: Any = None) -> Run | None:
    """A run of ``rec`` starts in this process; ``resumed``: entries already recorded;
    ``stamp``: what the tracer stamped into its inputs, when it was started here just
    now (see :meth:`~crashsafe.observe.otel.Tracing.stamp_start`). None when nothing
    listens, or when reporting it failed (the run goes on)."""
    try:
        return _begin(app, rec, resumed, stamp)
    except Exception:
        _failed("the start of a run")
        return None


def _failed(what: str) -> None:
    """Observability must never stop a workflow: say what broke, and carry on."""
    log.warning("crashsafe could not report %s (the workflow is not affected)", what,
                exc_info=True)


def _begin(app: App, rec: WorkflowRecord, resumed: int, stamp: Any) -> Run | None:
    tracing = app._tracer()
    sinks = _sinks if tracing is None else (*_sinks, tracing)
    if not sinks and not log.isEnabledFor(logging.INFO):
        return None
    if _sweeper is None:  # not started yet, or lost to a fork
        _start_sweeper()
    run = Run(app, rec, resumed, sinks)
    if tracing is not None:
        run.tracing = tracing
        if not tracing.begin(run, rec.inputs, stamp):  # not sampled: its span only current
            sinks = run.sinks = _sinks
            if not sinks and not log.isEnabledFor(logging.INFO):
                return run
    if sinks:
        for sink in sinks:  # _feed, without looking the method up by name
            try:
                sink.run_started(run)
            except Exception:
                _failed("the start of a run")
    if resumed:
        run._log(logging.INFO, "workflow %s resumed under lease %d, %d recorded entries "
                 "to replay", rec.id, rec.token, resumed)
    elif run.debug:  # its end is logged at INFO; a start is news only when debugging
        run._log(logging.DEBUG, "workflow %s started", rec.id)
    return run


def recovered(app: App, claimed: Sequence[tuple[str, int]], dead: Sequence[str]) -> None:
    """A recovery sweep claimed ``claimed`` ((id, new token)) and dead-lettered ``dead``."""
    try:
        _recovered(app, claimed, dead)
    except Exception:
        _failed("a recovery sweep")


def _recovered(app: App, claimed: Sequence[tuple[str, int]], dead: Sequence[str]) -> None:
    if _sinks and (claimed or dead):
        _feed(_sinks, "a recovery sweep", "recovered", len(claimed), len(dead))
    if log.isEnabledFor(logging.INFO):
        for wid, token in claimed:
            log.info("workflow %s taken over by %s (token %d): its owner is gone", wid,
                     app.executor_id, token, extra={"workflow_id": wid})
