"""The storage contract every backend implements.

The contract is deliberately narrow: the engine asks for whole records and hands
over batches of writes; it never issues SQL. A backend passes when it passes
``tests/store_conformance.py`` unchanged.

Writes that make up a step's progress (journal entries, a workflow's end) arrive
as *batches* through :meth:`Store.apply`: one call may hold the batches of many
concurrently running workflows, and the backend applies all of them in one
transaction (group commit). If the combined transaction fails because of one
batch, the backend retries the batches one by one so only the offender fails.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from ..exceptions import StoreConflictError


class Status(enum.StrEnum):
    """Lifecycle of a workflow."""

    RUNNING = "running"
    """Started and owned by an executor (or awaiting recovery if its owner died)."""
    WAITING = "waiting"
    """Running, but parked until a signal arrives (``crashsafe.wait_for``); owned and
    recovered exactly like a running workflow."""
    CANCELLING = "cancelling"
    """Cancel requested: the workflow is running the compensations of its completed
    steps (recovered like a running workflow), then becomes ``cancelled``."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD_LETTER = "dead_letter"
    """Parked after repeated crashed recoveries or a nondeterminism; resume by hand."""
    ENQUEUED = "enqueued"
    """Waiting in a queue for a worker to take it (see ``app.queue``); owned by nobody."""

    @property
    def terminal(self) -> bool:
        return self not in ACTIVE_STATUSES and self is not Status.ENQUEUED

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATUSES


ACTIVE_STATUSES = frozenset({Status.RUNNING, Status.WAITING, Status.CANCELLING})
FINISHED_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED,
                               Status.DEAD_LETTER})
"""What retention may drop or compact (see :meth:`Store.drop_workflows`)."""
PROCEEDING = frozenset({Status.RUNNING, Status.WAITING})
"""Active and not asked to stop."""


@dataclass(slots=True)
class WorkflowRecord:
    """One workflow row."""

    id: str
    name: str
    version: str
    status: Status
    inputs: bytes
    created_at: float
    updated_at: float
    owner: str | None = None
    parent_id: str | None = None
    output: bytes | None = None
    error: bytes | None = None
    recovery_attempts: int = 0
    """Recoveries since the workflow last made progress (see :func:`decide_claim`)."""
    reason: str | None = None
    recovery_mark: int = 0
    """How many journal entries the workflow had at its last recovery."""
    token: int = 0
    """The fencing token of the current lease: raised by one at every takeover. Writes
    made under an older token are refused by the store (see :class:`JournalEntry`)."""
    queue: str | None = None
    """The queue it was enqueued on (None: started directly)."""
    priority: int = 0
    """Higher runs first among a queue's waiting workflows."""
    not_before: float | None = None
    """While enqueued: not handed to a worker before this time (store clock)."""
    dedup_id: str | None = None
    """At most one workflow per (queue, dedup id) is waiting or running at a time."""


@dataclass(slots=True)
class JournalEntry:
    """One durable call made by a workflow: a step, a timer, a journaled value."""

    workflow_id: str
    index: int
    kind: str
    """``step``, ``now``, ``uuid``, ``random``, ``sleep``, ``child`` or ``patch``."""
    name: str
    output: bytes | None = None
    error: bytes | None = None
    attempts: int = 1
    started_at: float = 0.0
    ended_at: float = 0.0
    note: str | None = None
    """What else happened here, for the timeline (e.g. how an unknown outcome was
    resolved); never read by replay."""
    token: int | None = field(default=None, compare=False)
    """As a write: the writer's fencing token. The store inserts the entry only if the
    workflow's token is still this one (None: no check). Not stored."""


@dataclass(slots=True)
class ExecutorRecord:
    """A process that runs workflows; ``owner`` of a workflow names one of these."""

    id: str
    hostname: str
    pid: int
    pid_start: str
    started_at: float
    heartbeat_at: float
    stopped: bool = False


@dataclass(slots=True)
class FinishWorkflow:
    """Write op: record a workflow's end, only if it is still running under ``owner``."""

    workflow_id: str
    owner: str
    status: Status
    output: bytes | None = None
    error: bytes | None = None
    reason: str | None = None
    at: float = 0.0
    token: int | None = None
    """Refused unless the workflow's fencing token is still this one (None: no check)."""


