"""Production figures computed from what the store holds: the journal, the recorded
attempts, the workflow rows and the breakers' documents.

Nothing is counted in a process: every figure is derived from durable records, so it
is the same whichever process computes it, after any number of restarts, on memory,
SQLite or PostgreSQL. :func:`compute` reads only through the
:class:`~crashsafe.stores.base.Store` protocol (give it ``app.store``: records are
verified on their way out).

Each field of :class:`Metrics` says exactly how it is computed. Three figures are
**approximate** because the store keeps no per-recovery event log (when a crash was
detected, when the workflow resumed): the number of recoveries of queued workflows,
the recovery time and the recovery success rate. Their docstrings say what they
bound. Figures whose records do not exist yet (checkpoint latency, token usage and
cost) are None, with the reason in :attr:`Metrics.unavailable`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import _codec, _recovery_log
from .._checkpoint import KIND as CHECKPOINT
from .._effects import NOTE_PREFIX
from .._errors import recorded_class
from ..exceptions import ConfigurationError, CorruptRecordError, CrashsafeError
from ..policies.breaker import BreakerState
from ..policies.breaker import load as load_breaker
from ..stores.base import AttemptRecord, JournalEntry, ListFilter, Status, Store, WorkflowRecord

STUCK_AFTER = 1800.0
"""A step still retrying this many seconds after its first attempt began is stuck."""
FINISHED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
"""Statuses that end a workflow (a dead letter is parked, not finished: it can resume)."""
DEDUPLICATED = "deduplicated: key "
"""How an effect step's note starts when its key had already been applied."""
RERUN_RESOLUTIONS = frozenset({"retried with the same key", "escalated, a person chose retry"})
"""Resolutions of an unknown outcome that ran the effect's body again with the same key."""
UNAVAILABLE = {
    "checkpoint_latency_overhead": "no checkpoint of the window recorded its cost (adaptive "
                                   "automatic checkpoints do: CheckpointPolicy("
                                   "recovery_target=...))",
    "token_usage": "no checkpoint of the window recorded token usage (checkpoint(..., "
                   "tokens=) or crashsafe.record_usage)",
    "cost": "cost needs a per-model price table, which crashsafe does not keep",
}
APPROXIMATE = {
    "recoveries": "exact for workflows started directly, except that resuming one by hand "
                  "counts as a takeover; a lower bound for queued workflows, whose token "
                  "also counts dequeues",
    "recovery_time": "per takeover in the recovery log, from the dead owner's last "
                     "heartbeat (the crash came after it) to the first resumed step: an "
                     "upper bound by at most one heartbeat interval; for workflows "
                     "recovered before the log existed, the longest pause in their records",
    "recovery_success_rate": "a workflow dead-lettered once and then resumed by hand counts "
                             "by its current status; exact figures need a per-recovery "
                             "event log",
}


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles of durations in seconds: the p-th percentile is the
    smallest value such that at least p % of the values are at or below it (so it is
    always one of the values). All None when there are no values."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls()
        ordered = sorted(values)

        def rank(p: float) -> float:
            return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]

        return cls(len(ordered), rank(50), rank(95), rank(99), ordered[-1])


@dataclass(frozen=True, slots=True)
class RetryingStep:
    """A step call that failed at least once and has no result yet, in a workflow that is
    still active or enqueued."""

    workflow_id: str
    workflow_name: str
    index: int
    step: str
    attempts: int
    """Attempts recorded so far (the one in flight or planned included)."""
    first_started_at: float
    span: float
    """Seconds from its first attempt's start to the end of the window."""
    last_failure: str | None


@dataclass(frozen=True, slots=True)
class BreakerStats:
    """One breaker's history, read from the ``[at, from, to, why]`` state changes its
    document keeps (the last 20: older episodes are not visible)."""

    name: str
    state: str
    """Its state at the end of the window."""
    changes: int
    """State changes within the window."""
    trips: tuple[float, ...]
    """When it went from closed to open within the window."""
    longest_open: float
    """The longest stretch it was not closed (open, or half-open probing) that overlaps
    the window, in seconds, cut at the window's end; a stretch whose start fell out of
    the kept history is measured from the oldest change kept (a lower bound)."""
    open_since: float | None
    """When the stretch still running at the window's end began (None: closed)."""

    def most_trips_within(self, seconds: float) -> int:
        """The most closed-to-open trips inside any interval of ``seconds``."""
        best, first = 0, 0
        for last, at in enumerate(self.trips):
            while at - self.trips[first] > seconds:
                first += 1
            best = max(best, last - first + 1)
        return best


