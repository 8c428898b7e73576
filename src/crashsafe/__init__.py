"""crashsafe: crash-only durable execution for AI agents.

Kill the process at any instant, restart it, and every workflow resumes where it
left off: completed steps return their recorded results instead of running again.
"""

from ._app import App
from ._checkpoint import (
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointPrunedError,
    StateDivergenceError,
    checkpoint,
)
from ._checkpoint_policy import CheckpointPolicy, record_usage, track
from ._checkpoint_select import KeepLast, Selective
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
from ._partial import astream_partial, save_partial, stream_partial
from ._queues import Queue
from ._retention import GcReport, Retention
from ._secrets import DEFAULT_PATTERNS as REDACT_PATTERNS
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
    "REDACT_PATTERNS",
    "App",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointPolicy",
    "CheckpointPrunedError",
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
    "GcReport",
    "Hedge",
    "IdempotencyKeyConflictError",
    "InvalidStateError",
    "KeepLast",
    "Lock",
    "LockLostError",
    "LockTimeoutError",
    "NondeterminismError",
    "NotInWorkflowError",
    "Queue",
    "RateLimit",
    "ResultTimeoutError",
    "Retention",
    "RetryBudget",
    "RetryBudgetExhaustedError",
    "RetryPolicy",
    "Secret",
    "Selective",
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
    "astream_partial",
    "checkpoint",
    "classify",
    "current",
    "fallback",
    "fallback_async",
    "now",
    "patched",
    "random",
    "record_usage",
    "register_classifier",
    "register_exception",
    "save_partial",
    "sleep",
    "sleep_async",
    "stream_partial",
    "track",
    "uuid4",
    "wait_for",
    "wait_for_async",
]
