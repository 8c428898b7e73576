"""Steps: functions whose results are journaled and replayed instead of re-run."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar

from . import _codec, _effects, _faults, _transact
from ._context import _STEP, _WORKFLOW, Current, WorkflowContext, _Shutdown
from ._errors import error_payload, live_step_failure, step_failure
from .exceptions import (
    ConfigurationError,
    NotInWorkflowError,
    SerializationError,
    StepTimeoutError,
)
from .stores.base import JournalEntry

P = ParamSpec("P")
R = TypeVar("R")


def seconds(value: float | timedelta | None, what: str) -> float | None:
    """Accept seconds or a timedelta; reject negatives with a message naming ``what``."""
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if out < 0 or out != out:
        raise ValueError(f"{what} must be a non-negative duration, got {value!r}")
    return out


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step retries a failed attempt.

    The resilience policies (failure classes, durable budgets, breakers) build on
    this; here attempts are counted per run of the step.
    """

    max_attempts: int = 3
    """Total attempts including the first. 1 means no retry."""
    initial_delay: float | timedelta = 0.5
    """Seconds (or a timedelta) before the second attempt, before jitter."""
    max_delay: float | timedelta = 30.0
    """Upper bound of any single delay (seconds or a timedelta)."""
    backoff: float = 2.0
    """Each delay is the previous one times this factor."""
    jitter: bool = True
    """Full jitter: the delay is drawn uniformly from [0, computed delay]."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Only these exception types are retried."""
    give_up_on: tuple[type[BaseException], ...] = ()
    """These are never retried, even if they match ``retry_on``."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        # Stored as seconds from here on, so delay() does plain arithmetic.
        object.__setattr__(self, "initial_delay",
                           seconds(self.initial_delay, "RetryPolicy.initial_delay"))
        object.__setattr__(self, "max_delay", seconds(self.max_delay, "RetryPolicy.max_delay"))
        if self.backoff < 1:
            raise ValueError("RetryPolicy.backoff must be >= 1")

    def delay(self, attempt: int, exc: BaseException) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up."""
        if attempt >= self.max_attempts:
            return None
        if isinstance(exc, self.give_up_on) or not isinstance(exc, self.retry_on):
            return None
        first, most = float(self.initial_delay), float(self.max_delay)  # type: ignore[arg-type]
        cap = min(most, first * self.backoff ** (attempt - 1))
        return random.uniform(0, cap) if self.jitter else cap


NO_RETRY = RetryPolicy(max_attempts=1)


def as_policy(retry: RetryPolicy | int | bool | None) -> RetryPolicy:
    if retry is None or retry is False:
        return NO_RETRY
    if retry is True:
        return RetryPolicy()
    if isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, int):
        return RetryPolicy(max_attempts=retry)
    raise TypeError(f"retry must be a RetryPolicy, an int, a bool or None, not {retry!r}")


async def _pause(ctx: WorkflowContext, seconds_: float) -> None:
    """Sleep between attempts, waking early for a cancellation or shutdown."""
    deadline = time.monotonic() + seconds_
    while (left := deadline - time.monotonic()) > 0:
        ctx.check_interrupt()
        await asyncio.sleep(min(left, 0.25))
    ctx.check_interrupt()


