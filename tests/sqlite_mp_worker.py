"""One of several OS processes sharing one SQLite file (run by test_sqlite_store.py).

Usage: ``python sqlite_mp_worker.py URL PROCESS_NUMBER WORKFLOWS GO_FILE``. Waits for
GO_FILE to exist so every process opens the database at the same moment, runs
WORKFLOWS workflows concurrently, and prints their results as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import crashsafe

STEPS = 5


def expected(proc: int, i: int) -> list[int]:
    return [proc * 1000 + i * 10 + j for j in range(STEPS)]


def main() -> None:
    url, proc, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    deadline = time.monotonic() + 30
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the go file never appeared")
        time.sleep(0.005)

    app = crashsafe.App(url)

    @app.step(name="compute")
    def compute(p: int, i: int, j: int) -> int:
        return p * 1000 + i * 10 + j

    @app.workflow(name="mp")
    def mp(p: int, i: int) -> list[int]:
        return [compute(p, i, j) for j in range(STEPS)]

    handles = [app.start(mp, proc, i, workflow_id=f"p{proc}-w{i}") for i in range(count)]
    results = {h.workflow_id: h.result(timeout=60) for h in handles}
    app.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
