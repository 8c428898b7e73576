"""The demo's customer-support agent, run in a child process that the demo kills.

Each ticket: look up the order (a tool), classify the message (a simulated LLM that
fails a few percent of calls with rate limits, 5xx errors and timeouts), decide on a
refund (another LLM call), ask a person when the refund is large (a durable wait the
demo's operator answers with a signal), issue the refund through a local payments
service, wait a durable cool-off timer, and send a reply.

The payments service and the reply outbox write to their own SQLite file, the
*ledger*, which crashsafe never touches: it is the independent witness the demo's
report checks. The payments service honours idempotency keys the way real payment
APIs do (a repeated key returns the first answer), and it records every call.

Run as ``python -m crashsafe.demo.agent --db URL --ledger PATH --run ID ...``; it
prints one JSON event per line on stdout. ``--latency-scale 0.1`` makes every simulated
delay ten times shorter, for ``crashsafe chaos``, which runs the agent many times.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sqlite3
import sys
import threading
import time
from typing import Any

import crashsafe
from crashsafe.policies.classify import DEFAULT_RULES

LABELS = ("refund", "order_status", "technical", "billing")
TEMPLATES = (
    ("refund", "The blender for order {o} arrived broken, I want my money back."),
    ("order_status", "Where is my order {o}? It has been two weeks."),
    ("technical", "The app crashes when I open the invoice for order {o}."),
    ("billing", "I was charged twice for order {o}, please check."),
    ("refund", "Order {o} never arrived. Please refund me."),
)

_emit_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields})
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def make_ticket(i: int) -> dict[str, Any]:
    _, text = TEMPLATES[i % len(TEMPLATES)]
    order = f"ORD-{1000 + i}"
    return {"id": f"T-{i:03d}", "order_id": order, "text": text.format(o=order)}


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "big")


def order_facts(order_id: str) -> dict[str, Any]:
    h = _h("order", order_id)
    return {
        "order_id": order_id,
        "amount": round(10 + (h % 19000) / 100, 2),
        "status": ("delivered", "shipped", "lost")[h % 3],
    }


def true_label(text: str) -> str:
    for label, template in TEMPLATES:
        head = template.split("{o}")[0]
        if text.startswith(head):
            return label
    return "technical"


def refund_rule(order: dict[str, Any], label: str) -> dict[str, Any]:
    if label == "refund" and order["status"] in ("delivered", "lost"):
        return {"refund": True, "amount": order["amount"], "reason": "eligible refund"}
    if label == "billing":
        return {"refund": True, "amount": round(order["amount"] / 2, 2), "reason": "double charge"}
    return {"refund": False, "amount": 0.0, "reason": "no refund needed"}


ESCALATE_ABOVE = 100.0  # refunds above this wait for a person's approval


def needs_person(decision: dict[str, Any]) -> bool:
    return bool(decision["refund"]) and float(decision["amount"]) > ESCALATE_ABOVE


def person_approves(amount: float) -> bool:
    """The demo's operator: approves escalated refunds up to 160, refuses larger ones."""
    return amount <= 160.0


def expected_result(ticket: dict[str, Any]) -> dict[str, Any]:
    """What an uninterrupted, fault-free run returns (the reply id aside)."""
    order = order_facts(ticket["order_id"])
    label = true_label(ticket["text"])
    decision = refund_rule(order, label)
    refunded = decision["amount"] if decision["refund"] else 0.0
    if needs_person(decision) and not person_approves(decision["amount"]):
        refunded = 0.0
    return {"ticket": ticket["id"], "label": label, "refunded": refunded}


MAX_LLM_ATTEMPTS = 8


class LLMError(Exception):
    """Base of the simulated provider errors."""


@crashsafe.register_exception
class RateLimited(LLMError):
    pass


@crashsafe.register_exception
class ServerError(LLMError):
    pass


@crashsafe.register_exception
class LLMTimeout(LLMError):
    pass


# How crashsafe's retry policies see the simulated provider errors (real openai /
# anthropic / httpx errors are classified without this).
crashsafe.register_classifier(RateLimited, crashsafe.FailureClass.RATE_LIMITED)
crashsafe.register_classifier(ServerError, crashsafe.FailureClass.SERVER_ERROR)
crashsafe.register_classifier(LLMTimeout, crashsafe.FailureClass.TIMEOUT)


