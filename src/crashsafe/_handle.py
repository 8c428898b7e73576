"""Handles: what ``app.start`` returns, usable from any process that shares the store."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._context import _STEP, _WORKFLOW, _ReplayEnd
from ._errors import workflow_failure
from ._step import seconds
from .exceptions import (
    DeadLetteredError,
    ResultTimeoutError,
    UnknownWorkflowError,
    WorkflowCancelledError,
)
from .stores.base import Status, WorkflowRecord

if TYPE_CHECKING:
    from datetime import timedelta

    from ._app import App, Execution

R = TypeVar("R")


class WorkflowHandle(Generic[R]):
    """A reference to one workflow by id."""

    def __init__(self, app: App, workflow_id: str) -> None:
        self._app = app
        self.workflow_id = workflow_id

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.workflow_id!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowHandle) and other.workflow_id == self.workflow_id \
            and other._app is self._app

    def __hash__(self) -> int:
        return hash(self.workflow_id)

    def record(self) -> WorkflowRecord:
        """The stored row (status, owner, timestamps, reason)."""
        rec = self._app.store.get_workflow(self.workflow_id)
        if rec is None:
            raise UnknownWorkflowError(f"no workflow with id {self.workflow_id!r}")
        return rec

    def status(self) -> Status:
        """The workflow's current status, read from the store."""
        return self.record().status

    def cancel(self) -> bool:
        """Cancel the workflow; False if it had already finished."""
        return self._app.cancel(self.workflow_id)

    def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the workflow to finish and return its result (or raise its error).

        Waits in this process when the workflow runs here, and polls the store when
        it runs elsewhere. Raises :class:`~crashsafe.ResultTimeoutError` after ``timeout``.
        """
        limit = seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        # A workflow waiting on a child must still stop when it is cancelled or its
        # app closes, so waits are sliced and the caller's interrupts checked.
        caller = _WORKFLOW.get() if _STEP.get() is None else None
        ex = self._app._executions.get(self.workflow_id)
        if ex is not None:
            while not ex.done.wait(_slice(deadline, 0.25)):
                if caller is not None:
                    caller.check_interrupt()
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._timeout(limit)
            local = self._local(ex)
            if local is not _POLL:
                return local  # type: ignore[no-any-return]
        delay = 0.005
        while True:
            rec = self.record()
            if rec.status.terminal:
                return self._from_record(rec)  # type: ignore[no-any-return]
            if caller is not None:
                if caller.check_only:
                    raise _ReplayEnd  # a check-only replay cannot wait for live work
                caller.check_interrupt()
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timeout(limit)
            if caller is not None:
                caller.cancel_event.wait(_slice(deadline, delay))
            else:
                time.sleep(_slice(deadline, delay))
            delay = min(delay * 1.5, 0.5)

    async def result_async(self, timeout: float | timedelta | None = None) -> R:
        """The async form of :meth:`result`."""
        limit = seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        caller = _WORKFLOW.get() if _STEP.get() is None else None
        ex = self._app._executions.get(self.workflow_id)
        if ex is not None:
            fut = ex.future_for(asyncio.get_running_loop())
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), _slice(deadline, 0.25))
                    break
                except TimeoutError:
                    if caller is not None:
                        caller.check_interrupt()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise self._timeout(limit) from None
            local = self._local(ex)
            if local is not _POLL:
                return local  # type: ignore[no-any-return]
        delay = 0.005
        while True:
            rec = await asyncio.to_thread(self.record)
            if rec.status.terminal:
                return self._from_record(rec)  # type: ignore[no-any-return]
            if caller is not None:
                if caller.check_only:
                    raise _ReplayEnd
                caller.check_interrupt()
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timeout(limit)
            await asyncio.sleep(_slice(deadline, delay))
            delay = min(delay * 1.5, 0.5)

    def _timeout(self, limit: float | None) -> ResultTimeoutError:
        return ResultTimeoutError(
            f"workflow {self.workflow_id!r} did not finish within {limit:g} s; it keeps "
            "running — call result() again to keep waiting"
        )

    def _local(self, ex: Execution) -> Any:
        out = ex.outcome
        if out is None or out.kind in ("aborted", "suspended", "requeued"):
            return _POLL
        if out.kind == "ok":
            return out.value
        if out.kind == "cancelled":
            why = str(out.error) if out.error is not None and str(out.error) else ""
            raise WorkflowCancelledError(
                f"workflow {self.workflow_id!r} was cancelled" + (f" ({why})" if why else ""))
        if out.kind == "dead_letter":
            raise DeadLetteredError(
                f"workflow {self.workflow_id!r} was parked as a dead letter: {out.error}"
            )
        assert out.error is not None
        raise out.error

    def _from_record(self, rec: WorkflowRecord) -> Any:
        if rec.status is Status.SUCCEEDED:
            wf = self._app._lookup(rec.name, rec.version)
            if wf is None:
                from . import _codec

                return _codec.decode(rec.output or b"null", f"result of {rec.id!r}")
            return wf.decode_result(rec.output, rec.id)
        if rec.status is Status.FAILED:
            raise workflow_failure(rec.id, rec.error or b"{}")
        if rec.status is Status.CANCELLED:
            raise WorkflowCancelledError(
                f"workflow {rec.id!r} was cancelled" + (f" ({rec.reason})" if rec.reason else "")
            )
        raise DeadLetteredError(
            f"workflow {rec.id!r} is a dead letter: {rec.reason}; fix the cause, then run "
            f"`crashsafe resume {rec.id}`"
        )


_POLL = object()


def _slice(deadline: float | None, step: float) -> float:
    """How long to wait next: ``step``, but never past ``deadline``."""
    if deadline is None:
        return step
    return max(0.0, min(step, deadline - time.monotonic()))
