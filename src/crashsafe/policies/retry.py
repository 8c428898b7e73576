"""Retry policies: which failures are retried, how long to wait, when to give up.

The decision for one failed attempt is a pure function of the policy, the failure
(classified by :mod:`crashsafe.policies.classify`), the attempt number and the time
already spent, so the engine can journal it (attempt, class, delay and where the delay
came from) and a restarted process continues exactly where the crashed one stopped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Literal

from .classify import DEFAULT_RULES, ClassRule, Failure, FailureClass

Jitter = Literal["full", "decorrelated", "none"]


def seconds(value: float | timedelta | None, what: str) -> float | None:
    """Accept seconds or a timedelta; reject negatives and NaN with a message naming ``what``."""
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if out < 0 or math.isnan(out):
        raise ValueError(f"{what} must be a non-negative duration, got {value!r}")
    return out


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """A token bucket shared by every process on the store: retries may use at most
    ``ratio`` of the calls made (plus a ``burst`` reserve), so an outage cannot multiply
    the load on a dependency. When it is empty a failure is not retried and the step
    fails with :class:`~crashsafe.RetryBudgetExhaustedError`."""

    name: str = "default"
    """Budgets with the same name share one bucket in the store."""
    ratio: float = 0.1
    """Each first attempt deposits this many tokens; each retry takes one."""
    burst: float = 10.0
    """Most tokens the bucket holds (and what a new bucket starts with)."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("RetryBudget.name must be a non-empty string")
        if not 0 < self.ratio <= 1:
            raise ValueError("RetryBudget.ratio must be in (0, 1]")
        if self.burst < 1:
            raise ValueError("RetryBudget.burst must be at least 1")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt."""

    retry: bool
    delay: float = 0.0
    source: str = "backoff"
    """``backoff``, or where a server-given delay came from (``retry-after header``...)."""
    reason: str = ""
    """Why the step gives up (when ``retry`` is False)."""
    escalate: bool = False
    """Ask a person instead of failing (the policy allows it and the class calls for it)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step retries a failed attempt. Attempts are journaled: a restart continues
    the count, so the total across any number of crashes never exceeds ``max_attempts``
    (see docs/resilience.md for the one exception: a crash during the *first* attempt).
    """

    max_attempts: int = 3
    """Total attempts including the first. 1 means no retry."""
    initial_delay: float | timedelta = 0.5
    """Seconds (or a timedelta) before the second attempt, before jitter."""
    max_delay: float | timedelta = 30.0
    """Upper bound of a computed backoff delay. A server's Retry-After may ask for more;
    it is honoured up to ``max_total``."""
    backoff: float = 2.0
    """Each delay is the previous one times this factor."""
    jitter: Jitter | bool = "full"
    """``"full"`` (uniform in [0, delay]), ``"decorrelated"`` (uniform in
    [initial, 3 x previous]), ``"none"``; True means full and False none."""
    max_total: float | timedelta | None = None
    """Give up when the next attempt would start later than this after the first one."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Only these exception types are retried (and only if their failure class is)."""
    give_up_on: tuple[type[BaseException], ...] = ()
    """These are never retried, even if they match ``retry_on``."""
    rules: Mapping[FailureClass | str, ClassRule] = field(default_factory=dict)
    """Per-class overrides of :data:`~crashsafe.policies.classify.DEFAULT_RULES`."""
    honor_retry_after: bool = True
    """Wait at least what a rate-limit response asked for (Retry-After headers, body hints)."""
    budget: RetryBudget | None = None
    """A shared retry budget; None retries without one."""
    escalate: bool = False
    """Ask a person instead of failing, for failures whose class calls for it (auth,
    insufficient quota, content policy) and when attempts run out."""
    suspend_after: float | timedelta = 60.0
    """Waits longer than this release the worker: the workflow is parked and resumed
    when the next attempt is due (a durable timer)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be an int of at least 1")
        object.__setattr__(self, "initial_delay",
                           seconds(self.initial_delay, "RetryPolicy.initial_delay"))
        object.__setattr__(self, "max_delay", seconds(self.max_delay, "RetryPolicy.max_delay"))
        object.__setattr__(self, "max_total", seconds(self.max_total, "RetryPolicy.max_total"))
        object.__setattr__(self, "suspend_after",
                           seconds(self.suspend_after, "RetryPolicy.suspend_after"))
        if self.backoff < 1:
            raise ValueError("RetryPolicy.backoff must be >= 1")
        jitter: object = self.jitter
        if isinstance(jitter, bool):
            jitter = "full" if jitter else "none"
        if jitter not in ("full", "decorrelated", "none"):
            raise ValueError("RetryPolicy.jitter must be 'full', 'decorrelated' or 'none'")
        object.__setattr__(self, "jitter", jitter)
        rules = {FailureClass(k): v for k, v in self.rules.items()}
        object.__setattr__(self, "rules", MappingProxyType(rules))

    # -- decisions ------------------------------------------------------------------------
    def rule(self, cls: FailureClass) -> ClassRule:
        """The rule for a failure class: this policy's override, else the default."""
        return self.rules.get(cls) or DEFAULT_RULES[cls]

    def backoff_delay(self, attempt: int, previous: float | None = None) -> float:
        """Seconds before attempt ``attempt + 1`` from backoff and jitter alone."""
        first = float(self.initial_delay)  # type: ignore[arg-type]
        most = float(self.max_delay)  # type: ignore[arg-type]
        cap = min(most, first * self.backoff ** max(0, attempt - 1))
        if self.jitter == "full":
            return random.uniform(0, cap)
        if self.jitter == "decorrelated":
            prev = previous if previous is not None and previous > 0 else first
            return min(most, random.uniform(first, max(first, prev * 3)))
        return cap

    def decide(self, attempt: int, exc: BaseException, failure: Failure, elapsed: float,
               previous_delay: float | None = None) -> Decision:
        """What follows the failure of attempt number ``attempt`` (from 1), ``elapsed``
        seconds after the first attempt started."""
        rule = self.rule(failure.cls)
        if isinstance(exc, self.give_up_on) or not isinstance(exc, self.retry_on):
            return Decision(False, reason=f"{type(exc).__name__} is not retried by this policy")
        if not rule.retry:
            return Decision(False, reason=f"{failure.cls.value} failures are not retried",
                            escalate=self.escalate and rule.escalate)
        if attempt >= self.max_attempts:
            return Decision(False, reason=f"all {self.max_attempts} attempts failed",
                            escalate=self.escalate)
        delay = self.backoff_delay(attempt, previous_delay) * rule.delay_factor
        source = "backoff"
        if self.honor_retry_after and failure.retry_after is not None:
            # The server's own figure replaces the class's minimum delay.
            if failure.retry_after >= delay:
                delay = failure.retry_after
                source = failure.retry_after_source or "retry-after"
        else:
            delay = max(delay, rule.min_delay)
        if self.max_total is not None and elapsed + delay > float(self.max_total):  # type: ignore[arg-type]
            return Decision(False, delay, source, reason=(
                f"the next attempt would start after the total time cap of "
                f"{float(self.max_total):g} s"),  # type: ignore[arg-type]
                escalate=self.escalate)
        return Decision(True, delay, source)

    def decide_crash(self, attempt: int, elapsed: float,
                     previous_delay: float | None = None) -> Decision:
        """After attempt ``attempt`` was cut off by a crash: retry (it is not the step's
        failure, so ``retry_on`` and the failure classes do not apply) unless no attempt
        or time is left."""
        if attempt >= self.max_attempts:
            return Decision(False, reason=f"all {self.max_attempts} attempts were used")
        delay = self.backoff_delay(attempt, previous_delay)
        if self.max_total is not None and elapsed + delay > float(self.max_total):  # type: ignore[arg-type]
            return Decision(False, reason="the total time cap ran out")
        return Decision(True, delay)

    def delay(self, attempt: int, exc: BaseException) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up (the
        failure classified on the spot; the engine uses :meth:`decide`)."""
        from .classify import classify

        d = self.decide(attempt, exc, classify(exc), 0.0)
        return d.delay if d.retry else None


NO_RETRY = RetryPolicy(max_attempts=1)


def as_policy(retry: RetryPolicy | int | bool | None) -> RetryPolicy:
    """``None``/False: no retry; True: the default policy; an int: that many attempts."""
    if retry is None or retry is False:
        return NO_RETRY
    if retry is True:
        return RetryPolicy()
    if isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, int):
        return RetryPolicy(max_attempts=retry)
    raise TypeError(f"retry must be a RetryPolicy, an int, a bool or None, not {retry!r}")
