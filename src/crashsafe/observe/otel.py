"""OpenTelemetry spans for workflows, steps, attempts, checkpoints, sleeps and waits.

Enabled per app: ``App(tracing=True)`` traces through the global tracer provider,
``App(tracing=provider)`` through that one, ``App(tracing=False)`` never; the default
(``None``) traces when ``opentelemetry`` is imported and a real tracer provider has
been set globally (``trace.set_tracer_provider(...)``) by the time a run begins. Needs
``pip install 'crashsafe[otel]'``.

The spans of one workflow, whichever process ran which part::

    start <name>                 (where app.start was called; ended at once)
    └── workflow <name>          one per run: the first, and each resumed one
        ├── step <name>          one per step call that ran (not replayed ones)
        │   ├── attempt 1        only for a step that needed more than one attempt
        │   └── attempt 2
        ├── checkpoint <label>
        ├── sleep
        └── wait <signal>

**The trace survives a crash.** ``app.start`` stamps the context of its ``start``
span (a W3C ``traceparent``) into the workflow's stored inputs, written in the same
transaction as the workflow row. Every run — the first, and one resumed after kill -9
by any process — reads it back and opens its ``workflow`` span as a child of that
span, so the whole story is one trace. (A workflow started before its app traced has
no stamp: each of its runs starts a trace of its own.)

Step, attempt, checkpoint, sleep and wait spans are built from the records each
commit made durable, with their recorded start and end times (a step's span runs from
its first attempt's start to its result, as its journal entry records them; the
commit that follows is the run's), on the workflow's thread (a few microseconds a
span): at once for anything but a step's plain result, and for those in batches of up
to :data:`crashsafe._instrument.BATCH`, within about 0.3 s of the commit at the latest
(at the run's next step, or from crashsafe's reporting thread). A process killed with
-9 loses the spans of the last fraction of a second it had not reported yet, as it
loses those its span processor had not exported yet. They go to the provider's span
processors: use a ``BatchSpanProcessor`` in production, which exports on a thread of
its own, so the workflow never waits for the exporter (a ``SimpleSpanProcessor``
exports each span on the spot, in the workflow).
With head sampling (``TracerProvider(sampler=ParentBased(TraceIdRatioBased(r)))``)
a workflow's runs and steps follow the decision made for its ``start`` span: an
unsampled workflow makes no span at all.

The run's ``workflow`` span is current while the workflow's code runs, so spans your
own code opens (an instrumented HTTP or LLM client) land in the same trace, as children
of the run.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

import msgspec

from .. import __version__
from .._errors import describe, recorded_class
from .._instrument import Run, Sink
from .._secrets import redact_text
from ..exceptions import ConfigurationError, CrashsafeError
from ..stores.base import AttemptRecord, JournalEntry

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer, TracerProvider

    from ..stores.base import Op

Stamp = tuple[str, "SpanContext"]
"""A stamp (a ``traceparent``) and the remote span context it reads as."""
EXTRA = "pip install 'crashsafe[otel]'"
"""What to install for tracing."""
STAMP_KEY = "trace"
"""The key of the traceparent in a workflow's stored inputs document."""
_FAILED = frozenset({"error", "dead_letter", "store_error"})


def _api() -> Any:
    global _trace_module
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigurationError(
            f"tracing needs the OpenTelemetry packages: {EXTRA} (or pass "
            "App(tracing=False))") from exc
    _trace_module = trace
    return trace


_trace_module: Any = None


def auto_provider() -> TracerProvider | None:
    """The global tracer provider, if ``opentelemetry`` is imported and one was set."""
    import sys

    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider  # type: ignore[no-any-return]


# -- the stamp: a traceparent inside the stored inputs ------------------------------------
def stamp(inputs: bytes, traceparent: str) -> bytes:
    """``inputs`` (the JSON object ``{"args": ..., "kwargs": ...}``) with the
    traceparent added as one more key; readers of the arguments ignore it."""
    if not inputs.endswith(b"}") or len(inputs) < 2:
        return inputs
    sep = b"" if inputs == b"{}" else b","
    return inputs[:-1] + sep + f'"{STAMP_KEY}":"{traceparent}"}}'.encode()


def stamped(inputs: bytes) -> str | None:
    """The traceparent stamped into ``inputs``, or None.

    Read from the end, where :func:`stamp` put it, without decoding the arguments
    (a run of a workflow with a 100 KB prompt would otherwise parse it once more): a
    top-level key is the only place where ``"trace":"`` can follow a comma or the
    opening brace, since inside a JSON string every quote is escaped, and a key of a
    nested object is followed by that object's closing brace."""
    tail = inputs[-_STAMP_TAIL:]
    if not tail.endswith(b'"}'):
        return None
    at = tail.rfind(_STAMP_OPEN)
    if at < 1 or tail[at - 1] not in b",{":
        return None
    value = tail[at + len(_STAMP_OPEN):-2]
    if b'"' in value or b"\\" in value:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


