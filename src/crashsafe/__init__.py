"""crashsafe: crash-only durable execution for AI agents.

Kill the process at any instant, restart it, and every workflow resumes where it
left off: completed steps return their recorded results instead of running again.
"""

from ._app import App
from ._context import Current, current
from ._durable import (
    now,
    patched,
    random,
    sleep,
    sleep_async,
    uuid4,
    wait_for,
    wait_for_async,
)
from ._effects import NOT_APPLIED
from ._errors import register_exception
from ._handle import WorkflowHandle
from ._step import RetryPolicy, Step
from ._transact import TransactionConnection
from ._workflow import Workflow
from .exceptions import (
    ConfigurationError,
    CorruptRecordError,
    CrashsafeError,
    DeadLetteredError,
    EffectFailedError,
    IdempotencyKeyConflictError,
    InvalidStateError,
    NondeterminismError,
    NotInWorkflowError,
    ResultTimeoutError,
    SerializationError,
    StepError,
    StepTimeoutError,
    StoreConflictError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    UnknownWorkflowError,
    WaitTimeoutError,
    WorkflowCancelled,
    WorkflowCancelledError,
    WorkflowFailedError,
)
from .stores import Status

__version__ = "0.1.0"

__all__ = [
    "NOT_APPLIED",
    "App",
    "ConfigurationError",
    "CorruptRecordError",
    "CrashsafeError",
    "Current",
    "DeadLetteredError",
    "EffectFailedError",
    "IdempotencyKeyConflictError",
    "InvalidStateError",
    "NondeterminismError",
    "NotInWorkflowError",
    "ResultTimeoutError",
    "RetryPolicy",
    "SerializationError",
    "Status",
    "Step",
    "StepError",
    "StepTimeoutError",
    "StoreConflictError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "TransactionConnection",
    "UnknownWorkflowError",
    "WaitTimeoutError",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowCancelledError",
    "WorkflowFailedError",
    "WorkflowHandle",
    "__version__",
    "current",
    "now",
    "patched",
    "random",
    "register_exception",
    "sleep",
    "sleep_async",
    "uuid4",
    "wait_for",
    "wait_for_async",
]
