"""crashsafe: crash-only durable execution for AI agents.

Kill the process at any instant, restart it, and every workflow resumes where it
left off: completed steps return their recorded results instead of running again.
"""

from ._app import App
from ._checkpoint import (
    CheckpointInfo,
    CheckpointNotFoundError,
    StateDivergenceError,
    checkpoint,
)
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
from ._escalation import Escalation
from ._handle import WorkflowHandle
from ._locks import Lock, LockLostError, LockTimeoutError
from ._partial import save_partial
from ._queues import Queue
from ._secrets import Secret
from ._step import Step
from ._transact import TransactionConnection
from ._workflow import Workflow
from .exceptions import (
    CircuitOpenError,
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
    RetryBudgetExhaustedError,
    SerializationError,
    StepCrashedError,
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
from .policies.breaker import CircuitBreaker
from .policies.classify import FailureClass, classify, register_classifier
from .policies.fallback import fallback, fallback_async
from .policies.hedge import Hedge
from .policies.limits import ConcurrencyLimit, RateLimit
from .policies.retry import RetryBudget, RetryPolicy
from .stores import Status

__version__ = "0.1.0"

__all__ = [
    "NOT_APPLIED",
    "App",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcurrencyLimit",
    "ConfigurationError",
    "CorruptRecordError",
    "CrashsafeError",
    "Current",
    "DeadLetteredError",
    "EffectFailedError",
    "Escalation",
    "FailureClass",
    "Hedge",
    "IdempotencyKeyConflictError",
    "InvalidStateError",
    "Lock",
    "LockLostError",
    "LockTimeoutError",
    "NondeterminismError",
    "NotInWorkflowError",
    "Queue",
    "RateLimit",
    "ResultTimeoutError",
    "RetryBudget",
    "RetryBudgetExhaustedError",
    "RetryPolicy",
    "Secret",
    "SerializationError",
    "StateDivergenceError",
    "Status",
    "Step",
    "StepCrashedError",
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
    "checkpoint",
    "classify",
    "current",
    "fallback",
    "fallback_async",
    "now",
    "patched",
    "random",
    "register_classifier",
    "register_exception",
    "save_partial",
    "sleep",
    "sleep_async",
    "uuid4",
    "wait_for",
    "wait_for_async",
]