_STAMP_OPEN = f'"{STAMP_KEY}":"'.encode()
_STAMP_TAIL = 128
"""Bytes at the end of the inputs where a stamp can be: its key, a traceparent (55
characters in version 00, room left for a longer future version), the closing quote
and brace."""


def traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The W3C ``traceparent`` (version 00) of a span context's ids and flags."""
    return "00-%032x-%016x-%02x" % (trace_id, span_id, flags)  # noqa: UP031 (faster)


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent``, or None when malformed."""
    if not value:
        return None
    parts = value.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or trace_id >> 128 or span_id >> 64 or flags > 0xFF:
        return None
    return _remote(trace_id, span_id, flags)


def _remote(trace_id: int, span_id: int, flags: int) -> SpanContext:
    """The remote span context of valid ids, as a traceparent carries it (no trace
    state)."""
    trace = _trace_module or _api()
    return _new_tuple(trace.SpanContext,  # type: ignore[no-any-return]
                      (trace_id, span_id, True, trace.TraceFlags(flags),
                       trace.DEFAULT_TRACE_STATE, True)) if _fast_layout \
        else trace.SpanContext(trace_id, span_id, is_remote=True,
                               trace_flags=trace.TraceFlags(flags))


# -- the tracer -----------------------------------------------------------------------------
class Tracing(Sink):
    """Spans for one app's workflows (see the module documentation)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        trace = _api()
        self.provider = provider
        source = provider if provider is not None else trace.get_tracer_provider()
        self.source = source
        self.tracer: Tracer = source.get_tracer("crashsafe", __version__)
        self._trace = trace
        self._direct = _Direct.of(self.tracer)
        self._unset = trace.Status(trace.StatusCode.UNSET)
        from opentelemetry import context

        self._context = context
        self._runtime, self._current, self._span_key = _context_var(context)
        self._context_type = context.Context
        self._key = id(self)
        self._step_names: dict[str, str] = {}

    # On the caller's thread ------------------------------------------------------------
    def stamp_start(self, inputs: bytes, name: str,
                    workflow_id: str | None) -> tuple[bytes, Stamp | None]:
        """Open and end the ``start`` span (a child of the caller's current span) and
        stamp its context into ``inputs`` (unchanged if tracing fails: the workflow
        starts anyway). Also returns what :meth:`begin` would read back from the stamp,
        for a run begun right after in this process to take instead (None: no
        stamp)."""
        try:
            return self._stamp_start(inputs, name, workflow_id)
        except Exception:
            from .._instrument import _failed

            _failed("the start of a workflow")
            return inputs, None

    def _stamp_start(self, inputs: bytes, name: str,
                     workflow_id: str | None) -> tuple[bytes, Stamp | None]:
        direct = self._direct
        ids = direct.start(name, workflow_id) if direct is not None else None
        if ids is None:
            span = self.tracer.start_span(f"start {name}", kind=self._trace.SpanKind.PRODUCER,
                                          attributes=_start_attributes(name, workflow_id))
            span.end()
            sc = span.get_span_context()
            if not sc.is_valid:
                return inputs, None
            ids = (sc.trace_id, sc.span_id, int(sc.trace_flags))
        value = traceparent(*ids)
        return stamp(inputs, value), (value, _remote(*ids))

    def attach(self, span: Any) -> object:
        """Make ``span`` (a run's) current on this thread; returns the detach token.

        What ``context.attach(trace.set_span_in_context(span))`` does (the current
        context with the span added), straight on the API's context variable when the
        API keeps its context in one (:func:`_context_var`): five calls less a run."""
        if isinstance(span, _OpenRun):
            span = span.current
        current = self._current
        if current is not None and self._context._RUNTIME_CONTEXT is self._runtime:
            return current.set(self._context_type({**current.get(), self._span_key: span}))
        return self._context.attach(self._trace.set_span_in_context(span))

    def detach(self, token: Any) -> None:
        current = self._current
        if current is not None and type(token) is Token and token.var is current:
            current.reset(token)
        else:
            self._context.detach(token)

    def begin(self, run: Run, inputs: bytes, handed: Stamp | None = None) -> bool:
        """Open the run's ``workflow`` span, a child of the stamped ``start`` span
        (``handed``: what :meth:`stamp_start` returned for these inputs, when it was
        just now in this process; else it is read back from them). False when it is
        not sampled (nor will any span of the run be)."""
        stamp: str | None
        parent: SpanContext | None
        if handed is not None:
            stamp, parent = handed
        else:
            stamp = stamped(inputs)
            parent = parse_traceparent(stamp)
        if stamp and parent is not None and not parent.trace_flags.sampled \
                and self._direct is not None:
            # Sampled out at its start (a parent-based sampler follows that decision): no
            # span of its own, only the start span's context made current, so spans the
            # workflow's code opens follow the decision (log lines name that span).
            run.span = self._trace.NonRecordingSpan(parent)
            run.set_trace(stamp[3:35], stamp[36:52])  # as parsed: 2, 32 and 16 digits
            return False
        attrs: dict[str, Any] = {
            "crashsafe.workflow.id": run.workflow_id,
            "crashsafe.workflow.name": run.name,
            "crashsafe.workflow.version": run.version,
            "crashsafe.run.resumed": bool(run.resumed),
            "crashsafe.run.recorded_entries": run.resumed,
            "crashsafe.run.token": run.token,
            "crashsafe.executor": run.app.executor_id,
        }
        name = f"workflow {run.name}"
        if self._direct is not None and parent is not None:
            span: Any = _OpenRun(self._direct, name, parent, attrs)
        else:
            from opentelemetry.context import Context

            trace = self._trace  # a stamped run under its start span; else a trace of its own
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent), Context()) \
                if parent is not None else Context()
            span = self.tracer.start_span(name, context=ctx, attributes=attrs)
        run.span = span
        sc = span.get_span_context()
        if sc.is_valid:
            run.set_trace(f"{sc.trace_id:032x}", f"{sc.span_id:016x}")
        return True

    # On the workflow's thread, after each commit ---------------------------------------
    def committed(self, run: Run, ops: Sequence[Op], t0: int, t1: int) -> None:
        st = run.state.get(self._key)
        if st is None:
            st = self._state(run)
        if st.parent is None:
            return
        if st.sleep is not None:
            self._wake(run, st, t1)
        if len(ops) != 1 or type(ops[0]) is not JournalEntry:
            for op in ops:  # first the attempt rows: a step's last one commits with its result
                if type(op) is AttemptRecord and op.ended_at is not None:
                    st.attempts.setdefault(op.index, {})[op.attempt] = op
        for op in ops:
            if type(op) is not JournalEntry:
                continue
            kind = op.kind
            if kind == "step":
                if op.error is None and op.note is None and not st.attempts:
                    self._plain_step(run, st.parent, op)
                else:
                    self._step(run, st, op)
            elif kind == "checkpoint":
                self._span(st.parent, f"checkpoint {op.name}", t0, t1, {
                    "crashsafe.step.index": op.index,
                    "crashsafe.checkpoint.label": op.name,
                    "crashsafe.checkpoint.bytes": len(op.output or b""),
                    "crashsafe.checkpoint.commit_ms": (t1 - t0) / 1e6})
            elif kind == "sleep":
                wake = _number(op.output)
                begun = _ns(op.started_at, run)
                st.sleep = (op.index, begun, _ns(wake, run) if wake else begun)
            elif kind == "wait":
                st.waits[op.index] = _ns(op.started_at, run)
            elif kind == "signal":
                self._span(st.parent, f"wait {op.name}", st.waits.pop(op.index - 1, t0), t1, {
                    "crashsafe.step.index": op.index - 1,
                    "crashsafe.signal": op.name,
                    "crashsafe.outcome": "timed out" if op.error else "signal"},
                    error=op.error)
            elif kind == "compensate":
                self._span(st.parent, f"compensate {op.name}", _ns(op.started_at, run), t1, {
                    "crashsafe.step.index": op.index,
                    "crashsafe.outcome": "error" if op.error else "ok"}, error=op.error)

    def steps(self, run: Run, entries: Sequence[JournalEntry]) -> None:
        """:meth:`committed` for each step, with the spans of those that succeeded at
        once (nearly all) made in one pass (see :class:`_Direct`)."""
        st = run.state.get(self._key)
        if st is None:
            st = self._state(run)
        parent, direct = st.parent, self._direct
        if parent is None:
            return
        if direct is None or st.attempts or st.sleep is not None:
            for e in entries:
                t = _ns(e.ended_at, run)
                self.committed(run, (e,), t, t)
            return
        finish = direct.ends()
        make, readable, new_id = direct.make_context, direct.span_type, direct.new_id
        fast, context_type, bits = direct.fast, direct.context_type, _getrandbits
        trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        resource, kind, scope, unset = direct.resource, direct.kind, direct.scope, self._unset
        names, offset = self._step_names, run.offset_ns
        made: list[Any] = []
        for e in entries:  # _plain_step, inline
            name = names.get(e.name)
            if name is None:
                name = self._step_name(e.name)
            start = int(e.started_at * 1e9) - offset
            end = int(e.ended_at * 1e9) - offset
            if fast:  # _fast_context and the SDK's RandomIdGenerator, inline
                ctx = _new_tuple(context_type, (trace_id, bits(64) or new_id(), False, flags,
                                                state, True))
            else:
                ctx = make(trace_id, new_id(), flags, state)
            made.append(readable(
                name, ctx, parent, resource,
                {"crashsafe.step.index": e.index, "crashsafe.step.name": e.name,
                 "crashsafe.step.attempts": e.attempts, "crashsafe.outcome": "ok"},
                (), (), kind, None, unset, start, end if end > start else start, scope))
        for ender in finish:
            ender(made)

    def _step_name(self, step: str) -> str:
        name = f"step {step}"
        if len(self._step_names) < 1024:  # step names come from the code: a few
            self._step_names[step] = name
        return name

    def run_ended(self, run: Run, outcome: str, error: BaseException | None, at: int) -> None:
        span = run.span
        if span is None:
            return
        st = self._state(run)
        if st.parent is not None:
            self._wake(run, st, at)
            for index, rows in sorted(st.attempts.items()):  # a step still retrying
                first = rows[min(rows)]
                step = self._span(st.parent, f"step {first.step}", _ns(first.started_at, run),
                                  at, {"crashsafe.step.index": index,
                                       "crashsafe.step.name": first.step,
                                       "crashsafe.step.attempts": max(rows),
                                       "crashsafe.outcome": "unfinished"})
                self._attempts(run, step, rows)
        span.set_attribute("crashsafe.outcome", outcome)
        span.set_attribute("crashsafe.run.replayed", run.replayed)
        if outcome in _FAILED:
            text = redact_text(f"{type(error).__name__}: {error}")[:300] if error else outcome
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, text))
            if error is not None:
                span.set_attribute("error.type", type(error).__name__)
        span.end(end_time=at)
        run.state.pop(self._key, None)

    # ------------------------------------------------------------------------------------
    def _state(self, run: Run) -> _RunState:
        st = run.state.get(self._key)
        if st is None:
            st = run.state[self._key] = _RunState()
            sc = run.span.get_span_context() if run.span is not None else None
            # Children follow their run's sampling decision (as a parent-based sampler
            # would): a run that is not recorded gets no step spans either.
            if sc is not None and sc.is_valid and sc.trace_flags.sampled:
                st.parent = sc
        return st

    def _wake(self, run: Run, st: _RunState, now: int) -> None:
        """A sleep's span ends when the run next does something (or ends)."""
        if st.sleep is None or st.parent is None:
            return
        index, begun, wake = st.sleep
        st.sleep = None
        self._span(st.parent, "sleep", begun, max(begun, min(wake, now)),
                   {"crashsafe.step.index": index})

    def _plain_step(self, run: Run, parent: SpanContext, e: JournalEntry) -> None:
        """The span of a step that succeeded at once (nearly all): :meth:`_step`, with
        only what such a step needs (this runs once per step, in the workflow)."""
        name = self._step_names.get(e.name)
        if name is None:
            name = self._step_name(e.name)
        start, end = _ns(e.started_at, run), _ns(e.ended_at, run)
        attrs = {"crashsafe.step.index": e.index, "crashsafe.step.name": e.name,
                 "crashsafe.step.attempts": e.attempts, "crashsafe.outcome": "ok"}
        if self._direct is not None:
            self._direct.record(parent, name, start, end if end > start else start, attrs,
                                self._unset)
        else:
            self._span(parent, name, start, end, attrs)

    def _step(self, run: Run, st: _RunState, e: JournalEntry) -> None:
        assert st.parent is not None
        attrs: dict[str, Any] = {
            "crashsafe.step.index": e.index,
            "crashsafe.step.name": e.name,
            "crashsafe.step.attempts": e.attempts,
        }
        if e.error is not None:
            attrs["crashsafe.outcome"] = "error"
            attrs["crashsafe.failure_class"] = _failure_class(e.error)
        else:
            attrs["crashsafe.outcome"] = "deduplicated" \
                if (e.note or "").startswith("deduplicated") else "ok"
        step = self._span(st.parent, f"step {e.name}", _ns(e.started_at, run),
                          _ns(e.ended_at, run), attrs,
                          error=e.error)
        rows = st.attempts.pop(e.index, None)
        if rows:
            self._attempts(run, step, rows)

    def _attempts(self, run: Run, parent: SpanContext, rows: dict[int, AttemptRecord]) -> None:
        for n in sorted(rows):
            r = rows[n]
            attrs: dict[str, Any] = {
                "crashsafe.step.index": r.index,
                "crashsafe.step.name": r.step,
                "crashsafe.attempt": r.attempt,
                "crashsafe.outcome": "error" if r.failure_class else "ok",
            }
            if r.failure_class:
                attrs["crashsafe.failure_class"] = r.failure_class
            if r.delay is not None:
                attrs["crashsafe.retry.delay_s"] = r.delay
                attrs["crashsafe.retry.delay_source"] = r.delay_source or "backoff"
            end = r.ended_at if r.ended_at is not None else r.started_at
            self._span(parent, f"attempt {r.attempt}", _ns(r.started_at, run), _ns(end, run),
                       attrs, error=r.error)

    def _span(self, parent: SpanContext, name: str, start: int, end: int,
              attrs: dict[str, Any], *, error: bytes | None = None) -> SpanContext:
        """Record one finished span under ``parent``; returns its context."""
        trace = self._trace
        status = self._unset
        if error is not None:
            status = trace.Status(trace.StatusCode.ERROR, redact_text(describe(error))[:300])
            attrs["error.type"] = _error_type(error)
        end = max(start, end)
        if self._direct is not None:
            return self._direct.record(parent, name, start, end, attrs, status)
        span = self.tracer.start_span(
            name, context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            attributes=attrs, start_time=start)
        if error is not None:
            span.set_status(status)
        span.end(end_time=end)
        return span.get_span_context()


