"""A grow-only pool of daemon threads for sync workflows.

Creating a thread costs far more than a step on a busy machine, so finished
workflow threads wait for the next workflow instead of exiting. The pool never
makes a workflow wait for another one to finish: with no idle thread, it starts a
new one. Threads are daemons so a waiting workflow (a long durable sleep) never
holds the process open; crash-only recovery resumes it in the next process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class WorkerThreads:
    def __init__(self, name: str = "crashsafe-wf") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._idle = 0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.started = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that idle thread is now promised this job
            else:
                self.started += 1
        if spawn:
            threading.Thread(target=self._loop, args=(job,), name=self._name,
                             daemon=True).start()
        else:
            self._jobs.put(job)

    def _loop(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
