"""A child process for the dashboard's timeline test.

``python tests/dashboard_worker.py URL crash`` starts workflow ``K-1``: its step's
first attempt fails with a timeout, its second kills this process with SIGKILL.
``python tests/dashboard_worker.py URL recover`` takes the workflow over, finishes it
and prints its result.
"""

from __future__ import annotations

import os
import signal
import sys

import crashsafe

url, mode = sys.argv[1], sys.argv[2]
app = crashsafe.App(url)


@app.step(name="call_llm", retry=crashsafe.RetryPolicy(max_attempts=4, initial_delay=0.05,
                                                      jitter=False))
def call_llm() -> str:
    attempt = crashsafe.current().attempt or 0
    if attempt == 1:
        raise TimeoutError("the model took too long")
    if attempt == 2 and mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return f"answered at attempt {attempt}"


@app.workflow(name="killed_story")
def killed_story() -> str:
    return call_llm()


if mode == "crash":
    app.start(killed_story, workflow_id="K-1").result(timeout=30)
else:
    app.recover()
    print(app.handle("K-1").result(timeout=30))
    app.close()