class _Direct:
    """Records finished spans straight into an SDK tracer's span processors.

    A span whose start and end are already known needs none of the live ``Span``'s
    machinery (locks, limits, a sampler asked again for a child of a sampled run): it is
    built as the SDK's ``ReadableSpan`` and handed to the processors' ``on_end``, where
    a span ended through the API goes too (a batch of step spans goes straight into the
    queue of the SDK's ``BatchSpanProcessor``: :func:`_queue_into`). Four to five times
    cheaper, which keeps tracing within the overhead budget (see docs/benchmarks.md).
    Only for the SDK's own tracer; any other goes through ``start_span``. Processors'
    ``on_start`` is not called for these spans.
    """

    def __init__(self, tracer: Any) -> None:
        from opentelemetry.sdk.trace import ReadableSpan, SynchronousMultiSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

        self.processor = tracer.span_processor
        self.resource = tracer.resource
        self.new_id = tracer.id_generator.generate_span_id
        self.scope = InstrumentationScope("crashsafe", __version__)
        self.span_type, self.context_type = ReadableSpan, SpanContext
        self.kind = SpanKind.INTERNAL
        self.non_recording, self.unset = NonRecordingSpan, Status(StatusCode.UNSET)
        self._multi = SynchronousMultiSpanProcessor
        self._enders: dict[int, tuple[Any, Callable[[list[Any]], None]]] = {}
        self.make_context: Callable[[int, int, Any, Any], SpanContext] = self._checked_context
        self.fast = type(tracer.id_generator) is RandomIdGenerator and _fast_context_works()
        """Span contexts made as :func:`_fast_context` does, span ids drawn as the SDK's
        ``RandomIdGenerator`` draws them (64 random bits, never 0)."""
        if self.fast:
            self.make_context = _fast_context
        self.tracer = tracer
        self.producer = SpanKind.PRODUCER
        self.direct_start = _plain_tracer(tracer)
        """Whether :meth:`start` may decide a ``start`` span itself (see there)."""
        from opentelemetry import context as context_api
        from opentelemetry.trace import TraceFlags, get_current_span

        self.current_context, self.current_span = context_api.get_current, get_current_span
        self.random_flag = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
        is_random = getattr(tracer.id_generator, "is_trace_id_random", None)
        self.random_root = self.random_flag if is_random is not None and is_random() else 0
        self.flags_type = TraceFlags
        self.decided: tuple[Any, Callable[[Any, int], bool] | None] = (None, None)
        """A sampler and its :func:`_decider` (a tracer's sampler may be replaced)."""
        self.quiet: tuple[Any, bool] = (object(), False)
        """The processors :meth:`_quiet` looked at last, and what it found."""

    def _checked_context(self, trace_id: int, span_id: int, flags: Any,
                         state: Any) -> SpanContext:
        return self.context_type(trace_id, span_id, False, flags, state)

    def ends(self) -> list[Callable[[list[Any]], None]]:
        """For each of the provider's processors, what hands it a list of finished
        spans (read again for each batch: a processor may be added at any time)."""
        processor = self.processor
        inner = getattr(processor, "_span_processors", None)
        if type(processor) is self._multi and isinstance(inner, tuple):
            return [self._ender(p) for p in inner]  # one call less per span
        return [self._ender(processor)]

    def _ender(self, processor: Any) -> Callable[[list[Any]], None]:
        enders = self._enders
        ender = enders.get(id(processor))
        if ender is None or ender[0] is not processor:
            ender = (processor, _queue_into(processor) or _one_by_one(processor.on_end))
            if len(enders) > 64:  # processors come and go in tests, not in services
                enders.clear()
            enders[id(processor)] = ender
        return ender[1]

    @classmethod
    def of(cls, tracer: Any) -> _Direct | None:
        try:
            from opentelemetry.sdk.trace import Tracer as SdkTracer
        except ImportError:
            return None
        if type(tracer) is not SdkTracer or not all(
                hasattr(tracer, a) for a in ("span_processor", "resource", "id_generator")):
            return None
        return cls(tracer)

    def start(self, workflow: str, workflow_id: str | None) -> tuple[int, int, int] | None:
        """The ``start`` span of a workflow, begun and ended at once under the caller's
        current span: its trace id, span id and trace flags (None: ask ``start_span``).

        What the SDK tracer's ``start_span`` decides for such a span (a trace id, the
        sampler's verdict, the flags), without the live span it would build, lock and
        end at once; a recorded one is handed to the processors finished (as
        :meth:`record` does). In the other workflows of a sampled service, nearly all,
        no span object is made at all, and the SDK's own samplers are not even asked
        (:func:`_decider`). Only for a tracer that is enabled and counts nothing about
        its own spans (:func:`_plain_tracer`), checked at each call."""
        tracer = self.tracer
        if not self.direct_start or not tracer._is_enabled() or not self._quiet():
            return None
        context = self.current_context()
        parent: Any = self.current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id, random_flag = parent.trace_id, int(parent.trace_flags) & self.random_flag
        else:
            parent = None
            trace_id, random_flag = tracer.id_generator.generate_trace_id(), self.random_root
        sampler = tracer.sampler
        decided = self.decided
        if decided[0] is not sampler:  # one tuple: another thread sees a matching pair
            decided = self.decided = (sampler, _decider(sampler))
        name = f"start {workflow}"
        decide = decided[1]
        if decide is not None:
            sampled = decide(parent, trace_id)
            span_id = self.new_id()
            if sampled:  # as the SDK's samplers say: the caller's attributes, its state
                self._start_span(name, trace_id, span_id, 1 | random_flag, parent,
                                 None if parent is None else parent.trace_state,
                                 _start_attributes(workflow, workflow_id))
            return trace_id, span_id, int(sampled) | random_flag
        attrs = _start_attributes(workflow, workflow_id)
        result = sampler.should_sample(context, trace_id, name, self.producer, attrs, ())
        decision = result.decision
        flags = (1 if decision.is_sampled() else 0) | random_flag
        span_id = self.new_id()
        if decision.is_recording():
            self._start_span(name, trace_id, span_id, flags, parent, result.trace_state,
                             dict(result.attributes or {}))
        return trace_id, span_id, flags

    def _quiet(self) -> bool:
        """Whether none of the provider's span processors does anything when a span
        starts or is ending (the SDK's batch and simple processors, or ones that keep
        the base class's ``on_start``): a ``start`` span, the only one crashsafe makes
        in the caller's own context, is then recorded without them. Looked at again
        when a processor is added."""
        processor = self.processor
        seen = getattr(processor, "_span_processors", processor)
        quiet = self.quiet
        if quiet[0] is not seen:
            processors = seen if isinstance(seen, tuple) else (processor,)
            quiet = self.quiet = (seen, all(_quiet_processor(p) for p in processors))
        return quiet[1]

    def _start_span(self, name: str, trace_id: int, span_id: int, flags: int, parent: Any,
                    state: Any, attrs: dict[str, Any]) -> None:
        ctx = self.context_type(trace_id, span_id, False, self.flags_type(flags), state)
        now = time.time_ns()
        self.processor.on_end(self.span_type(
            name, ctx, parent, self.resource, attrs, (), (), self.producer, None, self.unset,
            now, now, self.scope))

    def record(self, parent: SpanContext, name: str, start: int, end: int,
               attrs: dict[str, Any], status: Any, ctx: Any = None) -> SpanContext:
        if ctx is None:
            ctx = self.make_context(parent.trace_id, self.new_id(), parent.trace_flags,
                                    parent.trace_state)
        self.processor.on_end(self.span_type(
            name, ctx, parent, self.resource, attrs, (), (), self.kind, None, status, start,
            end, self.scope))
        return ctx  # type: ignore[no-any-return]


