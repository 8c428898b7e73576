"""Automatic checkpoints: a per-workflow policy decides when, from journaled figures.

``@app.workflow(checkpoint=CheckpointPolicy(every_steps=5))`` records a checkpoint of
the state the workflow registered with :func:`crashsafe.track` after every fifth step.
The checkpoint is taken at the workflow's next durable call (or its end), so the state
includes what the code did with the step's result, and it rides along with the next
commit instead of costing one of its own.

Every decision is made from figures the journal holds — how many steps were recorded
since the last checkpoint, their recorded start and end times, child workflows started
— never from the live clock, so a replay after a crash meets each automatic checkpoint
at the same journal index and verifies its state hash there like an explicit one. The
adaptive policy's interval is recorded in each of its checkpoints (``next``) and read
back on replay.

Why a recovery-time target: crashsafe's own crash recovery never re-runs a recorded
step. What a checkpoint bounds is the work done again when a workflow is wound back to
it — by an operator's ``rollback`` or by the corruption policy's return to the last
good checkpoint: the steps recorded since then, at their recorded latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ._checkpoint_select import Selective
from .exceptions import ConfigurationError, NotInWorkflowError

if TYPE_CHECKING:
    from ._context import WorkflowContext
    from .stores.base import JournalEntry

_UNSET: Any = object()
MAX_INTERVAL = 10_000


def _secs(value: float | timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else value
    if not isinstance(out, int | float) or isinstance(out, bool) or not out > 0:
        raise ConfigurationError(f"CheckpointPolicy({what}=...) must be a positive number "
                                 f"of seconds or a timedelta, not {value!r}")
    return float(out)


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When a workflow checkpoints the state it tracks, without calling ``checkpoint``.

    Give one or more triggers; a checkpoint is taken when any of them is due. Counters
    restart at every checkpoint, explicit ones included.
    """

    every_steps: int | None = None
    """After this many recorded steps (1: after each step). With ``recovery_target``,
    the adaptive policy's starting interval (default then: 1)."""
    every_seconds: float | timedelta | None = None
    """Once this much time has passed since the last checkpoint, by the recorded end
    time of the latest step (default: off)."""
    after_child: bool = False
    """After each child workflow it starts (at its next durable call, so a child called
    like a function has finished; default: off)."""
    recovery_target: float | timedelta | None = None
    """Adaptive: keep the work re-done after winding back to the last checkpoint (the
    recorded latency of the steps since) under this many seconds; checkpoint at once
    when a step takes it over (default: off)."""
    max_overhead: float = 0.15
    """Adaptive: the share of step latency checkpoints may cost; when they cost more,
    the interval grows (unless that breaks ``recovery_target``, which wins)."""
    select: Selective | None = None
    """What of the state to keep, for every checkpoint of the workflow (default: all)."""

    def __post_init__(self) -> None:
        n = self.every_steps
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigurationError(f"CheckpointPolicy(every_steps=...) must be an int >= 1,"
                                     f" not {n!r}")
        object.__setattr__(self, "every_seconds", _secs(self.every_seconds, "every_seconds"))
        object.__setattr__(self, "recovery_target",
                           _secs(self.recovery_target, "recovery_target"))
        share = self.max_overhead
        if not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigurationError("CheckpointPolicy(max_overhead=...) must be in (0, 1], "
                                     f"not {share!r}")
        if self.select is not None and not isinstance(self.select, Selective):
            raise ConfigurationError("CheckpointPolicy(select=...) must be a "
                                     "crashsafe.Selective")
        if n is None and self.every_seconds is None and not self.after_child \
                and self.recovery_target is None:
            raise ConfigurationError(
                "CheckpointPolicy needs a trigger: every_steps=, every_seconds=, "
                "after_child=True or recovery_target=")

    @property
    def adaptive(self) -> bool:
        return self.recovery_target is not None


