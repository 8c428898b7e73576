"""Circuit breakers whose state lives in the store.

Every process using the store sees one breaker per name (and scope): a breaker that
trips in one worker fails fast in all of them, survives restarts, and after its open
period admits **exactly one** half-open probe across all processes. The probe holds a
lease, so a prober that crashes cannot wedge the breaker: once the lease runs out the
next caller probes. The probe is held by (workflow id, step index), so a recovered
workflow continues its own probe instead of waiting for the lease.

The transitions are pure functions over a small JSON document
(:func:`admit`, :func:`record`), applied with :meth:`Store.update_shared` under the
store's clock. The hot path (a closed breaker) costs one read, no write: successes are
counted in the process and flushed with the next failure or by the app's background
sweep about once a second.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import msgspec

from .retry import seconds

Scope = Literal["global", "host", "process"]
_HISTORY = 20


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """A named breaker's settings. Pass it (or just its name, for these defaults) as
    ``@app.step(breaker=...)``; the name may contain ``{workflow}`` to keep one breaker
    per agent (workflow name) and dependency, e.g. ``"openai:{workflow}"``."""

    name: str
    failure_ratio: float = 0.5
    """Trip when at least this share of the calls in the window failed ..."""
    min_calls: int = 10
    """... and the window holds at least this many calls."""
    window: float | timedelta = 60.0
    """Seconds of history the ratio is computed over (ten buckets)."""
    consecutive_failures: int | None = None
    """Also trip after this many failures in a row, whatever the ratio."""
    open_for: float | timedelta = 30.0
    """Seconds the breaker stays open before it admits one probe."""
    probe_lease: float | timedelta = 60.0
    """How long one half-open probe may take before another caller may probe."""
    scope: Scope = "global"
    """``global`` (every process on the store), ``host`` or ``process``."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("CircuitBreaker.name must be a non-empty string")
        if not 0 < self.failure_ratio <= 1:
            raise ValueError("CircuitBreaker.failure_ratio must be in (0, 1]")
        if self.min_calls < 1:
            raise ValueError("CircuitBreaker.min_calls must be at least 1")
        if self.consecutive_failures is not None and self.consecutive_failures < 1:
            raise ValueError("CircuitBreaker.consecutive_failures must be at least 1")
        if self.scope not in ("global", "host", "process"):
            raise ValueError("CircuitBreaker.scope must be 'global', 'host' or 'process'")
        for name in ("window", "open_for", "probe_lease"):
            value = seconds(getattr(self, name), f"CircuitBreaker.{name}")
            if not value:
                raise ValueError(f"CircuitBreaker.{name} must be positive")
            object.__setattr__(self, name, value)


class Doc(msgspec.Struct, omit_defaults=True):
    """The stored state of one breaker."""

    state: str = BreakerState.CLOSED.value
    buckets: list[list[float]] = msgspec.field(default_factory=list)
    """``[bucket start, successes, failures]``, oldest first."""
    streak: int = 0
    """Failures in a row."""
    until: float = 0.0
    """While open: when a probe may be admitted."""
    probe: str | None = None
    probe_until: float = 0.0
    changed_at: float = 0.0
    changes: int = 0
    trips: int = 0
    why: str = ""
    history: list[list[Any]] = msgspec.field(default_factory=list)
    """The last state changes: ``[at, from, to, why]``."""


_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(Doc)
_STATES = frozenset(s.value for s in BreakerState)


def load(raw: bytes | None) -> Doc:
    """Decode a stored breaker; an unreadable one is treated as new (and rewritten)."""
    if raw is None:
        return Doc()
    try:
        doc = _DEC.decode(raw)
    except msgspec.DecodeError:
        return Doc()
    # Well-formed JSON can still be meaningless: an unknown state would hand every caller
    # a probe, a short bucket would crash the next update.
    if doc.state not in _STATES or any(len(b) != 3 for b in doc.buckets):
        return Doc()
    return doc


def dump(doc: Doc) -> bytes:
    return _ENC.encode(doc)


class Admission(enum.Enum):
    ALLOW = "allow"
    PROBE = "probe"
    REJECT = "reject"


def _move(doc: Doc, to: BreakerState, now: float, why: str) -> None:
    doc.history = [*doc.history, [round(now, 3), doc.state, to.value, why]][-_HISTORY:]
    doc.state = to.value
    doc.changed_at = now
    doc.changes += 1
    doc.why = why


def quick_admit(doc: Doc, now: float, who: str) -> Admission | None:
    """Decide from a plain read when no write is needed: closed (allow), open and not
    yet due (reject). None: a transition may be due, decide under :func:`admit`."""
    if doc.state == BreakerState.CLOSED:
        return Admission.ALLOW
    if doc.state == BreakerState.OPEN and now < doc.until:
        return Admission.REJECT
    if doc.state == BreakerState.HALF_OPEN and doc.probe not in (None, who) \
            and now < doc.probe_until:
        return Admission.REJECT
    return None


