"""Steps: functions whose results are journaled and replayed instead of re-run."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar

from . import _codec, _effects, _faults, _transact
from ._attempts import Driver
from ._context import _STEP, _WORKFLOW, Current, WorkflowContext, _Shutdown, _Suspend
from ._errors import error_payload, live_step_failure, pin_class, step_failure
from ._escalation import ask, ask_async, describe_actions
from ._partial import drop_partials
from .exceptions import (
    CircuitOpenError,
    ConfigurationError,
    NotInWorkflowError,
    SerializationError,
    StepTimeoutError,
)
from .policies import hedge as _hedge
from .policies.breaker import CircuitBreaker
from .policies.classify import classify
from .policies.hedge import Hedge
from .policies.limits import Limit
from .policies.retry import NO_RETRY, RetryPolicy, as_policy, seconds
from .policies.runtime import Ticket
from .stores.base import JournalEntry

__all__ = ["NO_RETRY", "RetryPolicy", "Step", "as_policy", "seconds"]

P = ParamSpec("P")
R = TypeVar("R")


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
        breaker: CircuitBreaker | str | None = None,
        limits: Sequence[Limit | str] = (),
        hedge: Hedge | None = None,
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
        if breaker is not None and not isinstance(breaker, CircuitBreaker | str):
            raise ConfigurationError(f"step {self.name!r}: breaker must be a name or a "
                                     f"crashsafe.CircuitBreaker, not {breaker!r}")
        self.breaker = breaker
        if isinstance(limits, str | bytes):
            raise ConfigurationError(f"step {self.name!r}: limits must be a list of names "
                                     "or limits, e.g. limits=['openai-rpm']")
        self.limits = tuple(limits)
        if hedge is not None and not isinstance(hedge, Hedge):
            raise ConfigurationError(f"step {self.name!r}: hedge must be a crashsafe.Hedge")
        self.hedge = hedge
        if transactional:
            _transact.check(fn, self.is_async, self.name)
            if self.effect:
                raise ConfigurationError(
                    f"step {self.name!r}: a transactional step's writes happen exactly once "
                    "already; it cannot also be an effect step"
                )
            if hedge is not None:
                raise ConfigurationError(f"step {self.name!r}: a transactional step cannot "
                                         "be hedged")
        if hedge is not None and self.effect and hedge.alternative is None:
            raise ConfigurationError(
                f"step {self.name!r}: hedging an effect step would apply it twice; give the "
                "hedge an alternative=... that is safe to run alongside, or do not hedge")
        self._guarded = self.breaker is not None or bool(self.limits)
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
            return self._replay(ctx, entry)
        return self._run_sync(ctx, idx, args, kw, user_key)

    # -- replay -------------------------------------------------------------------------
    def _replay(self, ctx: WorkflowContext, entry: JournalEntry) -> R:
        if entry.note is not None and "hedged:" in entry.note:
            ctx.hedges += 1
        if entry.error is not None:
            raise step_failure(self.name, entry.error)
        value = _codec.decode(entry.output or b"null", f"result of step {self.name!r}")
        return _codec.rebuild(value, self.return_type, f"result of step {self.name!r}")  # type: ignore[no-any-return]

    # -- first run ----------------------------------------------------------------------
    def _info(self, ctx: WorkflowContext, idx: int, attempt: int,
              plan: _effects.Plan | None) -> Current:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        return Current(ctx.workflow_id, ctx.workflow_name, idx, self.name, attempt,
                       plan.key if plan is not None else None, deadline)

    def _expiry(self, ctx: WorkflowContext) -> float | None:
        keep = ctx.app.effect_retention
        return None if keep is None else time.time() + keep

    def _settled(self, ctx: WorkflowContext, idx: int, plan: _effects.Plan | None,
                 value: Any, error: Exception | None, attempts: int,
                 started: float, note: str | None = None) -> list[Any]:
        if plan is not None:
            ops = _effects.settled_ops(self, ctx, idx, plan, value, error, attempts, started,
                                       self._expiry(ctx))
            if note:
                ops[0].note = f"{ops[0].note} | {note}" if ops[0].note else note
            return ops
        if error is not None:
            entry = self._record_error(ctx, idx, error, attempts, started)
        else:
            entry = self._record_result(ctx, idx, value, attempts, started)
        entry.note = note
        return [entry]

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
                            started, ctx.app.clock())  # the clock ``started`` is on

    def _record_error(self, ctx: WorkflowContext, idx: int, exc: Exception, attempts: int,
                      started: float) -> JournalEntry:
        return JournalEntry(ctx.workflow_id, idx, "step", self.name, None, error_payload(exc),
                            attempts, started, ctx.app.clock())

    def _call_with_timeout(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self.timeout is None:
            return fn(*args, **kwargs)
        box: list[Any] = []
        run = contextvars.copy_context().run

        def target() -> None:
            try:
                box.append((True, run(fn, *args, **kwargs)))
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
            return value
        raise value

    # -- policies around each attempt ----------------------------------------------------
    def _driver(self, ctx: WorkflowContext, idx: int) -> Driver:
        records = ctx.attempts_for(idx) if self.retry.max_attempts > 1 else []
        return Driver(self, ctx, idx, records)

    def _admit(self, ctx: WorkflowContext, drv: Driver,
               wait: Callable[[float], None]) -> None:
        """Take this attempt's limits and breaker admission (blocking; may raise
        CircuitOpenError). Released by :meth:`_release`."""
        res = ctx.app._resilience
        who = f"{drv.who}:{drv.attempt}"
        for spec in self.limits:
            lim = res.limit_config(spec)
            res.acquire(lim, who, wait)
            drv.limits_held.append(lim)
        if self.breaker is not None:
            cfg = res.breaker_config(self.breaker)
            drv.ticket = res.admit(cfg, res.breaker_key(cfg, ctx.workflow_name), drv.who)

    async def _admit_async(self, ctx: WorkflowContext, drv: Driver) -> None:
        """:meth:`_admit` for async steps: waiting for a limit awaits (it never holds a
        worker thread), and a breaker seen closed a moment ago costs no thread hop."""
        res = ctx.app._resilience
        who = f"{drv.who}:{drv.attempt}"
        for spec in self.limits:
            lim = res.limit_config(spec)
            poll = 0.01
            while (left := await asyncio.to_thread(res.try_acquire, lim, who)) > 0:
                await _pause(ctx, min(left, poll))
                poll = min(poll * 2, 0.1)
            drv.limits_held.append(lim)
        if self.breaker is not None:
            cfg = res.breaker_config(self.breaker)
            key = res.breaker_key(cfg, ctx.workflow_name)
            if res.fresh_closed(key):
                drv.ticket = res.admit(cfg, key, drv.who)  # no I/O: seen closed just now
            else:
                drv.ticket = await asyncio.to_thread(res.admit, cfg, key, drv.who)

    def _release(self, ctx: WorkflowContext, drv: Driver, exc: BaseException | None) -> None:
        res = ctx.app._resilience
        who = f"{drv.who}:{drv.attempt}"
        held, drv.limits_held = drv.limits_held, []
        for lim in held:
            res.release(lim, who)
        ticket: Ticket | None = drv.ticket
        drv.ticket = None
        if ticket is None:
            return
        if exc is None:
            res.outcome(ticket, False)
        elif isinstance(exc, Exception) and not isinstance(exc, CircuitOpenError):
            # A failure the dependency is not to blame for (a bad request) still shows
            # it answered: it counts as a success, and releases a half-open probe.
            res.outcome(ticket, drv.policy.rule(classify(exc).cls).counts_for_breaker)

    def _calls(self, args: Any, kwargs: Any, ctx: WorkflowContext) -> list[Callable[[], Any]]:
        """The original call and its hedges (when this step hedges and the workflow's
        hedge budget allows)."""
        first: list[Callable[[], Any]] = [lambda: self._call_with_timeout(self.fn, args, kwargs)]
        h = self.hedge
        if h is None:
            return first
        extra = h.max_extra
        if h.max_per_workflow is not None:
            extra = min(extra, h.max_per_workflow - ctx.hedges)
        alt = h.alternative or self.fn
        return first + [lambda: self._call_with_timeout(alt, args, kwargs)] * max(0, extra)

    def _body_sync(self, ctx: WorkflowContext, drv: Driver, args: Any,
                   kwargs: Any) -> tuple[Any, str | None]:
        calls = self._calls(args, kwargs, ctx)
        t0 = time.monotonic()
        if len(calls) == 1:
            value = calls[0]()
            ctx.app._resilience.observe(self.name, time.monotonic() - t0)
            return value, None
        assert self.hedge is not None
        delay = self.hedge.delay(ctx.app._resilience.p95(self.name))
        out = _hedge.run_sync(calls, delay, ctx.check_interrupt)
        ctx.hedges += len(out.started) - 1
        if out.winner == 0:
            ctx.app._resilience.observe(self.name, out.elapsed)
        return out.value, out.note() if len(out.started) > 1 else None

    def _run_sync(self, ctx: WorkflowContext, idx: int, args: Any, kwargs: Any,
                  user_key: str | None = None) -> R:
        if ctx.pending:
            ctx.commit([])  # the body may send journaled values out: make them durable first
        plan = _effects.prepare(self, ctx, idx, args, kwargs, user_key) if self.effect else None
        if plan is not None and plan.done:
            error = plan.error if isinstance(plan.error, Exception) else None
            ops = self._settled(ctx, idx, plan, plan.value, error, 0,
                                ctx.app.clock())
            ctx.commit(ops)
            if error is not None:
                raise live_step_failure(self.name, error)
            return self._replay(ctx, ops[0])  # exactly what a replay will return
        drv = self._driver(ctx, idx)
        if drv.final_error is not None:
            return self._give_up_sync(ctx, idx, plan, drv, drv.final_error, None)

        def wait(secs: float) -> None:
            ctx.cancel_event.wait(secs)
            ctx.check_interrupt()

        while True:
            delay = drv.next_attempt()
            if delay > 0:
                if delay > float(self.retry.suspend_after) and drv.next_at is not None:  # type: ignore[arg-type]
                    self._suspend(ctx, idx, drv)
                wait(delay)
            ops = drv.start_ops()
            if ops:
                ctx.commit(ops)
            token = _STEP.set(self._info(ctx, idx, drv.attempt, plan))
            note: str | None = None
            try:
                failure: BaseException | None = None
                try:
                    if self._guarded:
                        self._admit(ctx, drv, wait)
                    if _faults.ENABLED:
                        _faults.point(f"step {self.name!r}: before body")
                    if self.transactional:
                        result = self._run_transaction(ctx, idx, args, kwargs, drv)
                        ctx.executed += 1
                        return result
                    result, note = self._body_sync(ctx, drv, args, kwargs)
                    if _faults.ENABLED:
                        _faults.point(f"step {self.name!r}: after body")
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    if self._guarded:
                        self._release(ctx, drv, failure)
            except Exception as exc:
                decision, ops, err = drv.failed(exc)
                if decision.retry:
                    ctx.commit(ops)
                    continue
                reason = decision.reason
                if decision.escalate:
                    action, value = self._ask_person(ctx, idx, drv, err, reason)
                    if action == "retry":
                        continue
                    if action == "value":
                        ops = self._settled(ctx, idx, plan, value, None, drv.attempt,
                                            drv.started, drv.note("a person supplied the result"))
                        ctx.commit(ops)
                        ctx.executed += 1
                        return self._replay(ctx, ops[0])
                    reason = f"a person chose {action!r} after: {reason}"
                return self._give_up_sync(ctx, idx, plan, drv, err, reason)
            finally:
                _STEP.reset(token)
            ctx.commit(self._settled(ctx, idx, plan, result, None, drv.attempt, drv.started,
                                     drv.note(note)) + drv.closing_ops(None))
            ctx.executed += 1
            if ctx.partials:
                drop_partials(ctx)
            return result

    def _suspend(self, ctx: WorkflowContext, idx: int, drv: Driver) -> None:
        """Free this thread until the next attempt is due: the workflow is parked as
        waiting and resumed from the journal then (a durable timer)."""
        if drv.pending:
            ops, drv.pending = drv.pending, []
            ctx.commit(ops)  # a crashed attempt's row, so waking does not re-plan it
        when = time.strftime("%H:%M:%S", time.localtime(drv.next_at))
        raise _Suspend(float(drv.next_at or 0.0),
                       f"step {self.name!r} (index {idx}) retries at {when} "
                       f"(attempt {drv.attempt})")

    def _person_question(self, ctx: WorkflowContext, idx: int, drv: Driver, err: Exception,
                         reason: str) -> tuple[str, str]:
        signal = f"resolve:{idx}"
        why = (f"step {self.name!r} (index {idx}) failed after {drv.attempt} attempt(s) "
               f"with {type(err).__name__}: {str(err)[:200]} ({reason}); "
               + describe_actions(ctx, signal, PERSON_ACTIONS)
               + """; "value" takes {"value": ...} as the step's result""")
        return signal, why

    def _value_fits(self, decision: dict[str, Any]) -> str | None:
        """A value a person supplies must rebuild into the step's return type, or it
        would be recorded and then fail every replay."""
        if decision.get("action") != "value":
            return None
        try:
            data, _ = _codec.encode(decision.get("value"), f"value for step {self.name!r}")
            _codec.rebuild(_codec.decode(data), self.return_type,
                           f"value for step {self.name!r}")
        except SerializationError as exc:
            return str(exc)
        return None

    @staticmethod
    def _person_decided(drv: Driver, err: Exception,
                        decision: dict[str, Any]) -> tuple[str, Any]:
        action = str(decision["action"])
        drv.history.append(f"escalated: a person chose {action}")
        if action == "retry":
            drv.next_at = None
        elif action in ("fallback", "abort"):
            pin_class(err, f"person:{action}")
        return action, decision.get("value")

    def _ask_person(self, ctx: WorkflowContext, idx: int, drv: Driver, err: Exception,
                    reason: str) -> tuple[str, Any]:
        """Escalate a failure the policy cannot handle; blocking. Returns the person's
        action and, for ``value``, the value."""
        signal, why = self._person_question(ctx, idx, drv, err, reason)
        decision = ask(ctx, idx, self.name, signal, why, PERSON_ACTIONS, self._value_fits)
        return self._person_decided(drv, err, decision)

    async def _ask_person_async(self, ctx: WorkflowContext, idx: int, drv: Driver,
                                err: Exception, reason: str) -> tuple[str, Any]:
        signal, why = self._person_question(ctx, idx, drv, err, reason)
        decision = await ask_async(ctx, idx, self.name, signal, why, PERSON_ACTIONS,
                                   self._value_fits)
        return self._person_decided(drv, err, decision)

    def _give_up_sync(self, ctx: WorkflowContext, idx: int, plan: _effects.Plan | None,
                      drv: Driver, error: Exception, reason: str | None) -> R:
        ctx.commit(self._settled(ctx, idx, plan, None, error, drv.attempt, drv.started,
                                 drv.note(_gave_up(drv, reason))) + drv.closing_ops(error))
        ctx.executed += 1
        raise live_step_failure(self.name, error)

    def _run_transaction(self, ctx: WorkflowContext, idx: int, args: Any, kwargs: Any,
                         drv: Driver) -> R:
        transact = getattr(ctx.app.store, "transact", None)
        if transact is None:
            raise _transact.unsupported(ctx.app.store, self.name)
        if ctx.shutdown:
            raise _Shutdown
        fn: Callable[..., R] = self.fn

        def work(conn: Any) -> R:
            return fn(_transact.TransactionConnection(conn), *args, **kwargs)

        made: list[JournalEntry] = []

        def record(value: Any) -> JournalEntry:
            entry = self._record_result(ctx, idx, value, drv.attempt, drv.started)
            entry.note = drv.note()
            entry.token = ctx.token
            made.append(entry)
            return entry

        t0 = time.time_ns()
        value: R = transact(work, record)
        # Committed with the step's writes, not through ctx.commit: note and report it
        # the same way.
        if ctx.instrument is not None:
            ctx.instrument.committed(made[-1:], t0)
        ctx._note_committed(made[-1:])
        return value

    # -- async ------------------------------------------------------------------------------
    async def _body_async(self, ctx: WorkflowContext, drv: Driver, args: Any,
                          kwargs: Any) -> tuple[Any, str | None]:
        h = self.hedge
        t0 = time.monotonic()
        if h is None or (h.max_per_workflow is not None and ctx.hedges >= h.max_per_workflow):
            value = await self._attempt_async(self.fn, args, kwargs)
            ctx.app._resilience.observe(self.name, time.monotonic() - t0)
            return value, None
        extra = h.max_extra if h.max_per_workflow is None else min(
            h.max_extra, h.max_per_workflow - ctx.hedges)
        alt = h.alternative or self.fn
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: self._attempt_async(self.fn, args, kwargs)]
        calls += [lambda: self._attempt_async(alt, args, kwargs)] * extra
        out = await _hedge.run_async(calls, h.delay(ctx.app._resilience.p95(self.name)))
        ctx.hedges += len(out.started) - 1
        if out.winner == 0:
            ctx.app._resilience.observe(self.name, out.elapsed)
        return out.value, out.note() if len(out.started) > 1 else None

    async def _attempt_async(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self.timeout is None:
            return await fn(*args, **kwargs)
        try:
            return await asyncio.wait_for(fn(*args, **kwargs), self.timeout)
        except TimeoutError:
            raise StepTimeoutError(
                f"step {self.name!r} ran longer than its timeout of {self.timeout:g} s"
            ) from None

    async def _run_async(self, ctx: WorkflowContext, idx: int, entry: JournalEntry | None,
                         args: Any, kwargs: Any, user_key: str | None = None) -> Any:
        if entry is not None:
            return self._replay(ctx, entry)
        if ctx.pending:
            await ctx.commit_async([])  # journaled values become durable before the body
        plan = None
        if self.effect:
            plan = await asyncio.to_thread(_effects.prepare, self, ctx, idx, args, kwargs,
                                           user_key)
            if plan.done:
                error = plan.error if isinstance(plan.error, Exception) else None
                ops = self._settled(ctx, idx, plan, plan.value, error, 0,
                                    ctx.app.clock())
                await ctx.commit_async(ops)
                if error is not None:
                    raise live_step_failure(self.name, error)
                return self._replay(ctx, ops[0])
        if self.retry.max_attempts > 1 and not ctx.fresh and ctx.attempts is None:
            await asyncio.to_thread(ctx.attempts_for, idx)
        drv = self._driver(ctx, idx)
        if drv.final_error is not None:
            return await self._give_up_async(ctx, idx, plan, drv, drv.final_error, None)

        while True:
            delay = drv.next_attempt()
            if delay > 0:
                if ctx.queue is not None and drv.next_at is not None \
                        and delay > float(self.retry.suspend_after):  # type: ignore[arg-type]
                    self._suspend(ctx, idx, drv)  # back to the queue: frees this worker's slot
                await _pause(ctx, delay)
            ops = drv.start_ops()
            if ops:
                await ctx.commit_async(ops)
            token = _STEP.set(self._info(ctx, idx, drv.attempt, plan))
            note: str | None = None
            try:
                failure: BaseException | None = None
                try:
                    if self._guarded:
                        await self._admit_async(ctx, drv)
                    if _faults.ENABLED:
                        _faults.point(f"step {self.name!r}: before body")
                    result, note = await self._body_async(ctx, drv, args, kwargs)
                    if _faults.ENABLED:
                        _faults.point(f"step {self.name!r}: after body")
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    if self._guarded:
                        if failure is None and not self.limits:
                            self._release(ctx, drv, None)  # a success is counted in memory
                        else:
                            await asyncio.to_thread(self._release, ctx, drv, failure)
            except Exception as exc:
                if self.retry.budget is not None:  # withdrawing from it is a store write
                    decision, ops, err = await asyncio.to_thread(drv.failed, exc)
                else:
                    decision, ops, err = drv.failed(exc)
                if decision.retry:
                    await ctx.commit_async(ops)
                    continue
                reason = decision.reason
                if decision.escalate:
                    action, value = await self._ask_person_async(ctx, idx, drv, err, reason)
                    if action == "retry":
                        continue
                    if action == "value":
                        ops = self._settled(ctx, idx, plan, value, None, drv.attempt,
                                            drv.started, drv.note("a person supplied the result"))
                        await ctx.commit_async(ops)
                        ctx.executed += 1
                        return self._replay(ctx, ops[0])
                    reason = f"a person chose {action!r} after: {reason}"
                return await self._give_up_async(ctx, idx, plan, drv, err, reason)
            finally:
                _STEP.reset(token)
            await ctx.commit_async(self._settled(ctx, idx, plan, result, None, drv.attempt,
                                                 drv.started, drv.note(note))
                                   + drv.closing_ops(None))
            ctx.executed += 1
            if ctx.partials:
                await asyncio.to_thread(drop_partials, ctx)
            return result

    async def _give_up_async(self, ctx: WorkflowContext, idx: int,
                             plan: _effects.Plan | None, drv: Driver, error: Exception,
                             reason: str | None) -> Any:
        await ctx.commit_async(self._settled(ctx, idx, plan, None, error, drv.attempt,
                                             drv.started, drv.note(_gave_up(drv, reason)))
                               + drv.closing_ops(error))
        ctx.executed += 1
        raise live_step_failure(self.name, error)


PERSON_ACTIONS = ("retry", "fallback", "abort", "value")


def _gave_up(drv: Driver, reason: str | None) -> str | None:
    if not reason or (drv.policy.max_attempts == 1 and not drv.history):
        return None  # a step without retries failing once needs no explanation
    return f"gave up: {reason}"