@dataclass(slots=True)
class MarkWaiting:
    """Write op: park an active workflow as ``waiting`` with ``reason``, or set it back to
    ``running`` when ``reason`` is None; only while ``owner`` still owns it."""

    workflow_id: str
    owner: str
    reason: str | None
    token: int | None = None
    """Refused unless the workflow's fencing token is still this one (None: no check)."""


@dataclass(slots=True)
class Requeue:
    """Write op: hand a running workflow back to its queue (a retry due later, or a
    worker shutting down), only while ``owner`` holds it under ``token``."""

    workflow_id: str
    owner: str
    token: int | None
    not_before: float | None
    reason: str | None = None


@dataclass(slots=True)
class CreateWorkflow:
    """Write op: insert a new workflow row; the batch fails with
    :class:`WorkflowExists` if the id is taken (nothing of that batch is applied)."""

    record: WorkflowRecord


@dataclass(slots=True)
class CompleteEffect:
    """Write op: record an effect step's outcome under its key and clear its intent, in
    the same transaction as the step's journal entry."""

    key: str
    workflow_id: str
    index: int
    output: bytes | None
    error: bytes | None
    at: float
    expires_at: float | None = None


@dataclass(slots=True)
class EffectRow:
    """One row of the deduplication table: who applied a key, with what result."""

    key: str
    workflow_id: str
    index: int
    step: str
    args_hash: str
    state: str
    """``started`` (an attempt may be in flight or cut off) or ``done``."""
    output: bytes | None = None
    error: bytes | None = None
    created_at: float = 0.0
    expires_at: float | None = None


@dataclass(slots=True)
class EffectStart:
    """What :meth:`Store.begin_effect` found."""

    unknown: bool = False
    """An earlier attempt of this very step started and never recorded its outcome."""
    holder: EffectRow | None = None
    """The key belongs to another step (another workflow, or already done): nothing
    was recorded for this one."""


@dataclass(slots=True)
class AttemptRecord:
    """Write op and row: one attempt of a step that did not succeed at its first try.

    A step's first attempt writes nothing here (its journal entry says ``attempts=1``).
    When an attempt fails and the step will retry, the failure is recorded with the
    planned delay; before a later attempt's body runs, its start is recorded. So after a
    crash the engine knows how many attempts were used and when the next one is due,
    and the total across restarts never exceeds the policy's limit. Written as an
    upsert on ``(workflow_id, index, attempt)``.
    """

    workflow_id: str
    index: int
    attempt: int
    step: str
    started_at: float
    ended_at: float | None = None
    failure_class: str | None = None
    """The failure class (``rate_limited``, ``server_error``, ...) when it failed."""
    error: bytes | None = None
    delay: float | None = None
    """Seconds planned before the next attempt (None: no further attempt)."""
    delay_source: str | None = None
    """Where the delay came from: ``backoff``, ``retry-after header``, ..."""
    next_at: float | None = None
    """When the next attempt is due (``ended_at + delay``)."""
    note: str | None = None
    token: int | None = field(default=None, compare=False)
    """As a write: refused unless the workflow's fencing token is still this one."""


Op = (JournalEntry | FinishWorkflow | CreateWorkflow | MarkWaiting | CompleteEffect
      | AttemptRecord | Requeue)

T = TypeVar("T")

PayloadRewrite = Callable[[int, str, bytes], bytes | None]
"""``fn(index, kind, stored) -> replacement or None`` for :meth:`Store.rewrite_payloads`."""

StoredPayload = tuple[str, str, int, str, bytes]
"""``(workflow_id, table, index, kind, stored)``: one payload as
:meth:`Store.load_payloads` lists it; ``table`` is ``workflows``, ``journal``,
``attempts``, ``effects``, ``signals`` or ``rewound`` (rolled-back entries)."""

SharedUpdate = Callable[[bytes | None, float], tuple[bytes | None, T]]
"""``fn(current_value, store_now) -> (new_value, result)`` for
:meth:`Store.update_shared`; returning the current value unchanged writes nothing."""