class Tracker:
    """One run's view of what happened since its last checkpoint, fed in journal order
    (replayed entries as replay meets them, new ones as they commit), so the same
    decisions fall at the same indexes in every run."""

    __slots__ = ("busy", "children", "error", "interval", "last_end", "latency", "model",
                 "policy", "recorded_model", "seconds", "since", "state", "steps", "target",
                 "tokens")

    def __init__(self) -> None:
        self.policy: CheckpointPolicy | None = None
        self.state: Any = _UNSET
        self.busy = False
        self.tokens: int | None = None
        self.model: str | None = None
        self.recorded_model: str | None = None
        """The model the latest checkpoint recorded (a checkpoint stores it on change)."""
        self.interval = 1
        self.seconds: float | None = None
        self.target: float | None = None
        self.error: str | None = None
        self.reset(None)

    def use(self, policy: CheckpointPolicy | None) -> None:
        self.policy = policy
        if policy is not None:
            self.interval = policy.every_steps or 1
            self.seconds = _secs(policy.every_seconds, "every_seconds")
            self.target = _secs(policy.recovery_target, "recovery_target")

    def reset(self, at: float | None) -> None:
        """A checkpoint was recorded (or replayed) at ``at``."""
        self.since = at
        self.steps = 0
        self.children = 0
        self.latency = 0.0
        self.last_end: float | None = None
        self.error = None

    def observe(self, entry: JournalEntry) -> None:
        if entry.kind == "child":
            self.children += 1
            return
        if entry.kind != "step":
            return
        self.steps += 1
        self.latency += max(0.0, entry.ended_at - entry.started_at)
        self.last_end = entry.ended_at
        if self.since is None:
            self.since = entry.started_at
        if entry.error is not None:
            self.error = _describe_failure(entry)

    def due(self) -> bool:
        p = self.policy
        if p is None or self.busy or (self.steps == 0 and self.children == 0):
            return False
        if p.after_child and self.children:
            return True
        if (p.every_steps is not None or p.adaptive) and self.steps >= self.interval:
            return True
        if self.seconds is not None and self.last_end is not None \
                and self.since is not None and self.last_end - self.since >= self.seconds:
            return True
        return self.target is not None and self.latency >= self.target

    def next_interval(self, cost: float) -> int:
        """The adaptive interval after a checkpoint that cost ``cost`` seconds, from the
        steps since the previous one."""
        p = self.policy
        if p is None or self.target is None or self.steps == 0:
            return self.interval
        per_step = max(self.latency / self.steps, 1e-6)
        # The slack keeps 0.005 / 0.001 from rounding to 6.
        fewest = math.ceil(cost / (p.max_overhead * per_step) - 1e-9)  # cost within share
        most = max(1, math.floor(self.target / per_step + 1e-9))  # re-done work on target
        return max(1, min(max(self.interval, fewest), most, MAX_INTERVAL))

    def current_state(self) -> Any:
        state = self.state
        return state() if callable(state) else state


def _describe_failure(entry: JournalEntry) -> str:
    from . import _codec
    from ._secrets import redact_text

    try:
        info = _codec.decode(entry.error or b"{}", "step failure")
        kind = str(info.get("type", "")).rpartition(".")[2] or "error"
        # Masked like the error record it comes from: a checkpoint's metadata is not
        # walked by the store's redaction.
        message = redact_text(str(info.get("message", "")))[:160]
    except Exception:  # the record is reported elsewhere; this is only a summary
        kind, message = "error", ""
    return f"step {entry.name!r} (index {entry.index}) failed: {kind}: {message}".rstrip(": ")


def take_due(ctx: WorkflowContext) -> None:
    """Record the automatic checkpoint the policy says is due (called before the
    workflow's next durable call and at its end)."""
    from ._checkpoint import record

    tracker = ctx.auto
    state = tracker.state
    if state is _UNSET:
        return  # nothing tracked yet: nothing to save
    tracker.busy = True
    try:
        record(ctx, tracker.current_state(), None, auto=True)
    finally:
        tracker.busy = False


def _workflow_ctx(what: str) -> WorkflowContext:
    from ._context import _STEP, workflow_context

    ctx = workflow_context(what)
    if _STEP.get() is not None:
        raise NotInWorkflowError(f"{what} is called from workflow code, not inside a step "
                                 "(a step's body is not replayed)")
    return ctx


def track(state: Any) -> Any:
    """Register the state automatic checkpoints save, and return it.

    ``state`` is the object itself (a dict the workflow updates in place) or a
    function of no arguments that returns it (``lambda: {"messages": messages}``),
    called at each automatic checkpoint. Call it again to register another. Workflow
    code only; it records nothing by itself.
    """
    _workflow_ctx("crashsafe.track()").auto.state = state
    return state


def record_usage(tokens: int, model: str | None = None) -> None:
    """Add ``tokens`` to the workflow's token usage and note the model, from workflow
    code (with the figures a step returned, since a step's body is not replayed).
    Every later checkpoint records the total so far and the latest model."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ConfigurationError(f"record_usage(tokens=...) must be an int >= 0, "
                                 f"not {tokens!r}")
    tracker = _workflow_ctx("crashsafe.record_usage()").auto
    tracker.tokens = (tracker.tokens or 0) + tokens
    if model is not None:
        tracker.model = str(model)