def _context_var(context: Any) -> tuple[Any, ContextVar[Any] | None, str]:
    """The API's runtime context, the context variable it keeps the current context in
    (None unless it is the API's own ``ContextVarsRuntimeContext``, the default), and
    the key a span is kept under in a context."""
    from opentelemetry.trace.propagation import _SPAN_KEY

    runtime = getattr(context, "_RUNTIME_CONTEXT", None)
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    except ImportError:
        return runtime, None, _SPAN_KEY
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is not ContextVarsRuntimeContext or type(var) is not ContextVar:
        return runtime, None, _SPAN_KEY
    return runtime, var, _SPAN_KEY


def _start_attributes(workflow: str, workflow_id: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"crashsafe.workflow.name": workflow}
    if workflow_id is not None:
        attrs["crashsafe.workflow.id"] = workflow_id
    return attrs


def _decider(sampler: Any) -> Callable[[Any, int], bool] | None:
    """For the SDK's own samplers, as the specification defines them (always on, always
    off, trace id ratio, and parent-based on top of those): whether a span under
    ``parent`` (a valid span context, or None for a root) in trace ``trace_id`` is
    sampled, decided as their ``should_sample`` decides but without building its
    result (about three quarters of the cost of a workflow's ``start`` span that is
    not sampled). None for any other sampler, a subclass that decides for itself, or
    a decision to record without sampling: those are asked."""
    try:
        from opentelemetry.sdk.trace.sampling import (
            Decision,
            ParentBased,
            StaticSampler,
            TraceIdRatioBased,
        )
    except ImportError:
        return None

    def own(s: Any, base: Any) -> bool:
        return isinstance(s, base) and type(s).should_sample is base.should_sample

    def by_trace_id(s: Any) -> Callable[[int], bool] | None:
        if own(s, StaticSampler):
            decision = getattr(s, "_decision", None)
            if decision is Decision.RECORD_AND_SAMPLE:
                return lambda trace_id: True
            if decision is Decision.DROP:
                return lambda trace_id: False
            return None
        if own(s, TraceIdRatioBased):
            bound, limit = s.bound, s.TRACE_ID_LIMIT
            return lambda trace_id: trace_id & limit < bound
        return None

    alone = by_trace_id(sampler)
    if alone is not None:  # these ignore the parent
        return lambda parent, trace_id: alone(trace_id)
    if not own(sampler, ParentBased):
        return None
    rules = [by_trace_id(getattr(sampler, a, None)) for a in (
        "_root", "_remote_parent_sampled", "_remote_parent_not_sampled",
        "_local_parent_sampled", "_local_parent_not_sampled")]
    root, remote_yes, remote_no, local_yes, local_no = rules
    if root is None or remote_yes is None or remote_no is None or local_yes is None \
            or local_no is None:
        return None

    def decide(parent: Any, trace_id: int) -> bool:
        if parent is None:
            return root(trace_id)
        if parent.is_remote:
            return (remote_yes if parent.trace_flags.sampled else remote_no)(trace_id)
        return (local_yes if parent.trace_flags.sampled else local_no)(trace_id)
    return decide


