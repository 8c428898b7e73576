"""A workload for the automatic-checkpoint kill -9 test, run as a child process.

``python tests/checkpoint_policy_worker.py DB WORKFLOWS STEPS``

Starts WORKFLOWS agent workflows (sync and async in turn, each with an automatic
checkpoint policy and a selective state) of STEPS steps, after recovering whatever a
killed predecessor left. Prints ``ready`` once recovery is done and ``done`` when every
workflow has finished. :func:`build` also serves the in-process reference run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import crashsafe

SELECT = crashsafe.Selective(essential=["task"], truncate={"messages": crashsafe.KeepLast(6)})
SYNC_POLICY = crashsafe.CheckpointPolicy(every_steps=3, select=SELECT)
ASYNC_POLICY = crashsafe.CheckpointPolicy(every_steps=2, select=SELECT)


def build(app: crashsafe.App, pause: float = 0.005) -> tuple[Any, Any]:
    @app.step(name="think")
    def think(task: str, turn: int) -> str:
        time.sleep(pause)
        return f"{task}: thought {turn}"

    @app.step(name="athink")
    async def athink(task: str, turn: int) -> str:
        await asyncio.sleep(pause)
        return f"{task}: thought {turn}"

    @app.workflow(name="agent", checkpoint=SYNC_POLICY)
    def agent(task: str, steps: int) -> int:
        state: dict[str, Any] = crashsafe.track({"task": task, "messages": [], "turn": 0})
        for turn in range(steps):
            state["messages"].append(think(task, turn))
            state["turn"] = turn
            crashsafe.record_usage(10 + turn, model="fake-1")
        return len(state["messages"])

    @app.workflow(name="aagent", checkpoint=ASYNC_POLICY)
    async def aagent(task: str, steps: int) -> int:
        messages: list[str] = []
        crashsafe.track(lambda: {"task": task, "messages": messages, "turn": len(messages)})
        for turn in range(steps):
            messages.append(await athink(task, turn))
        return len(messages)

    return agent, aagent


def start_all(app: crashsafe.App, agent: Any, aagent: Any, workflows: int,
              steps: int) -> list[Any]:
    return [app.start(aagent if n % 2 else agent, f"task-{n}", steps,
                      workflow_id=f"agent-{n:02d}") for n in range(workflows)]


def main() -> int:
    db, workflows, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    app = crashsafe.App(f"sqlite:///{db}")
    agent, aagent = build(app)
    handles = app.recover()
    print("ready", flush=True)
    known = {h.workflow_id for h in handles}
    for h in start_all(app, agent, aagent, workflows, steps):
        if h.workflow_id not in known:
            handles.append(h)
    for h in handles:
        h.result(timeout=120)
    print("done", flush=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
