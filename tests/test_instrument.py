"""The engine's hooks: OpenTelemetry spans (the real SDK, in-memory exporter), the trace
carried across a real kill -9, structured JSON logs without secrets, and the Prometheus
exposition (parsed with prometheus_client's own parser) and its server.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

import crashsafe
from crashsafe import App, RetryPolicy, _instrument
from crashsafe._errors import error_payload, pin_class
from crashsafe.observe import prometheus
from crashsafe.observe.logs import JsonFormatter
from crashsafe.observe.otel import parse_traceparent, stamped
from crashsafe.policies.classify import classify
from crashsafe.stores.base import (
    AttemptRecord,
    CreateWorkflow,
    JournalEntry,
    Op,
    Status,
    WorkflowRecord,
)
from trace_worker import WORKFLOW_ID, define

HERE = Path(__file__).resolve().parent
FAST = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.001)


@pytest.fixture(params=["direct", "start_span"])
def traced(request: pytest.FixtureRequest,
           tmp_path: Path) -> Iterator[tuple[App, InMemorySpanExporter]]:
    """An app tracing into memory; spans recorded straight into the SDK's processors,
    or through the API's start_span (the path for tracers other than the SDK's)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App(f"sqlite:///{tmp_path / 'traced.db'}", tracing=provider)
    assert app._tracer()._direct is not None
    if request.param == "start_span":
        app._tracer()._direct = None
    yield app, exporter
    if not app._closing.is_set():
        app.close()


