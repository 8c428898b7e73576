"""Rate limits, concurrency limits and retry budgets shared through the store.

Each is a small JSON document updated with :meth:`Store.update_shared` under the
store's clock, so every process on the store shares it and a restart forgets nothing.
The functions here are pure: ``(document, now, ...) -> (document, answer)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import msgspec

from .retry import RetryBudget, seconds


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``rate`` calls per ``per`` seconds across every process (a token
    bucket holding up to ``burst`` calls). A step waits for its turn."""

    name: str
    rate: float
    per: float | timedelta = 1.0
    burst: float | None = None
    """Calls allowed at once after a quiet spell; default ``rate``."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("RateLimit.name must be a non-empty string")
        if not self.rate > 0:
            raise ValueError("RateLimit.rate must be positive")
        per = seconds(self.per, "RateLimit.per")
        if not per:
            raise ValueError("RateLimit.per must be positive")
        object.__setattr__(self, "per", per)
        if self.burst is None:
            object.__setattr__(self, "burst", float(self.rate))
        elif self.burst < 1:
            raise ValueError("RateLimit.burst must be at least 1")

    @property
    def key(self) -> str:
        return f"rate:{self.name}"


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most ``limit`` attempts running at once across every process. A slot held by
    a process that crashed is freed after ``lease`` seconds."""

    name: str
    limit: int
    lease: float | timedelta = 600.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("ConcurrencyLimit.name must be a non-empty string")
        if not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError("ConcurrencyLimit.limit must be an int of at least 1")
        lease = seconds(self.lease, "ConcurrencyLimit.lease")
        if not lease:
            raise ValueError("ConcurrencyLimit.lease must be positive")
        object.__setattr__(self, "lease", lease)

    @property
    def key(self) -> str:
        return f"concurrency:{self.name}"


Limit = RateLimit | ConcurrencyLimit


class Bucket(msgspec.Struct):
    tokens: float
    at: float


class Slots(msgspec.Struct):
    holders: dict[str, float] = msgspec.field(default_factory=dict)
    """Holder -> when its lease runs out."""


_ENC = msgspec.json.Encoder()


def _bucket(raw: bytes | None, full: float, now: float) -> Bucket:
    if raw is not None:
        try:
            return msgspec.json.decode(raw, type=Bucket)
        except msgspec.DecodeError:
            pass  # unreadable: start over with a full bucket
    return Bucket(full, now)


def take_rate(lim: RateLimit, raw: bytes | None, now: float) -> tuple[bytes, float]:
    """Take one call from the bucket: ``(new document, 0.0)``, or the seconds to wait
    before trying again (nothing taken)."""
    burst = float(lim.burst)  # type: ignore[arg-type]
    per = float(lim.per)  # type: ignore[arg-type]
    b = _bucket(raw, burst, now)
    b.tokens = min(burst, b.tokens + max(0.0, now - b.at) * lim.rate / per)
    b.at = now
    if b.tokens >= 1:
        b.tokens -= 1
        return _ENC.encode(b), 0.0
    return raw or _ENC.encode(b), (1 - b.tokens) * per / lim.rate


def take_rate_many(lim: RateLimit, raw: bytes | None, now: float,
                   want: int) -> tuple[bytes | None, int]:
    """Take up to ``want`` calls from the bucket at once: ``(document, taken)``."""
    burst = float(lim.burst)  # type: ignore[arg-type]
    per = float(lim.per)  # type: ignore[arg-type]
    b = _bucket(raw, burst, now)
    b.tokens = min(burst, b.tokens + max(0.0, now - b.at) * lim.rate / per)
    b.at = now
    taken = max(0, min(want, int(b.tokens + 1e-9)))
    if not taken:
        return raw or _ENC.encode(b), 0
    b.tokens = max(0.0, b.tokens - taken)
    return _ENC.encode(b), taken


def _slots(raw: bytes | None) -> Slots:
    if raw is not None:
        try:
            return msgspec.json.decode(raw, type=Slots)
        except msgspec.DecodeError:
            pass
    return Slots()


def take_slot(lim: ConcurrencyLimit, raw: bytes | None, now: float,
              who: str) -> tuple[bytes, float]:
    """Take a slot for ``who`` (re-entrant): ``(document, 0.0)``, or seconds until the
    earliest lease runs out (nothing taken)."""
    s = _slots(raw)
    s.holders = {k: v for k, v in s.holders.items() if v > now}
    if who in s.holders or len(s.holders) < lim.limit:
        s.holders[who] = now + float(lim.lease)  # type: ignore[arg-type]
        return _ENC.encode(s), 0.0
    return raw or _ENC.encode(s), max(0.01, min(s.holders.values()) - now)


def release_slot(raw: bytes | None, now: float, who: str) -> bytes | None:
    s = _slots(raw)
    s.holders = {k: v for k, v in s.holders.items() if v > now and k != who}
    return _ENC.encode(s) if s.holders else None


def withdraw(budget: RetryBudget, raw: bytes | None, now: float,
             deposits: int) -> tuple[bytes, bool]:
    """Add ``deposits`` first calls' worth of tokens, then take one for a retry if there
    is one: ``(document, allowed)``."""
    b = _bucket(raw, budget.burst, now)
    b.tokens = min(budget.burst, b.tokens + deposits * budget.ratio)
    b.at = now
    # Ten deposits of 0.1 add up to 0.9999999999999999: "10 % of calls" must still buy
    # the tenth call's retry.
    allowed = b.tokens >= 1 - 1e-9
    if allowed:
        b.tokens = max(0.0, b.tokens - 1)
    return _ENC.encode(b), allowed


def deposit(budget: RetryBudget, raw: bytes | None, now: float, deposits: int) -> bytes:
    b = _bucket(raw, budget.burst, now)
    b.tokens = min(budget.burst, b.tokens + deposits * budget.ratio)
    b.at = now
    return _ENC.encode(b)
