"""Distributed locks with fencing tokens, kept in the store.

``with app.lock("repo:main", ttl=30) as token: ...`` holds the lock ``repo:main``
across every process on the store. A holder that dies loses the lock when its ``ttl``
runs out (measured on the store's clock); a holder that only *paused* may wake up
believing it still holds it — which is why every acquisition gets a **fencing token**,
larger than any before it. Pass the token to the resource you protect and have it
refuse a token smaller than the largest it has seen (or check it with
:meth:`Lock.still_held` right before acting). Renew a long critical section with
:meth:`Lock.renew`.

Take locks inside steps, not in workflow code: acquiring is not journaled, so replay
would not see the same outcome.
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING

import msgspec

from .exceptions import ConfigurationError, CrashsafeError
from .policies.retry import seconds

if TYPE_CHECKING:
    from ._app import App


class LockTimeoutError(CrashsafeError, TimeoutError):
    """The lock was not acquired within the timeout."""


class LockLostError(CrashsafeError):
    """The lock is no longer held by this holder (its ttl ran out and another took it)."""


class _Doc(msgspec.Struct):
    holder: str | None = None
    until: float = 0.0
    token: int = 0


def _load(raw: bytes | None) -> _Doc:
    if raw is None:
        return _Doc()
    try:
        return msgspec.json.decode(raw, type=_Doc)
    except msgspec.DecodeError:
        return _Doc()  # unreadable: treated as free, the token restarts from 0


class Lock:
    """One holder's handle on a named lock; reusable after release."""

    def __init__(self, app: App, name: str, ttl: float, timeout: float | None) -> None:
        self.app = app
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self.holder = f"{app.executor_id}:{uuid.uuid4().hex[:8]}"
        self.token: int | None = None
        self._key = f"lock:{name}"

    def __repr__(self) -> str:
        return f"<crashsafe lock {self.name!r} token={self.token}>"

    def try_acquire(self) -> int | None:
        """Take the lock if it is free (or its ttl ran out); its new token, or None."""
        me, ttl = self.holder, self.ttl

        def take(raw: bytes | None, now: float) -> tuple[bytes | None, int | None]:
            doc = _load(raw)
            if doc.holder not in (None, me) and doc.until > now:
                return raw, None
            if doc.holder != me:
                doc.token += 1
            doc.holder, doc.until = me, now + ttl
            return msgspec.json.encode(doc), doc.token

        self.token = self.app.store.update_shared(self._key, take)
        return self.token

    def acquire(self) -> int:
        """Wait until the lock is taken (polling), or raise :class:`LockTimeoutError`."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = 0.01
        while (token := self.try_acquire()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"lock {self.name!r} was not free within {self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return token

    def renew(self) -> None:
        """Extend the ttl; raises :class:`LockLostError` if the lock was lost."""
        me, ttl, mine = self.holder, self.ttl, self.token

        def extend(raw: bytes | None, now: float) -> tuple[bytes | None, bool]:
            doc = _load(raw)
            if doc.holder != me or doc.token != mine or doc.until <= now:
                return raw, False
            doc.until = now + ttl
            return msgspec.json.encode(doc), True

        if not self.app.store.update_shared(self._key, extend):
            raise LockLostError(f"lock {self.name!r} (token {mine}) is no longer held")

    def still_held(self) -> bool:
        """Whether this holder still holds the lock under its token (a read)."""
        raw, now = self.app.store.read_shared(self._key)
        doc = _load(raw)
        return doc.holder == self.holder and doc.token == self.token and doc.until > now

    def release(self) -> None:
        """Free the lock if this holder still holds it (the token counter is kept)."""
        me = self.holder

        def free(raw: bytes | None, now: float) -> tuple[bytes | None, None]:
            doc = _load(raw)
            if doc.holder != me:
                return raw, None
            doc.holder, doc.until = None, 0.0
            return msgspec.json.encode(doc), None

        self.app.store.update_shared(self._key, free)
        self.token = None

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def make_lock(app: App, name: str, ttl: float | object, timeout: float | object) -> Lock:
    if not name or not isinstance(name, str):
        raise ConfigurationError("a lock needs a non-empty name")
    ttl_s = seconds(ttl, "lock ttl")  # type: ignore[arg-type]
    if not ttl_s:
        raise ConfigurationError("lock ttl must be positive")
    return Lock(app, name, ttl_s, seconds(timeout, "lock timeout"))  # type: ignore[arg-type]