class WorkflowNotRunning(StoreConflictError):
    """A :class:`FinishWorkflow` found the workflow no longer running under that owner
    (cancelled meanwhile, or taken over), or a write carried a stale fencing token;
    nothing of its batch was applied."""

    def __init__(self, workflow_id: str, stale_token: int | None = None) -> None:
        self.workflow_id = workflow_id
        self.stale_token = stale_token
        if stale_token is not None:
            msg = (f"workflow {workflow_id!r} was taken over by another worker: this "
                   f"worker's lease (fencing token {stale_token}) is stale, so its write "
                   "was refused")
        else:
            msg = (f"workflow {workflow_id!r} is no longer running under this process "
                   "(cancelled or taken over); its end was not recorded")
        super().__init__(msg)


class WorkflowExists(StoreConflictError):
    """A :class:`CreateWorkflow` met an existing id (or, for ``dedup_id``, another
    waiting or running workflow of that queue with the same dedup id, whose id
    ``workflow_id`` then names); read that row instead."""

    def __init__(self, workflow_id: str, dedup_id: str | None = None) -> None:
        self.workflow_id = workflow_id
        self.dedup_id = dedup_id
        if dedup_id is None:
            super().__init__(f"a workflow with id {workflow_id!r} already exists")
        else:
            super().__init__(f"workflow {workflow_id!r} with dedup id {dedup_id!r} is "
                             "already waiting or running on this queue")


@dataclass(slots=True)
class ClaimResult:
    """Outcome of trying to take over a workflow from a dead executor."""

    claimed: bool
    dead_lettered: bool = False
    record: WorkflowRecord | None = None


def dead_letter_reason(max_recoveries: int) -> str:
    """Why :func:`decide_claim` parked a workflow as a dead letter."""
    return (f"recovered {max_recoveries} times without finishing (the process probably "
            "crashes while running it); fix the cause, then `crashsafe resume`")


def decide_claim(rec: WorkflowRecord, new_owner: str, max_recoveries: int,
                 journal_length: int, at: float) -> ClaimResult:
    """Count one more recovery of ``rec`` (in place): hand it to ``new_owner``, or park
    it as a dead letter once it has been recovered more than ``max_recoveries`` times
    *without progress*. A workflow whose journal grew since its last recovery starts
    counting again, so a long-lived workflow that survives many unrelated crashes is
    never parked; one that crashes its process at the same point every time is.
    Every backend calls this, then persists ``rec``."""
    if journal_length > rec.recovery_mark:
        rec.recovery_attempts = 0
        rec.recovery_mark = journal_length
    rec.recovery_attempts += 1
    rec.updated_at = at
    if rec.recovery_attempts > max_recoveries:
        rec.status = Status.DEAD_LETTER
        rec.owner = None
        rec.reason = dead_letter_reason(max_recoveries)
        return ClaimResult(claimed=False, dead_lettered=True, record=rec)
    rec.owner = new_owner
    rec.token += 1  # the previous holder's writes are refused from now on
    return ClaimResult(claimed=True, record=rec)


def choose_drops(rows: Sequence[tuple[str, str | None, str, float]], before: float,
                 kept_parents: Callable[[set[str]], set[str]]) -> list[str]:
    """Which of ``rows`` (``(id, parent_id, status, updated_at)`` as stored) the
    :meth:`Store.drop_workflows` call may drop: finished, older than ``before``, and
    whose parent is absent or dropped too. ``kept_parents(ids)`` says which of those
    parent ids still have a row. Every backend calls this inside its transaction."""
    eligible = {wid: parent for wid, parent, status, at in rows
                if status in _FINISHED_VALUES and at < before}
    outside = {p for p in eligible.values() if p is not None and p not in eligible}
    kept = kept_parents(outside) if outside else set()
    dropped: set[str] = set()
    while True:  # a child goes once its parent does, at any depth
        more = {wid for wid, parent in eligible.items() if wid not in dropped and (
            parent is None or parent in dropped or (parent not in eligible
                                                    and parent not in kept))}
        if not more:
            return sorted(dropped)
        dropped |= more


_FINISHED_VALUES = frozenset(s.value for s in FINISHED_STATUSES)


@dataclass(slots=True)
class ListFilter:
    status: Status | None = None
    name: str | None = None
    limit: int = 100
    id_prefix: str | None = None