class Ledger:
    """The payments service and reply outbox, in their own SQLite file."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, timeout=60, isolation_level=None,
                                     check_same_thread=False)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._conn.executescript(SCHEMA)

    def execution(self, workflow_id: str, index: int, step: str, attempt: int) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO executions (workflow_id, idx, step, attempt, pid, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (workflow_id, index, step, attempt, os.getpid(), time.time()),
            )

    def refund(self, key: str, order_id: str, amount: float) -> dict[str, Any]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT INTO payment_calls (key, order_id, amount, pid, at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, order_id, amount, os.getpid(), time.time()),
                )
                row = self._conn.execute("SELECT refund_id FROM refunds WHERE key = ?",
                                         (key,)).fetchone()
                if row is None:
                    refund_id = f"rf_{_h('refund', key) % 10**10:010d}"
                    self._conn.execute(
                        "INSERT INTO refunds (key, refund_id, order_id, amount, at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (key, refund_id, order_id, amount, time.time()),
                    )
                    replayed = False
                else:
                    refund_id, replayed = row[0], True
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return {"refund_id": refund_id, "idempotent_replay": replayed}

    def find_refund(self, key: str) -> dict[str, Any] | None:
        """The payments service's lookup by idempotency key (used to reconcile)."""
        with self._lock:
            row = self._conn.execute("SELECT refund_id FROM refunds WHERE key = ?",
                                     (key,)).fetchone()
        return None if row is None else {"refund_id": row[0], "idempotent_replay": True}

    def reply(self, key: str, ticket_id: str, text: str) -> str:
        with self._lock:
            self._conn.execute(
                "INSERT INTO replies (key, ticket_id, text, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (key, ticket_id, text, time.time()),
            )
        return f"msg_{_h('reply', key) % 10**10:010d}"


SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    workflow_id TEXT NOT NULL, idx INTEGER NOT NULL, step TEXT NOT NULL,
    attempt INTEGER NOT NULL, pid INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS payment_calls (
    key TEXT NOT NULL, order_id TEXT NOT NULL, amount REAL NOT NULL,
    pid INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (
    key TEXT PRIMARY KEY, refund_id TEXT NOT NULL, order_id TEXT NOT NULL,
    amount REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY, ticket_id TEXT NOT NULL, text TEXT NOT NULL, at REAL NOT NULL);
"""


def build(url: str, ledger_path: str, fault_rate: float, seed: int,
          latency_scale: float = 1.0) -> tuple[crashsafe.App, Any]:
    """The app and the support_ticket workflow, wired to one ledger.

    ``latency_scale`` multiplies every simulated delay: tool and LLM latency, retry
    back-off and the durable cool-off.
    """
    app = crashsafe.App(url)
    ledger = Ledger(ledger_path)
    rng = random.Random(seed ^ os.getpid())
    rng_lock = threading.Lock()
    first_step = threading.Event()
    # The simulated 429s carry no Retry-After: wait a short, scaled minimum instead of
    # the class's default second.
    rate_rule = dataclasses.replace(DEFAULT_RULES[crashsafe.FailureClass.RATE_LIMITED],
                                    min_delay=0.1 * latency_scale)
    llm_retry = crashsafe.RetryPolicy(max_attempts=MAX_LLM_ATTEMPTS,
                                      initial_delay=0.05 * latency_scale,
                                      max_delay=0.4 * latency_scale, retry_on=(LLMError,),
                                      rules={crashsafe.FailureClass.RATE_LIMITED: rate_rule})

    def body_started() -> None:
        cur = crashsafe.current()
        assert cur.step_index is not None and cur.step_name and cur.attempt
        if not first_step.is_set():
            first_step.set()
            emit("first_step", workflow_id=cur.workflow_id, step=cur.step_name)
        ledger.execution(cur.workflow_id, cur.step_index, cur.step_name, cur.attempt)

    def latency(lo: float, hi: float) -> None:
        with rng_lock:
            pause = rng.uniform(lo, hi)
        time.sleep(pause * latency_scale)

    def maybe_fail() -> None:
        with rng_lock:
            roll, kind = rng.random(), rng.randrange(3)
        if roll < fault_rate:
            raise (RateLimited("429 rate limited, retry after 0.1 s"),
                   ServerError("503 upstream overloaded"),
                   LLMTimeout("request timed out after 30 s"))[kind]

    @app.step(name="lookup_order")
    def lookup_order(order_id: str) -> dict[str, Any]:
        body_started()
        latency(0.02, 0.06)
        return order_facts(order_id)

    @app.step(name="classify", retry=llm_retry)
    def classify(text: str) -> str:
        body_started()
        latency(0.15, 0.4)
        maybe_fail()
        return true_label(text)

    @app.step(name="decide_refund", retry=llm_retry)
    def decide_refund(order: dict[str, Any], label: str) -> dict[str, Any]:
        body_started()
        latency(0.1, 0.25)
        maybe_fail()
        return refund_rule(order, label)

    def reconcile_refund(key: str, order_id: str, amount: float) -> Any:
        # After a crash cut the refund off: ask the payments service what happened.
        found = ledger.find_refund(key)
        return crashsafe.NOT_APPLIED if found is None else found

    @app.step(name="issue_refund", effect=True, reconcile=reconcile_refund)
    def issue_refund(order_id: str, amount: float) -> dict[str, Any]:
        body_started()
        latency(0.03, 0.08)
        key = crashsafe.current().idempotency_key
        assert key is not None
        return ledger.refund(key, order_id, amount)

    @app.step(name="send_reply")
    def send_reply(ticket_id: str, text: str) -> str:
        body_started()
        latency(0.02, 0.05)
        key = crashsafe.current().idempotency_key
        assert key is not None
        return ledger.reply(key, ticket_id, text)

    @app.workflow(name="support_ticket")
    def support_ticket(ticket: dict[str, Any]) -> dict[str, Any]:
        order = lookup_order(ticket["order_id"])
        label = classify(ticket["text"])
        decision = decide_refund(order, label)
        if needs_person(decision):
            # Too large to pay without a person: park until an operator answers.
            verdict = crashsafe.wait_for("approval", timeout=120)
            if not verdict["approved"]:
                decision = {"refund": False, "amount": 0.0,
                            "reason": f"refund refused by {verdict['by']}"}
        refunded = 0.0
        if decision["refund"]:
            issue_refund(order["order_id"], decision["amount"])
            refunded = decision["amount"]
        crashsafe.sleep(0.2 * latency_scale)  # durable cool-off before replying
        message = send_reply(ticket["id"], f"Re {order['order_id']}: {decision['reason']}")
        return {"ticket": ticket["id"], "label": label, "refunded": refunded, "reply": message}

    return app, support_ticket


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crashsafe.demo.agent")
    p.add_argument("--db", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--tickets", type=int, default=50)
    p.add_argument("--first-ticket", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--fault-rate", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-scale", type=float, default=1.0)
    a = p.parse_args(argv)
    app, support_ticket = build(a.db, a.ledger, a.fault_rate, a.seed, a.latency_scale)
    emit("started")
    slots = threading.Semaphore(a.concurrency)
    waiters: list[threading.Thread] = []

    def wait_for(handle: crashsafe.WorkflowHandle[Any]) -> None:
        try:
            handle.result()
        except crashsafe.CrashsafeError as exc:
            emit("ticket_error", workflow_id=handle.workflow_id, error=str(exc))
        finally:
            slots.release()

    def track(handle: crashsafe.WorkflowHandle[Any]) -> None:
        t = threading.Thread(target=wait_for, args=(handle,), daemon=True)
        t.start()
        waiters.append(t)

    recovered = app.recover()
    resumed_ids = {h.workflow_id for h in recovered}
    for handle in recovered:
        slots.acquire()
        emit("resumed", workflow_id=handle.workflow_id,
             recorded=len(app.journal(handle.workflow_id)))
        track(handle)
    for i in range(a.first_ticket, a.first_ticket + a.tickets):
        wid = f"{a.run}-T{i:03d}"
        existing = app.store.get_workflow(wid)
        if wid in resumed_ids or (existing is not None and existing.status.terminal):
            continue
        slots.acquire()
        track(app.start(support_ticket, make_ticket(i), workflow_id=wid))
    for t in waiters:
        t.join()
    emit("done")
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
