"""Distributed locks with fencing tokens, on every store kind."""

from __future__ import annotations

import threading
import time

import pytest

import crashsafe
from crashsafe import App


def test_one_holder_at_a_time_and_tokens_only_grow(app: App) -> None:
    inside: list[int] = []
    overlaps: list[int] = []
    tokens: list[int] = []
    guard = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            with app.lock("repo", ttl=5, timeout=20) as token:
                with guard:
                    inside.append(1)
                    if len(inside) > 1:
                        overlaps.append(len(inside))
                    tokens.append(token)
                time.sleep(0.002)
                with guard:
                    inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert tokens == sorted(tokens) and len(set(tokens)) == 20


def test_an_expired_holder_is_fenced_off(app: App) -> None:
    first = app.lock("deploy", ttl=0.2)
    token1 = first.acquire()
    assert first.still_held()
    time.sleep(0.3)  # the first holder "pauses" past its ttl
    second = app.lock("deploy", ttl=5)
    token2 = second.acquire()
    assert token2 > token1
    assert not first.still_held()
    with pytest.raises(crashsafe.LockLostError, match="no longer held"):
        first.renew()
    first.release()  # a stale release does not free the new holder's lock
    assert second.still_held()
    second.release()
    assert not second.still_held()


def test_timeout_and_reentry(app: App) -> None:
    holder = app.lock("busy", ttl=5)
    holder.acquire()
    assert holder.try_acquire() == holder.token  # the same holder re-takes its own lock
    waiter = app.lock("busy", ttl=5, timeout=0.2)
    with pytest.raises(crashsafe.LockTimeoutError, match="not free within"):
        waiter.acquire()
    holder.release()
    assert waiter.acquire() > 0


def test_bad_lock_arguments_are_clear_errors(app: App) -> None:
    with pytest.raises(crashsafe.ConfigurationError, match="non-empty name"):
        app.lock("")
    with pytest.raises(crashsafe.ConfigurationError, match="ttl must be positive"):
        app.lock("x", ttl=0)
