"""Workflow definitions: argument encoding, typed rebuild, and the run loop."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from . import _codec
from ._checkpoint_policy import CheckpointPolicy
from ._context import _WORKFLOW, WorkflowContext, _ReplayEnd, _Shutdown, _Suspend
from ._errors import error_payload, live_workflow_failure
from .exceptions import (
    ConfigurationError,
    CorruptRecordError,
    NondeterminismError,
    SerializationError,
    StoreConflictError,
    StoreError,
    WorkflowCancelled,
)
from .stores.base import (
    FinishWorkflow,
    JournalEntry,
    MarkWaiting,
    Requeue,
    Status,
    WorkflowNotRunning,
)

if TYPE_CHECKING:
    from ._app import App
    from ._handle import WorkflowHandle

_EMPTY: Any = inspect.Parameter.empty
P = ParamSpec("P")
R = TypeVar("R")


class Outcome:
    """How a run in this process ended, for handles waiting in the same process."""

    __slots__ = ("error", "kind", "value")

    def __init__(self, kind: str, value: Any = None, error: BaseException | None = None) -> None:
        # "ok", "error", "cancelled", "dead_letter", "store_error", "aborted", "suspended",
        # "requeued"
        self.kind = kind
        self.value = value
        self.error = error


class Workflow(Generic[P, R]):
    """A function decorated with ``@app.workflow``; start it with ``app.start``."""

    def __init__(self, app: App, fn: Callable[P, R], *, name: str | None, version: str,
                 checkpoint: CheckpointPolicy | None = None) -> None:
        if checkpoint is not None and not isinstance(checkpoint, CheckpointPolicy):
            raise ConfigurationError(f"workflow {name or fn.__qualname__!r}: checkpoint= must "
                                     "be a crashsafe.CheckpointPolicy")
        self.checkpoint = checkpoint
        self.app = app
        self.fn = fn
        self.name = name or fn.__qualname__
        self.version = str(version)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        self._hints: dict[str, Any] | None = None
        self.on_corrupt: str | None = None
        """This workflow's ``on_corrupt`` policy (None: the App's)."""
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<crashsafe workflow {self.name!r} version {self.version!r}>"

    @property
    def hints(self) -> dict[str, Any]:
        if self._hints is None:
            self._hints = _codec.resolve_hints(self.fn)
        return self._hints

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run as a workflow and wait for its result (a child workflow inside a workflow)."""
        if self.is_async:
            return self._call_async(*args, **kwargs)  # type: ignore[return-value]
        handle: WorkflowHandle[R] = self.app.start(self, *args, **kwargs)  # type: ignore[arg-type]
        return handle.result()

    async def _call_async(self, *args: Any, **kwargs: Any) -> Any:
        handle = await self.app.start_async(self, *args, **kwargs)
        return await handle.result_async()

    # -- arguments --------------------------------------------------------------------
    def encode_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """Serialize the arguments now, so a bad one fails at start and not at recovery."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"workflow {self.name!r}: {exc}") from None
        params = self.signature.parameters
        for pname, value in bound.arguments.items():
            what = f"argument {pname!r} of workflow {self.name!r}"
            data, structured = _codec.encode(value, what)
            if not structured:
                continue
            tp = self.hints.get(pname, _EMPTY)
            if not _codec.needs_type(tp):
                raise SerializationError(
                    f"{what} holds a dataclass, model or enum but the parameter has no type "
                    "annotation; annotate it so recovery can rebuild the same object"
                )
            if params[pname].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                          inspect.Parameter.VAR_KEYWORD):
                _codec.check_rebuild(value, data, tp, what)
        data, _ = _codec.encode({"args": list(args), "kwargs": kwargs},
                                f"arguments of workflow {self.name!r}")
        return data

    def decode_inputs(self, data: bytes, workflow_id: str) -> tuple[list[Any], dict[str, Any]]:
        raw = _codec.decode(data, f"arguments of workflow {workflow_id!r}")
        if not isinstance(raw, dict):
            raw = {}
        args = list(raw.get("args") or [])
        kwargs = dict(raw.get("kwargs") or {})
        params = list(self.signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_pos = next((p for p in params if p.kind is p.VAR_POSITIONAL), None)
        var_kw = next((p for p in params if p.kind is p.VAR_KEYWORD), None)
        hints = self.hints
        for i, value in enumerate(args):
            param = positional[i] if i < len(positional) else var_pos
            if param is None:
                break
            args[i] = _codec.rebuild(value, hints.get(param.name, _EMPTY),
                                     f"argument {param.name!r} of workflow {workflow_id!r}")
        for key, value in kwargs.items():
            tp = hints.get(key, hints.get(var_kw.name, _EMPTY) if var_kw else _EMPTY)
            kwargs[key] = _codec.rebuild(value, tp, f"argument {key!r} of workflow {workflow_id!r}")
        return args, kwargs

    def encode_result(self, value: Any) -> bytes:
        what = f"result of workflow {self.name!r}"
        data, structured = _codec.encode(value, what)
        if structured:
            tp = self.hints.get("return", _EMPTY)
            if not _codec.needs_type(tp):
                raise SerializationError(
                    f"{what} holds a dataclass, model or enum but the workflow has no return "
                    "annotation; annotate it so readers can rebuild the same object"
                )
            _codec.check_rebuild(value, data, tp, what)
        return data

    def decode_result(self, data: bytes | None, workflow_id: str) -> Any:
        value = _codec.decode(data or b"null", f"result of workflow {workflow_id!r}")
        return _codec.rebuild(value, self.hints.get("return", _EMPTY),
                              f"result of workflow {workflow_id!r}")


def _finish_op(ctx: WorkflowContext, status: Status, output: bytes | None = None,
               error: bytes | None = None, reason: str | None = None) -> FinishWorkflow:
    return FinishWorkflow(ctx.workflow_id, ctx.app.executor_id, status, output, error, reason,
                          time.time())


def _settle_success(wf: Workflow[Any, Any], ctx: WorkflowContext, value: Any) -> Outcome:
    ctx.leftover_check()
    if ctx.check_only:
        return Outcome("ok", value)
    data = wf.encode_result(value)
    try:
        ctx.commit([_finish_op(ctx, Status.SUCCEEDED, output=data)])
    except WorkflowNotRunning:
        if _cancel_requested(ctx):
            return _cancel_sync(ctx)  # cancelled while finishing: it ends cancelled
        raise
    return Outcome("ok", value)


def _cancel_requested(ctx: WorkflowContext) -> bool:
    rec = ctx.app.store.get_workflow(ctx.workflow_id)
    return rec is not None and rec.status is Status.CANCELLING


def _on_failure(wf: Workflow[Any, Any], ctx: WorkflowContext, exc: BaseException) -> Outcome:
    """Decide what a workflow that raised becomes; returns the outcome to report."""
    if ctx.diverged is not None and not isinstance(exc, _Shutdown | WorkflowCancelled):
        exc = ctx.diverged  # whatever the code raised after diverging, the cause is this
    if isinstance(exc, _Suspend):
        return _suspend(ctx, exc)
    if isinstance(exc, WorkflowCancelled):
        return Outcome("cancelled", error=exc)
    if isinstance(exc, _Shutdown | _ReplayEnd):
        return Outcome("aborted", error=exc)
    if isinstance(exc, StoreConflictError):
        return Outcome("aborted", error=exc)  # another executor owns it now
    if isinstance(exc, CorruptRecordError) and not ctx.check_only:
        from ._corruption import on_run

        return on_run(wf, ctx, exc)  # the workflow's on_corrupt policy decides
    if isinstance(exc, StoreError):
        # Nothing could be recorded; the workflow stays `running` and is recovered
        # when the store works again.
        return Outcome("store_error", error=exc)
    if ctx.check_only:
        return Outcome("error", error=exc)
    if isinstance(exc, NondeterminismError):
        reason = f"nondeterminism: {exc}"
        ctx.app.store.set_status(ctx.workflow_id, Status.DEAD_LETTER,
                                 only_from=(Status.RUNNING, Status.WAITING),
                                 reason=reason, clear_owner=True)
        return Outcome("dead_letter", error=exc)
    if not isinstance(exc, Exception):
        return Outcome("aborted", error=exc)  # KeyboardInterrupt, SystemExit: not recorded
    try:
        ctx.commit([_finish_op(ctx, Status.FAILED, error=error_payload(exc))])
    except WorkflowNotRunning as store_exc:
        if _cancel_requested(ctx):
            return _cancel_sync(ctx)
        return Outcome("aborted", error=store_exc)
    except StoreConflictError as store_exc:
        return Outcome("aborted", error=store_exc)  # cancelled or taken over meanwhile
    except StoreError as store_exc:
        return Outcome("store_error", error=store_exc)
    return Outcome("error", error=live_workflow_failure(ctx.workflow_id, exc))


def _suspend(ctx: WorkflowContext, exc: _Suspend) -> Outcome:
    """Park a workflow whose next attempt is far off: a queued one goes back to its
    queue (any worker continues it when due), another waits in this process."""
    if ctx.queue is not None:
        op: Requeue | MarkWaiting = Requeue(ctx.workflow_id, ctx.app.executor_id, ctx.token,
                                            exc.wake_at, exc.reason)
    else:
        op = MarkWaiting(ctx.workflow_id, ctx.app.executor_id, exc.reason)
    try:
        ctx.commit([op])
    except StoreConflictError as store_exc:
        return Outcome("aborted", error=store_exc)  # cancelled or taken over meanwhile
    except StoreError as store_exc:
        return Outcome("store_error", error=store_exc)
    return Outcome("requeued" if ctx.queue is not None else "suspended", error=exc)


def compensate(ctx: WorkflowContext) -> list[str]:
    """Run the compensations of the cancelled workflow's completed steps, newest first.

    Each runs once: it is journaled at an index derived from the journal alone (after
    the workflow's last recorded call), so a crash in the middle resumes with the
    next one. Returns the descriptions of compensations that raised (recorded too).
    """
    ctx.compensating = True
    ctx.pending = []  # journaled values never committed never happened
    ctx.riders = []
    steps = ctx.app._steps
    # A result taken from another workflow's key is that workflow's effect: not ours
    # to undo.
    done = [e for e in ctx.recorded if e.kind == "step" and e.error is None
            and not (e.note or "").startswith("deduplicated:")
            and (st := steps.get(e.name)) is not None and st.compensate is not None]
    base = 1 + max((e.index for e in ctx.recorded), default=-1)
    failures: list[str] = []
    for i, entry in enumerate(sorted(done, key=lambda e: e.index, reverse=True)):
        idx = base + i
        recorded = ctx.compensations.get(idx)
        if recorded is not None:
            if recorded.error is not None:
                failures.append(f"{entry.name} (step {entry.index})")
            continue
        ctx.check_interrupt()
        step = steps[entry.name]
        assert step.compensate is not None
        value = _codec.rebuild(_codec.decode(entry.output or b"null", "step result"),
                               step.return_type, f"result of step {entry.name!r}")
        started = time.time()
        error: bytes | None = None
        try:
            out = step.compensate(value)
            if inspect.isawaitable(out):
                asyncio.run(_awaited(out))
        except Exception as exc:
            error = error_payload(exc)
            failures.append(f"{entry.name} (step {entry.index})")
        done_entry = JournalEntry(ctx.workflow_id, idx, "compensate", entry.name, b"null", error,
                                  1, started, time.time(), f"undoes step {entry.index}")
        ctx.commit([done_entry])
        ctx.compensations[idx] = done_entry
    return failures


async def _awaited(value: Any) -> Any:
    return await value


def _cancelled(ctx: WorkflowContext, failures: list[str]) -> Outcome:
    if failures:
        reason = f"compensations failed for {', '.join(failures)} (see the timeline)"
    else:
        reason = "compensations ran" if ctx.compensations else "nothing to compensate"
    try:
        ctx.commit([_finish_op(ctx, Status.CANCELLED, reason=reason)])
    except StoreConflictError as exc:
        return Outcome("aborted", error=exc)
    except StoreError as exc:
        return Outcome("store_error", error=exc)
    return Outcome("cancelled", error=WorkflowCancelled(reason))


def _cancel_sync(ctx: WorkflowContext) -> Outcome:
    try:
        failures = compensate(ctx)
    except _Shutdown as exc:
        return Outcome("aborted", error=exc)
    except StoreError as exc:
        return Outcome("store_error", error=exc)
    return _cancelled(ctx, failures)


def run_sync(wf: Workflow[Any, Any], ctx: WorkflowContext, args: list[Any],
             kwargs: dict[str, Any]) -> Outcome:
    token = _WORKFLOW.set(ctx)
    ctx.auto.use(wf.checkpoint)
    try:
        try:
            value = wf.fn(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, WorkflowCancelled) and not ctx.check_only:
                return _cancel_sync(ctx)
            return _on_failure(wf, ctx, exc)
        try:
            return _settle_success(wf, ctx, value)
        except (Exception, _Shutdown) as exc:  # the app may close during the last commit
            return _on_failure(wf, ctx, exc)
    finally:
        _WORKFLOW.reset(token)


async def run_async(wf: Workflow[Any, Any], ctx: WorkflowContext, args: list[Any],
                    kwargs: dict[str, Any]) -> Outcome:
    token = _WORKFLOW.set(ctx)
    ctx.auto.use(wf.checkpoint)
    try:
        try:
            value = await wf.fn(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, WorkflowCancelled) and not ctx.check_only:
                return await asyncio.to_thread(_cancel_sync, ctx)
            return _on_failure(wf, ctx, exc)
        try:
            ctx.leftover_check()
            if ctx.check_only:
                return Outcome("ok", value)
            data = wf.encode_result(value)
            try:
                await ctx.commit_async([_finish_op(ctx, Status.SUCCEEDED, output=data)])
            except WorkflowNotRunning:
                if await asyncio.to_thread(_cancel_requested, ctx):
                    return await asyncio.to_thread(_cancel_sync, ctx)
                raise
            return Outcome("ok", value)
        except (Exception, _Shutdown) as exc:  # the app may close during the last commit
            return _on_failure(wf, ctx, exc)
    finally:
        _WORKFLOW.reset(token)
