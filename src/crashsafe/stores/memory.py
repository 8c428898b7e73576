"""An in-memory store for fast engine tests and for users' own tests.

Same contract as the SQLite store, no durability: everything is gone when the
process exits. Two :class:`~crashsafe.App` objects in one process can share one
``MemoryStore`` to simulate a crash and a recovery (see :mod:`crashsafe.testing`).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..exceptions import StoreConflictError
from .base import (
    ACTIVE_STATUSES,
    PROCEEDING,
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
    T,
    WorkflowExists,
    WorkflowNotRunning,
    WorkflowRecord,
    decide_claim,
)


class MemoryStore:
    """Thread-safe dictionaries behind the :class:`~crashsafe.stores.base.Store` contract."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._workflows: dict[str, WorkflowRecord] = {}
        self._journal: dict[str, dict[int, JournalEntry]] = {}
        self._executors: dict[str, ExecutorRecord] = {}
        self._signals: dict[tuple[str, str], list[bytes]] = {}
        self._effects: dict[str, EffectRow] = {}
        self._intents: set[tuple[str, int]] = set()
        self._attempts: dict[str, dict[tuple[int, int], AttemptRecord]] = {}
        self._shared: dict[str, tuple[bytes, float]] = {}
        self._rewound: dict[str, list[tuple[float, str, JournalEntry]]] = {}

    # -- writes ---------------------------------------------------------------------
    def apply(self, batches: Sequence[Sequence[Op]]) -> list[BaseException | None]:
        with self._lock:
            return [self._apply_one(ops) for ops in batches]

    def _apply_one(self, ops: Sequence[Op]) -> BaseException | None:
        # Validate first so a failing batch leaves nothing behind (one transaction).
        seen: set[tuple[str, int]] = set()
        creating: set[str] = set()
        for op in ops:
            if isinstance(op, CreateWorkflow):
                wid = op.record.id
                if wid in self._workflows or wid in creating:
                    return WorkflowExists(wid)
                twin = self._dedup_twin(op.record)
                if twin is not None:
                    return WorkflowExists(twin, op.record.dedup_id)
                creating.add(wid)
                continue
            if isinstance(op, Requeue):
                rec = self._workflows.get(op.workflow_id)
                if rec is None or rec.status not in PROCEEDING or rec.owner != op.owner \
                        or (op.token is not None and rec.token != op.token):
                    return WorkflowNotRunning(op.workflow_id, op.token)
                continue
            if isinstance(op, FinishWorkflow | MarkWaiting):
                rec = self._workflows.get(op.workflow_id)
                cancelling = isinstance(op, FinishWorkflow) and op.status is Status.CANCELLED
                allowed = ACTIVE_STATUSES if cancelling else PROCEEDING
                if rec is None or rec.status not in allowed or rec.owner != op.owner:
                    return WorkflowNotRunning(op.workflow_id)
                if op.token is not None and rec.token != op.token:
                    return WorkflowNotRunning(op.workflow_id, op.token)
                continue
            if isinstance(op, AttemptRecord) and op.token is not None:
                rec = self._workflows.get(op.workflow_id)
                if rec is not None and rec.token != op.token:
                    return WorkflowNotRunning(op.workflow_id, op.token)
            if not isinstance(op, JournalEntry):
                continue
            if op.token is not None:
                rec = self._workflows.get(op.workflow_id)
                if rec is not None and rec.token != op.token:
                    return WorkflowNotRunning(op.workflow_id, op.token)
            key = (op.workflow_id, op.index)
            if key in seen or op.index in self._journal.get(op.workflow_id, {}):
                return StoreConflictError(
                    f"workflow {op.workflow_id!r} already has a journal entry at index "
                    f"{op.index}; another executor is running it"
                )
            seen.add(key)
        for op in ops:
            if isinstance(op, JournalEntry):
                stored = copy.copy(op)
                stored.token = None
                self._journal.setdefault(op.workflow_id, {})[op.index] = stored
            elif isinstance(op, CreateWorkflow):
                self._workflows[op.record.id] = copy.copy(op.record)
            elif isinstance(op, CompleteEffect):
                row = self._effects.get(op.key)
                if row is not None and (row.workflow_id, row.index) == (op.workflow_id, op.index):
                    row.state, row.output, row.error = "done", op.output, op.error
                    row.expires_at = op.expires_at
                self._intents.discard((op.workflow_id, op.index))
            elif isinstance(op, AttemptRecord):
                attempt = copy.copy(op)
                attempt.token = None
                self._attempts.setdefault(op.workflow_id, {})[(op.index, op.attempt)] = attempt
            elif isinstance(op, Requeue):
                rec = self._workflows[op.workflow_id]
                rec.status, rec.owner, rec.not_before = Status.ENQUEUED, None, op.not_before
                rec.reason = op.reason
            elif isinstance(op, MarkWaiting):
                rec = self._workflows[op.workflow_id]
                rec.status = Status.RUNNING if op.reason is None else Status.WAITING
                rec.reason = op.reason
            else:
                self._finish(op)
        return None

    def _finish(self, op: FinishWorkflow) -> None:
        rec = self._workflows[op.workflow_id]  # checked by _apply_one
        rec.status = op.status
        rec.output = op.output
        rec.error = op.error
        rec.reason = op.reason
        rec.updated_at = op.at

    def _dedup_twin(self, record: WorkflowRecord) -> str | None:
        if record.dedup_id is None:
            return None
        for r in self._workflows.values():
            if (r.queue, r.dedup_id) == (record.queue, record.dedup_id) and (
                    r.status.active or r.status is Status.ENQUEUED):
                return r.id
        return None

    def dequeue(self, queue: str, owner: str, limit: int, queue_limit: int | None,
                now: float) -> list[WorkflowRecord]:
        with self._lock:
            if queue_limit is not None:
                running = sum(1 for r in self._workflows.values()
                              if r.queue == queue and r.status.active)
                limit = min(limit, queue_limit - running)
            if limit <= 0:
                return []
            ready = sorted(
                (r for r in self._workflows.values()
                 if r.queue == queue and r.status is Status.ENQUEUED
                 and (r.not_before is None or r.not_before <= now)),
                key=lambda r: (-r.priority, r.created_at, r.id))[:limit]
            for r in ready:
                r.status, r.owner, r.token, r.updated_at = Status.RUNNING, owner, r.token + 1, now
                r.reason = None
            return [copy.copy(r) for r in ready]

    def create_workflow(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        with self._lock:
            existing = self._workflows.get(record.id)
            if existing is not None:
                return copy.copy(existing), False
            self._workflows[record.id] = copy.copy(record)
            return copy.copy(record), True

    def claim_workflows(
        self, claims: Sequence[tuple[str, str | None]], new_owner: str, max_recoveries: int
    ) -> list[ClaimResult]:
        with self._lock:
            return [self._claim(wid, owner, new_owner, max_recoveries) for wid, owner in claims]

    def _claim(self, workflow_id: str, expected_owner: str | None, new_owner: str,
               max_recoveries: int) -> ClaimResult:
        rec = self._workflows.get(workflow_id)
        if rec is None or not rec.status.active or rec.owner != expected_owner:
            return ClaimResult(claimed=False)
        res = decide_claim(rec, new_owner, max_recoveries,
                           len(self._journal.get(workflow_id, {})), time.time())
        res.record = copy.copy(rec)
        return res

    def set_status(
        self,
        workflow_id: str,
        status: Status,
        *,
        only_from: Sequence[Status],
        reason: str | None = None,
        clear_owner: bool = False,
        reset_recoveries: bool = False,
    ) -> WorkflowRecord | None:
        with self._lock:
            rec = self._workflows.get(workflow_id)
            if rec is None or rec.status not in only_from:
                return None
            rec.status = status
            rec.reason = reason
            rec.updated_at = time.time()
            if clear_owner:
                rec.owner = None
            if reset_recoveries:
                rec.recovery_attempts = 0
            return copy.copy(rec)

    def begin_effect(self, workflow_id: str, index: int, step: str, key: str, args_hash: str,
                     at: float) -> EffectStart:
        with self._lock:
            row = self._effects.get(key)
            if row is not None and ((row.workflow_id, row.index) != (workflow_id, index)
                                    or row.state == "done"):
                return EffectStart(holder=copy.copy(row))
            unknown = (workflow_id, index) in self._intents
            self._intents.add((workflow_id, index))
            if row is None:
                self._effects[key] = EffectRow(key, workflow_id, index, step, args_hash,
                                               "started", created_at=at)
            return EffectStart(unknown=unknown)

    def get_effect(self, key: str) -> EffectRow | None:
        with self._lock:
            row = self._effects.get(key)
            return copy.copy(row) if row is not None else None

    def purge_effects(self, now: float) -> int:
        with self._lock:
            old = [k for k, r in self._effects.items()
                   if r.state == "done" and r.expires_at is not None and r.expires_at < now]
            for k in old:
                del self._effects[k]
            return len(old)

    def register_executor(self, record: ExecutorRecord) -> None:
        with self._lock:
            self._executors[record.id] = copy.copy(record)

    def heartbeat(self, executor_id: str, at: float) -> None:
        with self._lock:
            rec = self._executors.get(executor_id)
            if rec is not None:
                rec.heartbeat_at = at

    def stop_executor(self, executor_id: str) -> None:
        with self._lock:
            rec = self._executors.get(executor_id)
            if rec is not None:
                rec.stopped = True

    # -- reads ----------------------------------------------------------------------
    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        with self._lock:
            rec = self._workflows.get(workflow_id)
            return copy.copy(rec) if rec is not None else None

    def list_workflows(self, flt: ListFilter) -> list[WorkflowRecord]:
        with self._lock:
            rows = [
                copy.copy(r)
                for r in self._workflows.values()
                if (flt.status is None or r.status is flt.status)
                and (flt.name is None or r.name == flt.name)
                and (flt.id_prefix is None or r.id.startswith(flt.id_prefix))
            ]
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return rows[: max(0, flt.limit)]

    def load_journal(self, workflow_id: str) -> list[JournalEntry]:
        with self._lock:
            entries = self._journal.get(workflow_id, {})
            return [copy.copy(entries[i]) for i in sorted(entries)]

    def running_workflows(self, exclude_owner: str) -> list[tuple[str, str | None, str]]:
        with self._lock:
            return [
                (r.id, r.owner, r.name)
                for r in self._workflows.values()
                if r.status.active and r.owner != exclude_owner
            ]

    def cancelled_among(self, workflow_ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [
                i
                for i in workflow_ids
                if (r := self._workflows.get(i)) is not None and r.status not in PROCEEDING
            ]

    def send_signal(self, workflow_id: str, name: str, payload: bytes, at: float) -> int | None:
        with self._lock:
            rec = self._workflows.get(workflow_id)
            if rec is None or rec.status.terminal:
                return None
            queue = self._signals.setdefault((workflow_id, name), [])
            queue.append(payload)
            return len(queue) - 1

    def get_signal(self, workflow_id: str, name: str, nth: int) -> bytes | None:
        with self._lock:
            queue = self._signals.get((workflow_id, name), [])
            return queue[nth] if 0 <= nth < len(queue) else None

    def clock(self) -> float:
        return time.time()

    def rewind(self, workflow_id: str, from_index: int, reason: str, at: float) -> int:
        with self._lock:
            rec = self._workflows.get(workflow_id)
            if rec is None:
                return 0
            journal = self._journal.get(workflow_id, {})
            moved = sorted(i for i in journal if i >= from_index)
            history = self._rewound.setdefault(workflow_id, [])
            for i in moved:
                history.append((at, reason, journal.pop(i)))
            attempts = self._attempts.get(workflow_id, {})
            for key in [k for k in attempts if k[0] >= from_index]:
                del attempts[key]
            self._intents = {k for k in self._intents
                             if not (k[0] == workflow_id and k[1] >= from_index)}
            for effect_key in [k for k, r in self._effects.items()
                               if r.workflow_id == workflow_id and r.index >= from_index]:
                del self._effects[effect_key]
            rec.status, rec.owner, rec.reason = Status.RUNNING, None, reason
            rec.output = rec.error = None
            rec.token += 1
            rec.recovery_attempts, rec.updated_at = 0, at
            return len(moved)

    def load_rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        with self._lock:
            return [(at, why, copy.copy(e)) for at, why, e in self._rewound.get(workflow_id, [])]

    def rewrite_payloads(self, workflow_id: str, fn: PayloadRewrite) -> int:
        with self._lock:
            changed = 0

            def redo(obj: Any, attr: str, index: int, kind: str) -> None:
                nonlocal changed
                data = getattr(obj, attr)
                if data is not None and (new := fn(index, kind, data)) is not None:
                    setattr(obj, attr, new)
                    changed += 1

            rec = self._workflows.get(workflow_id)
            if rec is not None:
                for attr in ("inputs", "output", "error"):
                    redo(rec, attr, -1, attr)
            for e in self._journal.get(workflow_id, {}).values():
                redo(e, "output", e.index, "output")
                redo(e, "error", e.index, "error")
            for a in self._attempts.get(workflow_id, {}).values():
                redo(a, "error", a.index, f"attempt-error:{a.attempt}")
            for row in self._effects.values():
                if row.workflow_id == workflow_id:
                    redo(row, "output", row.index, "effect-output")
                    redo(row, "error", row.index, "effect-error")
            for (wid, name), queue in self._signals.items():
                if wid == workflow_id:
                    for i, payload in enumerate(queue):
                        if (new := fn(0, f"signal:{name}", payload)) is not None:
                            queue[i] = new
                            changed += 1
            return changed

    def load_attempts(self, workflow_id: str) -> list[AttemptRecord]:
        with self._lock:
            rows = self._attempts.get(workflow_id, {})
            return [copy.copy(rows[k]) for k in sorted(rows)]

    def update_shared(self, key: str, fn: SharedUpdate[T]) -> T:
        with self._lock:
            held = self._shared.get(key)
            current = held[0] if held is not None else None
            now = time.time()
            new, result = fn(current, now)
            if new != current:
                if new is None:
                    del self._shared[key]
                else:
                    self._shared[key] = (bytes(new), now)
            return result

    def read_shared(self, key: str) -> tuple[bytes | None, float]:
        with self._lock:
            held = self._shared.get(key)
            return (held[0] if held is not None else None), time.time()

    def list_shared(self, prefix: str) -> list[tuple[str, bytes, float]]:
        with self._lock:
            return sorted((k, v, at) for k, (v, at) in self._shared.items()
                          if k.startswith(prefix))

    def get_executors(self, ids: Sequence[str]) -> dict[str, ExecutorRecord]:
        with self._lock:
            return {i: copy.copy(self._executors[i]) for i in ids if i in self._executors}

    def close(self) -> None:
        """Nothing to release; the data stays for other apps sharing this store."""