def _quiet_processor(processor: Any) -> bool:
    """Whether ``processor``'s ``on_start`` and ``_on_ending`` are those of the SDK's
    base class or of its batch or simple processor, which do nothing."""
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    kinds = (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)
    cls = type(processor)
    return any(cls.on_start is k.on_start for k in kinds) and all(
        any(getattr(cls, hook, None) is getattr(k, hook, None) for k in kinds)
        for hook in ("_on_ending",))


def _plain_tracer(tracer: Any) -> bool:
    """Whether ``tracer`` is laid out as the SDK's is since it has a tracer
    configurator and metrics of its own, with those metrics off (the default): then
    :meth:`_Direct.start` decides as its ``start_span`` would. Otherwise (an older
    SDK, or its metrics on, which count each span) ``start`` spans go through
    ``start_span``."""
    try:
        from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
    except ImportError:
        return False
    return callable(getattr(tracer, "_is_enabled", None)) \
        and type(getattr(tracer, "_tracer_metrics", None)) is NoOpTracerMetrics \
        and hasattr(tracer, "sampler")


def _one_by_one(on_end: Callable[[Any], None]) -> Callable[[list[Any]], None]:
    def end(spans: list[Any]) -> None:
        for span in spans:
            on_end(span)
    return end


_QUEUE_LAYOUT = ("_queue", "_max_queue_size", "_max_export_batch_size", "_worker_awaken",
                 "_shutdown", "_pid")


