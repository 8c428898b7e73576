"""Every error crashsafe raises.

The tree::

    CrashsafeError                         root: catch this to catch anything of ours
    ├── ConfigurationError (ValueError)    bad URL, bad option, unknown store scheme
    ├── SerializationError (TypeError)     a value crashsafe cannot store or rebuild
    ├── NotInWorkflowError (RuntimeError)  a step or workflow-only call made elsewhere
    ├── UnknownWorkflowError (KeyError)    no workflow with that id / no such registered name
    ├── IdempotencyKeyConflictError (ValueError)  a key reused with different arguments
    ├── EffectFailedError                  a person resolved an unknown outcome as failed
    ├── NondeterminismError                replay met a different call than the journal holds
    ├── StepError                          a recorded step failure whose type cannot be rebuilt
    ├── StepTimeoutError (TimeoutError)    a step attempt ran past its timeout
    ├── StepCrashedError                   a step's last allowed attempt was cut off by a crash
    ├── CircuitOpenError                   a step's circuit breaker is open: failing fast
    ├── RetryBudgetExhaustedError          the shared retry budget is empty: not retrying
    ├── WorkflowFailedError                a workflow ended with an error that cannot be rebuilt
    ├── WorkflowCancelledError             result() of a cancelled workflow
    ├── DeadLetteredError                  result() of a workflow parked as dead letter
    ├── ResultTimeoutError (TimeoutError)  result(timeout=...) ran out
    ├── WaitTimeoutError (TimeoutError)    wait_for(name, timeout=...) saw no signal in time
    ├── InvalidStateError (RuntimeError)   an operation the workflow's status does not allow
    └── StoreError                         the database failed; committed data is intact
        ├── StoreUnavailableError          cannot open / reach the database
        ├── StoreFullError                 disk or quota full
        ├── StoreConflictError             a write conflicted with another writer
        └── CorruptRecordError             a stored record cannot be decoded

``WorkflowCancelled`` is not in the tree on purpose: it derives from
``BaseException`` so that ``except Exception`` in workflow code cannot swallow a
cancellation by accident.
"""

from __future__ import annotations


class CrashsafeError(Exception):
    """Root of every error crashsafe raises."""


class ConfigurationError(CrashsafeError, ValueError):
    """A URL, option or registration is invalid."""


class SerializationError(CrashsafeError, TypeError):
    """A value cannot be stored, or a stored value cannot be rebuilt into its type."""


class NotInWorkflowError(CrashsafeError, RuntimeError):
    """A call that only makes sense inside a workflow was made outside one."""


class UnknownWorkflowError(CrashsafeError, KeyError):
    """No workflow with this id exists, or no workflow function has this name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class IdempotencyKeyConflictError(CrashsafeError, ValueError):
    """An effect step's key was already used by another step with different arguments."""


class EffectFailedError(CrashsafeError):
    """A person resolved an effect's unknown outcome with ``{"action": "fail"}``."""


class NondeterminismError(CrashsafeError):
    """Replay met a different call than the journal recorded at the same index."""

    def __init__(self, workflow_id: str, step_index: int, expected: str, recorded: str) -> None:
        self.workflow_id = workflow_id
        self.step_index = step_index
        self.expected = expected
        self.recorded = recorded
        super().__init__(
            f"workflow {workflow_id!r}, step index {step_index}: the code now calls "
            f"{expected} but the journal recorded {recorded}. The workflow code changed "
            "while this workflow was in flight; guard the new path with "
            "crashsafe.patched(...) or register the old code under its old version."
        )

    def __reduce__(self) -> tuple[type[NondeterminismError], tuple[str, int, str, str]]:
        return (type(self), (self.workflow_id, self.step_index, self.expected, self.recorded))