@dataclass(frozen=True, slots=True)
class Metrics:
    """The figures for one window (and optionally one workflow name).

    An *event is in the window* when its time is at or after ``since`` (no lower bound
    when None) and at or before ``until``. The *workflows of the window* are those
    created at or before ``until`` that had not ended before ``since``: every active
    or enqueued one, and every ended one whose last update is in the window or later.
    Step figures count step journal entries (kind ``step``) by their ``ended_at``;
    attempt figures count attempt rows by their ``ended_at``.
    """

    since: float | None
    until: float
    name: str | None
    window_seconds: float | None
    """``until - since``; without ``since``, from the oldest workflow read (None when no
    workflow was read)."""

    workflows: int
    """Workflows of the window that were read."""
    by_status: dict[str, int]
    """Workflows of the window by their current status (every status, zeros included)."""

    workflows_finished: int
    """Workflows that ended (succeeded, failed or cancelled) with their last update in
    the window."""
    steps_finished: int
    """Step journal entries (succeeded or failed) whose ``ended_at`` is in the window."""
    workflow_throughput: float | None
    """``workflows_finished / window_seconds`` (per second)."""
    step_throughput: float | None
    """``steps_finished / window_seconds`` (per second)."""
    step_latency: Percentiles
    """``ended_at - started_at`` of the window's step entries: from the first attempt's
    start to the result (recorded as the commit that makes it durable begins), retry
    delays included."""
    workflow_latency: Percentiles
    """``updated_at - created_at`` of workflows that succeeded or failed in the window
    (time spent enqueued included)."""

    step_calls: int
    """The window's step entries, plus step calls that have attempt rows but no entry
    yet (still retrying, or abandoned) whose latest attempt activity is in the window."""
    retried_calls: int
    """Of ``step_calls``, those that needed more than one attempt (an entry with
    ``attempts > 1``, or any call still without an entry: a row exists only once a
    first attempt failed and a retry was planned)."""
    retry_rate: float | None
    """``retried_calls / step_calls``."""
    retried_finished: int
    """Step entries of the window with ``attempts > 1`` (calls still retrying are not
    decided yet and not counted)."""
    succeeded_after_retry: int
    """Of those, the entries with no error."""
    success_after_retry_rate: float | None
    """``succeeded_after_retry / retried_finished``."""
    retry_delays: int
    """Attempt rows of the window with a planned delay."""
    average_retry_delay: float | None
    """Mean of those rows' ``delay``: the seconds planned before the next attempt
    (backoff, or what a Retry-After asked for)."""

    failed_attempts: int
    """Failed attempts in the window: attempt rows with a failure class, plus failed step
    entries whose final attempt has no such row (a first attempt that was not
    retried), classed by the class recorded in their error. An entry whose error was
    deduplicated from another step's key is that step's failure, not counted again."""
    failure_counts: dict[str, int]
    """``failed_attempts`` by failure class (``crashed``: an attempt cut off by a kill;
    ``unknown`` also for errors recorded before classes were)."""
    failure_mix: dict[str, float]
    """``failure_counts`` as shares of ``failed_attempts``."""

    retrying: tuple[RetryingStep, ...]
    """Step calls of active or enqueued workflows that failed and are not finished, as
    of ``until``, longest first."""
    stuck_in_retries: int
    """Of ``retrying``, those whose span exceeds :data:`STUCK_AFTER` (30 min)."""
    longest_retry_span: float | None
    """The longest span in ``retrying`` (0 when none; None when no workflow was read)."""

    duplicate_effect_rate: float | None
    """Effects crashsafe observed applied twice / ``step_calls``. Always 0 when there
    were step calls: a key recorded as done is never applied again (such calls are
    ``deduplicated_effects``, the mechanism working, not duplicates), and the only way
    to apply an effect twice — running the body again after an unknown outcome, at a
    receiver that ignores the idempotency key — happens outside the store. Its upper
    bound is ``unknown_outcome_rerun_rate``."""
    deduplicated_effects: int
    """Effect steps of the window whose key had already been applied: they returned the
    recorded outcome instead of applying the effect (note ``deduplicated: ...``)."""
    unknown_outcomes: dict[str, int]
    """Effect steps of the window whose outcome was unknown after a crash, by how it was
    resolved (the text after ``outcome unknown after a crash:`` in the note; an
    escalation is shown as ``escalated, a person chose ACTION``)."""
    unknown_outcome_reruns: int
    """Of those, the ones whose body ran again with the same key (``retried with the
    same key``, or a person chose ``retry``)."""
    unknown_outcome_rerun_rate: float | None
    """``unknown_outcome_reruns / step_calls``: the duplicate-effect rate if no receiver
    honoured the idempotency key (0 if all of them do)."""

    recovered_workflows: int
    """Workflows of the window with ``recoveries`` above 0."""
    recoveries: int
    """Takeovers of workflows (claims by a new owner). Started directly: the fencing
    token minus two per rollback (a rollback raises it, and so does the claim that
    resumes the workflow after it). From a queue, whose token also counts dequeues:
    ``recovery_attempts`` (claims since the last progress), or 1 if only
    ``recovery_mark`` shows a claim, and 0 after a rollback reset them — a lower bound.
    A workflow resumed by hand (``crashsafe resume``) is claimed too, and counted."""
    recovery_success_rate: float | None
    """Of recovered workflows that are no longer active or enqueued, the share that is
    not a dead letter (approximate)."""
    dead_lettered: int
    """Workflows of the window that are dead letters."""
    recovery_time: Percentiles
    """Per takeover recorded in the recovery log (``app.recoveries(id)``): from the dead
    owner's last heartbeat (or its last journal entry, when it left none) to the start
    of the first journal entry after the claim (or the workflow's end, if it ended
    without another entry); takeovers not yet followed by progress are not counted.
    For a recovered workflow with no log (recovered before it existed), its longest
    pause without durable progress: between one
    journal entry's ``ended_at`` and the next one's ``started_at`` (from ``created_at``
    to the first entry for workflows not started from a queue; from a sleep's wake-up
    time; never across a wait for a signal or a child workflow), the span of an attempt
    recorded as ``crashed``, and from the last entry to the end of a workflow that
    succeeded or failed. An upper bound of the time from its crash to its resumed
    progress (approximate: the pause may also hold the wait before a rollback, a hand
    resume, or a worker handing the workflow back to its queue)."""

    rollbacks: int
    """Rollbacks (``app.rollback``) of the window's workflows made within the window."""

    state_consistency: float | None
    """Workflows of the window whose journal entries and attempt rows all passed their
    integrity check (SHA-256, and decryption when encrypted) / workflows read.
    ``crashsafe verify`` names the bad records."""
    unreadable: tuple[str, ...]
    """Ids of the workflows whose records failed that check."""

    breakers: tuple[BreakerStats, ...]
    """Every breaker in the store (breakers are shared by workflows: ``name`` does not
    filter them)."""
    breaker_changes: int
    """State changes of all breakers within the window."""

    checkpointed_workflows: int
    """Workflows of the window with at least one checkpoint in their journal."""
    checkpoint_bytes_per_task: float | None
    """Mean, over ``checkpointed_workflows``, of the bytes their checkpoint entries
    hold (the serialized delta or snapshot with its metadata, before compression and
    encryption, so at least what is written; rolled-back checkpoints not counted)."""

    checkpoint_latency_overhead: float | None = None
    """Over the window's workflows whose checkpoints recorded their cost (adaptive
    automatic checkpoints): the time spent taking those checkpoints divided by the
    time their steps took. None when none did (see ``unavailable``)."""
    token_usage: int | None = None
    """Tokens used by the window's workflows, from their checkpoints' recorded usage
    (the latest checkpoint's running total per workflow). None when none recorded it."""
    tokens_per_workflow: float | None = None
    """``token_usage`` over the workflows that recorded it."""
    unavailable: dict[str, str] = field(default_factory=lambda: dict(UNAVAILABLE))
    """Why each None-by-design figure is missing."""
    approximate: dict[str, str] = field(default_factory=lambda: dict(APPROXIMATE))
    """What each approximate figure bounds."""

    def stuck(self, after: float = STUCK_AFTER) -> list[RetryingStep]:
        """The retrying steps whose span exceeds ``after`` seconds."""
        return [r for r in self.retrying if r.span > after]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def compute(store: Store, since: float | None = None, until: float | None = None,
            name: str | None = None, *,
            progress: Callable[[int, int], None] | None = None) -> Metrics:
    """The figures of ``store`` for the window ``[since, until]`` (Unix seconds on the
    store's clock; ``until`` None: now, counting every record made so far even if a
    process clock stamped it a little ahead of the store's), for workflows named
    ``name`` (None: all).

    Reads every workflow row of the window, its journal and its attempt rows (one
    workflow at a time), and every breaker document. ``progress(done, total)`` is
    called after each workflow. A workflow row that fails its integrity check makes
    the listing fail (:class:`~crashsafe.CorruptRecordError`: run ``crashsafe
    verify``); a bad journal entry or attempt row only marks its workflow unreadable.
    """
    now = store.clock()
    end = now if until is None else float(until)
    if since is not None and since > end:
        raise ConfigurationError(f"the window starts ({since}) after it ends ({end}); "
                                 "give since <= until")
    # Up to now means everything recorded: a record stamped by a process clock a
    # millisecond ahead of the store's is not left out.
    tally = _Tally(since, end, math.inf if until is None else end)
    rows = [r for r in store.list_workflows(ListFilter(name=name, limit=10**9))
            if tally.in_window(r)]
    for n, rec in enumerate(rows, 1):
        try:
            journal, attempts = store.load_journal(rec.id), store.load_attempts(rec.id)
            # Every rollback raises the fencing token, so only then can there be one.
            rewound = store.load_rewound(rec.id) if rec.token else []
        except CorruptRecordError:
            tally.unreadable.append(rec.id)
        else:
            # Only a workflow whose token moved was ever taken over.
            events = _recovery_log.events(store, rec.id) if rec.token else []
            tally.add(rec, journal, attempts, sorted({at for at, _, _ in rewound}), events)
        if progress is not None:
            progress(n, len(rows))
    breakers = tuple(_breaker(key, raw, since, end, tally.hi)
                     for key, raw, _ in store.list_shared("breaker:"))
    return tally.result(name, len(rows), breakers)


