"""One step call's way through its attempts, journaled so a restart continues it.

The first attempt writes nothing before its body (a step that succeeds at once costs
one commit: its journal entry). When an attempt fails and the policy retries, the
failure is committed with its class, the planned delay and where the delay came from;
before each later attempt's body its start is committed. After a crash the driver is
rebuilt from those rows: it waits out what remains of the delay, or, if an attempt was
cut off, counts it as used. So the total number of attempts across any number of
restarts never exceeds ``max_attempts`` — except that a crash during the unrecorded
*first* attempt runs it again (bounded by the app's ``max_recoveries``).

The driver holds no I/O of its own: the sync and async runners in :mod:`._step` commit
the ops it returns and do the waiting, so both share every decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._context import WorkflowContext
from ._errors import error_payload, failure_class
from .exceptions import (
    CircuitOpenError,
    ConfigurationError,
    RetryBudgetExhaustedError,
    StepCrashedError,
)
from .policies.classify import Failure, FailureClass, classify
from .policies.retry import Decision
from .policies.runtime import Ticket
from .stores.base import AttemptRecord, Op

if TYPE_CHECKING:
    from ._step import Step

CRASHED = "crashed"


class Driver:
    """Where one step call stands: the attempt number, its delays, its history."""

    __slots__ = ("attempt", "attempt_started", "ctx", "final_error", "history", "idx",
                 "limits_held", "next_at", "pending", "policy", "prev_delay", "started", "step",
                 "ticket", "who")

    def __init__(self, step: Step[Any, Any], ctx: WorkflowContext, idx: int,
                 records: list[AttemptRecord]) -> None:
        self.step = step
        self.ctx = ctx
        self.idx = idx
        self.policy = step.retry
        self.attempt = 0
        self.started = ctx.app.clock()
        self.attempt_started = self.started
        self.next_at: float | None = None
        self.prev_delay: float | None = None
        self.history: list[str] = []
        self.pending: list[Op] = []
        self.final_error: Exception | None = None
        self.ticket: Ticket | None = None
        self.limits_held: list[Any] = []
        self.who = f"{ctx.workflow_id}:{idx}"
        if records:
            self._restore(records)

    # -- after a crash ----------------------------------------------------------------------
    def _restore(self, records: list[AttemptRecord]) -> None:
        self.started = records[0].started_at
        for r in records:
            if r.ended_at is not None:
                self.history.append(_describe(r))
        last = records[-1]
        self.attempt = last.attempt
        self.prev_delay = last.delay
        if last.ended_at is not None:
            self.next_at = last.next_at if last.next_at is not None else self.ctx.app.clock()
            return
        # The process died during this attempt: it counts as used.
        now = self.ctx.app.clock()
        decision = self.policy.decide_crash(last.attempt, now - self.started, last.delay)
        exc = StepCrashedError(
            f"attempt {last.attempt} of step {self.step.name!r} was cut off by a crash and "
            f"{decision.reason} (max_attempts={self.policy.max_attempts})")
        rec = AttemptRecord(self.ctx.workflow_id, self.idx, last.attempt, self.step.name,
                            last.started_at, now, CRASHED, None,
                            decision.delay if decision.retry else None,
                            decision.source if decision.retry else None,
                            now + decision.delay if decision.retry else None,
                            "the process died during this attempt")
        self.pending.append(rec)
        self.history.append(_describe(rec))
        if decision.retry:
            self.next_at = now + decision.delay
            self.prev_delay = decision.delay
        else:
            self.final_error = exc

    # -- the loop ----------------------------------------------------------------------------
    def next_attempt(self) -> float:
        """Begin the next attempt: seconds to wait before its body may run."""
        self.attempt += 1
        if self.next_at is None:
            return 0.0
        return max(0.0, self.next_at - self.ctx.app.clock())

    def start_ops(self) -> list[Op]:
        """What to commit right before the body runs (the recorded start of a retry)."""
        ops, self.pending = self.pending, []
        self.attempt_started = self.ctx.app.clock()
        if self.attempt >= 2:
            ops.append(AttemptRecord(self.ctx.workflow_id, self.idx, self.attempt,
                                     self.step.name, self.attempt_started))
        else:
            self.started = self.attempt_started
        if self.attempt == 1 and self.policy.budget is not None:
            self.ctx.app._resilience.first_call(self.policy.budget)
        return ops

    def failed(self, exc: Exception) -> tuple[Decision, list[Op], Exception]:
        """Decide after a failed attempt: the decision, the ops to commit before waiting
        (when retrying), and the error to record if the step gives up."""
        now = self.ctx.app.clock()
        failure = _classify(exc)
        if isinstance(exc, CircuitOpenError):
            decision = Decision(False, reason="its circuit breaker is open")
        elif isinstance(exc, ConfigurationError):
            decision = Decision(False, reason="a configuration error is not retried")
        else:
            decision = self.policy.decide(self.attempt, exc, failure, now - self.started,
                                          self.prev_delay)
        error: Exception = exc
        budget = self.policy.budget
        if decision.retry and budget is not None \
                and not self.ctx.app._resilience.withdraw(budget):
            error = RetryBudgetExhaustedError(
                f"step {self.step.name!r} was not retried: retry budget {budget.name!r} is "
                f"empty (retries are limited to {budget.ratio:.0%} of calls); attempt "
                f"{self.attempt} failed with {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            decision = Decision(False, reason=f"retry budget {budget.name!r} is empty")
        if not decision.retry:
            return decision, [], error
        rec = AttemptRecord(self.ctx.workflow_id, self.idx, self.attempt, self.step.name,
                            self.attempt_started, now, failure.cls.value,
                            error_payload(exc), decision.delay, decision.source,
                            now + decision.delay, failure.detail[:200] or None)
        self.history.append(_describe(rec))
        self.next_at = now + decision.delay
        self.prev_delay = decision.delay
        return decision, [rec], error

    def closing_ops(self, exc: BaseException | None) -> list[Op]:
        """The final attempt's row, ended, to commit with the step's journal entry (only
        attempts after the first have a row to close)."""
        if self.attempt < 2:
            return []
        cls = _classify(exc).cls.value if exc is not None else None
        return [AttemptRecord(self.ctx.workflow_id, self.idx, self.attempt, self.step.name,
                              self.attempt_started, self.ctx.app.clock(), cls,
                              error_payload(exc) if exc is not None else None)]

    def note(self, extra: str | None = None) -> str | None:
        """The timeline note of the step's journal entry: how its retries went."""
        parts = []
        if self.history:
            parts.append(f"{self.attempt} attempts: " + "; ".join(self.history))
        if extra:
            parts.append(extra)
        return " | ".join(parts) or None


def _classify(exc: BaseException) -> Failure:
    recorded = failure_class(exc) if hasattr(exc, "failure_class") else None
    if recorded is not None:
        try:
            return Failure(FailureClass(recorded))
        except ValueError:
            pass
    return classify(exc)


def _describe(r: AttemptRecord) -> str:
    what = r.failure_class or "failed"
    if r.delay is None:
        return f"#{r.attempt} {what}"
    return f"#{r.attempt} {what}, next in {r.delay:.2f} s ({r.delay_source})"