class StepError(CrashsafeError):
    """A step failed with an exception type crashsafe does not rebuild.

    Raised both on the first run and on replay, so workflow code sees the same
    failure either way. ``type_name``, ``message`` and ``traceback`` describe the
    original exception.
    """

    def __init__(self, step_name: str, type_name: str, message: str, traceback: str = "",
                 failure_class: str | None = None) -> None:
        self.step_name = step_name
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.failure_class = failure_class
        """The failure class recorded at the first run (``rate_limited``, ...), if any."""
        super().__init__(f"step {step_name!r} failed with {type_name}: {message}")

    def __reduce__(self) -> tuple[type[StepError], tuple[str, str, str, str, str | None]]:
        return (type(self), (self.step_name, self.type_name, self.message, self.traceback,
                             self.failure_class))


class StepTimeoutError(CrashsafeError, TimeoutError):
    """A step attempt ran longer than its ``timeout``."""


class StepCrashedError(CrashsafeError):
    """A retried step's last allowed attempt was cut off by a process crash (recorded
    attempts count even when a crash ends them, so a step that kills its process cannot
    run more often than its policy allows)."""


class CircuitOpenError(CrashsafeError):
    """The step's circuit breaker is open (or half-open with its one probe in flight
    elsewhere): the call was not made. ``breaker`` names the breaker."""

    def __init__(self, message: str, breaker: str = "") -> None:
        super().__init__(message, breaker)
        self.breaker = breaker

    def __str__(self) -> str:
        return str(self.args[0])


class RetryBudgetExhaustedError(CrashsafeError):
    """A failed attempt was not retried because the shared retry budget is empty."""


class WorkflowFailedError(CrashsafeError):
    """A workflow failed with an exception type crashsafe does not rebuild."""

    def __init__(self, workflow_id: str, type_name: str, message: str, traceback: str = "") -> None:
        self.workflow_id = workflow_id
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        super().__init__(f"workflow {workflow_id!r} failed with {type_name}: {message}")

    def __reduce__(self) -> tuple[type[WorkflowFailedError], tuple[str, str, str, str]]:
        return (type(self), (self.workflow_id, self.type_name, self.message, self.traceback))


class WorkflowCancelledError(CrashsafeError):
    """The workflow was cancelled before it finished."""


class DeadLetteredError(CrashsafeError):
    """The workflow was parked as a dead letter; ``crashsafe resume ID`` revives it."""


class ResultTimeoutError(CrashsafeError, TimeoutError):
    """``result(timeout=...)`` ran out before the workflow finished."""


class WaitTimeoutError(CrashsafeError, TimeoutError):
    """``crashsafe.wait_for(name, timeout=...)`` saw no signal before its deadline."""


class InvalidStateError(CrashsafeError, RuntimeError):
    """The workflow's current status does not allow this operation."""


class StoreError(CrashsafeError):
    """The database failed. Data committed before the failure is intact."""


class StoreUnavailableError(StoreError):
    """The database cannot be opened or reached."""


class StoreFullError(StoreError):
    """The disk or the database quota is full; nothing of the failed write was kept."""


class StoreConflictError(StoreError):
    """A write conflicted with another writer (for example a duplicate journal entry)."""


class CorruptRecordError(StoreError):
    """A stored record cannot be decoded; it was not used.

    ``workflow_id``, ``index`` and ``kind`` name the record when it is known (its place
    in the store, as :class:`~crashsafe._seal.RecordContext` has it); a workflow's
    ``on_corrupt`` policy uses them to decide what to roll back.
    """

    def __init__(self, message: str, workflow_id: str | None = None, index: int | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id
        self.index = index
        self.kind = kind


class WorkflowCancelled(BaseException):
    """Raised inside a cancelled workflow at its next durable call.

    Derives from ``BaseException`` so a broad ``except Exception`` in workflow
    code does not swallow it. Clean up in ``finally`` and let it propagate.
    """


__all__ = [
    "ConfigurationError",
    "CorruptRecordError",
    "CrashsafeError",
    "DeadLetteredError",
    "EffectFailedError",
    "IdempotencyKeyConflictError",
    "InvalidStateError",
    "NondeterminismError",
    "NotInWorkflowError",
    "ResultTimeoutError",
    "SerializationError",
    "StepError",
    "StepTimeoutError",
    "StoreConflictError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "UnknownWorkflowError",
    "WaitTimeoutError",
    "WorkflowCancelled",
    "WorkflowCancelledError",
    "WorkflowFailedError",
]
