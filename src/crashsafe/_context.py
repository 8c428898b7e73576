"""Per-workflow execution state and the journal cursor used for replay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._checkpoint_policy import Tracker, take_due
from .exceptions import NondeterminismError, NotInWorkflowError, WorkflowCancelled
from .stores.base import AttemptRecord, FinishWorkflow, JournalEntry, MarkWaiting, Op

_FENCED = (JournalEntry, FinishWorkflow, MarkWaiting, AttemptRecord)

if TYPE_CHECKING:
    from ._app import App
    from ._instrument import Run


class _Shutdown(BaseException):
    """Stops a workflow at its next durable call because its app is closing."""


class _Suspend(BaseException):
    """Unwinds a sync workflow that must wait long (a distant retry): its thread is freed
    and the app resumes it from the journal at ``wake_at``."""

    def __init__(self, wake_at: float, reason: str) -> None:
        super().__init__(reason)
        self.wake_at = wake_at
        self.reason = reason


class _ReplayEnd(BaseException):
    """A check-only replay reached the end of the recorded journal."""


class Current:
    """What :func:`crashsafe.current` returns (read-only by convention).

    Inside a step, ``step_index``, ``step_name``, ``attempt`` (from 1) and
    ``idempotency_key`` describe the running step; in workflow code outside a step
    they are ``None``.
    """

    __slots__ = ("_deadline", "_key", "attempt", "step_index", "step_name", "workflow_id",
                 "workflow_name")

    def __init__(self, workflow_id: str, workflow_name: str, step_index: int | None = None,
                 step_name: str | None = None, attempt: int | None = None,
                 key: str | None = None, deadline: float | None = None) -> None:
        self.workflow_id = workflow_id
        self.workflow_name = workflow_name
        self.step_index = step_index
        self.step_name = step_name
        self.attempt = attempt
        self._key = key
        self._deadline = deadline

    def time_left(self) -> float | None:
        """Seconds left before this attempt's ``timeout`` (None without one). Pass it to
        the call a sync step makes (``client.with_options(timeout=...)``), so the call
        ends by itself: a sync step's thread cannot be stopped from outside."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    @property
    def idempotency_key(self) -> str | None:
        """Stable across retries, crashes and processes: the key the caller gave an
        effect step (``key=``), else ``"<workflow id>:<step index>"``."""
        if self._key is not None:
            return self._key
        if self.step_index is None:
            return None
        return idempotency_key(self.workflow_id, self.step_index)

    @property
    def in_step(self) -> bool:
        return self.step_index is not None

    @property
    def partial(self) -> Any:
        """Inside a streaming step: the partial output it saved with
        ``crashsafe.save_partial`` before a crash, or None (see crashsafe._partial)."""
        from ._partial import load_partial

        return load_partial()

    def __repr__(self) -> str:
        return (f"Current(workflow_id={self.workflow_id!r}, step_index={self.step_index!r}, "
                f"step_name={self.step_name!r}, attempt={self.attempt!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Current) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def idempotency_key(workflow_id: str, step_index: int) -> str:
    """The key a step's external calls should carry: same across retries and crashes."""
    return f"{workflow_id}:{step_index}"


class WorkflowContext:
    """Everything one running workflow needs: its id, its journal, its cursor."""

    __slots__ = (
        "_async_wake", "app", "attempts", "auto", "cancel_event", "check_only",
        "checkpoint_base", "checkpoint_state",
        "compensating",
        "compensations", "diverged", "executed", "fresh", "hedges", "instrument", "is_async",
        "journal",
        "next_index", "partials", "patches", "pending", "queue", "recorded", "replayed", "riders",
        "shutdown",
        "signal_event", "token", "waits", "workflow_id", "workflow_name",
    )

    def __init__(
        self,
        app: App,
        workflow_id: str,
        workflow_name: str,
        journal: Sequence[JournalEntry],
        *,
        is_async: bool,
        check_only: bool = False,
        fresh: bool = False,
        token: int | None = None,
    ) -> None:
        self.app = app
        self.fresh = fresh
        self.token = token
        """The fencing token of this run's lease, stamped on every write it commits."""
        self.queue: str | None = None
        """The queue this workflow came from, if any."""
        self.partials: set[str] = set()
        """Keys of partial outputs saved by the running step (dropped once it ends)."""
        self.checkpoint_state: tuple[Any, int, int | None] | None = None
        """(state, ordinal, ordinal of its last full snapshot) of the latest checkpoint;
        None for the last: the next checkpoint is a full snapshot (a replayed one whose
        state retention dropped, or recorded under other redaction settings)."""
        self.checkpoint_base: tuple[int, bytes] | None = None
        """(journal index, canonical bytes of its state) of the latest checkpoint: what
        the next delta is compressed against (see crashsafe._checkpoint_pack)."""
        """Started by this process just now: no attempt of it can have been recorded."""
        self.attempts: dict[int, list[AttemptRecord]] | None = None
        self.hedges = 0
        self.instrument: Run | None = None
        """Where this run reports what it commits (None: nothing listens)."""
        self.workflow_id = workflow_id
        self.workflow_name = workflow_name
        # Compensations are not calls of the workflow's own code: replay never matches
        # them; the cancellation path reads them to run each one once.
        self.journal: dict[int, JournalEntry] = {
            e.index: e for e in journal if e.kind != "compensate"}
        self.compensations: dict[int, JournalEntry] = {
            e.index: e for e in journal if e.kind == "compensate"}
        self.recorded: list[JournalEntry] = list(self.journal.values())
        self.compensating = False
        self.next_index = 0
        self.pending: list[Op] = []
        # Automatic checkpoints: what their policy has seen, and the entries that ride
        # along with the next commit (unlike ``pending``, nothing waits for them).
        self.auto = Tracker()
        self.riders: list[Op] = []
        self.is_async = is_async
        self.check_only = check_only
        self.cancel_event = threading.Event()
        self.signal_event = threading.Event()
        self._async_wake: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self.waits: dict[str, int] = {}
        self.shutdown = False
        self.executed = 0
        self.replayed = 0
        self.patches: dict[str, bool] = {}
        # Once replay diverged, every later durable call and the workflow's end raise it
        # again, so an `except Exception` in workflow code cannot paper over it.
        self.diverged: NondeterminismError | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def wake(self, *, cancel: bool = False) -> None:
        """Wake a durable wait (a signal arrived, or the workflow must stop)."""
        if cancel:
            self.cancel_event.set()
        self.signal_event.set()
        waiter = self._async_wake
        if waiter is not None:
            loop, fut = waiter
            loop.call_soon_threadsafe(_resolve, fut)

    async def sleep_until_woken(self, seconds: float) -> None:
        """Async wait of at most ``seconds`` that :meth:`wake` cuts short."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._async_wake = (loop, fut)
        try:
            if self.signal_event.is_set() or self.cancel_event.is_set():
                return
            try:
                await asyncio.wait_for(fut, seconds)
            except TimeoutError:
                pass
        finally:
            self._async_wake = None

    def check_interrupt(self) -> None:
        if self.shutdown:
            raise _Shutdown
        if self.cancel_event.is_set() and not self.compensating:
            raise WorkflowCancelled(f"workflow {self.workflow_id!r} was cancelled")

    def begin(self, kind: str, name: str) -> tuple[int, JournalEntry | None]:
        """Take the next journal index; return the recorded entry there, if any."""
        self.check_interrupt()
        if self.diverged is not None:
            raise self.diverged
        if kind != "checkpoint" and self.auto.due():
            take_due(self)  # before this call takes its index, as in every run
        idx = self.next_index
        self.next_index = idx + 1
        entry = self.journal.pop(idx, None)
        if entry is None:
            if self.check_only:
                raise _ReplayEnd
            return idx, None
        if entry.kind != kind or entry.name != name:
            self.diverged = NondeterminismError(
                self.workflow_id, idx, f"{kind} {name!r}", f"{entry.kind} {entry.name!r}"
            )
            raise self.diverged
        self.replayed += 1
        self.auto.observe(entry)
        return idx, entry

    def attempts_for(self, idx: int) -> list[AttemptRecord]:
        """Recorded attempts of the step at ``idx`` (read once per run, and only for a
        workflow that may have run before: a recovered or resumed one). Blocking."""
        if self.fresh or self.check_only:
            return []
        if self.attempts is None:
            found: dict[int, list[AttemptRecord]] = {}
            for rec in self.app.store.load_attempts(self.workflow_id):
                found.setdefault(rec.index, []).append(rec)
            self.attempts = found
        return self.attempts.get(idx, [])

    def peek(self) -> JournalEntry | None:
        if self.auto.due():
            take_due(self)  # the next call lands after it, in every run: look there
        return self.journal.get(self.next_index)

    def leftover_check(self) -> None:
        """After the workflow returned: every recorded entry must have been met, and no
        divergence may have been caught and ignored."""
        if self.diverged is not None:
            raise self.diverged
        if self.auto.due() and (not self.check_only or self.next_index in self.journal):
            take_due(self)  # the workflow's end is a decision point too
        if self.journal:
            idx = min(self.journal)
            entry = self.journal[idx]
            self.diverged = NondeterminismError(
                self.workflow_id, idx, "no further call (the workflow returned)",
                f"{entry.kind} {entry.name!r}",
            )
            raise self.diverged

    def _fence(self, ops: list[Op]) -> None:
        token = self.token
        if token is None:
            return
        wid = self.workflow_id
        for op in ops:
            if isinstance(op, _FENCED) and op.token is None and op.workflow_id == wid:
                op.token = token

    def commit(self, ops: list[Op]) -> None:
        if self.shutdown:
            raise _Shutdown
        if self.pending or self.riders:
            ops = self.riders + self.pending + ops
            self.pending = []
            self.riders = []
        self._fence(ops)
        obs = self.instrument
        if obs is None:
            self.app._committer.commit(ops)
        elif len(ops) == 1 and type(e := ops[0]) is JournalEntry and e.kind == "step" \
                and e.error is None and e.note is None:  # _instrument.plain(), inline
            self.app._committer.commit(ops)
            obs.step(e)
        else:
            t0 = _now_ns()
            self.app._committer.commit(ops)
            obs.committed(ops, t0)
        self._note_committed(ops)

    def _note_committed(self, ops: Sequence[Op]) -> None:
        for op in ops:
            if type(op) is JournalEntry and op.kind != "compensate":
                self.recorded.append(op)
                if op.workflow_id == self.workflow_id:
                    self.auto.observe(op)

    async def commit_async(self, ops: list[Op]) -> None:
        if self.shutdown:
            raise _Shutdown
        if self.pending or self.riders:
            ops = self.riders + self.pending + ops
            self.pending = []
            self.riders = []
        self._fence(ops)
        obs = self.instrument
        if obs is None:
            await self.app._committer.commit_async(ops)
        elif len(ops) == 1 and type(e := ops[0]) is JournalEntry and e.kind == "step" \
                and e.error is None and e.note is None:  # _instrument.plain(), inline
            await self.app._committer.commit_async(ops)
            obs.step(e)
        else:
            t0 = _now_ns()
            await self.app._committer.commit_async(ops)
            obs.committed(ops, t0)
        self._note_committed(ops)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_now_ns = time.time_ns
_WORKFLOW: ContextVar[WorkflowContext | None] = ContextVar("crashsafe_workflow", default=None)
_STEP: ContextVar[Current | None] = ContextVar("crashsafe_step", default=None)


def workflow_context(what: str) -> WorkflowContext:
    ctx = _WORKFLOW.get()
    if ctx is None:
        raise NotInWorkflowError(
            f"{what} was called outside a workflow; call it from a function decorated "
            "with @app.workflow"
        )
    return ctx


def current() -> Current:
    """Describe the running workflow and step (see :class:`Current`).

    Raises :class:`~crashsafe.NotInWorkflowError` outside a workflow.
    """
    step = _STEP.get()
    if step is not None:
        return step
    ctx = workflow_context("crashsafe.current()")
    return Current(ctx.workflow_id, ctx.workflow_name)
