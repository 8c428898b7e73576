"""Child processes for the clock-skew tests (RELIABILITY.md R7).

``python tests/clock_worker.py victim DB``: starts workflow ``held`` whose step blocks,
heartbeating every 0.2 s; prints ``ready``.

``python tests/clock_worker.py skewed DB SECONDS [--own-clock]``: a worker on "another
host" whose wall clock is an hour ahead (``time.time`` shifted). For SECONDS it calls
``recover()`` every 0.1 s and prints ``claimed N`` at the end (and ``took <id>`` as soon
as it takes one). ``--own-clock`` makes it ignore the store's clock (the unsafe
behaviour the fix removes), as a control that the test can fail.
"""

from __future__ import annotations

import sys
import threading
import time

import crashsafe
import crashsafe._recovery

role, db = sys.argv[1], sys.argv[2]
gate = threading.Event()

if role == "skewed":
    real = time.time
    time.time = lambda: real() + 3600.0  # this process's wall clock is an hour ahead
    crashsafe._recovery.HOSTNAME = "another-host"  # liveness by heartbeat, not by pid

app = crashsafe.App(f"sqlite:///{db}", lease=2.0, heartbeat_interval=0.2,
                    recovery_interval=0.2)
if role == "skewed" and "--own-clock" in sys.argv:
    app._sync_clock = lambda: None  # type: ignore[method-assign]


@app.step(name="block")
def block() -> str:
    gate.wait(60)
    return "unblocked"


@app.workflow(name="held")
def held() -> str:
    return block()


if role == "victim":
    app.start(held, workflow_id="held-1")
    print("ready", flush=True)
    time.sleep(60)
else:
    deadline = time.monotonic() + float(sys.argv[3])
    taken = 0
    while time.monotonic() < deadline and not taken:
        app.recover()
        # The app's own background sweep may be the one that claims it: look at the
        # owner rather than at what this call returned.
        rec = app.store.get_workflow("held-1")
        if rec is not None and rec.owner == app.executor_id:
            taken += 1
            print("took", rec.id, flush=True)
        time.sleep(0.1)
    print("claimed", taken, flush=True)
    gate.set()
    app.close(timeout=1)
