"""Retention: rows and bytes before and after ``crashsafe gc``, and reuse of the space.

Fills a fresh SQLite file with WORKFLOWS finished 20-turn agents (each turn appends a
~2 KB message of random words, so compression cannot hide the size; checkpointed every
turn, a full snapshot every 10), half of them backdated by two days. Then, each as the
real command in a child process:

1. ``crashsafe gc --keep-checkpoints KEEP``: each workflow keeps the state of its last
   KEEP checkpoints (the oldest kept one rewritten as a full snapshot);
2. ``crashsafe gc --older-than 1d``: the backdated half is dropped;
3. the same number of new workflows again: the file grows by less than the first
   round did, because they reuse the freed pages.

Prints the store's own figures (``usage()``: rows per table, bytes of pages in use,
free pages, file + WAL) after each stage, as JSON lines.

    python bench/bench_retention.py --workflows 200 [--turns 20] [--keep 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import crashsafe
from crashsafe.stores.sqlite import SQLiteStore

WORDS = [f"w{i}" for i in range(5000)]


def fill(url: str, count: int, prefix: str, seed: int, turns: int) -> None:
    rng = random.Random(seed)
    app = crashsafe.App(url)

    @app.step(name="llm")
    def llm(turn: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(400))  # ~2 KB

    @app.workflow(name="agent")
    def agent(turns: int) -> int:
        messages: list[str] = []
        for turn in range(turns):
            messages.append(llm(turn))
            crashsafe.checkpoint({"messages": messages, "turn": turn})
        return turns

    for i in range(count):
        app.start(agent, turns, workflow_id=f"{prefix}{i}").result(timeout=60)
    app.close()


def usage(path: Path) -> dict[str, Any]:
    store = SQLiteStore(f"sqlite:///{path}")
    try:
        out: dict[str, Any] = store.usage()
    finally:
        store.close()
    conn = sqlite3.connect(path)
    out["checkpoint_payload_bytes"] = conn.execute(
        "SELECT COALESCE(sum(length(output)), 0) FROM journal WHERE kind = 'checkpoint'"
    ).fetchone()[0]
    conn.close()
    return out


def gc(path: Path, *args: str) -> dict[str, Any]:
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{path}", "gc",
                          *args, "--json"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"crashsafe gc {' '.join(args)} failed: {res.stderr}")
    report: dict[str, Any] = json.loads(res.stdout)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["after"] = usage(path)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--keep", type=int, default=3)
    opts = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="crashsafe-retention-")) / "agent.db"
    half = opts.workflows // 2
    fill(f"sqlite:///{path}", half, "old-", opts.seed, opts.turns)
    fill(f"sqlite:///{path}", opts.workflows - half, "new-", opts.seed + 1, opts.turns)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE workflows SET updated_at = updated_at - 172800 "
                     "WHERE id LIKE 'old-%'")
    conn.close()
    stages: list[tuple[str, Any]] = [("filled", usage(path))]
    keep = gc(path, "--keep-checkpoints", str(opts.keep))
    stages.append((f"gc --keep-checkpoints {opts.keep}", keep))
    drop = gc(path, "--older-than", "1d")
    stages.append(("gc --older-than 1d", drop))
    fill(f"sqlite:///{path}", half, "again-", opts.seed + 2, opts.turns)
    stages.append((f"{half} new workflows after gc", usage(path)))
    for name, data in stages:
        print(json.dumps({"stage": name, **data}))


if __name__ == "__main__":
    main()
