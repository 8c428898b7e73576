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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from .._keys import Keyring
from .._redaction import Redactor, for_tag
from .._seal import RecordContext, Sealer
from ..exceptions import ConfigurationError, CorruptRecordError, SerializationError
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
    MarkWaiting,
    Op,
    PayloadRewrite,
    Requeue,
    SharedUpdate,
    Status,
    Store,
    StoredPayload,
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
        self.redactor = Redactor(False)
        """Masks credentials in payloads before they are sealed (the App sets its own;
        without one, :class:`~crashsafe.Secret` values are still refused unencrypted)."""
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

    def _value(self, data: bytes | None, what: str, step: str | None = None,
               checkpoint: bool = False) -> bytes | None:
        if data is None:
            return None
        return self.redactor.value(data, encrypted=self.sealer.encrypted, what=what,
                                   step=step, checkpoint=checkpoint)

    def _error(self, data: bytes | None, step: str | None = None) -> bytes | None:
        return None if data is None else self.redactor.error(data, step=step)

    def _seal_record(self, r: WorkflowRecord) -> WorkflowRecord:
        out = copy.copy(r)
        inputs = self.redactor.value(r.inputs, encrypted=self.sealer.encrypted,
                                     what=f"the arguments of workflow {r.id!r}")
        out.inputs = self.sealer.seal(inputs, RecordContext(r.id, WORKFLOW, "inputs"))
        out.output = self._seal(self._value(r.output, f"the result of workflow {r.id!r}"),
                                r.id, WORKFLOW, "output")
        out.error = self._seal(self._error(r.error), r.id, WORKFLOW, "error")
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
        step = e.name if e.kind == "step" else None
        output = self._value(e.output, f"the {e.kind} {e.name!r} at index {e.index} of "
                                       f"workflow {e.workflow_id!r}", step,
                             checkpoint=e.kind == "checkpoint")
        out.output = self._seal(output, e.workflow_id, e.index, "output")
        out.error = self._seal(self._error(e.error, step), e.workflow_id, e.index, "error")
        out.note = self.redactor.text(e.note)
        return out

    def _open_effect(self, row: EffectRow | None) -> EffectRow | None:
        if row is None:
            return None
        row.output = self._open(row.output, row.workflow_id, row.index, "effect-output")
        row.error = self._open(row.error, row.workflow_id, row.index, "effect-error")
        return row

    def _seal_op(self, op: Op, steps: dict[tuple[str, int], str] | None = None) -> Op:
        if type(op) is JournalEntry:
            return self._seal_entry(op)
        if isinstance(op, CreateWorkflow):
            return CreateWorkflow(self._seal_record(op.record))
        if isinstance(op, FinishWorkflow):
            out = copy.copy(op)
            output = self._value(op.output, f"the result of workflow {op.workflow_id!r}")
            out.output = self._seal(output, op.workflow_id, WORKFLOW, "output")
            out.error = self._seal(self._error(op.error), op.workflow_id, WORKFLOW, "error")
            out.reason = self.redactor.text(op.reason)
            return out
        if isinstance(op, CompleteEffect):
            out_e = copy.copy(op)
            step = (steps or {}).get((op.workflow_id, op.index))
            output = self._value(op.output, f"the effect at index {op.index} of workflow "
                                            f"{op.workflow_id!r}", step)
            out_e.output = self._seal(output, op.workflow_id, op.index, "effect-output")
            out_e.error = self._seal(self._error(op.error, step), op.workflow_id, op.index,
                                     "effect-error")
            return out_e
        if isinstance(op, AttemptRecord):
            out_a = copy.copy(op)
            out_a.error = self._seal(self._error(op.error, op.step), op.workflow_id, op.index,
                                     f"attempt-error:{op.attempt}")
            out_a.note = self.redactor.text(op.note)
            return out_a
        if isinstance(op, MarkWaiting | Requeue) and op.reason is not None:
            out_m = copy.copy(op)
            out_m.reason = self.redactor.text(op.reason)
            return out_m
        return op

    def _seal_batch(self, ops: Sequence[Op]) -> list[Op]:
        # An effect's outcome is redacted like the result of the step that recorded it.
        steps = {(op.workflow_id, op.index): op.name for op in ops
                 if type(op) is JournalEntry and op.kind == "step"}
        return [self._seal_op(op, steps) for op in ops]

    # -- writes -------------------------------------------------------------------------
    def apply(self, batches: Sequence[Sequence[Op]]) -> list[BaseException | None]:
        sealed: list[list[Op] | None] = []
        refused: list[BaseException | None] = []
        for ops in batches:
            try:
                sealed.append(self._seal_batch(ops))
                refused.append(None)
            except SerializationError as exc:  # only this batch fails (a Secret, unencrypted)
                sealed.append(None)
                refused.append(exc)
        if not any(refused):
            return self.inner.apply([ops for ops in sealed if ops is not None])
        done = iter(self.inner.apply([ops for ops in sealed if ops is not None])
                    if any(ops is not None for ops in sealed) else [])
        return [err if ops is None else next(done) for ops, err in zip(sealed, refused,
                                                                         strict=True)]

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
        payload = self.redactor.value(payload, encrypted=self.sealer.encrypted,
                                      what=f"the payload of signal {name!r}")
        return self.inner.send_signal(workflow_id, name,
                                      self.sealer.seal(payload, _signal(workflow_id, name)), at)

    # -- reads ----------------------------------------------------------------------------
    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        return self._open_record(self.inner.get_workflow(workflow_id))

    def _open_listed(self, r: WorkflowRecord) -> WorkflowRecord:
        """Open a record for a listing: one damaged row must not hide the others. Its
        unreadable payloads become empty bytes (decoding them fails loudly) and its
        reason says what was damaged."""
        fields = (("inputs", r.inputs), ("output", r.output), ("error", r.error))
        for kind, data in fields:
            if data is None:
                continue
            try:
                setattr(r, kind, self.sealer.open(data, RecordContext(r.id, WORKFLOW, kind)))
            except CorruptRecordError as exc:
                setattr(r, kind, b"")
                r.reason = f"unreadable: {exc}" + (f"; {r.reason}" if r.reason else "")
        return r

    def list_workflows(self, flt: ListFilter) -> list[WorkflowRecord]:
        return [self._open_listed(r) for r in self.inner.list_workflows(flt)]

    def load_journal(self, workflow_id: str) -> list[JournalEntry]:
        entries = self.inner.load_journal(workflow_id)
        for e in entries:
            e.output = self._open(e.output, e.workflow_id, e.index, "output")
            e.error = self._open(e.error, e.workflow_id, e.index, "error")
        return entries

    def scan_journal(self, workflow_id: str
                     ) -> tuple[list[JournalEntry], list[CorruptRecordError]]:
        """The journal with every entry opened on its own: the readable entries, and
        the error of each record that failed (oldest first), instead of one error for
        the whole load. For the ``on_corrupt`` policy (:mod:`crashsafe._corruption`)."""
        good: list[JournalEntry] = []
        bad: list[CorruptRecordError] = []
        for e in self.inner.load_journal(workflow_id):
            try:
                e.output = self._open(e.output, e.workflow_id, e.index, "output")
                e.error = self._open(e.error, e.workflow_id, e.index, "error")
            except CorruptRecordError as exc:
                bad.append(exc)
            else:
                good.append(e)
        return good, bad

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
            try:
                self._open_record(res.record)
            except CorruptRecordError:
                # Claimed, but unreadable: ``record`` None tells the engine to apply the
                # workflow's on_corrupt policy (one bad row must not stop the others).
                res.record = None
        return results

    def set_status(self, workflow_id: str, status: Status, *, only_from: Sequence[Status],
                   reason: str | None = None, clear_owner: bool = False,
                   reset_recoveries: bool = False) -> WorkflowRecord | None:
        return self._open_record(self.inner.set_status(
            workflow_id, status, only_from=only_from, reason=self.redactor.text(reason),
            clear_owner=clear_owner,
            reset_recoveries=reset_recoveries))

    def dequeue(self, queue: str, owner: str, limit: int, queue_limit: int | None,
                now: float) -> list[WorkflowRecord]:
        # A damaged one still comes out (it is claimed): running it meets the damage
        # and the workflow's on_corrupt policy decides.
        return [self._open_listed(r)
                for r in self.inner.dequeue(queue, owner, limit, queue_limit, now)]

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
        return self.inner.rewind(workflow_id, from_index, self.redactor.text(reason) or "", at)

    def load_rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        rows = self.inner.load_rewound(workflow_id)
        for _, _, e in rows:
            try:
                e.output = self._open(e.output, e.workflow_id, e.index, "output")
                e.error = self._open(e.error, e.workflow_id, e.index, "error")
            except CorruptRecordError as exc:
                # Rolled back because it was damaged: the audit shows that, not the bytes.
                e.output = e.error = None
                e.note = f"{e.note}; " if e.note else ""
                e.note += f"unreadable: {exc}"
        return rows

    def rewrite_payloads(self, workflow_id: str, fn: PayloadRewrite) -> int:
        """Passed through: ``fn`` sees the sealed bytes (this is how keys are rotated)."""
        return self.inner.rewrite_payloads(workflow_id, fn)

    def load_payloads(self, workflow_ids: Sequence[str]) -> list[StoredPayload]:
        """Passed through: the sealed bytes (what ``crashsafe verify`` checks)."""
        return self.inner.load_payloads(workflow_ids)

    def orphaned_workflow_ids(self) -> list[str]:
        return self.inner.orphaned_workflow_ids()

    def finished_workflows(self, before: float, after: tuple[float, str] | None, limit: int,
                           *, roots: bool = False) -> list[tuple[str, float]]:
        return self.inner.finished_workflows(before, after, limit, roots=roots)

    def drop_workflows(self, workflow_ids: Sequence[str], before: float) -> list[str]:
        return self.inner.drop_workflows(workflow_ids, before)

    def rewrite_finished_entries(self, entries: Sequence[JournalEntry],
                                 expect: Mapping[str, tuple[int, float]]) -> list[str]:
        return self.inner.rewrite_finished_entries([self._seal_rewritten(e) for e in entries],
                                                   expect)

    def _seal_rewritten(self, e: JournalEntry) -> JournalEntry:
        """A checkpoint record retention rewrote from what this store holds: redacted
        under the settings it records (its hash covers that form), not the live ones,
        which may mask more since it was recorded."""
        if e.kind != "checkpoint" or e.output is None:
            return self._seal_entry(e)
        try:
            doc = msgspec.json.decode(e.output)
            redactor = for_tag(doc.get("rd")) if isinstance(doc, dict) else self.redactor
        except (msgspec.DecodeError, ValueError, RecursionError):
            redactor = self.redactor
        out = copy.copy(e)
        output = redactor.value(e.output, encrypted=self.sealer.encrypted,
                                what=f"the checkpoint at index {e.index} of workflow "
                                     f"{e.workflow_id!r}", checkpoint=True)
        out.output = self._seal(output, e.workflow_id, e.index, "output")
        out.error = self._seal(self._error(e.error), e.workflow_id, e.index, "error")
        out.note = self.redactor.text(e.note)
        return out

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
