"""Group commit: many workflows' journal writes share one transaction and one fsync.

A thread that commits while nothing else is committing, and whose last transaction
carried one writer only, becomes the *leader* and writes its own batch at once, so a
lone workflow pays exactly one transaction per step and no thread hand-off. Writers
arriving while a commit is in flight, or while recent transactions were shared,
queue up; a background thread takes everything queued and commits it as one
transaction, and keeps doing so until the queue is empty. Async callers
always queue (a commit must not block the event loop) and are woken through their
loop. Nobody is told their write succeeded before its transaction committed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from .stores.base import Op, Store


class _Waiter:
    __slots__ = ("error", "event", "future", "loop", "ops")

    def __init__(
        self,
        ops: Sequence[Op],
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        self.ops = ops
        self.error: BaseException | None = None
        # A held lock is the cheapest one-shot signal: resolve() releases it, and the
        # waiting thread's acquire() returns.
        self.event: threading.Lock | None = None
        self.loop = loop
        self.future = future

    def resolve(self, error: BaseException | None) -> None:
        self.error = error
        if self.future is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(_settle, self.future, error)
        elif self.event is not None:
            self.event.release()


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class GroupCommitter:
    """Batches concurrent :meth:`Store.apply` calls."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._mutex = threading.Lock()
        self._queue: list[_Waiter] = []
        self._busy = False
        self._wake = threading.Condition(self._mutex)
        self._handoff = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._solo = True  # the last transaction carried one writer: commit inline
        self.transactions = 0
        self.batched_writes = 0

    def commit(self, ops: Sequence[Op]) -> None:
        """Durably apply ``ops`` (blocking); raise the store's error if it failed."""
        me = _Waiter(ops)
        with self._mutex:
            if self._busy or not self._solo:
                # Others are committing too: join the next shared transaction.
                me.event = threading.Lock()
                me.event.acquire()
                self._queue.append(me)
                lead = False
                if not self._busy:
                    self._busy = True
                    self._hand_to_background()
            else:
                self._busy = True
                lead = True
        if lead:
            batch = [me]
            with self._mutex:
                if self._queue:
                    batch += self._queue
                    self._queue = []
            self._run(batch)
            self._release()
        else:
            assert me.event is not None
            me.event.acquire()
        if me.error is not None:
            raise me.error

    async def commit_async(self, ops: Sequence[Op]) -> None:
        """Durably apply ``ops`` without blocking the running event loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        me = _Waiter(ops, loop, fut)
        with self._mutex:
            self._queue.append(me)
            if not self._busy:
                self._busy = True
                self._hand_to_background()
        await fut

    def _run(self, batch: list[_Waiter]) -> None:
        try:
            errors = self._store.apply([w.ops for w in batch])
        except BaseException as exc:  # the store broke its contract; fail every waiter
            errors = [exc] * len(batch)
        self.transactions += 1
        self.batched_writes += len(batch)
        self._solo = len(batch) == 1
        for waiter, error in zip(batch, errors, strict=True):
            waiter.resolve(error)

    def _release(self) -> None:
        with self._mutex:
            if self._queue:
                self._hand_to_background()
            else:
                self._busy = False

    def _hand_to_background(self) -> None:
        # Called with the mutex held and _busy set: the background thread now leads.
        self._handoff = True
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._background, name="crashsafe-commit", daemon=True
            )
            self._thread.start()
        else:
            self._wake.notify()

    def _background(self) -> None:
        while True:
            with self._mutex:
                while not self._handoff and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                self._handoff = False
            while True:
                with self._mutex:
                    batch = self._queue
                    self._queue = []
                    if not batch:
                        self._busy = False
                        break
                self._run(batch)

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            self._wake.notify()