def _queue_into(processor: Any) -> Callable[[list[Any]], None] | None:
    """For the SDK's ``BatchSpanProcessor``: what its ``on_end`` does for each span (the
    span goes to the left of its queue, and its export thread is woken once a batch is
    there), done once for a list of sampled spans. Its per-span checks cost about as
    much as building the span. Whatever the fast way does not cover (a processor shut
    down, a forked process, a queue without room for them all: where it warns, drops
    and counts) goes through its own ``on_end``. None when the processor is not laid
    out as this SDK version's is (then each span goes through ``on_end``)."""
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    inner = getattr(processor, "_batch_processor", None)
    if type(processor) is not BatchSpanProcessor or inner is None \
            or not all(hasattr(inner, a) for a in _QUEUE_LAYOUT) \
            or type(inner._queue) is not deque:
        return None
    on_end = processor.on_end

    def end(spans: list[Any]) -> None:  # spans of one run: one trace, the same flags
        if not spans or not spans[0].context.trace_flags.sampled:
            return  # on_end drops those
        queue = inner._queue  # read each time: a forked child's SDK makes new ones
        if inner._shutdown or inner._pid != os.getpid() \
                or len(queue) + len(spans) > inner._max_queue_size:
            for span in spans:
                on_end(span)
            return
        queue.extendleft(spans)  # as appendleft, span by span
        if len(queue) >= inner._max_export_batch_size and not inner._worker_awaken.is_set():
            inner._worker_awaken.set()
    return end


