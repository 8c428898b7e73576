"""Durable queues: enqueue workflows now, let workers take them when there is room.

``q = app.queue("emails", concurrency=10, worker_concurrency=2, rate_limit=(100, 60))``
declares a queue; ``q.enqueue(send_email, to, workflow_id="mail-42")`` records the
workflow as ``enqueued`` (idempotent on the id, like ``app.start``) and returns its
handle. Processes that serve the queue (``app.serve(["emails"])``, or
``crashsafe worker MODULE:APP --queues emails``) take waiting workflows in priority
order, never more than ``concurrency`` running at once across all workers, never more
than ``worker_concurrency`` in one process, and no faster than ``rate_limit``. The
store hands each workflow to one worker only (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, the write lock on SQLite) and gives it a new fencing token.

A queued workflow whose step must wait long before its next attempt is handed back
to the queue with ``not_before`` set, so any worker continues it when it is due (the
centralized retry queue) instead of one worker holding it; a worker that shuts down
hands its queued workflows back the same way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError
from .policies.limits import RateLimit
from .policies.retry import seconds
from .stores.base import CreateWorkflow, Status, WorkflowExists

if TYPE_CHECKING:
    from ._app import App
    from ._handle import WorkflowHandle
    from ._workflow import Workflow


@dataclass(frozen=True, slots=True)
class QueueOptions:
    name: str
    concurrency: int | None
    worker_concurrency: int | None
    rate_limit: RateLimit | None


class Queue:
    """A named durable queue of workflows (see the module documentation)."""

    def __init__(self, app: App, name: str, *, concurrency: int | None = None,
                 worker_concurrency: int | None = None,
                 rate_limit: RateLimit | tuple[float, float] | None = None) -> None:
        if not name or not isinstance(name, str):
            raise ConfigurationError("a queue needs a non-empty name")
        for what, value in (("concurrency", concurrency),
                            ("worker_concurrency", worker_concurrency)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"queue {name!r}: {what} must be an int >= 1 or None")
        if isinstance(rate_limit, tuple):
            calls, per = rate_limit
            rate_limit = RateLimit(f"queue:{name}", calls, per)
        self.app = app
        self.options = QueueOptions(name, concurrency, worker_concurrency, rate_limit)

    @property
    def name(self) -> str:
        return self.options.name

    def __repr__(self) -> str:
        return f"<crashsafe queue {self.name!r}>"

    def enqueue(self, fn: Workflow[Any, Any] | str, *args: Any, workflow_id: str | None = None,
                priority: int = 0, delay: float | timedelta | None = None,
                dedup_id: str | None = None, **kwargs: Any) -> WorkflowHandle[Any]:
        """Record the workflow as waiting on this queue and return its handle at once.

        Idempotent on ``workflow_id``. ``priority``: higher is taken first. ``delay``:
        not before this many seconds from now. ``dedup_id``: while a workflow of this
        queue with the same dedup id waits or runs, enqueueing another returns that
        one's handle instead. Inside a workflow, the enqueue is journaled like a child
        workflow (its id defaults to ``<parent id>/<index>``).
        """
        app = self.app
        wf, inputs, parent, _ = app._prepare(fn, args, kwargs, workflow_id)  # runs later
        wait = seconds(delay, "delay") or 0.0
        if not isinstance(priority, int):
            raise ConfigurationError(f"priority must be an int, not {priority!r}")
        if parent is not None:
            return app._start_child(parent, wf, inputs, args, kwargs, workflow_id,
                                    queued=(self, priority, wait, dedup_id))
        app._ensure_launched()
        rec = self.record(wf, workflow_id or str(uuid.uuid4()), inputs, None, priority, wait,
                          dedup_id)
        try:
            app._committer.commit([CreateWorkflow(rec)])
        except WorkflowExists as exc:
            if exc.dedup_id is None:
                app._check_existing(wf, exc.workflow_id)
            from ._handle import WorkflowHandle as Handle

            return Handle(app, exc.workflow_id)
        app._queue_wakeup.set()
        from ._handle import WorkflowHandle as Handle

        return Handle(app, rec.id)

    def record(self, wf: Workflow[Any, Any], workflow_id: str, inputs: bytes,
               parent_id: str | None, priority: int, delay: float,
               dedup_id: str | None) -> Any:
        rec = self.app._new_record(wf, workflow_id, inputs, parent_id)
        rec.status, rec.owner = Status.ENQUEUED, None
        rec.queue, rec.priority, rec.dedup_id = self.name, priority, dedup_id
        rec.not_before = self.app.clock() + delay if delay else None
        return rec


def take(app: App, queue: Queue, room: int) -> list[Any]:
    """Take up to ``room`` workflows of ``queue`` for this process (rate limit first)."""
    opts = queue.options
    if opts.rate_limit is not None and room > 0:
        room = app._resilience.take_many(opts.rate_limit, room)
    if room <= 0:
        return []
    return app.store.dequeue(opts.name, app.executor_id, room, opts.concurrency, app.clock())