class _Tally:
    """What :func:`compute` accumulates while it reads workflows one at a time."""

    def __init__(self, since: float | None, until: float, hi: float) -> None:
        self.since, self.until = since, until
        self.lo = -math.inf if since is None else since
        self.hi = hi
        self.oldest: float | None = None
        self.by_status: Counter[str] = Counter()
        self.finished = 0
        self.workflow_latencies: list[float] = []
        self.step_latencies: list[float] = []
        self.step_calls = self.retried = self.retried_done = self.retried_ok = 0
        self.delays: list[float] = []
        self.failures: Counter[str] = Counter()
        self.retrying: list[RetryingStep] = []
        self.deduplicated = self.reruns = 0
        self.unknown: Counter[str] = Counter()
        self.recovered = self.recoveries = self.recovered_ended = self.recovered_dead = 0
        self.pauses: list[float] = []
        self.rollbacks = 0
        self.checkpoint_bytes: list[int] = []
        self.tokens: list[int] = []
        self.checkpoint_cost = self.checkpoint_step_time = 0.0
        self.unreadable: list[str] = []

    def inside(self, t: float) -> bool:
        return self.lo <= t <= self.hi

    def in_window(self, rec: WorkflowRecord) -> bool:
        if rec.created_at > self.hi:
            return False
        return not (rec.status.terminal and rec.updated_at < self.lo)

    def add(self, rec: WorkflowRecord, journal: list[JournalEntry],
            attempts: list[AttemptRecord], rollbacks: list[float],
            events: list[dict[str, Any]] | None = None) -> None:
        self.oldest = rec.created_at if self.oldest is None else min(self.oldest,
                                                                     rec.created_at)
        self.by_status[rec.status.value] += 1
        if rec.status in FINISHED and self.inside(rec.updated_at):
            self.finished += 1
            if rec.status is not Status.CANCELLED:
                self.workflow_latencies.append(rec.updated_at - rec.created_at)
        rows: dict[int, list[AttemptRecord]] = {}
        for a in attempts:
            rows.setdefault(a.index, []).append(a)
            if a.ended_at is not None and self.inside(a.ended_at):
                if a.failure_class:
                    self.failures[a.failure_class] += 1
                if a.delay is not None:
                    self.delays.append(a.delay)
        for e in journal:
            if e.kind == "step" and self.inside(e.ended_at):
                self._step(e, rows.get(e.index, []))
        finished = {e.index for e in journal}
        for index, calls in rows.items():
            if index not in finished:
                self._unfinished(rec, index, calls)
        stored = [len(e.output or b"") for e in journal if e.kind == CHECKPOINT]
        if stored:
            self.checkpoint_bytes.append(sum(stored))
            self._checkpoint_meta(journal)
        self.rollbacks += sum(self.inside(at) for at in rollbacks)
        self._recovery(rec, journal, attempts, len(rollbacks), events)

    def _checkpoint_meta(self, journal: list[JournalEntry]) -> None:
        """Token usage and checkpoint cost, where the checkpoints recorded them."""
        tokens: int | None = None
        cost = 0.0
        for e in journal:
            if e.kind != CHECKPOINT:
                continue
            try:
                meta = _codec.decode(e.output or b"{}", "checkpoint")
            except CrashsafeError:
                continue
            if not isinstance(meta, dict):
                continue
            tok, us = meta.get("tok"), meta.get("us")
            if isinstance(tok, int) and not isinstance(tok, bool):
                tokens = tok  # a running total: the latest one counts
            if isinstance(us, int) and not isinstance(us, bool) and self.inside(e.started_at):
                cost += us / 1e6
        if tokens is not None:
            self.tokens.append(tokens)
        if cost:
            self.checkpoint_cost += cost
            self.checkpoint_step_time += sum(
                e.ended_at - e.started_at for e in journal
                if e.kind == "step" and self.inside(e.ended_at))

    def _step(self, e: JournalEntry, rows: list[AttemptRecord]) -> None:
        self.step_calls += 1
        self.step_latencies.append(e.ended_at - e.started_at)
        if e.attempts > 1:
            self.retried += 1
            self.retried_done += 1
            self.retried_ok += e.error is None
        note = e.note or ""
        deduplicated = DEDUPLICATED in note
        self.deduplicated += deduplicated
        closed = any(r.attempt == e.attempts and r.failure_class for r in rows)
        if e.error is not None and not deduplicated and not closed:
            self.failures[_error_class(e.error)] += 1
        if NOTE_PREFIX in note:
            how = _resolution(note)
            self.unknown[how] += 1
            self.reruns += how in RERUN_RESOLUTIONS

    def _unfinished(self, rec: WorkflowRecord, index: int, rows: list[AttemptRecord]) -> None:
        seen = [r for r in rows if r.started_at <= self.hi]
        if not seen:
            return
        latest = max(max(r.started_at, r.ended_at or 0.0) for r in seen)
        if self.inside(latest):
            self.step_calls += 1
            self.retried += 1
        if rec.status.active or rec.status is Status.ENQUEUED:
            failed = [r.failure_class for r in seen if r.failure_class]
            self.retrying.append(RetryingStep(
                rec.id, rec.name, index, seen[0].step, seen[-1].attempt, seen[0].started_at,
                max(0.0, self.until - seen[0].started_at), failed[-1] if failed else None))

    def _recovery(self, rec: WorkflowRecord, journal: list[JournalEntry],
                  attempts: list[AttemptRecord], rollbacks: int,
                  events: list[dict[str, Any]] | None) -> None:
        timed = _recovery_times(rec, journal, events or [])
        if timed is not None:
            self.recovered += 1
            self.recoveries += len(events or [])
            if rec.status.terminal:
                self.recovered_ended += 1
                self.recovered_dead += rec.status is Status.DEAD_LETTER
            self.pauses += [t for at, t in timed if self.inside(at)]
            return
        if rec.queue is None:
            # Each takeover raises the token by one; each rollback by two (its own new
            # token, then the claim that resumes the unowned workflow).
            n = max(0, rec.token - 2 * rollbacks)
        elif rollbacks:
            n = 0  # the counters were reset by the rollback: nothing to tell
        else:
            n = max(rec.recovery_attempts, 1 if rec.recovery_mark else 0)
        if not n:
            return
        self.recovered += 1
        self.recoveries += n
        if rec.status.terminal:
            self.recovered_ended += 1
            self.recovered_dead += rec.status is Status.DEAD_LETTER
        pause = _longest_pause(rec, journal, attempts)
        if pause is not None:
            self.pauses.append(pause)

    def result(self, name: str | None, read: int,
               breakers: tuple[BreakerStats, ...]) -> Metrics:
        start = self.since if self.since is not None else self.oldest
        window = self.until - start if start is not None else None
        if window is not None and window <= 0:
            window = None
        failed = sum(self.failures.values())
        readable = read - len(self.unreadable)
        retrying = tuple(sorted(self.retrying, key=lambda r: -r.span))
        return Metrics(
            since=self.since, until=self.until, name=name, window_seconds=window,
            workflows=readable,
            by_status={s.value: self.by_status[s.value] for s in Status},
            workflows_finished=self.finished,
            steps_finished=len(self.step_latencies),
            workflow_throughput=_per(self.finished, window),
            step_throughput=_per(len(self.step_latencies), window),
            step_latency=Percentiles.of(self.step_latencies),
            workflow_latency=Percentiles.of(self.workflow_latencies),
            step_calls=self.step_calls, retried_calls=self.retried,
            retry_rate=_ratio(self.retried, self.step_calls),
            retried_finished=self.retried_done, succeeded_after_retry=self.retried_ok,
            success_after_retry_rate=_ratio(self.retried_ok, self.retried_done),
            retry_delays=len(self.delays),
            average_retry_delay=(sum(self.delays) / len(self.delays)) if self.delays else None,
            failed_attempts=failed,
            failure_counts=dict(self.failures.most_common()),
            failure_mix={k: v / failed for k, v in self.failures.most_common()},
            retrying=retrying,
            stuck_in_retries=sum(r.span > STUCK_AFTER for r in retrying),
            longest_retry_span=(retrying[0].span if retrying else 0.0) if read else None,
            duplicate_effect_rate=0.0 if self.step_calls else None,
            deduplicated_effects=self.deduplicated,
            unknown_outcomes=dict(self.unknown.most_common()),
            unknown_outcome_reruns=self.reruns,
            unknown_outcome_rerun_rate=_ratio(self.reruns, self.step_calls),
            recovered_workflows=self.recovered, recoveries=self.recoveries,
            recovery_success_rate=_ratio(self.recovered_ended - self.recovered_dead,
                                         self.recovered_ended),
            dead_lettered=self.by_status[Status.DEAD_LETTER.value],
            recovery_time=Percentiles.of(self.pauses),
            rollbacks=self.rollbacks,
            state_consistency=_ratio(readable, read),
            unreadable=tuple(self.unreadable),
            breakers=breakers,
            breaker_changes=sum(b.changes for b in breakers),
            checkpointed_workflows=len(self.checkpoint_bytes),
            checkpoint_bytes_per_task=(sum(self.checkpoint_bytes) / len(self.checkpoint_bytes)
                                       if self.checkpoint_bytes else None),
            checkpoint_latency_overhead=(self.checkpoint_cost / self.checkpoint_step_time
                                         if self.checkpoint_step_time else None),
            token_usage=sum(self.tokens) if self.tokens else None,
            tokens_per_workflow=(sum(self.tokens) / len(self.tokens)
                                 if self.tokens else None),
            unavailable={k: v for k, v in UNAVAILABLE.items() if k == "cost" or (
                k == "token_usage" and not self.tokens) or (
                k == "checkpoint_latency_overhead" and not self.checkpoint_step_time)},
        )


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _per(count: int, seconds: float | None) -> float | None:
    return count / seconds if seconds else None


