"""A child process for test_breaker_processes: asks one shared breaker for admission.

``python tests/breaker_worker.py DB NAME PROBE_LEASE`` opens the SQLite store DB and
answers commands read from stdin, one per line, with one line on stdout:

- ``admit KEY AT``: wait until the wall clock reads AT (so every worker asks at the same
  instant), call ``Resilience.admit`` for the breaker stored under KEY as caller NAME,
  and print ``probe``, ``allow`` or ``reject``;
- ``ok KEY``: report the last call admitted under KEY as a success; prints ``done``;
- ``quit``.
"""

from __future__ import annotations

import sys
import time

from crashsafe.exceptions import CircuitOpenError
from crashsafe.policies.breaker import CircuitBreaker
from crashsafe.policies.runtime import Resilience, Ticket
from crashsafe.stores.sqlite import SQLiteStore


def main() -> None:
    db, name, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = SQLiteStore(f"sqlite:///{db}")
    res = Resilience(store, f"worker-{name}", "localhost")
    cfg = CircuitBreaker("dep", consecutive_failures=1, open_for=60, probe_lease=lease)
    tickets: dict[str, Ticket] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "admit":
            key, at = args[0], float(args[1])
            while (left := at - time.time()) > 0.002:
                time.sleep(left - 0.002)
            while time.time() < at:
                pass
            try:
                ticket = res.admit(cfg, key, name)
            except CircuitOpenError:
                answer = "reject"
            else:
                tickets[key] = ticket
                answer = ticket.admission.value
            print(answer, flush=True)
        elif cmd == "ok":
            res.outcome(tickets.pop(args[0]), False)
            print("done", flush=True)
        elif cmd == "quit":
            break
    store.close()


if __name__ == "__main__":
    main()