@runtime_checkable
class Store(Protocol):
    """What the engine needs from a database. All methods are thread-safe."""

    url: str

    def apply(self, batches: Sequence[Sequence[Op]]) -> list[BaseException | None]:
        """Apply many batches durably in one transaction; return one error (or None) each.

        Must not return before the data is durable at the store's durability level.
        """
        ...

    def create_workflow(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        """Insert ``record`` unless its id exists; return the stored row and whether it was new."""
        ...

    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None: ...

    def list_workflows(self, flt: ListFilter) -> list[WorkflowRecord]:
        """Newest first."""
        ...

    def load_journal(self, workflow_id: str) -> list[JournalEntry]:
        """Entries ordered by index."""
        ...

    def running_workflows(self, exclude_owner: str) -> list[tuple[str, str | None, str]]:
        """``(id, owner, name)`` of active (running or waiting) workflows not owned by
        ``exclude_owner``."""
        ...

    def claim_workflows(
        self, claims: Sequence[tuple[str, str | None]], new_owner: str, max_recoveries: int
    ) -> list[ClaimResult]:
        """Atomically move running workflows ``(id, expected_owner)`` to ``new_owner``.

        One result per claim, in order. Each counts a recovery; past
        ``max_recoveries`` the workflow becomes a dead letter instead. A claim fails
        (``claimed=False``) when the owner changed meanwhile. The whole list is one
        transaction, so recovering thousands of workflows costs a few commits.
        """
        ...

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
        """Change status if the current one is in ``only_from``; return the new row or None."""
        ...

    def cancelled_among(self, workflow_ids: Sequence[str]) -> list[str]:
        """Which of these workflows have been cancelled (or otherwise stopped being active)."""
        ...

    def send_signal(self, workflow_id: str, name: str, payload: bytes, at: float) -> int | None:
        """Queue a signal for an active workflow; its sequence number among signals of that
        name (from 0), or None if there is no active workflow with this id."""
        ...

    def get_signal(self, workflow_id: str, name: str, nth: int) -> bytes | None:
        """The payload of signal number ``nth`` (from 0) of that name, if it arrived."""
        ...

    def begin_effect(self, workflow_id: str, index: int, step: str, key: str, args_hash: str,
                     at: float) -> EffectStart:
        """Durably record that step ``index`` is about to apply the effect ``key``.

        In one transaction: if ``key`` is held by another step, or is done, return that
        row as ``holder`` and record nothing; otherwise record (or keep) the intent and
        the key's ``started`` row, and say whether an intent of this step was already
        there (``unknown``: a previous attempt never recorded its outcome).
        """
        ...

    def get_effect(self, key: str) -> EffectRow | None: ...

    def purge_effects(self, now: float) -> int:
        """Delete done effect rows whose retention ran out; return how many."""
        ...

    def load_attempts(self, workflow_id: str) -> list[AttemptRecord]:
        """Recorded attempts of the workflow's steps, ordered by (index, attempt)."""
        ...

    def update_shared(self, key: str, fn: SharedUpdate[T]) -> T:
        """Atomically read-modify-write one small shared value (breaker, budget, limit).

        ``fn`` is called inside one transaction that excludes every other updater of
        ``key`` in every process, with the current value (None if absent) and the
        store's clock (the database server's time where there is one). If it returns a
        value different from the current one, that value is written (None deletes the
        key). ``fn`` may be called more than once if the transaction must be retried,
        so it must be a pure function of its arguments. Returns ``fn``'s result.
        """
        ...

    def read_shared(self, key: str) -> tuple[bytes | None, float]:
        """The shared value under ``key`` (or None) and the store's clock, without a
        write transaction."""
        ...

    def list_shared(self, prefix: str) -> list[tuple[str, bytes, float]]:
        """``(key, value, updated_at)`` of every shared value whose key starts with
        ``prefix``, ordered by key."""
        ...

    def dequeue(self, queue: str, owner: str, limit: int, queue_limit: int | None,
                now: float) -> list[WorkflowRecord]:
        """Hand up to ``limit`` enqueued workflows of ``queue`` to ``owner``: highest
        priority first, then oldest; only those whose ``not_before`` has passed; never
        more than ``queue_limit`` of the queue running at once across all owners. Each
        becomes ``running`` with a new fencing token. One item is never handed to two
        callers. Returns the taken records."""
        ...

    def rewind(self, workflow_id: str, from_index: int, reason: str, at: float) -> int:
        """Roll a workflow back (``app.rollback``): in one transaction, move its journal
        entries at ``from_index`` and after into the rewound-entries history (kept for
        audit, see :meth:`load_rewound`), drop its attempt rows, intents and effect keys
        from there on, and make it ``running`` and unowned with a new fencing token and
        ``reason``, so a serving process resumes it (and any process still running it
        is fenced off). Returns how many entries were moved."""
        ...

    def load_rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        """Entries removed by :meth:`rewind`: ``(rewound_at, reason, entry)``, oldest
        rewind first, then by index."""
        ...

    def rewrite_payloads(self, workflow_id: str, fn: PayloadRewrite) -> int:
        """Maintenance (key rotation): in one transaction, call ``fn(index, kind, data)``
        for every payload stored for ``workflow_id`` — its own ``inputs``/``output``/
        ``error`` at index -1, journal ``output``/``error``, ``attempt-error:N``,
        ``effect-output``/``effect-error`` of the effects it recorded, ``signal:NAME``
        (index 0), and the ``output``/``error`` of its rolled-back entries — and store
        what it returns instead (None: keep). Rows are found by their workflow id, so
        this also reaches the rows of an id that has no workflow row any more (see
        :meth:`orphaned_workflow_ids`). Returns how many payloads changed."""
        ...

    def load_payloads(self, workflow_ids: Sequence[str]) -> list[StoredPayload]:
        """Maintenance (``crashsafe verify``), read only: every payload
        :meth:`rewrite_payloads` visits for each of ``workflow_ids``, as stored, grouped
        by workflow in the order given. Many ids per call: the effects table has no
        index on its workflow column, so each call reads it once."""
        ...

    def orphaned_workflow_ids(self) -> list[str]:
        """Maintenance (key rotation, verify): the ids, sorted, that own journal,
        attempt, effect, signal or rolled-back rows but have no workflow row: above all
        the effect rows retention keeps after dropping their workflow (they deduplicate
        until their expiry). :meth:`rewrite_payloads` and :meth:`load_payloads` reach
        their rows by id."""
        ...

    def finished_workflows(self, before: float, after: tuple[float, str] | None, limit: int,
                           *, roots: bool = False) -> list[tuple[str, float]]:
        """Retention: ``(id, updated_at)`` of up to ``limit`` finished workflows
        (succeeded, failed, cancelled, dead letter) last updated before ``before``,
        ordered by ``(updated_at, id)`` and strictly after the cursor ``after``. With
        ``roots``, only those without a parent workflow row (never a child, or the
        parent was dropped): a child goes with its parent."""
        ...

    def drop_workflows(self, workflow_ids: Sequence[str], before: float) -> list[str]:
        """Retention: in one transaction, delete each listed workflow that is still
        finished, was last updated before ``before``, and has no parent row left
        other than one dropped by this same call, with all its rows: journal,
        attempts, signals, rolled-back entries, and intents whose effect key has no
        row any more. Effect rows are *kept* (a key deduplicates until its expiry,
        see :meth:`purge_effects`). Returns the ids dropped."""
        ...

    def rewrite_finished_entries(self, entries: Sequence[JournalEntry],
                                 expect: Mapping[str, tuple[int, float]]) -> list[str]:
        """Retention (checkpoint compaction): in one transaction, replace the
        ``output`` and ``note`` of existing journal entries (same workflow, index and
        kind). A compare-and-swap per workflow: its entries are written only if it is
        still finished and its fencing token and ``updated_at`` are still
        ``expect[workflow_id]``, as the caller read them *before* the journal it
        planned from; a workflow rolled back, run again (both raise the token) or
        missing from ``expect`` is left alone entirely. Returns the ids of the
        workflows whose entries were written, sorted."""
        ...

    def clock(self) -> float:
        """The store's own time (Unix seconds): the database server's clock where there
        is one. Leases and durable timers are measured against it, so a worker whose
        wall clock is off neither steals early nor wakes late."""
        ...

    def register_executor(self, record: ExecutorRecord) -> None: ...

    def heartbeat(self, executor_id: str, at: float) -> None: ...

    def stop_executor(self, executor_id: str) -> None: ...

    def get_executors(self, ids: Sequence[str]) -> dict[str, ExecutorRecord]: ...

    def close(self) -> None: ...