def _fast_context(trace_id: int, span_id: int, flags: Any, state: Any) -> SpanContext:
    """``SpanContext(trace_id, span_id, False, flags, state)`` without its checks, for
    ids known valid (a sampled parent's trace id, a span id of the SDK's random
    generator, never 0): the API's SpanContext is a tuple, and its checks cost more
    than the rest of a span. Used only when :func:`_fast_context_works`."""
    return _new_tuple(_SpanContext, (trace_id, span_id, False, flags, state, True))  # type: ignore[no-any-return]


_new_tuple = tuple.__new__
_SpanContext: Any = None
_getrandbits = random.getrandbits


def _fast_context_works() -> bool:
    """Whether this version of the API lays its SpanContext out as :func:`_fast_context`
    assumes (checked once, against the real constructor)."""
    global _SpanContext, _fast_layout
    if _SpanContext is not None:
        return _fast_layout
    from opentelemetry.trace import DEFAULT_TRACE_STATE, SpanContext, TraceFlags, TraceState

    flags, state = TraceFlags(TraceFlags.SAMPLED), TraceState([("k", "v")])
    try:
        fast = _new_tuple(SpanContext, (0xABC, 0xDEF, False, flags, state, True))
        real = SpanContext(0xABC, 0xDEF, False, flags, state)
        remote = _new_tuple(SpanContext, (1, 2, True, flags, DEFAULT_TRACE_STATE, True))
        real_remote = SpanContext(1, 2, is_remote=True, trace_flags=flags)
    except Exception:
        works = False
    else:
        works = bool(isinstance(real, tuple) and fast == real and type(fast) is type(real)
                     and fast.trace_id == 0xABC and fast.span_id == 0xDEF
                     and not fast.is_remote and fast.trace_flags == flags
                     and fast.trace_state is state and fast.is_valid
                     and remote == real_remote and remote.is_remote)
    _fast_layout, _SpanContext = works, SpanContext
    return works


