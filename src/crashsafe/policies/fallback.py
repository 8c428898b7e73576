"""Fallback chains: try each alternative in order until one answers.

``crashsafe.fallback(primary, backup, ...)`` builds a callable for workflow code. Each
alternative is a step, so each try is journaled as that step's entry; an alternative
whose circuit breaker is open fails fast with :class:`~crashsafe.CircuitOpenError`,
which is journaled too. So after a crash, replay meets the same failures and the same
answer in the same order: the chain never switches model on recovery.

The chain moves on after a failure whose class allows it (see ``ClassRule.fallback``:
rate limits, overload, server errors, timeouts, context overflow, content policy,
auth and quota — another provider or account may work — and an open breaker); a bad
request is raised at once, since another model would not fix it. ``on=`` replaces
that rule with a predicate of your own; it receives what the workflow sees (for
provider errors crashsafe does not rebuild, a :class:`~crashsafe.StepError` whose
``type_name`` and ``failure_class`` describe the original).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

from .._context import workflow_context
from .._errors import failure_class
from ..exceptions import CircuitOpenError, ConfigurationError
from .classify import DEFAULT_RULES, FailureClass

P = ParamSpec("P")
R = TypeVar("R")


class Fallback(Generic[P, R]):
    """What :func:`fallback` returns: call it like the steps it chains."""

    def __init__(self, alternatives: tuple[Callable[P, R], ...],
                 on: Callable[[BaseException], bool] | None) -> None:
        from .._step import Step

        if len(alternatives) < 2:
            raise ConfigurationError("fallback() needs at least two alternatives")
        for alt in alternatives:
            if not isinstance(alt, Step):
                raise ConfigurationError(
                    f"fallback() chains steps (functions decorated with @app.step); "
                    f"{alt!r} is not one, so its answer would not be journaled")
            if alt.is_async:
                raise ConfigurationError(
                    f"step {alt.name!r} is async: use crashsafe.fallback_async(...) in an "
                    "async workflow")
        self.alternatives = alternatives
        self.on = on or moves_on

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        workflow_context("a fallback chain")
        last: BaseException | None = None
        for alt in self.alternatives:
            try:
                return alt(*args, **kwargs)
            except Exception as exc:
                if not self.on(exc):
                    raise
                last = exc
        raise last if last is not None else RuntimeError("fallback chain was empty")


class FallbackAsync(Generic[P, R]):
    """What :func:`fallback_async` returns: ``await chain(...)``."""

    def __init__(self, alternatives: tuple[Callable[P, Any], ...],
                 on: Callable[[BaseException], bool] | None) -> None:
        from .._step import Step

        if len(alternatives) < 2:
            raise ConfigurationError("fallback_async() needs at least two alternatives")
        for alt in alternatives:
            if not isinstance(alt, Step) or not alt.is_async:
                raise ConfigurationError(
                    f"fallback_async() chains async steps; {alt!r} is not one")
        self.alternatives = alternatives
        self.on = on or moves_on

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        workflow_context("a fallback chain")
        last: BaseException | None = None
        for alt in self.alternatives:
            try:
                result: R = await alt(*args, **kwargs)
                return result
            except Exception as exc:
                if not self.on(exc):
                    raise
                last = exc
        raise last if last is not None else RuntimeError("fallback chain was empty")


def moves_on(exc: BaseException) -> bool:
    """The default rule: move on after failures whose class allows a fallback. Decided
    from the failure class recorded at the first run, so replay decides the same."""
    if isinstance(exc, CircuitOpenError):
        return True
    recorded = failure_class(exc)
    if recorded.startswith("person:"):
        return recorded == "person:fallback"  # a person decided, after an escalation
    try:
        cls = FailureClass(recorded)
    except ValueError:
        return True
    return DEFAULT_RULES[cls].fallback


def fallback(*alternatives: Callable[P, R],
             on: Callable[[BaseException], bool] | None = None) -> Fallback[P, R]:
    """Chain steps with the same signature: ``answer = fallback(gpt, claude, local)(prompt)``.

    Tries each in order, skipping those whose breaker is open; returns the first answer.
    """
    return Fallback(alternatives, on)


def fallback_async(*alternatives: Callable[P, Any],
                   on: Callable[[BaseException], bool] | None = None) -> FallbackAsync[P, Any]:
    """The async form of :func:`fallback`, for ``async def`` workflows and steps."""
    return FallbackAsync(alternatives, on)