def admit(cfg: CircuitBreaker, doc: Doc, now: float, who: str) -> Admission:
    """Admit a call (in place): the half-open probe is handed to exactly one caller."""
    quick = quick_admit(doc, now, who)
    if quick is not None:
        return quick
    if doc.state == BreakerState.OPEN:
        _move(doc, BreakerState.HALF_OPEN, now, f"open for {cfg.open_for:g} s: probing")
    doc.probe = who
    doc.probe_until = now + float(cfg.probe_lease)  # type: ignore[arg-type]
    return Admission.PROBE


def _bucket(doc: Doc, cfg: CircuitBreaker, now: float) -> list[float]:
    width = float(cfg.window) / 10  # type: ignore[arg-type]
    start = now - now % width
    horizon = now - float(cfg.window)  # type: ignore[arg-type]
    doc.buckets = [b for b in doc.buckets if b[0] > horizon - width]
    if not doc.buckets or doc.buckets[-1][0] < start:
        doc.buckets.append([start, 0, 0])
    return doc.buckets[-1]


def record(cfg: CircuitBreaker, doc: Doc, now: float, who: str, failed: bool | None,
           successes: int = 0) -> None:
    """Count an outcome (in place): ``failed`` True/False for a call, None for only
    flushing ``successes`` counted in the process since the last write."""
    if doc.state == BreakerState.HALF_OPEN and doc.probe == who and failed is not None:
        doc.probe = None
        if failed:
            doc.until = now + float(cfg.open_for)  # type: ignore[arg-type]
            doc.trips += 1
            _move(doc, BreakerState.OPEN, now, "the half-open probe failed")
        else:
            doc.buckets, doc.streak = [], 0
            _move(doc, BreakerState.CLOSED, now, "the half-open probe succeeded")
        return
    if doc.state != BreakerState.CLOSED:
        return  # a call admitted before the breaker opened: its outcome is old news
    bucket = _bucket(doc, cfg, now)
    bucket[1] += successes + (1 if failed is False else 0)
    if failed is False or (successes and failed is None):
        doc.streak = 0
    if failed:
        bucket[2] += 1
        doc.streak = 1 if successes else doc.streak + 1
        why = _trip_reason(cfg, doc)
        if why:
            doc.until = now + float(cfg.open_for)  # type: ignore[arg-type]
            doc.trips += 1
            _move(doc, BreakerState.OPEN, now, why)


def _trip_reason(cfg: CircuitBreaker, doc: Doc) -> str:
    if cfg.consecutive_failures is not None and doc.streak >= cfg.consecutive_failures:
        return f"{doc.streak} failures in a row"
    calls = sum(b[1] + b[2] for b in doc.buckets)
    fails = sum(b[2] for b in doc.buckets)
    if calls >= cfg.min_calls and fails / calls >= cfg.failure_ratio:
        return f"{int(fails)} of {int(calls)} calls failed in the last {cfg.window:g} s"
    return ""


def reset(raw: bytes, now: float) -> bytes:
    """A breaker closed by hand (``crashsafe breakers --reset``), its window cleared."""
    doc = load(raw)
    doc.buckets, doc.streak, doc.probe = [], 0, None
    if doc.state != BreakerState.CLOSED:
        _move(doc, BreakerState.CLOSED, now, "closed by hand")
    return dump(doc)


def counts(doc: Doc) -> tuple[int, int]:
    """(successes, failures) in the current window."""
    return int(sum(b[1] for b in doc.buckets)), int(sum(b[2] for b in doc.buckets))


@dataclass(frozen=True, slots=True)
class BreakerInfo:
    """One breaker as :meth:`App.breakers` and ``crashsafe breakers`` show it."""

    name: str
    """The breaker's name, with ``@host:...`` or ``@process:...`` for narrower scopes."""
    state: str
    successes: int
    failures: int
    """Calls in the current window (successes counted by a process are written about
    once a second)."""
    trips: int
    changes: int
    changed_at: float
    why: str
    open_until: float | None
    probe: str | None
    history: list[list[Any]]


def info(key: str, raw: bytes) -> BreakerInfo:
    doc = load(raw)
    ok, failed = counts(doc)
    return BreakerInfo(key.removeprefix("breaker:"), doc.state, ok, failed, doc.trips,
                       doc.changes, doc.changed_at, doc.why,
                       doc.until if doc.state == BreakerState.OPEN else None,
                       doc.probe if doc.state == BreakerState.HALF_OPEN else None,
                       list(doc.history))
