"""The per-app side of the shared policies: talks to the store, batches cheap updates.

One :class:`Resilience` per :class:`~crashsafe.App`. Every method blocks on the store
(async steps call them in a worker thread). Successes of closed breakers and the
deposits of retry budgets are counted here and written by :meth:`flush`, which the
app's background thread calls about once a second, so a healthy dependency costs no
write per call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..exceptions import CircuitOpenError, ConfigurationError
from ..stores.base import Store
from . import breaker as _b
from . import limits as _l
from .breaker import Admission, CircuitBreaker
from .limits import ConcurrencyLimit, Limit, RateLimit
from .retry import RetryBudget

_SAMPLES = 200
_CLOSED_FRESH = 0.1
"""Seconds a closed breaker read from the store is trusted without reading it again:
a trip in another process is seen at most this late (breakers are statistical)."""
_LOCAL_TOKENS_TTL = 1.0
"""Rate-limit tokens taken in a batch and not used within this time are dropped (never
handed back), so a process never exceeds the shared rate, only under-uses it."""


@dataclass(slots=True)
class Ticket:
    """A call admitted by a breaker: who it is, and whether it is the half-open probe."""

    cfg: CircuitBreaker
    key: str
    who: str
    admission: Admission


class Resilience:
    def __init__(self, store: Store, executor_id: str, hostname: str) -> None:
        self.store = store
        self.executor_id = executor_id
        self.hostname = hostname
        self._lock = threading.Lock()
        self._successes: dict[str, tuple[CircuitBreaker, int]] = {}
        self._deposits: dict[str, tuple[RetryBudget, int]] = {}
        self._latency: dict[str, deque[float]] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.limits: dict[str, Limit] = {}
        self._closed_seen: dict[str, float] = {}
        self._tokens: dict[str, tuple[int, float]] = {}

    # -- configuration --------------------------------------------------------------------
    def breaker_config(self, spec: CircuitBreaker | str) -> CircuitBreaker:
        if isinstance(spec, CircuitBreaker):
            return spec
        return self.breakers.get(spec) or CircuitBreaker(spec)

    def limit_config(self, spec: Limit | str) -> Limit:
        if isinstance(spec, RateLimit | ConcurrencyLimit):
            return spec
        found = self.limits.get(spec)
        if found is None:
            raise ConfigurationError(
                f"no limit named {spec!r}: declare it first with app.rate_limit({spec!r}, "
                f"...) or app.concurrency_limit({spec!r}, ...)")
        return found

    def breaker_key(self, cfg: CircuitBreaker, workflow_name: str) -> str:
        name = cfg.name.replace("{workflow}", workflow_name)
        if cfg.scope == "host":
            return f"breaker:{name}@host:{self.hostname}"
        if cfg.scope == "process":
            return f"breaker:{name}@process:{self.executor_id}"
        return f"breaker:{name}"

    # -- breakers -------------------------------------------------------------------------
    def admit(self, cfg: CircuitBreaker, key: str, who: str) -> Ticket:
        """Admit one call or raise :class:`CircuitOpenError` (nothing is called)."""
        if self.fresh_closed(key):
            return Ticket(cfg, key, who, Admission.ALLOW)
        raw, now = self.store.read_shared(key)
        doc = _b.load(raw)
        admission = _b.quick_admit(doc, now, who)
        if admission is None:
            def step(raw: bytes | None, now: float) -> tuple[bytes | None, tuple[Admission,
                                                                                 _b.Doc]]:
                d = _b.load(raw)
                a = _b.admit(cfg, d, now, who)
                return _b.dump(d), (a, d)

            admission, doc = self.store.update_shared(key, step)
        if doc.state == _b.BreakerState.CLOSED:
            with self._lock:
                self._closed_seen[key] = time.monotonic() + _CLOSED_FRESH
        if admission is Admission.REJECT:
            name = key.removeprefix("breaker:")
            if doc.state == _b.BreakerState.OPEN:
                left = max(0.0, doc.until - now)
                why = f"open ({doc.why}); next probe in {left:.1f} s"
            else:
                why = "half-open with its one probe in flight elsewhere"
            raise CircuitOpenError(f"circuit breaker {name!r} is {why}", name)
        return Ticket(cfg, key, who, admission)

    def fresh_closed(self, key: str) -> bool:
        """Whether the breaker was seen closed in the last moment (no read needed)."""
        with self._lock:
            return self._closed_seen.get(key, 0.0) > time.monotonic()

    def outcome(self, ticket: Ticket, failed: bool) -> None:
        """Count the call's outcome. A success of a closed breaker is only counted here
        and written by :meth:`flush` (or with the next failure)."""
        if ticket.admission is Admission.ALLOW and not failed:
            with self._lock:
                _, n = self._successes.get(ticket.key, (ticket.cfg, 0))
                self._successes[ticket.key] = (ticket.cfg, n + 1)
            return
        with self._lock:
            _, pending = self._successes.pop(ticket.key, (ticket.cfg, 0))
            self._closed_seen.pop(ticket.key, None)  # it may trip: look again next time
        cfg, who = ticket.cfg, ticket.who

        def step(raw: bytes | None, now: float) -> tuple[bytes | None, None]:
            d = _b.load(raw)
            _b.record(cfg, d, now, who, failed, pending)
            return _b.dump(d), None

        self.store.update_shared(ticket.key, step)

    # -- retry budgets --------------------------------------------------------------------
    def first_call(self, budget: RetryBudget) -> None:
        with self._lock:
            _, n = self._deposits.get(budget.name, (budget, 0))
            self._deposits[budget.name] = (budget, n + 1)

    def withdraw(self, budget: RetryBudget) -> bool:
        """Take a token for one retry; False when the shared budget is empty."""
        with self._lock:
            _, pending = self._deposits.pop(budget.name, (budget, 0))

        def step(raw: bytes | None, now: float) -> tuple[bytes | None, bool]:
            return _l.withdraw(budget, raw, now, pending)

        return self.store.update_shared(f"budget:{budget.name}", step)

    # -- rate and concurrency limits ------------------------------------------------------
    def try_acquire(self, lim: Limit, who: str) -> float:
        """Take ``lim`` for ``who`` without waiting: 0.0 when taken, else the seconds
        after which trying again may succeed. Rate-limit tokens are taken in batches of
        a tenth of the burst and spent locally, so a busy process writes to the store
        once per batch (never more than the shared rate: unused tokens are dropped)."""
        if isinstance(lim, RateLimit):
            if self._spend_local(lim):
                return 0.0
            rate = lim
            batch = max(1, int(float(lim.burst) * 0.1))  # type: ignore[arg-type]

            def take_batch(raw: bytes | None, now: float) -> tuple[bytes | None,
                                                                   tuple[float, int]]:
                doc, got = _l.take_rate_many(rate, raw, now, batch)
                if got:
                    return doc, (0.0, got)
                doc, wait = _l.take_rate(rate, raw, now)  # none left: how long to wait
                return doc, (wait, 0)

            wait, got = self.store.update_shared(rate.key, take_batch)
            if got:
                self._keep_local(rate, got - 1)
                return 0.0
            return max(wait, 0.001)
        conc = lim

        def take(raw: bytes | None, now: float) -> tuple[bytes | None, float]:
            return _l.take_slot(conc, raw, now, who)

        return self.store.update_shared(lim.key, take)

    def acquire(self, lim: Limit, who: str, wait_fn: Callable[[float], None]) -> None:
        """Block (through ``wait_fn``, which may raise to stop) until ``lim`` admits
        ``who``; a freed slot is noticed within a tenth of a second."""
        poll = 0.01
        while (wait := self.try_acquire(lim, who)) > 0:
            wait_fn(min(wait, poll))
            poll = min(poll * 2, 0.1)

    def _spend_local(self, lim: RateLimit) -> bool:
        """Use a token this process took earlier in a batch, if one is still fresh."""
        with self._lock:
            count, until = self._tokens.get(lim.key, (0, 0.0))
            if count > 0 and until > time.monotonic():
                self._tokens[lim.key] = (count - 1, until)
                return True
            return False

    def _keep_local(self, lim: RateLimit, count: int) -> None:
        with self._lock:
            self._tokens[lim.key] = (count, time.monotonic() + _LOCAL_TOKENS_TTL)

    def take_many(self, lim: RateLimit, want: int) -> int:
        """Take up to ``want`` calls from a rate limit without waiting; how many."""
        def take(raw: bytes | None, now: float) -> tuple[bytes | None, int]:
            return _l.take_rate_many(lim, raw, now, want)

        return self.store.update_shared(lim.key, take)

    def release(self, lim: Limit, who: str) -> None:
        if isinstance(lim, ConcurrencyLimit):
            def give(raw: bytes | None, now: float) -> tuple[bytes | None, None]:
                return _l.release_slot(raw, now, who), None

            self.store.update_shared(lim.key, give)

    # -- latency, for hedging -------------------------------------------------------------
    def observe(self, step: str, secs: float) -> None:
        with self._lock:
            self._latency.setdefault(step, deque(maxlen=_SAMPLES)).append(secs)

    def p95(self, step: str) -> float | None:
        """The 95th percentile of the step's recent successful attempts (None: < 20)."""
        with self._lock:
            samples = sorted(self._latency.get(step, ()))
        if len(samples) < 20:
            return None
        return samples[min(len(samples) - 1, int(len(samples) * 0.95))]

    # -- background -----------------------------------------------------------------------
    def flush(self) -> None:
        """Write counted successes and budget deposits (the app calls this ~1/s)."""
        with self._lock:
            successes, self._successes = self._successes, {}
            deposits, self._deposits = self._deposits, {}
        for key, (cfg, n) in successes.items():
            def step(raw: bytes | None, now: float, cfg: CircuitBreaker = cfg,
                     n: int = n) -> tuple[bytes | None, None]:
                d = _b.load(raw)
                _b.record(cfg, d, now, "", None, n)
                return _b.dump(d), None

            self.store.update_shared(key, step)
        for name, (budget, n) in deposits.items():
            def dep(raw: bytes | None, now: float, budget: RetryBudget = budget,
                    n: int = n) -> tuple[bytes | None, None]:
                return _l.deposit(budget, raw, now, n), None

            self.store.update_shared(f"budget:{name}", dep)
