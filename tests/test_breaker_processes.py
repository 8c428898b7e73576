"""One breaker shared by real processes: exactly one half-open probe across all of them.

Four worker processes (tests/breaker_worker.py) share one SQLite file. Each round the
test stores an open breaker whose open period has elapsed and releases every worker at
the same wall-clock instant to ask for admission; exactly one may come back with the
probe. A prober killed with SIGKILL before it reports holds the probe only until its
lease runs out; then exactly one survivor gets it.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashsafe.policies import breaker as _b
from crashsafe.policies.breaker import BreakerState
from crashsafe.stores.sqlite import SQLiteStore
from helpers import wait_until

WORKER = str(Path(__file__).with_name("breaker_worker.py"))
WORKERS = 4
LEASE = 0.5


class Worker:
    def __init__(self, db: Path, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(db), name, str(LEASE)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                pytest.fail(f"worker {self.name} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            pytest.fail(f"worker {self.name} exited: {self.proc.stderr.read()}")
        return line.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "shared.db"
    SQLiteStore(f"sqlite:///{path}").close()  # create the schema once, before the workers
    return path


@pytest.fixture
def workers(db: Path) -> Iterator[list[Worker]]:
    started = [Worker(db, f"w{i}") for i in range(WORKERS)]
    try:
        for w in started:
            assert w.read() == "ready"
        yield started
    finally:
        for w in started:
            w.stop()


def store_open_breaker(db: Path, key: str) -> None:
    """An open breaker whose open period ended a second ago: the next admit may probe."""
    store = SQLiteStore(f"sqlite:///{db}")
    try:
        def put(raw: bytes | None, now: float) -> tuple[bytes, None]:
            doc = _b.Doc(state=BreakerState.OPEN.value, until=now - 1.0, trips=1,
                         changed_at=now - 61.0, changes=1, why="1 failures in a row")
            return _b.dump(doc), None
        store.update_shared(key, put)
    finally:
        store.close()


def read_breaker(db: Path, key: str) -> _b.Doc:
    store = SQLiteStore(f"sqlite:///{db}")
    try:
        return _b.load(store.read_shared(key)[0])
    finally:
        store.close()


def admit_all(ws: list[Worker], key: str) -> dict[str, str]:
    """Release every worker at the same instant to ask for admission."""
    at = time.time() + 0.05
    for w in ws:
        w.send(f"admit {key} {at}")
    return {w.name: w.read() for w in ws}


def probers(answers: dict[str, str]) -> list[str]:
    return [name for name, answer in answers.items() if answer == "probe"]


@pytest.mark.slow
def test_exactly_one_process_gets_the_half_open_probe(db: Path,
                                                      workers: list[Worker]) -> None:
    winners: set[str] = set()
    for r in range(20):
        key = f"breaker:dep-{r}"
        store_open_breaker(db, key)
        answers = admit_all(workers, key)
        assert len(probers(answers)) == 1, f"round {r}: {answers}"
        assert sorted(answers.values()) == ["probe"] + ["reject"] * (WORKERS - 1)
        (prober,) = probers(answers)
        winners.add(prober)
        doc = read_breaker(db, key)
        assert (doc.state, doc.probe) == (BreakerState.HALF_OPEN, prober)
    # Not a guarantee, but with every process released at once over 20 rounds the
    # probe should not always land on the same one; if it did, they were not racing.
    assert len(winners) > 1, f"one process won all 20 rounds: {winners}"


@pytest.mark.slow
def test_a_killed_prober_holds_the_probe_only_until_its_lease_runs_out(
        db: Path, workers: list[Worker]) -> None:
    key = "breaker:dep"
    store_open_breaker(db, key)
    answers = admit_all(workers, key)
    assert len(probers(answers)) == 1, answers
    (dead,) = probers(answers)
    os.kill(next(w for w in workers if w.name == dead).proc.pid, signal.SIGKILL)
    held = read_breaker(db, key)
    assert held.probe == dead
    survivors = [w for w in workers if w.name != dead]

    assert set(admit_all(survivors, key).values()) == {"reject"}, (
        "the dead prober's lease still holds")
    taken: list[dict[str, str]] = []

    def someone_probes() -> bool:
        taken.append(admit_all(survivors, key))
        return bool(probers(taken[-1]))

    wait_until(someone_probes, timeout=10, what="a survivor to take over the probe")
    assert len(probers(taken[-1])) == 1, taken[-1]
    (new,) = probers(taken[-1])
    doc = read_breaker(db, key)
    assert (doc.state, doc.probe) == (BreakerState.HALF_OPEN, new)
    granted_at = doc.probe_until - LEASE
    assert granted_at >= held.probe_until, "the probe moved before the dead one's lease ran out"

    # The new prober succeeds: the breaker closes for every process.
    worker = next(w for w in survivors if w.name == new)
    worker.send(f"ok {key}")
    assert worker.read() == "done"
    assert read_breaker(db, key).state == BreakerState.CLOSED
    assert set(admit_all(survivors, key).values()) == {"allow"}