def _error_class(payload: bytes) -> str:
    try:
        return recorded_class(payload) or "unknown"
    except CrashsafeError:
        return "unknown"


def _resolution(note: str) -> str:
    """How an unknown outcome was resolved, from the note after :data:`NOTE_PREFIX`."""
    rest = note.split(NOTE_PREFIX, 1)[1]
    if rest.startswith("escalated"):
        _, found, choice = rest.rpartition("a person chose ")
        action = choice.split()[0] if found and choice.split() else "?"
        return f"escalated, a person chose {action}"
    return rest.split(" | ", 1)[0].strip()


def _wake(e: JournalEntry) -> float:
    try:
        value = _codec.decode(e.output or b"null", "durable sleep")
    except CrashsafeError:
        return e.ended_at
    return max(e.ended_at, float(value)) if isinstance(value, int | float) else e.ended_at


def _recovery_times(rec: WorkflowRecord, journal: list[JournalEntry],
                    events: list[dict[str, Any]]) -> list[tuple[float, float]] | None:
    """(claimed at, recovery time) per logged takeover that was followed by progress;
    None when the workflow has no recovery log (see :attr:`Metrics.recovery_time`)."""
    if not events:
        return None
    out: list[tuple[float, float]] = []
    for ev in events:
        at, seen = ev.get("at"), ev.get("seen")
        if not isinstance(at, int | float) or ev.get("outcome") != "claimed":
            continue
        if not isinstance(seen, int | float):
            before = [e.ended_at for e in journal if e.ended_at <= at]
            seen = before[-1] if before else rec.created_at
        after = [e.started_at for e in journal if e.started_at >= at]
        if after:
            resumed = after[0]
        elif rec.status.terminal and rec.updated_at >= at:
            resumed = rec.updated_at
        else:
            continue  # not resumed yet (or waiting for a person)
        out.append((at, max(0.0, resumed - seen)))
    return out