def _spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# -- spans ------------------------------------------------------------------------------------
def test_spans_of_a_workflow_nest_and_carry_their_attributes(
        traced: tuple[App, InMemorySpanExporter]) -> None:
    app, exporter = traced
    calls = {"n": 0}

    @app.step(retry=FAST, name="flaky")
    def flaky(x: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("the model took too long")
        return x * 2

    @app.step(name="plain")
    def plain(x: int) -> int:
        return x + 1

    @app.workflow(name="agent")
    def agent(x: int) -> int:
        crashsafe.checkpoint({"messages": ["hi"]}, label="turn-1")
        crashsafe.sleep(0.01)
        return plain(flaky(x))

    tracer = trace_api.get_tracer("caller", tracer_provider=app.tracing)
    with tracer.start_as_current_span("http request") as caller:
        handle = app.start(agent, 5, workflow_id="W-1")
    assert handle.result(timeout=10) == 11
    app.close()
    spans = _spans(exporter)
    assert {s.name for s in spans} == {
        "http request", "start agent", "workflow agent", "checkpoint turn-1", "sleep",
        "step flaky", "attempt 1", "attempt 2", "step plain"}
    trace_id, caller_id = caller.get_span_context().trace_id, caller.get_span_context().span_id
    assert all(_ids(s)[0] == trace_id for s in spans), "one trace from the caller down"

    start, run = _one(spans, "start agent"), _one(spans, "workflow agent")
    assert _parent(start) == caller_id
    assert _parent(run) == _ids(start)[1]
    assert start.attributes == {"crashsafe.workflow.name": "agent",
                                "crashsafe.workflow.id": "W-1"}
    assert run.attributes is not None
    assert run.attributes["crashsafe.workflow.id"] == "W-1"
    assert run.attributes["crashsafe.workflow.name"] == "agent"
    assert run.attributes["crashsafe.run.resumed"] is False
    assert run.attributes["crashsafe.outcome"] == "ok"
    assert run.status.status_code is StatusCode.UNSET

    for name in ("checkpoint turn-1", "sleep", "step flaky", "step plain"):
        assert _parent(_one(spans, name)) == _ids(run)[1], name
    step = _one(spans, "step flaky")
    assert step.attributes == {"crashsafe.step.index": 2, "crashsafe.step.name": "flaky",
                               "crashsafe.step.attempts": 2, "crashsafe.outcome": "ok"}
    first, second = _one(spans, "attempt 1"), _one(spans, "attempt 2")
    assert _parent(first) == _parent(second) == _ids(step)[1]
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["crashsafe.attempt"] == 1
    assert first.attributes["crashsafe.outcome"] == "error"
    assert first.attributes["crashsafe.failure_class"] == "timeout"
    assert first.attributes["error.type"] == "TimeoutError"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["crashsafe.attempt"] == 2
    assert second.attributes["crashsafe.outcome"] == "ok"
    assert "crashsafe.failure_class" not in second.attributes
    # Times come from the records: attempts inside their step, in order, inside the run.
    assert step.start_time is not None and step.end_time is not None
    assert first.start_time is not None and second.end_time is not None
    assert step.start_time <= first.start_time <= second.start_time <= step.end_time
    assert run.start_time is not None and run.end_time is not None
    assert run.start_time <= step.start_time and step.end_time <= run.end_time
    plain_span = _one(spans, "step plain")
    assert plain_span.attributes is not None
    assert plain_span.attributes["crashsafe.step.attempts"] == 1
    checkpoint = _one(spans, "checkpoint turn-1")
    assert checkpoint.attributes is not None
    assert checkpoint.attributes["crashsafe.checkpoint.bytes"] > 0
    sleep = _one(spans, "sleep")
    assert sleep.end_time is not None and sleep.start_time is not None
    assert sleep.end_time - sleep.start_time >= 5_000_000  # 10 ms asked (clock jitter)


def test_a_failed_step_and_workflow_are_error_spans_without_the_secret(
        traced: tuple[App, InMemorySpanExporter]) -> None:
    app, exporter = traced
    canary = "sk-proj-CANARY0123456789abcdef"

    @app.step(name="charge")
    def charge(order: str) -> str:
        raise ValueError(f"card declined for {order}; api_key={canary}")

    @app.workflow(name="billing")
    def billing(order: str) -> str:
        return charge(order)

    with pytest.raises(ValueError, match="card declined"):
        app.start(billing, "o-1", workflow_id="B-1").result(timeout=10)
    app.close()
    spans = _spans(exporter)
    step, run = _one(spans, "step charge"), _one(spans, "workflow billing")
    assert step.status.status_code is StatusCode.ERROR
    assert step.attributes is not None
    assert step.attributes["crashsafe.outcome"] == "error"
    assert step.attributes["crashsafe.failure_class"] == classify(ValueError()).cls.value
    assert step.attributes["error.type"] == "ValueError"
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["crashsafe.outcome"] == "error"
    text = repr([(s.name, s.attributes, s.status.description, s.events) for s in spans])
    assert "card declined" in text  # the description is there ...
    assert canary not in text and "CANARY0123" not in text  # ... the key is not


def test_a_run_span_is_current_for_the_workflow_code(
        traced: tuple[App, InMemorySpanExporter]) -> None:
    app, exporter = traced
    tracer = trace_api.get_tracer("user", tracer_provider=app.tracing)

    @app.step(name="llm")
    def llm(prompt: str) -> str:
        with tracer.start_as_current_span("openai.chat"):
            return prompt.upper()

    @app.workflow(name="chat")
    async def chat(prompt: str) -> str:
        return await llm_async(prompt)

    @app.step(name="llm_async")
    async def llm_async(prompt: str) -> str:
        with tracer.start_as_current_span("anthropic.messages"):
            return prompt[::-1]

    @app.workflow(name="chat_sync")
    def chat_sync(prompt: str) -> str:
        return llm(prompt)

    assert app.start(chat_sync, "hi").result(timeout=10) == "HI"
    assert app.start(chat, "ab").result(timeout=10) == "ba"
    app.close()
    spans = _spans(exporter)
    for user, run in (("openai.chat", "workflow chat_sync"),
                      ("anthropic.messages", "workflow chat")):
        assert _parent(_one(spans, user)) == _ids(_one(spans, run))[1]
        assert _ids(_one(spans, user))[0] == _ids(_one(spans, run))[0]


def test_no_tracing_means_no_stamp_and_no_spans(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App(f"sqlite:///{tmp_path / 'off.db'}", tracing=False)

    @app.workflow(name="quiet")
    def quiet() -> int:
        return 1

    assert app.start(quiet, workflow_id="Q").result(timeout=10) == 1
    assert stamped(app.get_workflow("Q").inputs) is None
    assert app.start(quiet, workflow_id="Q").result(timeout=10) == 1
    app.close()
    assert _spans(exporter) == []


def test_the_stamp_does_not_change_the_arguments(
        traced: tuple[App, InMemorySpanExporter]) -> None:
    app, _ = traced

    @app.workflow(name="args")
    def args(a: int, *rest: str, trace: str = "mine", **kw: Any) -> list[Any]:
        return [a, list(rest), trace, kw]

    handle = app.start(args, 1, "x", trace="user value", extra={"trace": "also"},
                       workflow_id="A-1")
    assert handle.result(timeout=10) == [1, ["x"], "user value", {"extra": {"trace": "also"}}]
    inputs = app.get_workflow("A-1").inputs
    sc = parse_traceparent(stamped(inputs))
    assert sc is not None and sc.is_valid  # ours, beside the user's own "trace" keyword
    assert stamped(b'{"args":[],"kwargs":{"trace":"00-x"}}') is None


# -- the trace across kill -9 ------------------------------------------------------------------
@pytest.mark.slow
def test_the_trace_continues_after_kill_9_in_another_process(tmp_path: Path) -> None:
    db, lines, gate = tmp_path / "kill.db", tmp_path / "spans.jsonl", tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, str(HERE / "trace_worker.py"), str(db),
                             str(lines), str(gate)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "blocked", proc.stderr and proc.stderr.read()
        # The span of "first" is reported while "second" blocks: by the reporting thread,
        # once it has waited SWEEP_S (a lone step result waits for company until then).
        deadline = time.monotonic() + 10
        while '"step first"' not in (lines.read_text() if lines.exists() else ""):
            assert time.monotonic() < deadline, "the step span was never reported"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    before = [json.loads(line) for line in lines.read_text().splitlines()]
    start = next(s for s in before if s["name"] == "start trace_wf")
    assert not any(s["name"] == "workflow trace_wf" for s in before)  # died with it
    assert [s["name"] for s in before if s["name"].startswith("step")] == ["step first"]

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App(f"sqlite:///{db}", tracing=provider)
    define(app, gate)
    gate.touch()
    resumed = app.recover()
    assert [h.workflow_id for h in resumed] == [WORKFLOW_ID]
    assert resumed[0].result(timeout=30) == 50
    app.close()
    spans = _spans(exporter)
    run = _one(spans, "workflow trace_wf")
    trace_id, run_id = _ids(run)
    assert f"{trace_id:032x}" == start["trace_id"], "the resumed run continues the trace"
    assert f"{_parent(run):016x}" == start["span_id"], "under the same start span"
    assert run.attributes is not None
    assert run.attributes["crashsafe.run.resumed"] is True
    assert run.attributes["crashsafe.run.token"] >= 1
    assert run.attributes["crashsafe.run.replayed"] == 1  # step "first" was not run again
    second = _one(spans, "step second")
    assert _ids(second)[0] == trace_id and _parent(second) == run_id
    assert not [s for s in spans if s.name == "step first"]


# -- logs ---------------------------------------------------------------------------------------
@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("crashsafe")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_json_logs_carry_ids_and_never_a_secret(tmp_path: Path,
                                                json_lines: io.StringIO) -> None:
    canary = "sk-ant-api03-CANARYsecret0123456789"
    password = "hunter2-CANARY"
    app = App(f"sqlite:///{tmp_path / 'logs.db'}", tracing=False)
    calls = {"n": 0}

    @app.step(retry=FAST, name="call_llm")
    def call_llm(prompt: str) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError(f"upstream reset; Authorization: Bearer {canary}")
        return prompt

    @app.step(name="login")
    def login(user: str) -> str:
        raise PermissionError(f"login failed for {user} with password={password}")

    @app.workflow(name="support")
    def support(prompt: str) -> str:
        logging.getLogger("crashsafe.user").info(
            "calling out", extra={"api_key": canary, "workflow_id": "S-1"})
        call_llm(prompt)
        return login(f"postgresql://bob:{password}@db/agents")

    with pytest.raises(PermissionError):
        app.start(support, "hello", workflow_id="S-1").result(timeout=10)
    app.close()
    raw = json_lines.getvalue()
    assert canary not in raw and "CANARYsecret" not in raw
    assert password not in raw and "hunter2" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]
    ours = [d for d in lines if d.get("workflow_id") == "S-1"]
    assert all(d["logger"].startswith("crashsafe") for d in ours)
    messages = [d["message"] for d in ours]
    assert "workflow S-1 started" in messages
    retry = next(d for d in ours if "attempt 1 failed" in d["message"])
    assert (retry["step"], retry["step_index"], retry["attempt"]) == ("call_llm", 0, 1)
    assert retry["failure_class"] == "server_error"
    assert retry["level"] == "INFO"
    assert "trace_id" not in retry  # this app does not trace
    done = next(d for d in ours if d["message"].startswith("step 'call_llm' (index 0) finished"))
    assert done["attempt"] == 2 and done["level"] == "DEBUG"
    failed = next(d for d in ours if d["message"].startswith("step 'login'"))
    assert failed["level"] == "WARNING" and failed["step_index"] == 1
    assert "login failed" in failed["message"]
    end = next(d for d in ours if d.get("outcome") == "error")
    assert end["level"] == "WARNING" and end["message"].startswith("workflow S-1 failed")
    user = next(d for d in lines if d["message"] == "calling out")
    assert user["api_key"] == "***"
    assert all(d["time"].endswith("Z") for d in lines)


def test_log_lines_carry_the_trace_id_when_tracing(
        traced: tuple[App, InMemorySpanExporter], json_lines: io.StringIO) -> None:
    app, exporter = traced

    @app.workflow(name="logged")
    def logged() -> int:
        return 3

    app.start(logged, workflow_id="L-1").result(timeout=10)
    app.close()
    run = _one(_spans(exporter), "workflow logged")
    lines = [json.loads(x) for x in json_lines.getvalue().splitlines()]
    started = next(d for d in lines if d["message"] == "workflow L-1 started")
    assert started["trace_id"] == f"{_ids(run)[0]:032x}"
    assert started["span_id"] == f"{_ids(run)[1]:016x}"


# -- Prometheus ----------------------------------------------------------------------------
def _samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
         **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _failure(cls: str) -> bytes:
    exc = ValueError(f"a {cls} failure")
    pin_class(exc, cls)
    return error_payload(exc)


def _craft(app: App) -> None:
    """Three workflows of two names, recorded within the last few minutes."""
    t = app.store.clock() - 300
    null = b"null"

    def wf(wid: str, name: str, status: Status, start: float, end: float) -> Op:
        return CreateWorkflow(WorkflowRecord(wid, name, "1", status, null, t + start,
                                             t + end, output=null))

    batches: list[list[Op]] = [
        # s-1: "support", succeeded; "llm" took 3 attempts (retry delays 4 and 2 s).
        [wf("s-1", "support", Status.SUCCEEDED, 0, 60),
         JournalEntry("s-1", 0, "step", "fetch", null, None, 1, t + 1, t + 2),
         JournalEntry("s-1", 1, "step", "llm", null, None, 3, t + 10, t + 20),
         AttemptRecord("s-1", 1, 1, "llm", t + 10, t + 11, "rate_limited", None, 4.0,
                       "backoff", t + 15),
         AttemptRecord("s-1", 1, 2, "llm", t + 15, t + 16, "server_error", None, 2.0,
                       "backoff", t + 18),
         AttemptRecord("s-1", 1, 3, "llm", t + 18, t + 20)],
        # s-2: "support", failed at its first attempt with a bad request.
        [wf("s-2", "support", Status.FAILED, 100, 110),
         JournalEntry("s-2", 0, "step", "llm", None, _failure("bad_request"), 1, t + 101,
                      t + 102)],
        # c-1: "coder", succeeded; one step and a 100-byte checkpoint.
        [wf("c-1", "coder", Status.SUCCEEDED, 200, 230),
         JournalEntry("c-1", 0, "step", "build", null, None, 1, t + 201, t + 205),
         JournalEntry("c-1", 1, "checkpoint", "checkpoint", b'"' + b"a" * 98 + b'"', None, 1,
                      t + 206, t + 206)],
    ]
    assert app.store.apply(batches) == [None] * len(batches)


def test_exposition_of_a_crafted_journal(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path / 'prom.db'}", tracing=False)
    _craft(app)
    body, ctype = prometheus.exposition(app.store, window=3600)
    app.close()
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    m = _samples(body)
    assert _get(m, "crashsafe_window_seconds") == 3600
    assert _get(m, "crashsafe_workflows", workflow="", status="succeeded") == 2
    assert _get(m, "crashsafe_workflows", workflow="", status="failed") == 1
    assert _get(m, "crashsafe_workflows", workflow="support", status="failed") == 1
    assert _get(m, "crashsafe_workflows", workflow="coder", status="succeeded") == 1
    # Step calls fetch, llm, llm | build: one of four retried.
    assert _get(m, "crashsafe_step_calls", workflow="") == 4
    assert _get(m, "crashsafe_retry_rate", workflow="") == pytest.approx(0.25)
    assert _get(m, "crashsafe_retry_rate", workflow="support") == pytest.approx(1 / 3)
    assert _get(m, "crashsafe_retry_rate", workflow="coder") == 0
    assert _get(m, "crashsafe_success_after_retry_rate", workflow="") == 1
    assert _get(m, "crashsafe_average_retry_delay_seconds", workflow="") == pytest.approx(3)
    for cls in ("rate_limited", "server_error", "bad_request"):
        assert _get(m, "crashsafe_failed_attempts_by_class", workflow="",
                    failure_class=cls) == 1
    # Step latencies 1, 10, 1 | 4: p50 is the 2nd of 1, 1, 4, 10; the max 10.
    assert _get(m, "crashsafe_step_latency_seconds", workflow="", quantile="0.5") == 1
    assert _get(m, "crashsafe_step_latency_seconds", workflow="", quantile="1") == 10
    assert _get(m, "crashsafe_checkpoint_bytes_per_task", workflow="") == 100
    assert _get(m, "crashsafe_checkpoint_bytes_per_task", workflow="support") is None
    assert _get(m, "crashsafe_state_consistency", workflow="") == 1
    assert _get(m, "crashsafe_recovery_success_rate", workflow="") is None  # no data: absent
    # Alerts: the retry rate (25 % > 10 %) fires, and only it.
    assert _get(m, "crashsafe_check", check="retry_rate", status="alert") == 1
    assert _get(m, "crashsafe_check_value", check="retry_rate") == pytest.approx(0.25)
    assert _get(m, "crashsafe_check_threshold", check="retry_rate") == pytest.approx(0.1)
    assert _get(m, "crashsafe_check", check="success_after_retry", status="ok") == 1
    assert _get(m, "crashsafe_check", check="recovery_time_max_approx",
                status="no_data") == 1
    assert _get(m, "crashsafe_alerts") == 1
    # Nothing happened in the last minute.
    reader = App(f"sqlite:///{tmp_path / 'prom.db'}")
    later = _samples(prometheus.exposition(reader.store, window=60)[0])
    reader.close()
    assert _get(later, "crashsafe_step_calls", workflow="") == 0
    assert _get(later, "crashsafe_alerts") == 0


@pytest.fixture
def counting() -> Iterator[prometheus.Counters]:
    yield prometheus.instrument()
    prometheus.uninstrument()


def test_in_process_counters_follow_the_hooks(tmp_path: Path,
                                              counting: prometheus.Counters) -> None:
    assert prometheus.instrument() is counting
    app = App(f"sqlite:///{tmp_path / 'count.db'}", tracing=False)
    calls = {"n": 0}

    @app.step(retry=FAST, name="flaky_c")
    def flaky_c(x: int) -> int:
        calls["n"] += 1
        if calls["n"] % 2:
            raise TimeoutError("slow")
        return x

    @app.workflow(name="counted_wf")
    def counted_wf(x: int) -> int:
        crashsafe.checkpoint({"x": x})
        return flaky_c(x)

    for i in range(3):
        assert app.start(counted_wf, i).result(timeout=10) == i
    body, _ = prometheus.exposition(app.store)
    app.close()
    m = _samples(body)
    wf = "counted_wf"
    prometheus.uninstrument()
    reader = App(f"sqlite:///{tmp_path / 'count.db'}")
    assert b"crashsafe_steps_total" not in prometheus.exposition(reader.store)[0]
    reader.close()
    assert _get(m, "crashsafe_workflow_runs_total", workflow=wf, resumed="false") == 3
    assert _get(m, "crashsafe_workflow_runs_ended_total", workflow=wf, outcome="ok") == 3
    assert _get(m, "crashsafe_steps_total", workflow=wf, step="flaky_c", outcome="ok") == 3
    assert _get(m, "crashsafe_step_attempts_total", workflow=wf, step="flaky_c") == 6
    assert _get(m, "crashsafe_attempt_failures_total", workflow=wf, step="flaky_c",
                failure_class="timeout") == 3
    assert _get(m, "crashsafe_checkpoints_total", workflow=wf) == 3
    assert _get(m, "crashsafe_checkpoint_write_seconds_count", workflow=wf) == 3
    assert _get(m, "crashsafe_step_duration_seconds_count", workflow=wf, step="flaky_c") == 3


def test_worker_serves_metrics_on_its_port(tmp_path: Path) -> None:
    module = tmp_path / "served_app.py"
    module.write_text(
        "import crashsafe\n"
        "app = crashsafe.App()\n"
        "@app.workflow(name='served')\n"
        "def served(x: int) -> int:\n"
        "    return x\n")
    url = f"sqlite:///{tmp_path / 'served.db'}"
    app = App(url, tracing=False)

    @app.workflow(name="served")
    def served(x: int) -> int:
        return x

    for i in range(2):
        app.start(served, i).result(timeout=10)
    app.close()
    proc = subprocess.Popen([sys.executable, "-m", "crashsafe", "worker", str(module),
                             "--db", url, "--metrics-port", "0", "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        assert proc.stdout is not None
        address = None
        deadline = time.monotonic() + 30
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("metrics at "):
                address = line.split()[-1]
        assert address is not None and address.startswith("http://127.0.0.1:"), \
            proc.stderr and proc.stderr.read()
        with urllib.request.urlopen(address, timeout=30) as resp:
            assert resp.status == 200
            assert "version=0.0.4" in resp.headers["Content-Type"]
            m = _samples(resp.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert _get(m, "crashsafe_workflows", workflow="served", status="succeeded") == 2
    assert _get(m, "crashsafe_recovery_claims_total") == 0
    assert _get(m, "crashsafe_alerts") is not None


def test_a_bad_log_format_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "crashsafe", "worker", "nowhere.py",
                           "--log-format", "xml"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "json" in proc.stderr + proc.stdout


# -- the extras --------------------------------------------------------------------------------
def test_tracing_and_metrics_without_their_extra_name_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("opentelemetry", "opentelemetry.trace"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(crashsafe.ConfigurationError, match=r"crashsafe\[otel\]"):
        App(f"sqlite:///{tmp_path / 'x.db'}", tracing=True)
    app = App(f"sqlite:///{tmp_path / 'x.db'}")  # the default: no tracing, no error

    @app.workflow(name="plain_wf")
    def plain_wf() -> int:
        return 1

    assert app.start(plain_wf).result(timeout=10) == 1
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(crashsafe.ConfigurationError, match=r"crashsafe\[prometheus\]"):
        prometheus.exposition(app.store)
    app.close()


def test_the_default_traces_only_under_a_global_provider(tmp_path: Path) -> None:
    from crashsafe.observe import otel

    assert otel.auto_provider() is None  # this test process never sets one
    app = App(f"sqlite:///{tmp_path / 'auto.db'}")
    assert app.tracing is None and app._tracer() is None
    app.close()


# -- the fast path of redact_text (log lines go through it) --------------------------------------
@pytest.mark.parametrize("text", [
    "Authorization: Bearer abcdefghijkl", "proxy-authorization=Basic xyz",
    "bearer abcdefghijklmnop", "postgres://u:pw@h/db", "sk-ant-api03-abcdefghijklmnop",
    "ghp_abcdefghijklmnopqrstuvwxyz", "github_pat_abcdefghijklmnopqrstuv",
    "AKIAABCDEFGHIJKLMNOP", "ASIAABCDEFGHIJKLMNOP", "AIzaSyA-abcdefghijklmnopqrstuvwxyz123456",
    "xoxb-1234567890-abc", "eyJhbGciOi.eyJzdWIiOi.signature", "password=hunter2",
    "PASSWD: x", "pwd=1", "passphrase: 'a b'", "client_secret=abc", "API-KEY: abc",
    "apikey=abc", "x_api_key=abc", "token=abc", "access_key=abc", "AccessKey: abc",
    "private_key=abc", "private-key: abc", "cookie=abc", "Set-Cookie: a=b",
    "workflow w-1 succeeded", "step 'llm' (index 2) attempt 1 failed (rate_limited)",
])
def test_redact_text_skips_only_text_no_rule_would_change(text: str) -> None:
    from crashsafe._secrets import _TEXT_RULES, redact_text

    every_rule = text
    for pattern, replacement in _TEXT_RULES:
        every_rule = pattern.sub(replacement, every_rule)
    assert redact_text(text) == every_rule


# -- observability never stops a workflow ---------------------------------------------------------
def test_a_broken_listener_or_tracer_does_not_stop_workflows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(_instrument.Sink):
        def committed(self, run: Any, ops: Any, t0: int, t1: int) -> None:
            raise RuntimeError("listener bug")

        def run_ended(self, run: Any, outcome: str, error: Any, at: int) -> None:
            raise RuntimeError("listener bug")

        def run_started(self, run: Any) -> None:
            raise RuntimeError("listener bug")

        def steps(self, run: Any, entries: Any) -> None:
            raise RuntimeError("listener bug")

    class BadTracer:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("tracer bug")

    class BadProvider:
        def get_tracer(self, *args: Any, **kwargs: Any) -> BadTracer:
            return BadTracer()

    broken = Broken()
    _instrument.add_sink(broken)
    try:
        for tracing in (False, BadProvider()):
            app = App(f"sqlite:///{tmp_path / 'broken.db'}", tracing=tracing)

            @app.step(name="fine")
            def fine(x: int) -> int:
                return x + 1

            @app.workflow(name="robust")
            def robust(x: int) -> int:
                crashsafe.checkpoint({"x": x})
                return fine(x)

            wid = f"R-{bool(tracing)}"
            assert app.start(robust, 1, workflow_id=wid).result(timeout=10) == 2
            assert app.get_workflow(wid).status is Status.SUCCEEDED
            app.close()
    finally:
        _instrument.remove_sink(broken)
    said = {r.getMessage().split(" (")[0] for r in caplog.records if r.name == "crashsafe"}
    assert {"crashsafe could not report a commit", "crashsafe could not report the end of "
            "a run", "crashsafe could not report the start of a workflow",
            "crashsafe could not report the start of a run"} <= said


def test_a_wait_for_a_signal_is_a_span_from_its_start_to_the_signal(
        traced: tuple[App, InMemorySpanExporter]) -> None:
    app, exporter = traced

    @app.workflow(name="approval_wf")
    def approval_wf() -> Any:
        return crashsafe.wait_for("approval", timeout=30)

    handle = app.start(approval_wf, workflow_id="AP-1")
    deadline = time.monotonic() + 10
    while app.get_workflow("AP-1").status is not Status.WAITING:
        assert time.monotonic() < deadline, "the workflow never waited"
        time.sleep(0.01)
    time.sleep(0.05)
    app.signal("AP-1", "approval", {"approved": True})
    assert handle.result(timeout=10) == {"approved": True}
    app.close()
    spans = _spans(exporter)
    wait, run = _one(spans, "wait approval"), _one(spans, "workflow approval_wf")
    assert _parent(wait) == _ids(run)[1]
    assert wait.attributes is not None
    assert wait.attributes["crashsafe.outcome"] == "signal"
    assert wait.attributes["crashsafe.signal"] == "approval"
    assert wait.start_time is not None and wait.end_time is not None
    assert wait.end_time - wait.start_time >= 40_000_000  # it waited for the signal


# -- reporting in batches ----------------------------------------------------------------------
def test_many_steps_are_reported_in_order_once_each_across_batches(
        traced: tuple[App, InMemorySpanExporter], counting: prometheus.Counters) -> None:
    app, exporter = traced
    n = _instrument.BATCH * 2 + 5  # two full batches, then the rest at the run's end

    @app.step(name="many_s")
    def many_s(i: int) -> int:
        return i

    @app.workflow(name="many_wf")
    def many_wf() -> int:
        return sum(many_s(i) for i in range(n))

    assert app.start(many_wf, workflow_id="M-1").result(timeout=30) == n * (n - 1) // 2
    app.close()
    spans = _spans(exporter)
    run = _one(spans, "workflow many_wf")
    steps = [s for s in spans if s.name == "step many_s"]
    assert [s.attributes["crashsafe.step.index"] for s in steps  # type: ignore[index]
            ] == list(range(n))
    assert all(_parent(s) == _ids(run)[1] for s in steps)
    assert len({_ids(s)[1] for s in steps}) == n  # a span id of its own each
    assert all(s.context is not None and s.context.is_valid and not s.context.is_remote
               for s in steps)
    assert all(s.start_time is not None and s.end_time is not None
               and s.start_time <= s.end_time for s in steps)
    assert counting.snapshot()[0]["steps"][("many_wf", "many_s", "ok")] == n


def test_a_slow_step_does_not_hold_back_the_report_of_the_steps_before_it(
        traced: tuple[App, InMemorySpanExporter], counting: prometheus.Counters) -> None:
    import threading

    app, exporter = traced
    gate = threading.Event()

    @app.step(name="quick_s")
    def quick_s(i: int) -> int:
        return i

    @app.step(name="slow_s")
    def slow_s() -> int:
        gate.wait(30)
        return 0

    @app.workflow(name="held_wf")
    def held_wf() -> int:
        return quick_s(1) + quick_s(2) + slow_s()

    handle = app.start(held_wf, workflow_id="H-1")
    try:
        # While slow_s runs, the two results before it wait for company; the reporting
        # thread reports them once they have waited SWEEP_S.
        deadline = time.monotonic() + 10
        while len([s for s in _spans(exporter) if s.name == "step quick_s"]) < 2:
            assert time.monotonic() < deadline, [s.name for s in _spans(exporter)]
            time.sleep(0.02)
        assert counting.snapshot()[0]["steps"][("held_wf", "quick_s", "ok")] == 2
        assert not any(s.name == "workflow held_wf" for s in _spans(exporter))
    finally:
        gate.set()
    assert handle.result(timeout=10) == 3
    app.close()
    names = [s.name for s in _spans(exporter)]
    assert names.count("step quick_s") == 2 and names.count("step slow_s") == 1


def test_steps_that_come_slowly_are_reported_while_the_run_goes_on(
        traced: tuple[App, InMemorySpanExporter]) -> None:
    """Steps a few tens of milliseconds apart never fill a batch soon, and the run
    never stops committing: the reporting thread reports them once the oldest has
    waited SWEEP_S, while the run goes on (not all at its end)."""
    app, exporter = traced
    seen_during: list[int] = []

    @app.step(name="paced_s")
    def paced_s(i: int) -> int:
        time.sleep(0.04)
        return i

    @app.workflow(name="paced_wf")
    def paced_wf(n: int) -> int:
        total = 0
        for i in range(n):
            total += paced_s(i)
            if i == n - 1:
                seen_during.append(
                    len([s for s in _spans(exporter) if s.name == "step paced_s"]))
        return total

    n = 25  # 1 s of steps, fewer than a batch (32)
    assert n < _instrument.BATCH
    assert app.start(paced_wf, n, workflow_id="P-1").result(timeout=30) == sum(range(n))
    app.close()
    assert seen_during and seen_during[0] >= n // 3, seen_during
    assert [s.name for s in _spans(exporter)].count("step paced_s") == n


def test_a_span_processor_added_later_gets_the_next_spans(tmp_path: Path) -> None:
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(first))
    app = App(f"sqlite:///{tmp_path / 'late.db'}", tracing=provider)

    @app.step(name="late_s")
    def late_s() -> int:
        return 1

    @app.workflow(name="late_wf")
    def late_wf() -> int:
        return late_s()

    assert app.start(late_wf, workflow_id="L-1").result(timeout=10) == 1
    provider.add_span_processor(SimpleSpanProcessor(second))
    assert app.start(late_wf, workflow_id="L-2").result(timeout=10) == 1
    app.close()
    assert [s.name for s in _spans(first)].count("step late_s") == 2
    assert [s.name for s in _spans(second)].count("step late_s") == 1


def test_the_fast_span_context_is_the_api_s_own() -> None:
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState

    from crashsafe.observe import otel

    assert otel._fast_context_works()  # this API version: the shortcut is in use
    flags, state = TraceFlags(TraceFlags.SAMPLED), TraceState()
    fast = otel._fast_context(7, 9, flags, state)
    assert fast == SpanContext(7, 9, False, flags, state)
    assert isinstance(fast, SpanContext) and fast.is_valid and not fast.is_remote
    assert (fast.trace_id, fast.span_id, fast.trace_flags, fast.trace_state) == (
        7, 9, flags, state)


def test_the_direct_start_span_decides_as_start_span_does() -> None:
    """_Direct.start (the ``start`` span without a live span object) gives the ids,
    trace flags and finished span that the SDK's start_span gives, whatever the
    sampler says (sample, drop, record only, follow the parent) and wherever it is
    called from (no span, under a sampled local span, under a remote unsampled one);
    and it steps aside for a disabled tracer and for one that counts its spans."""
    from opentelemetry import context as context_api
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        Decision,
        ParentBased,
        ParentBasedTraceIdRatio,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        TraceFlags,
        set_span_in_context,
    )

    from crashsafe.observe import otel

    class Ids(IdGenerator):  # the same ids for both ways, call for call
        def __init__(self) -> None:
            self.n = 0

        def generate_span_id(self) -> int:
            self.n += 1
            return 0x5000 + self.n

        def generate_trace_id(self) -> int:
            self.n += 1
            return 0x7000 + self.n

        def is_trace_id_random(self) -> bool:
            return True

    class RecordOnly(Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: Any = None, attributes: Any = None, links: Any = None,
                          trace_state: Any = None) -> SamplingResult:
            return SamplingResult(Decision.RECORD_ONLY, {**(attributes or {}), "r": 1})

        def get_description(self) -> str:
            return "record only"

    class Ended(SpanProcessor):  # every span handed to on_end, sampled or not
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def on_end(self, span: ReadableSpan) -> None:
            self.spans.append(span)

    def seen(span: ReadableSpan) -> tuple[Any, ...]:
        return (span.name, span.kind, dict(span.attributes or {}), span.context,
                span.parent, span.status.status_code, dict(span.resource.attributes),
                span.start_time is not None and span.start_time <= (span.end_time or 0))

    sampled_parent = SpanContext(0x1111, 0x2222, False, TraceFlags(TraceFlags.SAMPLED))
    remote_unsampled = SpanContext(0x3333, 0x4444, True, TraceFlags(0))
    checked = 0
    samplers = (ALWAYS_ON, ALWAYS_OFF, ParentBased(ALWAYS_OFF), RecordOnly(),
                ParentBased(TraceIdRatioBased(0.5), remote_parent_not_sampled=ALWAYS_ON),
                TraceIdRatioBased(0.5))
    for sampler in samplers:
        for parent in (None, sampled_parent, remote_unsampled):
            got: list[Any] = []
            for way in ("direct", "start_span"):
                ended = Ended()
                provider = TracerProvider(sampler=sampler, id_generator=Ids())
                provider.add_span_processor(ended)
                tracer = provider.get_tracer("crashsafe", crashsafe.__version__)
                direct = otel._Direct.of(tracer)
                assert direct is not None and direct.direct_start
                attrs = {"crashsafe.workflow.name": "wf", "crashsafe.workflow.id": "W-9"}
                token = context_api.attach(set_span_in_context(NonRecordingSpan(parent))) \
                    if parent is not None else None
                try:
                    if way == "direct":
                        ids = direct.start("wf", "W-9")
                    else:
                        span = tracer.start_span("start wf", kind=SpanKind.PRODUCER,
                                                 attributes=dict(attrs))
                        span.end()
                        sc = span.get_span_context()
                        ids = (sc.trace_id, sc.span_id, int(sc.trace_flags))
                finally:
                    if token is not None:
                        context_api.detach(token)
                got.append((ids, [seen(s) for s in ended.spans]))
            assert got[0] == got[1], (sampler, parent)
            checked += bool(got[0][1])
    # Recorded: under ALWAYS_ON and RecordOnly everywhere, under ParentBased(ALWAYS_OFF)
    # only as a child of the sampled span; by trace id for the ratio samplers.
    assert checked >= 7

    # The SDK's own samplers are decided without asking them: as they decide, for any
    # trace id and parent. Others, and subclasses deciding for themselves, are asked.
    class Mine(TraceIdRatioBased):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return SamplingResult(Decision.RECORD_AND_SAMPLE)

    rng = __import__("random").Random(5)
    parents = [None, sampled_parent, remote_unsampled,
               SpanContext(0x3333, 0x4444, True, TraceFlags(TraceFlags.SAMPLED)),
               SpanContext(0x1111, 0x2222, False, TraceFlags(0))]
    ours = [ALWAYS_ON, ALWAYS_OFF, ParentBased(ALWAYS_ON), ParentBased(ALWAYS_OFF),
            TraceIdRatioBased(0.0), TraceIdRatioBased(0.3), TraceIdRatioBased(1.0),
            ParentBased(TraceIdRatioBased(0.1)), ParentBasedTraceIdRatio(0.7),
            ParentBased(TraceIdRatioBased(0.5), remote_parent_sampled=ALWAYS_OFF,
                        remote_parent_not_sampled=TraceIdRatioBased(0.5),
                        local_parent_sampled=TraceIdRatioBased(0.2),
                        local_parent_not_sampled=ALWAYS_ON)]
    compared = 0
    for sampler in ours:
        decide = otel._decider(sampler)
        assert decide is not None, sampler
        for parent in parents:
            ctx = set_span_in_context(NonRecordingSpan(parent)) if parent is not None \
                else None
            for _ in range(200):
                trace_id = rng.getrandbits(128) or 1
                asked = sampler.should_sample(ctx, trace_id, "start wf").decision
                assert decide(parent, trace_id) == asked.is_sampled(), (sampler, parent)
                compared += 1
    assert compared == len(ours) * len(parents) * 200
    for other in (RecordOnly(), Mine(0.5), ParentBased(RecordOnly()),
                  ParentBased(ALWAYS_ON, local_parent_sampled=Mine(0.1))):
        assert otel._decider(other) is None, other

    provider = TracerProvider()
    tracer = provider.get_tracer("crashsafe", crashsafe.__version__)
    direct = otel._Direct.of(tracer)
    assert direct is not None and direct.direct_start
    tracer._is_enabled = lambda: False  # type: ignore[method-assign]
    assert direct.start("wf", None) is None  # start_span decides (no span)
    counting = provider.get_tracer("counted", "1")
    counting._tracer_metrics = object()  # type: ignore[attr-defined]
    counted = otel._Direct.of(counting)
    assert counted is not None and not counted.direct_start


def test_a_processor_that_acts_on_start_gets_the_start_span_started(tmp_path: Path) -> None:
    """The start span is the only one crashsafe makes in the caller's context: a span
    processor that does something in on_start (copying baggage into attributes, say)
    gets it started through start_span, as before; the SDK's batch and simple
    processors, which do nothing there, let it be recorded directly. Looked at again
    when a processor is added."""
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from crashsafe.observe import otel

    class Starting(SpanProcessor):
        def __init__(self) -> None:
            self.started: list[str] = []

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            self.started.append(span.name)

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    app = App(f"sqlite:///{tmp_path / 'on_start.db'}", tracing=provider)
    direct = app._tracer()._direct
    assert direct is not None and direct.start("probe", None) is not None  # direct

    starting = Starting()
    provider.add_span_processor(starting)
    assert direct.start("probe", None) is None  # through start_span from now on

    @app.workflow(name="on_start_wf")
    def on_start_wf() -> int:
        return 1

    assert app.start(on_start_wf, workflow_id="OS-1").result(timeout=10) == 1
    app.close()
    provider.shutdown()
    assert starting.started == ["start on_start_wf"]
    assert [s.name for s in _spans(exporter)].count("start on_start_wf") == 1
    assert not otel._quiet_processor(starting)


def test_a_runs_span_is_made_current_as_the_api_would(tmp_path: Path) -> None:
    """Tracing.attach sets the API's context variable itself (the default runtime
    context): the context it makes current is the API's own, other entries (baggage)
    kept, and detach restores the one before; the API's way when the fast one is off."""
    from opentelemetry import baggage, context
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    app = App(f"sqlite:///{tmp_path / 'attach.db'}", tracing=TracerProvider())
    tracing = app._tracer()
    assert tracing._current is not None  # this API keeps its context in a variable
    span = NonRecordingSpan(SpanContext(1, 2, False, TraceFlags(TraceFlags.SAMPLED)))
    outer = context.attach(baggage.set_baggage("tenant", "t-1"))
    try:
        before = context.get_current()
        for fast in (True, False):
            if not fast:
                tracing._current = None
            token = tracing.attach(span)
            assert context.get_current() == trace_api.set_span_in_context(span, before)
            assert trace_api.get_current_span() is span
            assert baggage.get_baggage("tenant") == "t-1"
            tracing.detach(token)
            assert context.get_current() is before
    finally:
        context.detach(outer)
        app.close()


def test_json_formatter_times_secrets_and_odd_values() -> None:
    fmt = JsonFormatter()

    def line(created: float, msg: str, **extra: Any) -> dict[str, Any]:
        record = logging.LogRecord("crashsafe", logging.INFO, __file__, 1, msg, (), None)
        record.created, record.msecs = created, (created % 1) * 1000
        record.__dict__.update(extra)
        out: dict[str, Any] = json.loads(fmt.format(record))
        return out

    a = line(1_700_000_000.25, "plain")
    b = line(1_700_000_000.5, "plain")  # the same second: its stamp is reused
    c = line(1_700_000_061.0, "plain")  # a new second (and minute)
    assert (a["time"], b["time"], c["time"]) == (
        "2023-11-14T22:13:20.250Z", "2023-11-14T22:13:20.500Z", "2023-11-14T22:14:21.000Z")
    leaked = line(1_700_000_000.0, "calling with Authorization: Bearer abcdefghijklmnop",
                  workflow_id="W-1")
    assert "abcdefghijklmnop" not in json.dumps(leaked) and leaked["workflow_id"] == "W-1"
    field = line(1_700_000_000.0, "ok", detail="api_key=sk-abcdefghijklmnopqrstuv")
    assert "sk-abcdefghijklmnopqrstuv" not in json.dumps(field)
    nested = line(1_700_000_000.0, "ok", request={"headers": {"password": "hunter2hunter2"}})
    assert "hunter2hunter2" not in json.dumps(nested)

    class Odd:
        def __str__(self) -> str:
            return "odd token=abcdef123456"

    odd = line(1_700_000_000.0, "ok", thing=Odd(), numbers=(1, 2), count=3)
    assert odd["thing"].startswith("odd") and "abcdef123456" not in odd["thing"]
    assert odd["numbers"] == [1, 2] and odd["count"] == 3


def test_counters_merge_plain_and_retried_results_of_one_step(
        tmp_path: Path, counting: prometheus.Counters) -> None:
    app = App(f"sqlite:///{tmp_path / 'merge.db'}", tracing=False)
    calls = {"n": 0}

    @app.step(retry=FAST, name="mixed_s")
    def mixed_s(i: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second call's first attempt fails, once
            raise TimeoutError("slow")
        return i

    @app.workflow(name="mixed_wf")
    def mixed_wf() -> int:
        return sum(mixed_s(i) for i in range(3))

    assert app.start(mixed_wf, workflow_id="X-1").result(timeout=10) == 3
    body, _ = prometheus.exposition(app.store)
    app.close()
    m = _samples(body)
    assert _get(m, "crashsafe_steps_total", workflow="mixed_wf", step="mixed_s",
                outcome="ok") == 3
    assert _get(m, "crashsafe_step_attempts_total", workflow="mixed_wf", step="mixed_s") == 4
    assert _get(m, "crashsafe_step_duration_seconds_count", workflow="mixed_wf",
                step="mixed_s") == 3
    assert _get(m, "crashsafe_step_duration_seconds_bucket", workflow="mixed_wf",
                step="mixed_s", le="+Inf") == 3
    assert _get(m, "crashsafe_attempt_failures_total", workflow="mixed_wf", step="mixed_s",
                failure_class="timeout") == 1


def test_head_sampling_keeps_or_drops_a_workflow_whole(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App(f"sqlite:///{tmp_path / 'sampled.db'}", tracing=provider)
    tracer = provider.get_tracer("user code")
    inner: dict[str, bool] = {}

    @app.step(name="s_step")
    def s_step(i: int) -> int:
        return i

    @app.workflow(name="s_wf")
    def s_wf(wid: str) -> int:
        with tracer.start_as_current_span("user span") as span:
            inner[wid] = span.is_recording()  # follows the workflow's decision
        return s_step(1) + s_step(2)

    ids = [f"S-{i}" for i in range(40)]
    for wid in ids:
        assert app.start(s_wf, wid, workflow_id=wid).result(timeout=10) == 3
    stamps = {wid: parse_traceparent(stamped(app.get_workflow(wid).inputs)) for wid in ids}
    app.close()
    spans = _spans(exporter)
    by_trace: dict[int, list[str]] = {}
    for s in spans:
        by_trace.setdefault(_ids(s)[0], []).append(s.name)
    kept = {wid for wid, sc in stamps.items() if sc is not None and sc.trace_flags.sampled}
    assert 0 < len(kept) < len(ids)  # 2**-40 odds of either failing by chance
    assert len(by_trace) == len(kept)
    for names in by_trace.values():  # each kept workflow whole, and nothing else
        assert sorted(names) == ["start s_wf", "step s_step", "step s_step", "user span",
                                 "workflow s_wf"]
    assert {wid for wid, recording in inner.items() if recording} == kept


def test_a_transactional_step_has_its_span_and_is_counted(
        traced: tuple[App, InMemorySpanExporter], counting: prometheus.Counters) -> None:
    app, exporter = traced

    @app.transaction(name="book_t")
    def book_t(db: crashsafe.TransactionConnection, n: int) -> int:
        db.execute("CREATE TABLE IF NOT EXISTS booked (n INT)")
        db.execute("INSERT INTO booked VALUES (?)", (n,))
        return n

    @app.workflow(name="booking_wf")
    def booking_wf() -> int:
        return book_t(1) + book_t(2)

    assert app.start(booking_wf, workflow_id="B-1").result(timeout=10) == 3
    app.close()
    spans = _spans(exporter)
    run = _one(spans, "workflow booking_wf")
    steps = [s for s in spans if s.name == "step book_t"]
    assert [s.attributes["crashsafe.step.index"] for s in steps] == [0, 1]  # type: ignore[index]
    assert all(_parent(s) == _ids(run)[1] for s in steps)
    assert counting.snapshot()[0]["steps"][("booking_wf", "book_t", "ok")] == 2


def test_counters_fold_step_durations_in_bulk_as_one_at_a_time() -> None:
    """Durations of steps that succeeded (``ended_at - started_at``) are gathered and
    turned into buckets in bulk (Counters.steps, Counters._fold): the histogram, counts
    and attempts must be those of observing each step on its own, per step name, across
    folds, bucket bounds, zero and negative durations (clocks apart), retried steps and
    steps recorded without running, in batches of plain steps only and mixed ones."""
    import random

    rng = random.Random(11)
    counters = prometheus.Counters()

    class FakeRun:  # what Counters.steps reads of a run
        name = "fold_wf"
        offset_ns = 0

    run: Any = FakeRun()
    picks = [*prometheus.LATENCY_BUCKETS, 0.0, -0.5, 1e-9, 301.0, 1e4]
    names = ["b", "a", "c"]
    expected = {n: [0.0] * (len(prometheus.LATENCY_BUCKETS) + 2) for n in names}
    count = dict.fromkeys(names, 0)
    attempts = dict.fromkeys(names, 0)
    plain_batches = 0
    for batch in range(3 * prometheus.FOLD // 32 + 7):  # folds on the way, and at snapshot
        mixed = batch % 2 == 0
        plain_batches += not mixed
        entries = []
        for _ in range(32):
            took = rng.choice(picks) if rng.random() < 0.3 else rng.uniform(0, 400)
            tries = rng.choice([1] * 8 + [0, 3]) if mixed else 1
            name = rng.choice(names)
            ended = 1_700_000_000.0 + rng.uniform(0, 1e5)
            e = JournalEntry("w", batch, "step", name, b"1", None, tries, ended - took, ended)
            entries.append(e)
            count[name] += 1
            attempts[name] += tries
            if tries:
                took = e.ended_at - e.started_at  # as the float arithmetic makes it
                expected[name][bisect.bisect_left(prometheus.LATENCY_BUCKETS, took)] += 1
                expected[name][-1] += took if took > 0 else 0.0
        counters.steps(run, entries)
    assert plain_batches > prometheus.FOLD // 32
    counts, histograms = counters.snapshot()
    for name in names:
        assert counts["steps"][("fold_wf", name, "ok")] == count[name]
        assert counts["step_attempts"][("fold_wf", name)] == attempts[name]
        got = histograms["step_duration_seconds"][("fold_wf", name)]
        assert got[:-1] == expected[name][:-1], name
        assert got[-1] == pytest.approx(expected[name][-1], rel=1e-9)
        assert sum(got[:-1]) < count[name]  # those recorded without running: no duration
    assert counters.snapshot() == (counts, histograms)  # a scrape changes nothing


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_its_own_reporting_thread(
        tmp_path: Path, counting: prometheus.Counters) -> None:
    """The reporting thread does not survive a fork: the child must start its own, or
    the steps of a run stuck in a slow step would wait unreported until it ends."""
    app = App(f"sqlite:///{tmp_path / 'fork.db'}", tracing=False)

    @app.workflow(name="forking_wf")
    def forking_wf() -> int:
        return 1

    assert app.start(forking_wf).result(timeout=10) == 1
    assert _instrument._sweeper is not None and _instrument._sweeper.is_alive()
    app.close()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            if _instrument._sweeper is None:
                code = 2
                child = App(f"sqlite:///{tmp_path / 'child.db'}", tracing=False)
                gate = threading.Event()

                @child.step(name="quick_f")
                def quick_f() -> int:
                    return 1

                @child.step(name="slow_f")
                def slow_f() -> int:
                    gate.wait(10)
                    return 2

                @child.workflow(name="child_wf")
                def child_wf() -> int:
                    return quick_f() + slow_f()

                handle = child.start(child_wf)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # reported while slow_f still runs
                    steps = counting.snapshot()[0]["steps"]
                    if steps.get(("child_wf", "quick_f", "ok")) == 1:
                        code = 0
                        break
                    time.sleep(0.05)
                gate.set()
                handle.result(timeout=10)
                child.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (
        "1: the parent's reporting thread looked alive in the child; 2: the child's "
        "quick step was not reported while its slow step ran")


def _finished_span(name: str, sampled: bool = True) -> ReadableSpan:
    flags = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED if sampled else 0)
    ctx = trace_api.SpanContext(0x1234, 0x99, False, flags)
    return ReadableSpan(name, ctx, start_time=1, end_time=2)


def test_step_spans_go_into_the_batch_processors_queue_in_one_pass(tmp_path: Path) -> None:
    """With the SDK's BatchSpanProcessor, a run's batch of step spans is queued at once
    (otel._queue_into), and every span is exported, in order, as through on_end."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from crashsafe.observe import otel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    bsp = BatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    provider.add_span_processor(bsp)
    assert otel._queue_into(bsp) is not None  # this SDK is laid out as expected
    app = App(f"sqlite:///{tmp_path / 'bsp.db'}", tracing=provider)

    @app.step(name="many_b")
    def many_b(i: int) -> int:
        return i

    @app.workflow(name="bsp_wf")
    def bsp_wf() -> int:
        return sum(many_b(i) for i in range(_instrument.BATCH + 8))  # two batches

    assert app.start(bsp_wf).result(timeout=10) == sum(range(_instrument.BATCH + 8))
    app.close()
    provider.force_flush()
    steps = [s for s in exporter.get_finished_spans() if s.name == "step many_b"]
    assert [s.attributes["crashsafe.step.index"] for s in steps] == \
        list(range(_instrument.BATCH + 8))  # type: ignore[index]
    run = next(s for s in exporter.get_finished_spans() if s.name == "workflow bsp_wf")
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id
               for s in steps)
    provider.shutdown()


def test_the_batch_queue_shortcut_leaves_the_rest_to_the_sdk() -> None:
    """What the one-pass queueing does not cover goes through the processor's own
    on_end: a queue without room for the batch (the SDK warns and drops), a processor
    shut down, unsampled spans; and a processor laid out differently is not touched."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from crashsafe.observe import otel

    def queued(bsp: BatchSpanProcessor) -> list[str]:
        return [s.name for s in bsp._batch_processor._queue]

    spans = [_finished_span(f"s{i}") for i in range(6)]
    ours, theirs = (BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=4,
                                       max_export_batch_size=2,
                                       schedule_delay_millis=60_000) for _ in range(2))
    for bsp in (ours, theirs):  # keep the export threads from draining the queues
        bsp._batch_processor._export = lambda *args: None  # type: ignore[method-assign]
    end = otel._queue_into(ours)
    assert end is not None
    end(spans[:3])
    for span in spans[:3]:
        theirs.on_end(span)
    assert queued(ours) == queued(theirs) == ["s2", "s1", "s0"]
    end(spans[3:])  # no room for three more: span by span, as the SDK does it
    for span in spans[3:]:
        theirs.on_end(span)
    assert queued(ours) == queued(theirs)
    assert len(queued(ours)) == 4

    unsampled = BatchSpanProcessor(InMemorySpanExporter(), schedule_delay_millis=60_000)
    end = otel._queue_into(unsampled)
    assert end is not None
    end([_finished_span("u", sampled=False)])
    assert queued(unsampled) == []
    unsampled.shutdown()
    end([_finished_span("late")])
    assert queued(unsampled) == []

    class Custom(BatchSpanProcessor):
        pass

    assert otel._queue_into(Custom(InMemorySpanExporter())) is None
    assert otel._queue_into(SimpleSpanProcessor(InMemorySpanExporter())) is None
    for bsp in (ours, theirs):
        bsp.shutdown()


def test_the_stamp_is_read_from_the_end_of_the_inputs_only() -> None:
    """stamped() reads the traceparent where stamp() puts it, the last top-level key,
    without decoding the arguments; a "trace" anywhere else is the user's."""
    from crashsafe.observe.otel import stamp

    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    big = b'{"args":["' + b"x" * 200_000 + b'"],"kwargs":{}}'
    assert stamped(stamp(big, tp)) == tp
    assert stamped(stamp(b"{}", tp)) == tp
    assert stamped(big) is None
    user = [
        b'{"args":[],"kwargs":{"trace":"' + tp.encode() + b'"}}',  # a keyword argument
        b'{"args":[{"trace":"' + tp.encode() + b'"}],"kwargs":{}}',  # inside an argument
        b'{"args":["a\\",\\"trace\\":\\"' + tp.encode() + b'"],"kwargs":{}}',  # in a string
        b'{"args":[],"kwargs":{"k":"v,\\"trace\\":\\"' + tp.encode() + b'"}}',
        b'{"args":[],"kwargs":{},"trace":"00-\\"x"}',  # an escape: not ours
        b'{"args":[],"kwargs":{},"trace":"00-\xff"}',  # not ASCII
        b"",
        b'"}',
    ]
    for inputs in user:
        assert stamped(inputs) is None, inputs


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_a_run_begun_right_after_its_start_reuses_the_stamp(tmp_path: Path,
                                                             ratio: float) -> None:
    """app.start hands its run the stamp it just wrote (what Tracing.stamp_start
    returns) instead of reading it back from the inputs: the same parent as reading it
    gives, sampled or not, and used."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App(f"sqlite:///{tmp_path / 'handoff.db'}", tracing=provider)
    tracing = app._tracer()

    @app.workflow(name="handoff_wf")
    def handoff_wf() -> str | None:
        return trace_api.get_current_span().get_span_context().trace_id.to_bytes(
            16, "big").hex()

    inputs = b'{"args":[],"kwargs":{}}'
    stamped_inputs, handed = tracing.stamp_start(inputs, "handoff_wf", "H-0")
    assert handed is not None
    value, parent = handed
    assert value == stamped(stamped_inputs)
    assert parent == parse_traceparent(value)
    assert parent.is_remote and parent.trace_flags.sampled == (ratio == 1.0)

    seen: list[Any] = []
    real_begin = tracing.begin

    def begin(run: _instrument.Run, inputs: bytes, handed: Any = None) -> bool:
        seen.append((stamped(inputs), handed))
        return real_begin(run, inputs, handed)

    tracing.begin = begin
    trace_hex = app.start(handoff_wf, workflow_id="H-1").result(timeout=10)
    assert len(seen) == 1 and seen[0][1] is not None  # handed, not read back
    assert seen[0][1] == (seen[0][0], parse_traceparent(seen[0][0]))
    stored = parse_traceparent(stamped(app.get_workflow("H-1").inputs))
    assert stored is not None and f"{stored.trace_id:032x}" == trace_hex
    app.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    if ratio == 1.0:
        run = spans["workflow handoff_wf"]
        assert run.parent is not None and run.parent.span_id == stored.span_id
        assert run.parent.is_remote
    else:
        assert spans == {}


def test_concurrent_starts_each_hand_their_run_its_own_stamp(tmp_path: Path) -> None:
    """Async starts interleave between stamping their inputs and beginning their runs
    (each awaits its commit): every run still takes its own stamp, not another's."""
    import asyncio

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Launched first, with no sweep due meanwhile: a recovery sweep resumes this
    # process's own running workflows that no thread runs, and could begin one
    # between its commit and its start's own begin (from the stored inputs: no
    # hand-off for that one, rightly).
    app = App(f"sqlite:///{tmp_path / 'handoff_async.db'}", tracing=provider,
              recovery_interval=3600)
    swept = threading.Event()
    real_sweep = app._sweep

    def sweep() -> None:
        real_sweep()
        swept.set()

    app._sweep = sweep  # type: ignore[method-assign]
    app.launch()
    assert swept.wait(10), "the serving thread's first sweep"
    tracing = app._tracer()
    handed: list[bool] = []
    real_begin = tracing.begin

    def begin(run: _instrument.Run, inputs: bytes, stamp: Any = None) -> bool:
        handed.append(stamp is not None and stamp[0] == stamped(inputs))
        return real_begin(run, inputs, stamp)

    tracing.begin = begin

    @app.workflow(name="handoff_async_wf")
    async def handoff_async_wf(i: int) -> int:
        return i

    async def main() -> list[int]:
        handles = await asyncio.gather(*(app.start_async(handoff_async_wf, i,
                                                         workflow_id=f"HA-{i}")
                                         for i in range(20)))
        return [await h.result_async(timeout=10) for h in handles]

    assert asyncio.run(main()) == list(range(20))
    assert handed == [True] * 20, "every run was handed its own stamp"
    app.close()
    spans = _spans(exporter)
    starts = {s.attributes["crashsafe.workflow.id"]: s for s in spans  # type: ignore[index]
              if s.name == "start handoff_async_wf"}
    runs = [s for s in spans if s.name == "workflow handoff_async_wf"]
    assert len(starts) == len(runs) == 20
    for run in runs:
        assert run.attributes is not None
        assert _parent(run) == _ids(starts[run.attributes["crashsafe.workflow.id"]])[1]


def test_a_malformed_traceparent_is_no_parent() -> None:
    good = "00-0000000000000000000000000000000a-000000000000000b-01"
    assert parse_traceparent(good) is not None
    for bad in ("", "0-0000000000000000000000000000000a-000000000000000b-01",
                "000-0000000000000000000000000000000a-000000000000000b-01",
                "00-000000000000000000000000000000a-000000000000000b-01",
                "00-00000000000000000000000000000000-000000000000000b-01",
                "00-0000000000000000000000000000000a-0000000000000000-01",
                "00-0000000000000000000000000000000g-000000000000000b-01",
                "00-0000000000000000000000000000000a-000000000000000b-1ff",
                "00-0000000000000000000000000000000a-000000000000000b"):
        assert parse_traceparent(bad) is None, bad


class _CountingSink(_instrument.Sink):
    """Counts the steps reported, and the order of what it hears."""

    def __init__(self, hold: float = 0.0) -> None:
        self.steps_seen = 0
        self.uneven = 0
        self.events: list[str] = []
        self.hold = hold

    def steps(self, run: _instrument.Run, entries: Any) -> None:
        self.events.append("steps-begin")
        if len({e.index for e in entries}) != len(entries):
            self.uneven += 1
        self.steps_seen += len(entries)
        time.sleep(self.hold)
        self.events.append("steps-end")

    def run_ended(self, run: _instrument.Run, outcome: str, error: BaseException | None,
                  at: int) -> None:
        self.events.append("run_ended")


def _bare_run(sink: _instrument.Sink) -> _instrument.Run:
    import types

    app: Any = types.SimpleNamespace(_clock_offset=0.0)
    rec: Any = types.SimpleNamespace(id="R-1", name="bare_wf", version=1, token=1)
    return _instrument.Run(app, rec, 0, (sink,))


def test_steps_appended_while_another_thread_reports_are_never_lost() -> None:
    """An async workflow's child start commits from a worker thread while its other
    tasks commit steps: the report one makes must not drop what the other appends."""
    sink = _CountingSink()
    run = _bare_run(sink)
    n = 150_000
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        def steps() -> None:
            for i in range(n):
                run.step(JournalEntry("R-1", i, "step", "s", b"1", None, 1, 0.0, 0.0))

        def other_commits() -> None:
            for i in range(n):
                run.committed([JournalEntry("R-1", -i, "child", "c", b"1", None, 1, 0.0,
                                            0.0)], 0)

        threads = [threading.Thread(target=steps), threading.Thread(target=other_commits)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    run.end("ok", None, 0)
    assert (sink.steps_seen, sink.uneven) == (n, 0)
    assert not run.pending and run not in _instrument._waiting


def test_a_runs_end_is_reported_after_the_reporting_threads_report() -> None:
    """One run's reports never overlap: its end waits for a report under way."""
    sink = _CountingSink(hold=0.05)
    run = _bare_run(sink)
    run.step(JournalEntry("R-1", 0, "step", "s", b"1", None, 1, 0.0, 0.0))
    reporter = threading.Thread(target=run.flush)  # as the reporting thread does
    reporter.start()
    deadline = time.monotonic() + 5
    while not sink.events and time.monotonic() < deadline:
        time.sleep(0.001)
    run.end("ok", None, 0)
    reporter.join()
    assert sink.events == ["steps-begin", "steps-end", "run_ended"]
    assert run not in _instrument._waiting


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_batch_queue_shortcut_wakes_a_forked_childs_export_thread() -> None:
    """After a fork the SDK makes its processor a new queue, wake-up event and export
    thread: the shortcut must use those, not the parent's."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from crashsafe.observe import otel

    exporter = InMemorySpanExporter()
    bsp = BatchSpanProcessor(exporter, max_export_batch_size=4, schedule_delay_millis=60_000)
    end = otel._queue_into(bsp)
    assert end is not None
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            end([_finished_span(f"c{i}") for i in range(8)])  # the SDK's fork path
            end([_finished_span(f"d{i}") for i in range(8)])  # the shortcut, after it
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if len(exporter.get_finished_spans()) == 16:
                    code = 0
                    break
                time.sleep(0.01)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's spans were not exported"
    bsp.shutdown()
