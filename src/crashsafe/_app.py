"""The App: registration, starting, recovery, control, and the process's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from . import _checkpoint as _ckpt
from . import _codec, _corruption, _instrument, _recovery_log
from ._checkpoint import CheckpointInfo
from ._checkpoint_policy import CheckpointPolicy
from ._commit import GroupCommitter
from ._context import _STEP, _WORKFLOW, WorkflowContext, _Suspend
from ._escalation import Escalation
from ._handle import WorkflowHandle
from ._keys import Keyring
from ._locks import Lock, make_lock
from ._queues import Queue
from ._queues import take as take_from_queue
from ._recovery import HOSTNAME, executor_alive, process_start_marker
from ._redaction import Redactor, install_log_filter
from ._retention import AutoRetention, GcReport, Retention
from ._retention import Progress as GcProgress
from ._retention import collect as collect_garbage
from ._secrets import redact_text
from ._step import RetryPolicy, Step, seconds
from ._threads import WorkerThreads
from ._workflow import Outcome, Workflow, run_async, run_sync
from .exceptions import (
    ConfigurationError,
    CorruptRecordError,
    CrashsafeError,
    InvalidStateError,
    StoreConflictError,
    StoreError,
    UnknownWorkflowError,
)
from .policies.breaker import BreakerInfo, CircuitBreaker, Scope
from .policies.breaker import info as breaker_info
from .policies.breaker import reset as reset_doc
from .policies.hedge import Hedge
from .policies.limits import ConcurrencyLimit, Limit, RateLimit
from .policies.runtime import Resilience
from .stores import ListFilter, Status, Store, WorkflowRecord, open_store
from .stores.base import (
    ACTIVE_STATUSES,
    CreateWorkflow,
    ExecutorRecord,
    JournalEntry,
    MarkWaiting,
    Requeue,
    WorkflowExists,
)
from .stores.sealed import SealedStore, sealed

log = logging.getLogger("crashsafe")

_JUDGE_BEATS = 3
"""Others' late heartbeats are evidence only while ours got through within this many
heartbeat intervals, and from this many intervals after ours resumed from a gap."""

P = ParamSpec("P")
R = TypeVar("R")


class Execution:
    """A workflow running in this process."""

    __slots__ = ("_waiters", "ctx", "done", "outcome")

    def __init__(self, ctx: WorkflowContext) -> None:
        self.ctx = ctx
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def finish(self, outcome: Outcome, lock: threading.Lock) -> None:
        with lock:
            self.outcome = outcome
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_done, fut)

    def future_for(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        if self.done.is_set():
            fut.set_result(None)
        else:
            self._waiters.append((loop, fut))
            if self.done.is_set() and not fut.done():  # finished while we registered
                fut.set_result(None)
        return fut


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class App:
    """A crashsafe application: your workflows and steps, bound to one store.

    ``url`` picks the store: ``sqlite:///agent.db`` (the default is
    ``$CRASHSAFE_DATABASE``, else ``sqlite:///crashsafe.db``) or ``memory://``.
    Pass ``store=`` to share a store object between apps (tests).

    Opening the app does no I/O. The app starts *serving* — registers this process,
    heartbeats, and recovers orphaned workflows — on :meth:`launch`, which the first
    :meth:`start` or :meth:`recover` call does for you.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        store: Store | None = None,
        max_recoveries: int = 20,
        lease: float | timedelta = 30.0,
        heartbeat_interval: float | timedelta | None = None,
        recovery_interval: float | timedelta = 5.0,
        effect_retention: float | timedelta | None = None,
        on_escalate: Callable[[Escalation], Any] | None = None,
        checkpoint_full_every: int = 10,
        on_corrupt: str = "rollback",
        redact: Sequence[str] | bool = True,
        allow: Sequence[str] = (),
        retention: Retention | None = None,
        tracing: bool | Any = None,
    ) -> None:
        if store is not None and url is not None:
            raise ConfigurationError("pass either a URL or a store, not both")
        self._url = url
        self._store = store
        self._owns_store = store is None
        if max_recoveries < 1:
            raise ConfigurationError("max_recoveries must be at least 1")
        self.max_recoveries = max_recoveries
        self.lease = seconds(lease, "lease") or 30.0
        beat = seconds(heartbeat_interval, "heartbeat_interval")
        if beat is not None and beat >= self.lease:
            raise ConfigurationError(
                f"heartbeat_interval={beat:g} s is not shorter than lease={self.lease:g} s: "
                "every lease would lapse between beats; use a heartbeat of a quarter of "
                "the lease or less")
        self.heartbeat_interval = beat or min(2.0, self.lease / 4)
        self.recovery_interval = seconds(recovery_interval, "recovery_interval") or 5.0
        # How long a finished effect's key is remembered (None: forever). After that, a
        # step reusing the key applies the effect again.
        self.effect_retention = seconds(effect_retention, "effect_retention")
        # Called when a workflow parks to ask a person (see crashsafe._escalation).
        self.on_escalate = on_escalate
        if not isinstance(checkpoint_full_every, int) or checkpoint_full_every < 1:
            raise ConfigurationError("checkpoint_full_every must be an int >= 1")
        # A checkpoint is a full snapshot after this many deltas (reads apply at most
        # this many).
        self.checkpoint_full_every = checkpoint_full_every
        # What a workflow does when one of its records fails verification (see
        # crashsafe._corruption); @app.workflow(on_corrupt=...) overrides it.
        self.on_corrupt = _corruption.check_policy(on_corrupt, "App")
        # Field names whose values are masked in stored payloads (crashsafe._redaction):
        # redact=True the defaults, a list of patterns, or False; allow exempts names.
        self._redact_allow: dict[str, tuple[str, ...]] = {}
        self._redactor = Redactor(redact, allow, step_allow=self._step_redact_allow)
        if self._redactor.enabled:
            install_log_filter()
        # Applied by the serving loop, a bounded batch at a time (see crashsafe._retention).
        self.retention = retention
        # OpenTelemetry spans (see crashsafe.observe.otel): True, False, a tracer
        # provider, or None (trace when a global tracer provider has been set).
        self.tracing = tracing
        self._tracing_obj: Any = None
        if tracing is not None and tracing is not False:
            self._tracer()  # fails now, naming the extra, if OpenTelemetry is missing
        self.executor_id = f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._workflows: dict[str, dict[str, Workflow[Any, Any]]] = {}
        self._latest: dict[str, Workflow[Any, Any]] = {}
        self._steps: dict[str, Step[Any, Any]] = {}
        self._executions: dict[str, Execution] = {}
        self._lock = threading.Lock()
        self._launched = False
        self._closing = threading.Event()
        self._auto_retention = (AutoRetention(retention, self._closing)
                                if retention is not None else None)
        self._background: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._committer_obj: GroupCommitter | None = None
        self._threads = WorkerThreads()
        self._resilience_obj: Resilience | None = None
        self._queues: dict[str, Queue] = {}
        self._served: dict[str, Queue] = {}  # queues this process takes work from
        self._worker_cap: int | None = None
        self._queue_wakeup = threading.Event()
        # The store's clock minus ours, re-measured at every heartbeat (see clock()).
        self._clock_offset = 0.0
        # When our own heartbeat last got through, and until when (after ours could
        # not get through on time) others' late heartbeats prove nothing (monotonic).
        self._beat_ok_at = time.monotonic()
        self._no_judging_until = 0.0
        # One recovery sweep at a time; the background one's last resumed handles.
        self._sweep_lock = threading.Lock()
        self._swept: list[WorkflowHandle[Any]] = []
        # Sync workflows parked for a distant retry: id -> when to resume them.
        self._suspended: dict[str, float] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._limits: dict[str, Limit] = {}

    # -- store --------------------------------------------------------------------------
    def clock(self) -> float:
        """Now, on the store's clock (Unix seconds). Durable timers (sleeps, waits, retry
        delays) and leases use it, so a process whose wall clock is off by an hour
        neither takes over live workers' workflows nor wakes its timers late."""
        return time.time() + self._clock_offset

    def _sync_clock(self) -> None:
        # The sample with the shortest round trip bounds the error best (half of it).
        samples = []
        for _ in range(3):
            before = time.time()
            theirs = self.store.clock()
            after = time.time()
            samples.append((after - before, theirs - (before + after) / 2))
        offset = min(samples)[1]
        # Below the precision of the measurement (scheduling delays, SQLite's
        # millisecond clock), an offset is noise: a store on this machine reads the
        # same clock.
        self._clock_offset = offset if abs(offset) > 0.05 else 0.0

    @property
    def _resilience(self) -> Resilience:
        if self._resilience_obj is None:
            store = self.store
            with self._lock:
                if self._resilience_obj is None:
                    res = Resilience(store, self.executor_id, HOSTNAME)
                    res.breakers, res.limits = self._breakers, self._limits
                    self._resilience_obj = res
        return self._resilience_obj

    @property
    def store(self) -> Store:
        """The store, opened on first use. Payloads are sealed on their way in and
        verified on their way out (see :mod:`crashsafe.stores.sealed`)."""
        if self._store is None or not isinstance(self._store, SealedStore):
            with self._lock:
                if self._store is None:
                    self._store = open_store(self._url)
                elif not isinstance(self._store, SealedStore):
                    self._store = sealed(self._store, Keyring.from_env())
                if isinstance(self._store, SealedStore):
                    self._store.redactor = self._redactor
        return self._store

    def _step_redact_allow(self, step: str) -> tuple[str, ...]:
        return self._redact_allow.get(step, ())

    @property
    def _committer(self) -> GroupCommitter:
        if self._committer_obj is None:
            store = self.store  # outside the lock: opening the store takes it too
            with self._lock:
                if self._committer_obj is None:
                    self._committer_obj = GroupCommitter(store)
        return self._committer_obj

    # -- registration -------------------------------------------------------------------
    @overload
    def workflow(self, fn: Callable[P, R], /) -> Workflow[P, R]: ...

    @overload
    def workflow(
        self, fn: None = None, /, *, name: str | None = None, version: str | int = "1",
        checkpoint: CheckpointPolicy | None = None, on_corrupt: str | None = None,
    ) -> Callable[[Callable[P, R]], Workflow[P, R]]: ...

    def workflow(
        self, fn: Callable[P, R] | None = None, /, *, name: str | None = None,
        version: str | int = "1", checkpoint: CheckpointPolicy | None = None,
        on_corrupt: str | None = None,
    ) -> Workflow[P, R] | Callable[[Callable[P, R]], Workflow[P, R]]:
        """Register a workflow function (``def`` or ``async def``).

        ``name`` defaults to the function's qualified name and identifies the workflow
        in the store; keep it stable. Register a changed workflow under a new
        ``version`` (keeping the old one registered) so in-flight runs finish on the
        code that started them, or use :func:`crashsafe.patched` inside one version.

        ``checkpoint`` (a :class:`CheckpointPolicy`) checkpoints the state the workflow
        tracks (:func:`crashsafe.track`) automatically: every N steps or seconds, after
        child workflows, or adaptively (see :mod:`crashsafe._checkpoint_policy`).

        ``on_corrupt`` (``"rollback"``, ``"fail"`` or ``"escalate"``; default: the
        App's) decides what happens when one of the workflow's stored records fails
        verification: see :mod:`crashsafe._corruption` and docs/checkpoints.md.
        """
        if on_corrupt is not None:
            _corruption.check_policy(on_corrupt, "@app.workflow")

        def register(f: Callable[P, R]) -> Workflow[P, R]:
            wf: Workflow[P, R] = Workflow(self, f, name=name, version=str(version),
                                          checkpoint=checkpoint)
            wf.on_corrupt = on_corrupt
            versions = self._workflows.setdefault(wf.name, {})
            old = versions.get(wf.version)
            code = getattr(f, "__code__", None)
            if old is not None and getattr(old.fn, "__code__", None) is not code:
                raise ConfigurationError(
                    f"workflow {wf.name!r} version {wf.version!r} is already registered by "
                    f"{old.fn.__module__}.{old.fn.__qualname__}; give one a different name "
                    "or version"
                )
            versions[wf.version] = wf
            self._latest[wf.name] = wf
            return wf

        return register(fn) if fn is not None else register

    @overload
    def step(self, fn: Callable[P, R], /) -> Step[P, R]: ...

    @overload
    def step(
        self, fn: None = None, /, *, name: str | None = None,
        retry: RetryPolicy | int | bool | None = None,
        timeout: float | timedelta | None = None, effect: bool = False,
        on_unknown: str | None = None, reconcile: Callable[..., Any] | None = None,
        compensate: Callable[[Any], Any] | None = None,
        breaker: CircuitBreaker | str | None = None, limits: Sequence[Limit | str] = (),
        hedge: Hedge | None = None, redact_allow: Sequence[str] = (),
    ) -> Callable[[Callable[P, R]], Step[P, R]]: ...

    def step(
        self, fn: Callable[P, R] | None = None, /, *, name: str | None = None,
        retry: RetryPolicy | int | bool | None = None, timeout: float | timedelta | None = None,
        effect: bool = False, on_unknown: str | None = None,
        reconcile: Callable[..., Any] | None = None,
        compensate: Callable[[Any], Any] | None = None,
        breaker: CircuitBreaker | str | None = None, limits: Sequence[Limit | str] = (),
        hedge: Hedge | None = None, redact_allow: Sequence[str] = (),
    ) -> Step[P, R] | Callable[[Callable[P, R]], Step[P, R]]:
        """Make a function (``def`` or ``async def``) a step: run once, journaled, replayed.

        ``retry`` is a :class:`RetryPolicy`, a number of attempts, or True for the
        default policy; ``timeout`` bounds each attempt (seconds or timedelta).

        ``effect=True`` marks a step with an external side effect: its intent is
        recorded before the body runs and its outcome is kept under its idempotency key,
        so an outcome left unknown by a crash is handled by ``on_unknown``
        (``"retry"``, ``"reconcile"`` with ``reconcile=fn``, or ``"escalate"``), and
        callers may pass ``key="..."`` to share one effect across workflows. See
        :mod:`crashsafe._effects`.

        ``compensate=fn`` undoes the step when its workflow is cancelled after the step
        completed: ``fn(result)`` runs once per completed step, in reverse order, and
        each run is journaled (saga).

        ``breaker`` (a name or a :class:`CircuitBreaker`) fails the step fast while the
        dependency is known to be down; the breaker's state lives in the store, shared
        by every process. ``limits`` names rate and concurrency limits declared with
        :meth:`rate_limit` / :meth:`concurrency_limit` (or given as objects) that each
        attempt must pass. ``hedge`` starts a second call when the first is slow. See
        docs/resilience.md.

        ``redact_allow`` names fields of this step's results and errors that are stored
        verbatim although they look like credentials (``App(redact=...)``; see
        docs/security.md). A redacted result replays as ``"***"`` after a crash.
        """

        def register(f: Callable[P, R]) -> Step[P, R]:
            st = Step(f, name=name, retry=retry, timeout=timeout, effect=effect,
                      on_unknown=on_unknown, reconcile=reconcile, compensate=compensate,
                      breaker=breaker, limits=limits, hedge=hedge)
            self._steps[st.name] = st
            if isinstance(redact_allow, str):
                raise ConfigurationError("redact_allow takes a list of field names")
            self._redact_allow[st.name] = tuple(redact_allow)
            return st

        return register(fn) if fn is not None else register

    def transaction(
        self, *, name: str | None = None, retry: RetryPolicy | int | bool | None = None,
    ) -> Callable[[Callable[Concatenate[Any, P], R]], Step[P, R]]:
        """A step whose writes to the journal's database commit with its result.

        The decorated ``def`` takes a connection first (a
        :class:`~crashsafe._transact.TransactionConnection`); workflows call it without
        that argument. Its writes and its journal entry commit in one transaction, so
        they happen exactly once. SQLite store only.
        """

        def register(f: Callable[Concatenate[Any, P], R]) -> Step[P, R]:
            st: Step[P, R] = Step(f, name=name, retry=retry, timeout=None,  # type: ignore[arg-type]
                                  transactional=True)
            self._steps[st.name] = st
            return st

        return register

    # -- shared policies ------------------------------------------------------------------
    def breaker(self, name: str, *, failure_ratio: float = 0.5, min_calls: int = 10,
                window: float | timedelta = 60.0, consecutive_failures: int | None = None,
                open_for: float | timedelta = 30.0, probe_lease: float | timedelta = 60.0,
                scope: Scope = "global") -> CircuitBreaker:
        """Declare the settings of the breaker ``name`` (steps then say
        ``breaker=name``). Its state lives in the store: every process shares it."""
        cfg = CircuitBreaker(name, failure_ratio, min_calls, window, consecutive_failures,
                             open_for, probe_lease, scope)
        self._breakers[name] = cfg
        return cfg

    def rate_limit(self, name: str, rate: float, per: float | timedelta = 1.0,
                   burst: float | None = None) -> RateLimit:
        """Declare a rate limit shared by every process: at most ``rate`` calls per
        ``per`` seconds. Steps name it in ``limits=[...]``."""
        lim = RateLimit(name, rate, per, burst)
        self._limits[name] = lim
        return lim

    def concurrency_limit(self, name: str, limit: int,
                          lease: float | timedelta = 600.0) -> ConcurrencyLimit:
        """Declare a concurrency limit shared by every process: at most ``limit``
        attempts of the steps naming it run at once."""
        lim = ConcurrencyLimit(name, limit, lease)
        self._limits[name] = lim
        return lim

    def breakers(self) -> list[BreakerInfo]:
        """Every breaker recorded in the store, with its state and recent changes."""
        return [breaker_info(key, raw) for key, raw, _ in self.store.list_shared("breaker:")]

    def reset_breaker(self, name: str) -> bool:
        """Close breaker ``name`` by hand (forgetting its window); False if unknown."""
        key = name if name.startswith("breaker:") else f"breaker:{name}"

        def close(raw: bytes | None, now: float) -> tuple[bytes | None, bool]:
            if raw is None:
                return None, False
            return reset_doc(raw, now), True

        return self.store.update_shared(key, close)

    def lock(self, name: str, *, ttl: float | timedelta = 30.0,
             timeout: float | timedelta | None = None) -> Lock:
        """A distributed lock with fencing tokens (see :mod:`crashsafe._locks`):
        ``with app.lock("repo", ttl=30) as token: ...``."""
        return make_lock(self, name, ttl, timeout)

    # -- queues -----------------------------------------------------------------------------
    def queue(self, name: str, *, concurrency: int | None = None,
              worker_concurrency: int | None = None,
              rate_limit: RateLimit | tuple[float, float] | None = None) -> Queue:
        """Declare a durable queue (see :mod:`crashsafe._queues`): at most
        ``concurrency`` of its workflows run at once across all workers, at most
        ``worker_concurrency`` in one process, and they start no faster than
        ``rate_limit`` (``(calls, per_seconds)`` or a :class:`RateLimit`)."""
        q = Queue(self, name, concurrency=concurrency, worker_concurrency=worker_concurrency,
                  rate_limit=rate_limit)
        self._queues[name] = q
        return q

    def serve(self, queues: Sequence[str] | None = None, *,
              concurrency: int | None = None) -> None:
        """Take work from these queues (all declared ones by default) while serving;
        ``concurrency`` caps the queued workflows this process runs at once in all."""
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigurationError("serve(concurrency=...) must be an int >= 1 or None")
        self._worker_cap = concurrency
        names = list(self._queues) if queues is None else list(queues)
        unknown = [n for n in names if n not in self._queues]
        if unknown:
            raise ConfigurationError(
                f"no queue named {', '.join(map(repr, unknown))}; declared: "
                f"{sorted(self._queues) or 'none'} (declare with app.queue(name, ...))")
        self._served.update({n: self._queues[n] for n in names})
        self.launch()
        self._queue_wakeup.set()

    def _poll_queues(self) -> None:
        with self._lock:
            running: dict[str | None, int] = {}
            for ex in self._executions.values():
                running[ex.ctx.queue] = running.get(ex.ctx.queue, 0) + 1
        busy = sum(n for name, n in running.items() if name is not None)
        spare = (self._worker_cap - busy) if self._worker_cap is not None else 1 << 30
        for name, q in list(self._served.items()):
            most = q.options.worker_concurrency or q.options.concurrency or 100
            room = min(most - running.get(name, 0), spare)
            for rec in take_from_queue(self, q, room):
                spare -= 1
                if rec.name in self._workflows:
                    self._resume(rec)
                else:  # registered elsewhere only: hand it back for a worker that has it
                    self._committer.commit([Requeue(rec.id, self.executor_id, rec.token, None,
                                                    f"{rec.name!r} is not registered in "
                                                    f"worker {self.executor_id}")])

    def _hand_back(self, workflow_ids: Sequence[str]) -> None:
        """Give queued workflows this process stopped running back to their queue."""
        for wid in workflow_ids:
            rec = self.store.get_workflow(wid)
            if rec is None or rec.queue is None or rec.owner != self.executor_id \
                    or rec.status not in (Status.RUNNING, Status.WAITING):
                continue
            try:
                self._committer.commit([Requeue(wid, self.executor_id, rec.token, None,
                                                "handed back by a worker shutting down")])
            except CrashsafeError as exc:
                log.warning("could not hand %s back to its queue: %s", wid, exc)

    def _lookup(self, name: str, version: str | None = None) -> Workflow[Any, Any] | None:
        versions = self._workflows.get(name)
        if not versions:
            return None
        if version is not None and version in versions:
            return versions[version]
        return self._latest[name]

    def _resolve(self, fn: Workflow[Any, Any] | str) -> Workflow[Any, Any]:
        if isinstance(fn, Workflow):
            if fn.app is not self:
                raise ConfigurationError(f"{fn!r} is registered with another App")
            return fn
        if isinstance(fn, str):
            wf = self._lookup(fn)
            if wf is None:
                raise UnknownWorkflowError(
                    f"no workflow named {fn!r} is registered; registered: "
                    f"{sorted(self._workflows) or 'none'}"
                )
            return wf
        raise TypeError(
            f"app.start expects a function decorated with @app.workflow (or its name), "
            f"got {fn!r}"
        )

    # -- lifecycle ----------------------------------------------------------------------
    def launch(self) -> None:
        """Start serving: register this process, heartbeat, and recover orphans."""
        if self._ensure_launched():
            self.recover()

    def _ensure_launched(self) -> bool:
        """Register and start the heartbeat once; True if this call did it."""
        with self._lock:
            if self._closing.is_set():
                raise InvalidStateError("this App was closed; create a new one")
            if self._launched:
                return False
            self._launched = True
        try:
            self._sync_clock()
            now = self.clock()
            pid = os.getpid()
            self.store.register_executor(ExecutorRecord(
                self.executor_id, HOSTNAME, pid, process_start_marker(pid), now, now,
            ))
            self._beat_ok_at = time.monotonic()
        except BaseException:
            with self._lock:  # not launched: the next call tries again from the start
                self._launched = False
            raise
        self._background = threading.Thread(target=self._serve, name="crashsafe-serve",
                                            daemon=True)
        self._background.start()
        # Its own thread: a slow sweep or a blocked claim must not make this process
        # look dead to the others.
        self._beat = threading.Thread(target=self._heartbeat_loop, name="crashsafe-heartbeat",
                                      daemon=True)
        self._beat.start()
        return True

    def __enter__(self) -> App:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving. In-flight workflows stop at their next durable call and are
        left for recovery (by this process's successor or any other process); queued
        ones are handed back to their queue at once."""
        self._served.clear()
        with self._lock:
            queued = [wid for wid, ex in self._executions.items() if ex.ctx.queue is not None]
        clean = self._abandon(timeout)
        if queued and self._launched:
            self._hand_back(queued)
        if self._background is not None:
            self._background.join(timeout=2.0)
        if self._launched and clean:
            try:
                self.store.stop_executor(self.executor_id)
            except CrashsafeError as exc:
                log.warning("could not mark executor %s stopped: %s", self.executor_id, exc)
        if self._committer_obj is not None:
            self._committer_obj.close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=2.0)
        if self._owns_store and self._store is not None and clean:
            self._store.close()

    def _abandon(self, timeout: float) -> bool:
        """Stop serving and make every in-flight workflow stop at its next durable call
        without recording more; True if all of them stopped within ``timeout``."""
        self._closing.set()
        self._queue_wakeup.set()
        with self._lock:
            executions = list(self._executions.values())
        for ex in executions:
            ex.ctx.shutdown = True
            ex.ctx.wake(cancel=True)  # wakes durable sleeps and waits; shutdown wins
        deadline = time.monotonic() + timeout
        return all(ex.done.wait(max(0.0, deadline - time.monotonic())) for ex in executions)

    def _serve(self) -> None:
        next_sweep = next_flush = time.monotonic()
        while True:
            # Woken early when work is enqueued or a queued workflow ends.
            self._queue_wakeup.wait(0.25)
            self._queue_wakeup.clear()
            if self._closing.is_set():
                break
            now = time.monotonic()
            try:
                self._poll_cancellations()
                self._wake_suspended()
                if self._served:
                    self._poll_queues()
                if self._resilience_obj is not None and now >= next_flush:
                    self._resilience_obj.flush()
                    next_flush = now + 1.0
                if now >= next_sweep:
                    self._sweep()
                    if self.effect_retention is not None:
                        self.store.purge_effects(time.time())
                    if self._auto_retention is not None:
                        self._auto_retention.tick(self.store)
                    next_sweep = now + self.recovery_interval
            except Exception as exc:  # keep serving; try again on the next tick
                log.warning("crashsafe background work failed: %s", exc, exc_info=True)

    def _heartbeat_loop(self) -> None:
        while not self._closing.wait(self.heartbeat_interval):
            try:
                self._sync_clock()
                self.store.heartbeat(self.executor_id, self.clock())
                now = time.monotonic()
                if now - self._beat_ok_at >= _JUDGE_BEATS * self.heartbeat_interval:
                    # Our own beats did not get through (the store stalled, or we were
                    # paused or starved): the others' most likely did not either. Give
                    # them time to beat again before judging anyone by it.
                    self._no_judging_until = now + _JUDGE_BEATS * self.heartbeat_interval
                self._beat_ok_at = now
            except Exception as exc:  # keep beating; the next one may get through
                log.warning("crashsafe heartbeat failed: %s", exc, exc_info=True)

    def _wake_suspended(self) -> None:
        """Resume parked workflows whose time has come, or that were cancelled."""
        with self._lock:
            if not self._suspended:
                return
            parked = dict(self._suspended)
        now = self.clock()
        due = {wid for wid, at in parked.items() if at <= now}
        due.update(self.store.cancelled_among(list(parked)))
        for wid in due:
            with self._lock:
                self._suspended.pop(wid, None)
            rec = self.store.get_workflow(wid)
            if rec is None or not rec.status.active or rec.owner != self.executor_id:
                continue  # finished, or taken over by another process meanwhile
            if rec.status is Status.WAITING:
                try:
                    self._committer.commit([MarkWaiting(wid, self.executor_id, None)])
                except StoreConflictError:
                    continue
            self._resume(rec)

    def _poll_cancellations(self) -> None:
        with self._lock:
            ids = list(self._executions)
        if not ids:
            return
        for wid in self.store.cancelled_among(ids):
            ex = self._executions.get(wid)
            if ex is not None:
                ex.ctx.wake(cancel=True)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="crashsafe-async",
                                          daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    # -- starting -----------------------------------------------------------------------
    def start(self, fn: Workflow[P, R] | str, *args: Any, workflow_id: str | None = None,
              **kwargs: Any) -> WorkflowHandle[R]:
        """Start a workflow and return its handle at once.

        Idempotent on ``workflow_id``: starting an id that exists returns a handle
        to the existing workflow and runs nothing. Arguments are serialized here, so
        a value crashsafe cannot store fails now, naming the argument.
        Called inside a workflow, this starts a journaled child workflow.
        """
        wf, inputs, parent, stamp = self._prepare(fn, args, kwargs, workflow_id)
        if parent is not None:
            return self._start_child(parent, wf, inputs, args, kwargs, workflow_id)
        self.launch()
        rec = self._new_record(wf, workflow_id or str(uuid.uuid4()), inputs, None)
        try:
            self._committer.commit([CreateWorkflow(rec)])
        except WorkflowExists:
            self._check_existing(wf, rec.id)
        else:
            self._run(wf, rec, list(args), dict(kwargs), [], fresh=True, stamp=stamp)
        return WorkflowHandle(self, rec.id)

    async def start_async(self, fn: Workflow[P, R] | str, *args: Any,
                          workflow_id: str | None = None, **kwargs: Any) -> WorkflowHandle[R]:
        """:meth:`start` for async callers: the store write does not block the loop,
        and concurrent starts share a commit."""
        wf, inputs, parent, stamp = self._prepare(fn, args, kwargs, workflow_id)
        if parent is not None:
            def child() -> WorkflowHandle[R]:
                return self._start_child(parent, wf, inputs, args, kwargs, workflow_id)

            return await asyncio.to_thread(child)
        if not self._launched:
            await asyncio.to_thread(self.launch)
        rec = self._new_record(wf, workflow_id or str(uuid.uuid4()), inputs, None)
        try:
            await self._committer.commit_async([CreateWorkflow(rec)])
        except WorkflowExists:
            await asyncio.to_thread(self._check_existing, wf, rec.id)
        else:
            self._run(wf, rec, list(args), dict(kwargs), [], fresh=True, stamp=stamp)
        return WorkflowHandle(self, rec.id)

    def _prepare(self, fn: Workflow[Any, Any] | str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], workflow_id: str | None,
                 ) -> tuple[Workflow[Any, Any], bytes, WorkflowContext | None, Any]:
        """The workflow, its stored inputs, the workflow starting it (None: not inside
        one), and what the tracer's stamp in the inputs says (for the run's begin;
        None when not tracing)."""
        wf = self._resolve(fn)
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
            raise ConfigurationError(f"workflow_id must be a non-empty string, got {workflow_id!r}")
        inputs = wf.encode_inputs(args, kwargs)
        tracer = self._tracer()
        stamp = None
        if tracer is not None:  # the trace every run of it continues, even after a crash
            inputs, stamp = tracer.stamp_start(inputs, wf.name, workflow_id)
        parent = _WORKFLOW.get() if _STEP.get() is None else None
        return wf, inputs, parent, stamp

    def _tracer(self) -> Any:
        """This app's :class:`~crashsafe.observe.otel.Tracing`, or None if it does not
        trace (see the ``tracing`` argument)."""
        mode = self.tracing
        if mode is False:
            return None
        if self._tracing_obj is not None and mode is not None:
            return self._tracing_obj
        from .observe import otel

        if mode is None:  # automatic: follow the global provider as it is now
            provider = otel.auto_provider()
            if provider is None:
                return None
            cached = self._tracing_obj
            if cached is None or cached.source is not provider:
                self._tracing_obj = otel.Tracing(provider)
            return self._tracing_obj
        self._tracing_obj = otel.Tracing(None if mode is True else mode)
        return self._tracing_obj

    def _new_record(self, wf: Workflow[Any, Any], wid: str, inputs: bytes,
                    parent_id: str | None) -> WorkflowRecord:
        now = time.time()
        return WorkflowRecord(wid, wf.name, wf.version, Status.RUNNING, inputs, now, now,
                              owner=self.executor_id, parent_id=parent_id)

    def _check_existing(self, wf: Workflow[Any, Any], wid: str) -> None:
        stored = self.get_workflow(wid)
        if stored.name != wf.name:
            raise InvalidStateError(
                f"workflow id {wid!r} already belongs to workflow {stored.name!r} "
                f"(status {stored.status}); pick another id"
            )

    def _start_child(self, parent: WorkflowContext, wf: Workflow[Any, Any], inputs: bytes,
                     args: tuple[Any, ...], kwargs: dict[str, Any],
                     workflow_id: str | None,
                     queued: tuple[Queue, int, float, str | None] | None = None,
                     ) -> WorkflowHandle[Any]:
        idx, entry = parent.begin("child", wf.name)
        if entry is not None:
            child_id = str(_codec.decode(entry.output or b'""', "child workflow id"))
            return WorkflowHandle(self, child_id)
        child_id = workflow_id or f"{parent.workflow_id}/{idx}"
        if queued is not None:
            queue, priority, delay, dedup_id = queued
            rec = queue.record(wf, child_id, inputs, parent.workflow_id, priority, delay,
                               dedup_id)
        else:
            rec = self._new_record(wf, child_id, inputs, parent.workflow_id)
        data, _ = _codec.encode(child_id, "child workflow id")
        at = time.time()
        link = JournalEntry(parent.workflow_id, idx, "child", wf.name, data, None, 1, at, at)
        try:
            # The child's row and the parent's record of it commit together.
            parent.commit([CreateWorkflow(rec), link])
        except WorkflowExists:
            # Started before a crash (or by someone else): record the link, run nothing.
            self._check_existing(wf, child_id)
            parent.commit([link])
        else:
            if queued is None:
                self._run(wf, rec, list(args), dict(kwargs), [], fresh=True)
            else:
                self._queue_wakeup.set()
        return WorkflowHandle(self, child_id)

    def _run(self, wf: Workflow[Any, Any], rec: WorkflowRecord, args: list[Any],
             kwargs: dict[str, Any], journal: list[JournalEntry], *,
             fresh: bool = False, stamp: Any = None) -> None:
        ctx = WorkflowContext(self, rec.id, rec.name, journal, is_async=wf.is_async,
                              fresh=fresh, token=rec.token)
        ctx.queue = rec.queue
        if rec.status is Status.CANCELLING:
            ctx.cancel_event.set()  # it stops at its first durable call and compensates
        ex = Execution(ctx)
        with self._lock:
            # A closing app starts nothing: a sweep, queue poll or wake-up already under
            # way could otherwise resume, with a fresh context, a workflow close() just
            # stopped (and is handing back). _abandon sets _closing before it lists the
            # executions under this lock, so every one it misses is refused here.
            if rec.id in self._executions or self._closing.is_set():
                return
            self._executions[rec.id] = ex
        obs = ctx.instrument = _instrument.begin(self, rec, len(journal), stamp)
        if wf.is_async:
            async def main() -> None:
                scope = obs.enter() if obs is not None else None
                try:
                    self._finish(ex, await run_async(wf, ctx, args, kwargs))
                finally:
                    if obs is not None:
                        obs.leave(scope)

            asyncio.run_coroutine_threadsafe(main(), self._event_loop())
        else:
            def target() -> None:
                scope = obs.enter() if obs is not None else None
                try:
                    self._finish(ex, run_sync(wf, ctx, args, kwargs))
                finally:
                    if obs is not None:
                        obs.leave(scope)

            self._threads.submit(target)

    def _finish(self, ex: Execution, outcome: Outcome) -> None:
        if ex.ctx.queue is not None:
            self._queue_wakeup.set()  # room for the next one
        if outcome.kind == "suspended" and isinstance(outcome.error, _Suspend):
            with self._lock:
                self._suspended[ex.ctx.workflow_id] = outcome.error.wake_at
        if outcome.kind == "store_error":
            log.error("workflow %s stopped: %s; this process resumes it at its next recovery "
                      "sweep once the store works", ex.ctx.workflow_id,
                      redact_text(str(outcome.error)), extra={"workflow_id": ex.ctx.workflow_id})
        if ex.ctx.instrument is not None:
            ex.ctx.instrument.end(outcome.kind, outcome.error, ex.ctx.replayed)
        ex.finish(outcome, self._lock)
        with self._lock:
            if self._executions.get(ex.ctx.workflow_id) is ex:
                del self._executions[ex.ctx.workflow_id]

    # -- recovery -----------------------------------------------------------------------
    def recover(self) -> list[WorkflowHandle[Any]]:
        """Take over every running workflow whose owning process is dead, and resume it.

        Never takes a workflow from a live process. A workflow recovered more than
        ``max_recoveries`` times becomes a dead letter instead. Returns handles to the
        workflows resumed here (also by the background sweep this call waited for).
        """
        self._ensure_launched()
        waited = not self._sweep_lock.acquire(blocking=False)
        if waited:
            self._sweep_lock.acquire()
        try:
            handles = self._recover()
            if waited:  # the sweep we waited for may have resumed what we came for
                seen = {h.workflow_id for h in handles}
                handles[:0] = [h for h in self._swept if h.workflow_id not in seen]
            self._swept = []
            return handles
        finally:
            self._sweep_lock.release()

    def _sweep(self) -> None:
        """The background sweep: skipped while a recover() call runs."""
        if self._sweep_lock.acquire(blocking=False):
            try:
                self._swept = self._recover()
            finally:
                self._sweep_lock.release()

    def _recover(self) -> list[WorkflowHandle[Any]]:
        rows = self.store.running_workflows("")
        if not rows:
            return []
        handles: list[WorkflowHandle[Any]] = []
        # Our own workflows that stopped without finishing (a store error interrupted
        # them) are resumed here without a claim: they are ours already.
        now = time.time()
        for wid, owner, name in rows:
            if owner == self.executor_id and wid not in self._executions \
                    and name in self._workflows and self._suspended.get(wid, 0.0) <= now:
                try:
                    rec = self.store.get_workflow(wid)
                except CorruptRecordError:
                    if _corruption.on_unreadable_record(self, wid):
                        handles.append(WorkflowHandle(self, wid))
                    continue
                if rec is not None and rec.status.active \
                        and rec.owner == self.executor_id and self._resume(rec):
                    handles.append(WorkflowHandle(self, wid))
        others = [r for r in rows if r[1] != self.executor_id]
        owners = sorted({owner for _, owner, _ in others if owner is not None})
        executors = self.store.get_executors(owners)
        now = self.clock()
        mono = time.monotonic()
        # Late heartbeats prove a death only while ours get through on time.
        judge = (mono >= self._no_judging_until
                 and mono - self._beat_ok_at < _JUDGE_BEATS * self.heartbeat_interval)
        dead = {o for o in owners
                if not executor_alive(executors.get(o), self.lease, now, by_heartbeat=judge)}
        claims = [
            (wid, owner) for wid, owner, name in others
            if (owner is None or owner in dead) and wid not in self._executions
            and name in self._workflows
        ]
        for start in range(0, len(claims), 500):
            chunk = claims[start:start + 500]
            results = self.store.claim_workflows(chunk, self.executor_id, self.max_recoveries)
            _instrument.recovered(self, [(w, r.record.token) for (w, _), r in zip(
                chunk, results, strict=True) if r.claimed and r.record is not None],
                [w for (w, _), r in zip(chunk, results, strict=True) if r.dead_lettered])
            for (wid, owner), res in zip(chunk, results, strict=True):
                if res.claimed or res.dead_lettered:
                    self._log_recovery(wid, owner, executors.get(owner) if owner else None,
                                       res.dead_lettered)
                if res.dead_lettered:
                    log.error("workflow %s dead-lettered: %s", wid,
                              redact_text(str(res.record and res.record.reason)),
                              extra={"workflow_id": wid})
                elif res.claimed and res.record is not None:
                    rec = res.record
                    if rec.queue is not None:
                        # A dead worker's queued workflow goes back to its queue, where
                        # the queue's limits apply (global and per worker), rather than
                        # all of them landing on whichever worker swept first.
                        self._committer.commit([Requeue(
                            rec.id, self.executor_id, rec.token, None,
                            "taken back from a worker that died")])
                        handles.append(WorkflowHandle(self, wid))
                    elif self._resume(rec):
                        handles.append(WorkflowHandle(self, wid))
                elif res.claimed and _corruption.on_unreadable_record(self, wid):
                    handles.append(WorkflowHandle(self, wid))  # its own row is damaged
        return handles

    def _log_recovery(self, workflow_id: str, owner: str | None,
                      was: ExecutorRecord | None, dead: bool) -> None:
        """Append the takeover to the workflow's recovery log (see _recovery_log)."""
        event = {"at": self.clock(), "from": owner,
                 "seen": was.heartbeat_at if was is not None else None,
                 "by": self.executor_id, "outcome": "dead_letter" if dead else "claimed"}
        try:
            _recovery_log.append(self.store, workflow_id, event)
        except StoreError as exc:  # the recovery goes on; the metrics lose precision
            log.warning("could not log the recovery of %s: %s", workflow_id, exc,
                        extra={"workflow_id": workflow_id})

    def recoveries(self, workflow_id: str) -> list[dict[str, Any]]:
        """The workflow's takeovers, oldest first: each a dict with ``at`` (when it was
        claimed, store clock), ``from`` (the dead owner), ``seen`` (that owner's last
        heartbeat), ``by`` (the claimer) and ``outcome`` (``claimed`` or
        ``dead_letter``). ``crashsafe stats`` computes recovery times from them."""
        return _recovery_log.events(self.store, workflow_id)

    def _resume(self, rec: WorkflowRecord) -> bool:
        wf = self._lookup(rec.name, rec.version)
        if wf is None:  # pragma: no cover - checked by the caller
            return False
        try:
            args, kwargs = wf.decode_inputs(rec.inputs, rec.id)
            journal = self.store.load_journal(rec.id)
        except CorruptRecordError as exc:
            return _corruption.on_load(self, wf, rec, exc)
        except CrashsafeError as exc:
            self.store.set_status(rec.id, Status.DEAD_LETTER, only_from=tuple(ACTIVE_STATUSES),
                                  reason=f"cannot resume: {exc}", clear_owner=True)
            log.error("workflow %s dead-lettered: %s", rec.id, redact_text(str(exc)),
                      extra={"workflow_id": rec.id})
            return False
        self._run(wf, rec, args, kwargs, journal)
        return True

    # -- reading and control --------------------------------------------------------------
    def handle(self, workflow_id: str) -> WorkflowHandle[Any]:
        """A handle to an existing workflow; raises UnknownWorkflowError if there is none."""
        h: WorkflowHandle[Any] = WorkflowHandle(self, workflow_id)
        h.record()
        return h

    def get_workflow(self, workflow_id: str) -> WorkflowRecord:
        rec = self.store.get_workflow(workflow_id)
        if rec is None:
            raise UnknownWorkflowError(f"no workflow with id {workflow_id!r}")
        return rec

    def list_workflows(self, *, status: Status | str | None = None, name: str | None = None,
                       limit: int = 100, id_prefix: str | None = None) -> list[WorkflowRecord]:
        """Workflows, newest first: of one status, of one name (exact), whose id starts
        with ``id_prefix`` (literally: ``%`` and ``_`` are not wildcards)."""
        st = Status(status) if status is not None else None
        return self.store.list_workflows(ListFilter(status=st, name=name, limit=limit,
                                                    id_prefix=id_prefix))

    def journal(self, workflow_id: str) -> list[JournalEntry]:
        self.get_workflow(workflow_id)
        return self.store.load_journal(workflow_id)

    # -- checkpoints, fork -----------------------------------------------------------------
    def checkpoints(self, workflow_id: str) -> list[CheckpointInfo]:
        """The checkpoints a workflow recorded, oldest first."""
        return _ckpt.infos(self.journal(workflow_id))

    def checkpoint_state(self, workflow_id: str, at: int | str | None = None) -> Any:
        """The agent state at a checkpoint (time travel): ``at`` is a label, ``"#N"``
        (the N-th checkpoint), a journal index (the last checkpoint at or before it),
        or None (the latest)."""
        journal = self.journal(workflow_id)
        return _ckpt.state_at(journal, _ckpt.resolve(journal, at))

    def fork(self, workflow_id: str, *, at: int | str | None = None,
             new_id: str | None = None) -> WorkflowHandle[Any]:
        """Start a new workflow from a past point of ``workflow_id``.

        The new one gets the same inputs and a copy of the journal up to the point
        ``at`` names — a checkpoint (label, ``"#N"``, or None for the latest one,
        included) or, as an int, a journal index (entries before it) — and runs from
        there: replay returns the copied results, everything after runs anew (with new
        idempotency keys, since they derive from the new id). Child workflows started
        before the fork point are shared with the original, not copied.
        """
        rec = self.get_workflow(workflow_id)
        wf = self._lookup(rec.name, rec.version)
        journal = self.store.load_journal(workflow_id)
        if isinstance(at, int) and not isinstance(at, bool):
            cut = at
        else:
            cut = _ckpt.resolve(journal, at).index + 1
        kept = [e for e in journal if e.index < cut and e.kind != "compensate"]
        new = new_id or f"{workflow_id}~fork-{uuid.uuid4().hex[:8]}"
        now = self.clock()
        # Not registered here (the command line): the fork is created unowned and any
        # serving process that registers the workflow resumes it.
        copy = WorkflowRecord(new, rec.name, rec.version, Status.RUNNING, rec.inputs, now, now,
                              owner=self.executor_id if wf is not None else None,
                              reason=f"forked from {workflow_id!r} before index {cut}")
        if wf is not None:
            self.launch()
        entries = [JournalEntry(new, e.index, e.kind, e.name, e.output, e.error, e.attempts,
                                e.started_at, e.ended_at,
                                f"copied from {workflow_id!r}" + (f"; {e.note}" if e.note
                                                                  else ""))
                   for e in kept]
        self._committer.commit([CreateWorkflow(copy), *entries])
        if wf is not None:
            args, kwargs = wf.decode_inputs(rec.inputs, new)
            self._run(wf, copy, args, kwargs, entries)
        return WorkflowHandle(self, new)

    def rollback(self, workflow_id: str, *, to: int | str | None = None,
                 compensate: bool = True, reason: str | None = None) -> WorkflowHandle[Any]:
        """Wind a workflow back and resume it from there.

        ``to`` names the point: a checkpoint (label, ``"#N"``, or None for the latest
        one, which is kept) or, as an int, a journal index (entries from it on are
        rolled back). The rolled-back entries are kept for audit (``crashsafe show``
        lists them); the compensations of rolled-back steps that have one run first,
        newest first (at least once: a crash during the rollback runs them again when
        it is repeated) — only those of steps registered in this App: an App that does
        not register a step cannot know of its compensation (``crashsafe rollback`` and
        the dashboard refuse in that case unless forced); then the workflow becomes
        ``running`` under a new fencing token — a process still running it can no
        longer write — and a serving process with it registered resumes it (this one
        at once).
        """
        rec = self.get_workflow(workflow_id)
        journal = self.store.load_journal(workflow_id)
        if isinstance(to, int) and not isinstance(to, bool):
            cut = to
        else:
            cut = _ckpt.resolve(journal, to).index + 1
        rolled = [e for e in journal if e.index >= cut]
        undone, failed = _corruption.compensate(self, rolled) if compensate else (0, [])
        why = reason or f"rolled back to before index {cut}"
        if undone or failed:
            why += f"; {undone} compensation(s) ran" + (
                f", {len(failed)} failed: {'; '.join(failed)}" if failed else "")
        self.store.rewind(workflow_id, cut, why, self.clock())
        if rec.name in self._workflows and self._launched:
            self.recover()
        return WorkflowHandle(self, workflow_id)

    def gc(self, *, keep_checkpoints: int | None = None,
           finished_older_than: float | timedelta | None = None, dry_run: bool = False,
           batch: int = 100, progress: GcProgress | None = None) -> GcReport:
        """Retention, once, over the whole store (``crashsafe gc``): drop workflows that
        finished longer ago than ``finished_older_than`` with all their rows, and keep
        the state of only the last ``keep_checkpoints`` checkpoints of each finished
        workflow, compacting deltas first. Running workflows are never touched; each
        batch of ``batch`` workflows is one transaction, so it is safe to kill and run
        again. ``progress(done, total)`` is called after each batch. See
        :mod:`crashsafe._retention` and ``docs/checkpoints.md``."""
        return collect_garbage(self.store, keep_checkpoints=keep_checkpoints,
                               finished_older_than=finished_older_than, dry_run=dry_run,
                               batch=batch, progress=progress)

    def rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        """The entries rolled back from a workflow, kept for audit: ``(when, why, entry)``."""
        self.get_workflow(workflow_id)
        return self.store.load_rewound(workflow_id)

    def corruption_events(self, workflow_id: str) -> list[dict[str, Any]]:
        """What the ``on_corrupt`` policy did for this workflow, oldest first: each a dict
        with ``at``, ``record`` (the damaged record), ``index``, ``kind``, ``action``
        (``rollback``, ``fail`` or ``escalate``) and ``detail`` (where it rolled back
        to, or why it failed)."""
        return _corruption.events(self, workflow_id)

    def signal(self, workflow_id: str, name: str, payload: Any = None) -> None:
        """Send the signal ``name`` with ``payload`` to a running or waiting workflow.

        Durable once this returns: the workflow's n-th ``crashsafe.wait_for(name)``
        receives the n-th signal of that name, whenever each was sent, in whichever
        process the workflow runs. Raises :class:`UnknownWorkflowError` for an unknown
        id and :class:`InvalidStateError` for a workflow that has finished.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"the signal name must be a non-empty string, got {name!r}")
        data, _ = _codec.encode(payload, f"payload of signal {name!r}")
        if self.store.send_signal(workflow_id, name, data, time.time()) is None:
            rec = self.get_workflow(workflow_id)  # raises UnknownWorkflowError if absent
            raise InvalidStateError(
                f"workflow {workflow_id!r} is {rec.status}; signals go to running or "
                "waiting workflows only"
            )
        ex = self._executions.get(workflow_id)
        if ex is not None:
            ex.ctx.wake()

    def cancel(self, workflow_id: str, reason: str | None = None) -> bool:
        """Cancel a running or waiting workflow; False if it had already finished.

        The workflow becomes ``cancelling`` and stops at its next durable call with
        :class:`WorkflowCancelled`; then the compensations of its completed steps run
        (newest first, each once, journaled) and it becomes ``cancelled``; its result
        is :class:`WorkflowCancelledError`. A workflow whose process is gone is
        compensated by whichever process recovers it.
        """
        if self.store.set_status(workflow_id, Status.CANCELLED, only_from=(Status.ENQUEUED,),
                                 reason=reason or "cancelled before it started") is not None:
            return True  # it never ran: nothing to compensate
        rec = self.store.set_status(workflow_id, Status.CANCELLING,
                                    only_from=(Status.RUNNING, Status.WAITING),
                                    reason=reason or "cancelled on request")
        if rec is None:
            self.get_workflow(workflow_id)  # raises UnknownWorkflowError if absent
            return False
        ex = self._executions.get(workflow_id)
        if ex is not None:
            ex.ctx.wake(cancel=True)
        return True

    def resume(self, workflow_id: str) -> WorkflowHandle[Any]:
        """Revive a cancelled or dead-lettered workflow from where its journal ends.

        Any serving app with the workflow registered picks it up (this one at once).
        A cancelled workflow whose completed steps were compensated cannot be resumed:
        its effects were undone; start a new workflow instead.
        """
        if any(e.kind == "compensate" for e in self.store.load_journal(workflow_id)):
            raise InvalidStateError(
                f"workflow {workflow_id!r} was cancelled and its completed steps were "
                "compensated; resuming it would continue from effects that were undone. "
                "Start a new workflow instead"
            )
        rec = self.store.set_status(
            workflow_id, Status.RUNNING, only_from=(Status.CANCELLED, Status.DEAD_LETTER),
            clear_owner=True, reset_recoveries=True,
        )
        if rec is None:
            cur = self.get_workflow(workflow_id)
            raise InvalidStateError(
                f"workflow {workflow_id!r} is {cur.status}; only cancelled or dead-lettered "
                "workflows can be resumed (running ones resume by themselves)"
            )
        if rec.name in self._workflows and self._launched:
            self.recover()
        return WorkflowHandle(self, workflow_id)