class Step(Generic[P, R]):
    """A function decorated with ``@app.step``. Call it from a workflow."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None,
        retry: RetryPolicy | int | bool | None,
        timeout: float | timedelta | None,
        effect: bool = False,
        on_unknown: str | None = None,
        reconcile: Callable[..., Any] | None = None,
        compensate: Callable[[Any], Any] | None = None,
        transactional: bool = False,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__qualname__
        self.compensate = compensate
        self.transactional = transactional
        if on_unknown is None:
            on_unknown = "reconcile" if reconcile is not None else "retry"
        if on_unknown not in _effects.UNKNOWN_RULES:
            raise ConfigurationError(
                f"step {self.name!r}: on_unknown must be one of "
                f"{', '.join(_effects.UNKNOWN_RULES)}, not {on_unknown!r}"
            )
        if on_unknown == "reconcile" and reconcile is None:
            raise ConfigurationError(
                f"step {self.name!r}: on_unknown='reconcile' needs reconcile=fn, a function "
                "called with (key, *args, **kwargs) that returns the result or "
                "crashsafe.NOT_APPLIED"
            )
        self.effect = effect or reconcile is not None or on_unknown != "retry"
        self.on_unknown = on_unknown
        self.reconcile = reconcile
        if self.effect:
            _effects.check_signature(self.name, fn)
        self.retry = as_policy(retry)
        self.timeout = seconds(timeout, f"timeout of step {self.name!r}")
        self.is_async = inspect.iscoroutinefunction(fn)
        if transactional:
            _transact.check(fn, self.is_async, self.name)
            if self.effect:
                raise ConfigurationError(
                    f"step {self.name!r}: a transactional step's writes happen exactly once "
                    "already; it cannot also be an effect step"
                )
        hints = _codec.resolve_hints(fn)
        self.return_type: Any = hints.get("return", inspect.Parameter.empty)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<crashsafe step {self.name!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        ctx = _WORKFLOW.get()
        if ctx is None:
            raise NotInWorkflowError(
                f"step {self.name!r} was called outside a workflow. Call it from a function "
                f"decorated with @app.workflow, or call {self.name}.fn(...) to run the plain "
                "function without durability."
            )
        if _STEP.get() is not None:
            return self.fn(*args, **kwargs)  # a step inside a step is part of its body
        kw: dict[str, Any] = dict(kwargs)
        user_key = kw.pop("key", None) if self.effect else None
        if user_key is not None and (not isinstance(user_key, str) or not user_key):
            raise ConfigurationError(f"step {self.name!r}: key= must be a non-empty string, "
                                     f"got {user_key!r}")
        if self.is_async:
            if not ctx.is_async:
                raise NotInWorkflowError(
                    f"async step {self.name!r} was called from sync workflow "
                    f"{ctx.workflow_name!r}; make the workflow async or the step sync"
                )
            idx, entry = ctx.begin("step", self.name)
            return self._run_async(ctx, idx, entry, args, kw, user_key)  # type: ignore[return-value]
        idx, entry = ctx.begin("step", self.name)
        if entry is not None:
            return self._replay(entry)
        return self._run_sync(ctx, idx, args, kw, user_key)

    # -- replay -------------------------------------------------------------------------
    def _replay(self, entry: JournalEntry) -> R:
        if entry.error is not None:
            raise step_failure(self.name, entry.error)
        value = _codec.decode(entry.output or b"null", f"result of step {self.name!r}")
        return _codec.rebuild(value, self.return_type, f"result of step {self.name!r}")  # type: ignore[no-any-return]

    # -- first run ----------------------------------------------------------------------
    def _info(self, ctx: WorkflowContext, idx: int, attempt: int,
              plan: _effects.Plan | None) -> Current:
        return Current(ctx.workflow_id, ctx.workflow_name, idx, self.name, attempt,
                       plan.key if plan is not None else None)

    def _expiry(self, ctx: WorkflowContext) -> float | None:
        keep = ctx.app.effect_retention
        return None if keep is None else time.time() + keep

    def _settled(self, ctx: WorkflowContext, idx: int, plan: _effects.Plan | None,
                 value: Any, error: Exception | None, attempts: int,
                 started: float) -> list[Any]:
        if plan is not None:
            return _effects.settled_ops(self, ctx, idx, plan, value, error, attempts, started,
                                        self._expiry(ctx))
        if error is not None:
            return [self._record_error(ctx, idx, error, attempts, started)]
        return [self._record_result(ctx, idx, value, attempts, started)]

    def _record_result(self, ctx: WorkflowContext, idx: int, result: Any, attempts: int,
                       started: float) -> JournalEntry:
        what = f"result of step {self.name!r}"
        data, structured = _codec.encode(result, what)
        if structured:
            if not _codec.needs_type(self.return_type):
                raise SerializationError(
                    f"{what} holds an object of type {type(result).__qualname__} (a "
                    "dataclass, model or enum) but the step has no return annotation; "
                    "annotate the return type so replay can rebuild the same object"
                )
            _codec.check_rebuild(result, data, self.return_type, what)
        return JournalEntry(ctx.workflow_id, idx, "step", self.name, data, None, attempts,
                            started, time.time())

    def _record_error(self, ctx: WorkflowContext, idx: int, exc: Exception, attempts: int,
                      started: float) -> JournalEntry:
        return JournalEntry(ctx.workflow_id, idx, "step", self.name, None, error_payload(exc),
                            attempts, started, time.time())

    def _call_with_timeout(self, args: Any, kwargs: Any) -> R:
        if self.timeout is None:
            return self.fn(*args, **kwargs)
        box: list[Any] = []
        run = contextvars.copy_context().run

        def target() -> None:
            try:
                box.append((True, run(self.fn, *args, **kwargs)))
            except BaseException as exc:  # handed to the calling thread
                box.append((False, exc))

        worker = threading.Thread(target=target, name=f"crashsafe-step-{self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if not box:
            raise StepTimeoutError(
                f"step {self.name!r} ran longer than its timeout of {self.timeout:g} s "
                "(its thread is left to finish in the background)"
            )
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _run_sync(self, ctx: WorkflowContext, idx: int, args: Any, kwargs: Any,
                  user_key: str | None = None) -> R:
        if ctx.pending:
            ctx.commit([])  # the body may send journaled values out: make them durable first
        plan = _effects.prepare(self, ctx, idx, args, kwargs, user_key) if self.effect else None
        if plan is not None and plan.done:
            error = plan.error if isinstance(plan.error, Exception) else None
            ops = self._settled(ctx, idx, plan, plan.value, error, 0, time.time())
            ctx.commit(ops)
            if error is not None:
                raise live_step_failure(self.name, error)
            return self._replay(ops[0])  # exactly what a replay will return
        started = time.time()
        attempt = 0
        while True:
            attempt += 1
            token = _STEP.set(self._info(ctx, idx, attempt, plan))
            try:
                if _faults.ENABLED:
                    _faults.point(f"step {self.name!r}: before body")
                if self.transactional:
                    result = self._run_transaction(ctx, idx, args, kwargs, attempt, started)
                    ctx.executed += 1
                    return result
                result = self._call_with_timeout(args, kwargs)
                if _faults.ENABLED:
                    _faults.point(f"step {self.name!r}: after body")
            except Exception as exc:
                wait = self.retry.delay(attempt, exc)
                if wait is None:
                    ctx.commit(self._settled(ctx, idx, plan, None, exc, attempt, started))
                    ctx.executed += 1
                    raise live_step_failure(self.name, exc)  # noqa: B904 - cause set inside
                ctx.cancel_event.wait(wait)
                ctx.check_interrupt()
                continue
            finally:
                _STEP.reset(token)
            ctx.commit(self._settled(ctx, idx, plan, result, None, attempt, started))
            ctx.executed += 1
            return result

    def _run_transaction(self, ctx: WorkflowContext, idx: int, args: Any, kwargs: Any,
                         attempt: int, started: float) -> R:
        transact = getattr(ctx.app.store, "transact", None)
        if transact is None:
            raise _transact.unsupported(ctx.app.store, self.name)
        if ctx.shutdown:
            raise _Shutdown
        fn: Callable[..., R] = self.fn

        def work(conn: Any) -> R:
            return fn(_transact.TransactionConnection(conn), *args, **kwargs)

        def record(value: Any) -> JournalEntry:
            return self._record_result(ctx, idx, value, attempt, started)

        value: R = transact(work, record)
        return value

    async def _run_async(self, ctx: WorkflowContext, idx: int, entry: JournalEntry | None,
                         args: Any, kwargs: Any, user_key: str | None = None) -> Any:
        if entry is not None:
            return self._replay(entry)
        if ctx.pending:
            await ctx.commit_async([])  # journaled values become durable before the body
        plan = None
        if self.effect:
            plan = await asyncio.to_thread(_effects.prepare, self, ctx, idx, args, kwargs,
                                           user_key)
            if plan.done:
                error = plan.error if isinstance(plan.error, Exception) else None
                ops = self._settled(ctx, idx, plan, plan.value, error, 0, time.time())
                await ctx.commit_async(ops)
                if error is not None:
                    raise live_step_failure(self.name, error)
                return self._replay(ops[0])
        started = time.time()
        attempt = 0
        fn: Callable[..., Awaitable[Any]] = self.fn  # type: ignore[assignment]
        while True:
            attempt += 1
            token = _STEP.set(self._info(ctx, idx, attempt, plan))
            try:
                if _faults.ENABLED:
                    _faults.point(f"step {self.name!r}: before body")
                if self.timeout is None:
                    result = await fn(*args, **kwargs)
                else:
                    try:
                        result = await asyncio.wait_for(fn(*args, **kwargs), self.timeout)
                    except TimeoutError:
                        raise StepTimeoutError(
                            f"step {self.name!r} ran longer than its timeout of "
                            f"{self.timeout:g} s"
                        ) from None
                if _faults.ENABLED:
                    _faults.point(f"step {self.name!r}: after body")
            except Exception as exc:
                wait = self.retry.delay(attempt, exc)
                if wait is None:
                    await ctx.commit_async(self._settled(ctx, idx, plan, None, exc, attempt,
                                                         started))
                    ctx.executed += 1
                    raise live_step_failure(self.name, exc)  # noqa: B904 - cause set inside
                await _pause(ctx, wait)
                continue
            finally:
                _STEP.reset(token)
            await ctx.commit_async(self._settled(ctx, idx, plan, result, None, attempt, started))
            ctx.executed += 1
            return result