_fast_layout = False


class _OpenRun:
    """A run's ``workflow`` span recorded the direct way (see :class:`_Direct`): its
    context exists from the start, for the workflow's code to open spans under; the
    span itself is made when the run ends. Sampled as its ``start`` span was."""

    def __init__(self, direct: _Direct, name: str, parent: SpanContext,
                 attrs: dict[str, Any]) -> None:
        self.direct, self.name, self.parent, self.attrs = direct, name, parent, attrs
        self.context: SpanContext = direct.make_context(
            parent.trace_id, direct.new_id(), parent.trace_flags, parent.trace_state)
        self.current = direct.non_recording(self.context)
        self.status: Any = direct.unset
        self.start = time.time_ns()

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attribute(self, key: str, value: Any) -> None:
        self.attrs[key] = value

    def set_status(self, status: Any) -> None:
        self.status = status

    def end(self, end_time: int) -> None:
        if self.context.trace_flags.sampled:
            self.direct.record(self.parent, self.name, self.start, max(self.start, end_time),
                               self.attrs, self.status, self.context)


class _RunState:
    """What the tracer keeps about one run between its commits."""

    __slots__ = ("attempts", "parent", "sleep", "waits")

    def __init__(self) -> None:
        self.parent: SpanContext | None = None
        self.attempts: dict[int, dict[int, AttemptRecord]] = {}
        self.sleep: tuple[int, int, int] | None = None
        self.waits: dict[int, int] = {}


def _ns(seconds: float, run: Run) -> int:
    """A record's time (the store's clock) as our wall clock in nanoseconds."""
    return int(seconds * 1e9) - run.offset_ns


def _number(data: bytes | None) -> float | None:
    try:
        value = msgspec.json.decode(data or b"null")
    except msgspec.DecodeError:
        return None
    return float(value) if isinstance(value, int | float) else None


def _failure_class(payload: bytes) -> str:
    try:
        return recorded_class(payload) or "unknown"
    except CrashsafeError:
        return "unknown"


def _error_type(payload: bytes) -> str:
    text = describe(payload)
    return text.split(":", 1)[0] if ":" in text else "Exception"