def _longest_pause(rec: WorkflowRecord, journal: list[JournalEntry],
                   attempts: list[AttemptRecord]) -> float | None:
    """See :attr:`Metrics.recovery_time`."""
    pauses: list[float] = []
    last: float | None = rec.created_at if rec.queue is None else None
    for e in journal:
        if last is not None:
            pauses.append(e.started_at - last)
        if e.kind == "sleep":
            last = _wake(e)
        elif e.kind in ("wait", "child"):
            last = None  # waiting for a person or a child is no pause of the engine
        else:
            last = e.ended_at
    pauses += [a.ended_at - a.started_at for a in attempts
               if a.failure_class == "crashed" and a.ended_at is not None]
    if rec.status in (Status.SUCCEEDED, Status.FAILED) and last is not None and journal:
        pauses.append(rec.updated_at - last)
    return max((max(0.0, p) for p in pauses), default=None)


def _breaker(key: str, raw: bytes, since: float | None, until: float,
             hi: float) -> BreakerStats:
    """See :class:`BreakerStats` (``hi``: the last moment counted, ``until`` or later)."""
    doc = load_breaker(raw)
    lo = -math.inf if since is None else since
    kept = sorted((h for h in doc.history if len(h) >= 3), key=lambda h: float(h[0]))
    history = [h for h in kept if float(h[0]) <= hi]
    later = kept[len(history):]
    closed = BreakerState.CLOSED.value
    changes = sum(lo <= float(h[0]) for h in history)
    trips = tuple(float(h[0]) for h in history
                  if lo <= float(h[0]) and h[1] == closed and h[2] == BreakerState.OPEN.value)
    longest, start = 0.0, None
    for at, _src, dst, *_ in history:
        if dst != closed and start is None:
            start = float(at)  # also when the stretch began before the kept history
        elif dst == closed and start is not None:
            if float(at) >= lo:
                longest = max(longest, float(at) - start)
            start = None
    if history:
        state = str(history[-1][2])
    else:  # no change kept up to the window's end: the state before the first later one
        state = str(later[0][1]) if later else doc.state
        if state != closed and not later and 0 < doc.changed_at <= hi:
            start = doc.changed_at
    if start is not None:
        longest = max(longest, until - start, 0.0)
    return BreakerStats(key.removeprefix("breaker:"), state, changes, trips, longest,
                        start)
