"""Crash points, for the crash-point sweep (tests) and ``crashsafe chaos``.

Off unless the environment asks: ``CRASHSAFE_CRASH_AT=N`` makes the process SIGKILL
itself at the N-th crash point it reaches (counting from 1), and
``CRASHSAFE_CRASH_TRACE=PATH`` appends one line per point reached (its number and
label), which is how a sweep learns how many points a workload has. Crash points sit
before and after every store statement and commit (the commit is SQLite's fsync) and
around every step body (where external effects happen).
"""

from __future__ import annotations

import os
import signal
import threading

_AT = int(os.environ.get("CRASHSAFE_CRASH_AT", "0") or 0)
_TRACE = os.environ.get("CRASHSAFE_CRASH_TRACE") or None
ENABLED = bool(_AT or _TRACE)
_lock = threading.Lock()
_count = 0


def point(label: str) -> None:
    """Count one crash point; die here if this is the chosen one."""
    global _count
    with _lock:
        _count += 1
        n = _count
        if _TRACE is not None:
            with open(_TRACE, "a", encoding="utf-8") as f:
                f.write(f"{n} {label}\n")
    if n == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
