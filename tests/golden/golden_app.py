"""Reference workflows whose recorded journals are committed as golden files.

``journal_v1.sql`` was recorded from this code by ``make_golden.py``. CI replays it
against this module (must report no problem) and against ``golden_app_changed.py``
(must report the nondeterminism). If you change this file, the replay test tells
you whether old journals still replay; regenerate only for intended format changes.
"""

from __future__ import annotations

import os
from typing import Any

import crashsafe

app = crashsafe.App(os.environ.get("GOLDEN_DB", "memory://"))


@app.step(name="fetch_order")
def fetch_order(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "amount": 42.5, "items": ["kettle", "mug"]}


@app.step(name="classify")
def classify(text: str) -> str:
    return "refund" if "refund" in text else "question"


@app.step(name="refund")
def refund(order_id: str, amount: float) -> dict[str, Any]:
    return {"refund_id": f"rf-{order_id}", "amount": amount,
            "key": crashsafe.current().idempotency_key}


@app.step(name="notify")
async def notify(ticket_id: str) -> str:
    return f"sent:{ticket_id}"


@app.workflow(name="golden_child")
def golden_child(order_id: str) -> str:
    return fetch_order(order_id)["order_id"].lower()


@app.workflow(name="golden_ticket")
def golden_ticket(ticket: dict[str, Any]) -> dict[str, Any]:
    started = crashsafe.now()
    trace = crashsafe.uuid4()
    order = fetch_order(ticket["order_id"])
    label = classify(ticket["text"])
    refunded = refund(order["order_id"], order["amount"]) if label == "refund" else None
    crashsafe.sleep(0.01)
    child = app.start(golden_child, ticket["order_id"]).result()
    return {"label": label, "refund": refunded, "child": child,
            "trace_set": trace is not None, "started_set": started is not None}


@app.workflow(name="golden_async")
async def golden_async(ticket_id: str) -> str:
    await crashsafe.sleep_async(0.01)
    return await notify(ticket_id)


@app.workflow(name="golden_approval")
def golden_approval(amount: float) -> dict[str, Any]:
    decision = crashsafe.wait_for("approve", timeout=60)
    return {"amount": amount, "approved": bool(decision["approved"])}
