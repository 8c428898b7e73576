"""A store wrapper that seals every payload on its way in and checks it on its way out.

Payloads are what the engine serializes: a workflow's inputs, output and error, a
journal entry's output and error, an effect's recorded outcome, a failed attempt's
error, a signal. :class:`SealedStore` passes every call to the real store and, at the
boundary, turns each payload into a sealed record (:mod:`crashsafe._seal`: zstd when it
saves bytes, AES-256-GCM when a keyring is configured, a SHA-256 checksum always),
bound to its place: (workflow id, index, kind). Reading verifies and opens it, so a
damaged, swapped or forged record raises :class:`~crashsafe.CorruptRecordError`
naming it instead of being decoded. Records written before sealing existed (bare
JSON) are read as they are while encryption is off.

Once a store has been written with encryption on, it says so (a marker in its shared
values), and opening it without a keyring is refused: no silent downgrade to
plaintext writes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from .._keys import Keyring
from .._seal import RecordContext, Sealer
from ..exceptions import ConfigurationError
from .base import (
    AttemptRecord,
    ClaimResult,
    CompleteEffect,
    CreateWorkflow,
    EffectRow,
    EffectStart,
    ExecutorRecord,
    FinishWorkflow,
    JournalEntry,
    ListFilter,
    Op,
    PayloadRewrite,
    SharedUpdate,
    Status,
    Store,
    T,
    WorkflowRecord,
)

WORKFLOW = -1
"""The index of a workflow's own records (inputs, output, error)."""
ENCRYPTION_MARK = "crashsafe:encryption"


