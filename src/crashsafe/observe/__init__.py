"""Observability: figures computed from the journal, and alert thresholds over them.

``compute(app.store, since, until, name)`` returns :class:`Metrics`;
``evaluate(metrics, Thresholds(...))`` returns one :class:`Check` per figure.
``crashsafe stats`` prints both.
"""

from .alerts import Check, Thresholds, Verdict, evaluate
from .metrics import STUCK_AFTER, BreakerStats, Metrics, Percentiles, RetryingStep, compute

__all__ = [
    "STUCK_AFTER",
    "BreakerStats",
    "Check",
    "Metrics",
    "Percentiles",
    "RetryingStep",
    "Thresholds",
    "Verdict",
    "compute",
    "evaluate",
]
