"""A child process for the trace-continuity test, killed with SIGKILL mid-workflow.

``python tests/trace_worker.py DB SPANS GATE``

Starts workflow ``T-1`` with tracing on, every span written to SPANS (one JSON object
per line, written as the span ends), runs step ``first``, then blocks inside step
``second`` until the file GATE exists, printing ``blocked`` when it gets there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import crashsafe

WORKFLOW_ID = "T-1"


def define(app: crashsafe.App, gate: Path, announce: bool = False) -> Any:
    """The workflow, as every process running it defines it."""

    @app.step(name="first")
    def first(x: int) -> int:
        return x + 1

    @app.step(name="second")
    def second(x: int) -> int:
        if announce:
            print("blocked", flush=True)
        while not gate.exists():
            time.sleep(0.01)
        return x * 10

    @app.workflow(name="trace_wf")
    def trace_wf(x: int) -> int:
        return second(first(x))

    return trace_wf


def main(db: str, spans: str, gate: str) -> None:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class LineExporter(SpanExporter):
        def __init__(self, path: str) -> None:
            self.out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

        def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
            for s in batch:
                assert s.context is not None
                self.out.write(json.dumps({
                    "name": s.name, "trace_id": f"{s.context.trace_id:032x}",
                    "span_id": f"{s.context.span_id:016x}",
                    "parent": f"{s.parent.span_id:016x}" if s.parent else None}) + "\n")
            self.out.flush()
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LineExporter(spans)))
    app = crashsafe.App(f"sqlite:///{db}", tracing=provider)
    wf = define(app, Path(gate), announce=True)
    app.start(wf, 4, workflow_id=WORKFLOW_ID)
    time.sleep(600)  # killed long before


if __name__ == "__main__":
    main(*sys.argv[1:4])