class SealedStore:
    """The :class:`~crashsafe.stores.base.Store` contract over another store, sealed."""

    def __init__(self, inner: Store, sealer: Sealer) -> None:
        self.inner = inner
        self.sealer = sealer
        self.url = inner.url
        marked = inner.read_shared(ENCRYPTION_MARK)[0] is not None
        if marked and not sealer.encrypted:
            raise ConfigurationError(
                f"{inner.url!r} is encrypted (its records were written with a keyring); "
                "set $CRASHSAFE_KEYS to the keyring to open it")
        if sealer.encrypted and not marked:
            inner.update_shared(ENCRYPTION_MARK, lambda cur, now: (b"1", None))
        if hasattr(inner, "transact"):  # only backends with transactional steps have it
            self.transact = self._transact

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # backend extras (path, synchronous, ...)

    # -- sealing helpers ----------------------------------------------------------------
    def _seal(self, data: bytes | None, wid: str, index: int, kind: str) -> bytes | None:
        if data is None:
            return None
        return self.sealer.seal(data, RecordContext(wid, index, kind))

    def _open(self, data: bytes | None, wid: str, index: int, kind: str) -> bytes | None:
        if data is None:
            return None
        return self.sealer.open(data, RecordContext(wid, index, kind))

    def _seal_record(self, r: WorkflowRecord) -> WorkflowRecord:
        out = copy.copy(r)
        out.inputs = self.sealer.seal(r.inputs, RecordContext(r.id, WORKFLOW, "inputs"))
        out.output = self._seal(r.output, r.id, WORKFLOW, "output")
        out.error = self._seal(r.error, r.id, WORKFLOW, "error")
        return out

    def _open_record(self, r: WorkflowRecord | None) -> WorkflowRecord | None:
        if r is None:
            return None
        r.inputs = self.sealer.open(r.inputs, RecordContext(r.id, WORKFLOW, "inputs"))
        r.output = self._open(r.output, r.id, WORKFLOW, "output")
        r.error = self._open(r.error, r.id, WORKFLOW, "error")
        return r

    def _seal_entry(self, e: JournalEntry) -> JournalEntry:
        out = copy.copy(e)
        out.output = self._seal(e.output, e.workflow_id, e.index, "output")
        out.error = self._seal(e.error, e.workflow_id, e.index, "error")
        return out

    def _open_effect(self, row: EffectRow | None) -> EffectRow | None:
        if row is None:
            return None
        row.output = self._open(row.output, row.workflow_id, row.index, "effect-output")
        row.error = self._open(row.error, row.workflow_id, row.index, "effect-error")
        return row

    def _seal_op(self, op: Op) -> Op:
        if type(op) is JournalEntry:
            return self._seal_entry(op)
        if isinstance(op, CreateWorkflow):
            return CreateWorkflow(self._seal_record(op.record))
        if isinstance(op, FinishWorkflow):
            out = copy.copy(op)
            out.output = self._seal(op.output, op.workflow_id, WORKFLOW, "output")
            out.error = self._seal(op.error, op.workflow_id, WORKFLOW, "error")
            return out
        if isinstance(op, CompleteEffect):
            out_e = copy.copy(op)
            out_e.output = self._seal(op.output, op.workflow_id, op.index, "effect-output")
            out_e.error = self._seal(op.error, op.workflow_id, op.index, "effect-error")
            return out_e
        if isinstance(op, AttemptRecord):
            out_a = copy.copy(op)
            out_a.error = self._seal(op.error, op.workflow_id, op.index,
                                     f"attempt-error:{op.attempt}")
            return out_a
        return op

    # -- writes -------------------------------------------------------------------------
    def apply(self, batches: Sequence[Sequence[Op]]) -> list[BaseException | None]:
        return self.inner.apply([[self._seal_op(op) for op in ops] for ops in batches])

    def create_workflow(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        stored, created = self.inner.create_workflow(self._seal_record(record))
        if created:
            return record, True
        self._open_record(stored)
        return stored, False

    def _transact(self, work: Callable[[Any], Any],
                  record: Callable[[Any], JournalEntry]) -> Any:
        return self.inner.transact(work,  # type: ignore[attr-defined]
                                   lambda value: self._seal_entry(record(value)))

    def send_signal(self, workflow_id: str, name: str, payload: bytes, at: float) -> int | None:
        return self.inner.send_signal(workflow_id, name,
                                      self.sealer.seal(payload, _signal(workflow_id, name)), at)

    # -- reads ----------------------------------------------------------------------------
    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        return self._open_record(self.inner.get_workflow(workflow_id))

    def list_workflows(self, flt: ListFilter) -> list[WorkflowRecord]:
        return [r for r in map(self._open_record, self.inner.list_workflows(flt))
                if r is not None]

    def load_journal(self, workflow_id: str) -> list[JournalEntry]:
        entries = self.inner.load_journal(workflow_id)
        for e in entries:
            e.output = self._open(e.output, e.workflow_id, e.index, "output")
            e.error = self._open(e.error, e.workflow_id, e.index, "error")
        return entries

    def load_attempts(self, workflow_id: str) -> list[AttemptRecord]:
        rows = self.inner.load_attempts(workflow_id)
        for r in rows:
            r.error = self._open(r.error, r.workflow_id, r.index, f"attempt-error:{r.attempt}")
        return rows

    def get_signal(self, workflow_id: str, name: str, nth: int) -> bytes | None:
        data = self.inner.get_signal(workflow_id, name, nth)
        return None if data is None else self.sealer.open(data, _signal(workflow_id, name))

    def begin_effect(self, workflow_id: str, index: int, step: str, key: str, args_hash: str,
                     at: float) -> EffectStart:
        start = self.inner.begin_effect(workflow_id, index, step, key, args_hash, at)
        self._open_effect(start.holder)
        return start

    def get_effect(self, key: str) -> EffectRow | None:
        return self._open_effect(self.inner.get_effect(key))

    def claim_workflows(self, claims: Sequence[tuple[str, str | None]], new_owner: str,
                        max_recoveries: int) -> list[ClaimResult]:
        results = self.inner.claim_workflows(claims, new_owner, max_recoveries)
        for res in results:
            self._open_record(res.record)
        return results

    def set_status(self, workflow_id: str, status: Status, *, only_from: Sequence[Status],
                   reason: str | None = None, clear_owner: bool = False,
                   reset_recoveries: bool = False) -> WorkflowRecord | None:
        return self._open_record(self.inner.set_status(
            workflow_id, status, only_from=only_from, reason=reason, clear_owner=clear_owner,
            reset_recoveries=reset_recoveries))

    def dequeue(self, queue: str, owner: str, limit: int, queue_limit: int | None,
                now: float) -> list[WorkflowRecord]:
        return [r for r in map(self._open_record,
                               self.inner.dequeue(queue, owner, limit, queue_limit, now))
                if r is not None]

    # -- passed through unchanged (no payloads) -----------------------------------------
    def running_workflows(self, exclude_owner: str) -> list[tuple[str, str | None, str]]:
        return self.inner.running_workflows(exclude_owner)

    def cancelled_among(self, workflow_ids: Sequence[str]) -> list[str]:
        return self.inner.cancelled_among(workflow_ids)

    def purge_effects(self, now: float) -> int:
        return self.inner.purge_effects(now)

    def update_shared(self, key: str, fn: SharedUpdate[T]) -> T:
        return self.inner.update_shared(key, fn)

    def read_shared(self, key: str) -> tuple[bytes | None, float]:
        return self.inner.read_shared(key)

    def list_shared(self, prefix: str) -> list[tuple[str, bytes, float]]:
        return self.inner.list_shared(prefix)

    def clock(self) -> float:
        return self.inner.clock()

    def rewind(self, workflow_id: str, from_index: int, reason: str, at: float) -> int:
        return self.inner.rewind(workflow_id, from_index, reason, at)

    def load_rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        rows = self.inner.load_rewound(workflow_id)
        for _, _, e in rows:
            e.output = self._open(e.output, e.workflow_id, e.index, "output")
            e.error = self._open(e.error, e.workflow_id, e.index, "error")
        return rows

    def rewrite_payloads(self, workflow_id: str, fn: PayloadRewrite) -> int:
        """Passed through: ``fn`` sees the sealed bytes (this is how keys are rotated)."""
        return self.inner.rewrite_payloads(workflow_id, fn)

    def register_executor(self, record: ExecutorRecord) -> None:
        self.inner.register_executor(record)

    def heartbeat(self, executor_id: str, at: float) -> None:
        self.inner.heartbeat(executor_id, at)

    def stop_executor(self, executor_id: str) -> None:
        self.inner.stop_executor(executor_id)

    def get_executors(self, ids: Sequence[str]) -> dict[str, ExecutorRecord]:
        return self.inner.get_executors(ids)

    def close(self) -> None:
        self.inner.close()


def _signal(workflow_id: str, name: str) -> RecordContext:
    return RecordContext(workflow_id, 0, f"signal:{name}")


def sealed(inner: Store, keyring: Keyring | None) -> SealedStore:
    """``inner`` behind a sealer with ``keyring`` (None: checksums and compression only)."""
    return SealedStore(inner, Sealer(keyring))
