"""Who is alive: deciding which workflows are orphans that this process may take over.

A workflow is never taken from a live process. On the owner's own host, death is
seen at once: the owner's pid is gone, a zombie, or has another start time than when
it registered (a recycled pid). Everywhere, an owner whose heartbeat is older than the
lease is dead too (a paused or hung process; its late writes are refused by the
fencing tokens).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .stores.base import ExecutorRecord

HOSTNAME = socket.gethostname()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2:].split()


def process_start_marker(pid: int) -> str:
    """An opaque value that changes when ``pid`` is reused ('' when unknown)."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def pid_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X")  # a zombie has exited already
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir()  # /proc exists but had no entry: the pid is gone


def executor_alive(rec: ExecutorRecord | None, lease: float, now: float, *,
                   by_heartbeat: bool = True) -> bool:
    """Whether ``rec``'s process still holds its leases. ``by_heartbeat`` False: a late
    heartbeat proves nothing (the judge's own heartbeat just stalled), so only a
    stopped record or, on this host, a gone process counts as dead."""
    if rec is None or rec.stopped:
        return False
    fresh = not by_heartbeat or now - rec.heartbeat_at < lease
    if rec.hostname == HOSTNAME:
        if not pid_alive(rec.pid):
            return False
        marker = process_start_marker(rec.pid)
        if rec.pid_start and marker and marker != rec.pid_start:
            return False
        # A live pid that stopped heartbeating (SIGSTOP, a hang) has lost its leases
        # too: fencing makes taking its workflows safe.
        return fresh
    return fresh
