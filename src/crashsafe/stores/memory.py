"""An in-memory store for fast engine tests and for users' own tests.

Same contract as the SQLite store, no durability: everything is gone when the
process exits. Two :class:`~crashsafe.App` objects in one process can share one
``MemoryStore`` to simulate a crash and a recovery (see :mod:`crashsafe.testing`).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..exceptions import StoreConflictError
from .base import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
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
    StoredPayload,
    T,
    WorkflowExists,
    WorkflowNotRunning,
    WorkflowRecord,
    choose_drops,
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
            for _, _, e in self._rewound.get(workflow_id, []):
                redo(e, "output", e.index, "output")
                redo(e, "error", e.index, "error")
            return changed

    def load_payloads(self, workflow_ids: Sequence[str]) -> list[StoredPayload]:
        found: dict[str, list[StoredPayload]] = {wid: [] for wid in workflow_ids}

        def note(wid: str, table: str, index: int, kind: str, data: bytes | None) -> None:
            if data is not None:
                found[wid].append((wid, table, index, kind, bytes(data)))

        with self._lock:
            # The same walk as rewrite_payloads, told which table each payload is in.
            for wid in found:
                if (rec := self._workflows.get(wid)) is not None:
                    for attr in ("inputs", "output", "error"):
                        note(wid, "workflows", -1, attr, getattr(rec, attr))
                entries = self._journal.get(wid, {})
                for i in sorted(entries):
                    note(wid, "journal", i, "output", entries[i].output)
                    note(wid, "journal", i, "error", entries[i].error)
                attempts = self._attempts.get(wid, {})
                for key in sorted(attempts):
                    note(wid, "attempts", key[0], f"attempt-error:{key[1]}", attempts[key].error)
                for _, _, e in self._rewound.get(wid, []):
                    note(wid, "rewound", e.index, "output", e.output)
                    note(wid, "rewound", e.index, "error", e.error)
            for row in sorted(self._effects.values(), key=lambda r: r.key):
                if row.workflow_id in found:
                    note(row.workflow_id, "effects", row.index, "effect-output", row.output)
                    note(row.workflow_id, "effects", row.index, "effect-error", row.error)
            for (wid, name), queue in sorted(self._signals.items()):
                for payload in queue if wid in found else []:
                    note(wid, "signals", 0, f"signal:{name}", payload)
        return [row for rows in found.values() for row in rows]

    def orphaned_workflow_ids(self) -> list[str]:
        with self._lock:
            owners = {wid for wid, rows in self._journal.items() if rows}
            owners |= {wid for wid, rows in self._attempts.items() if rows}
            owners |= {wid for wid, rows in self._rewound.items() if rows}
            owners |= {r.workflow_id for r in self._effects.values()}
            owners |= {wid for wid, _ in self._signals}
            return sorted(owners - self._workflows.keys())

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

    # -- retention ----------------------------------------------------------------------
    def finished_workflows(self, before: float, after: tuple[float, str] | None, limit: int,
                           *, roots: bool = False) -> list[tuple[str, float]]:
        with self._lock:
            found = sorted(
                (r.updated_at, r.id) for r in self._workflows.values()
                if r.status in FINISHED_STATUSES and r.updated_at < before
                and (after is None or (r.updated_at, r.id) > after)
                and not (roots and r.parent_id is not None and r.parent_id in self._workflows))
            return [(wid, at) for at, wid in found[:max(0, limit)]]

    def drop_workflows(self, workflow_ids: Sequence[str], before: float) -> list[str]:
        with self._lock:
            rows = [(r.id, r.parent_id, r.status.value, r.updated_at)
                    for wid in dict.fromkeys(workflow_ids)
                    if (r := self._workflows.get(wid)) is not None]
            dropped = choose_drops(rows, before,
                                   lambda ids: {i for i in ids if i in self._workflows})
            gone = set(dropped)
            for wid in dropped:
                del self._workflows[wid]
                self._journal.pop(wid, None)
                self._attempts.pop(wid, None)
                self._rewound.pop(wid, None)
            self._signals = {k: v for k, v in self._signals.items() if k[0] not in gone}
            held = {(r.workflow_id, r.index) for r in self._effects.values()}
            self._intents = {k for k in self._intents if k[0] not in gone or k in held}
            return dropped

    def rewrite_finished_entries(self, entries: Sequence[JournalEntry],
                                 expect: Mapping[str, tuple[int, float]]) -> list[str]:
        with self._lock:
            written: set[str] = set()
            for e in entries:
                rec = self._workflows.get(e.workflow_id)
                held = self._journal.get(e.workflow_id, {}).get(e.index)
                if rec is None or rec.status not in FINISHED_STATUSES or held is None \
                        or held.kind != e.kind \
                        or (rec.token, rec.updated_at) != tuple(expect.get(rec.id, ())):
                    continue
                held.output, held.note = e.output, e.note
                written.add(e.workflow_id)
            return sorted(written)

    def usage(self) -> dict[str, int]:
        """Rows per table (no bytes: nothing is on disk)."""
        with self._lock:
            return {
                "workflows": len(self._workflows),
                "journal": sum(len(j) for j in self._journal.values()),
                "attempts": sum(len(a) for a in self._attempts.values()),
                "signals": sum(len(q) for q in self._signals.values()),
                "effects": len(self._effects),
                "intents": len(self._intents),
                "rewound": sum(len(r) for r in self._rewound.values()),
                "shared": len(self._shared),
            }

    def close(self) -> None:
        """Nothing to release; the data stays for other apps sharing this store."""
