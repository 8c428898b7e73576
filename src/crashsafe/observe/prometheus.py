"""The Prometheus endpoint: the journal's figures, their alerts, and this process's counters.

``exposition(store)`` returns ``(body, content_type)`` for a ``GET /metrics``:

* **Gauges computed from the journal** (:func:`crashsafe.observe.compute`) over a
  trailing window (``window`` seconds, one hour by default): the same figures as
  ``crashsafe stats``, true across restarts and processes, whichever process serves
  them. Each comes once for all workflows (``workflow=""``) and once per workflow name
  of the window (``workflow="support_ticket"``), except the breakers (shared by every
  workflow) and the alert checks (for all workflows). A figure that cannot be computed
  (nothing in the window) is left out, never reported as 0.
* **Alert state**: ``crashsafe_check{check, status}`` is 1 with the check's status
  (``ok``, ``alert`` or ``no_data``), with ``crashsafe_check_value`` and
  ``crashsafe_check_threshold``; ``crashsafe_alerts`` counts the checks that fire.
* **Counters of this process** (since it started), once :func:`instrument` was called
  (``crashsafe worker --metrics-port`` does): workflow runs begun and ended, steps by
  outcome, attempts, failed attempts by failure class, step duration and checkpoint
  write latency histograms, checkpoint bytes, sleeps and waits, recovery claims.
  They are fed by the engine's hooks (:mod:`crashsafe._instrument`) after each commit
  (plain step results in batches, within about 0.3 s).

Needs ``pip install 'crashsafe[prometheus]'``. Computing the journal figures reads
every workflow of the window (about a second per 10,000 workflows on SQLite, twice
when there are several workflow names); scrape every 30 s or more on a large store,
or shorten ``window``.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .. import _instrument
from .._errors import recorded_class
from ..exceptions import ConfigurationError, CrashsafeError
from ..policies.breaker import BreakerState
from ..stores.base import AttemptRecord, JournalEntry, ListFilter
from .alerts import Thresholds, Verdict, evaluate
from .metrics import Metrics, Percentiles, compute

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .._instrument import Run
    from ..stores.base import Op, Store

EXTRA = "pip install 'crashsafe[prometheus]'"
WINDOW = 3600.0
"""Default trailing window of the journal figures, in seconds."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
FOLD = 1024
"""Durations of one workflow's step gathered before they are turned into buckets."""


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(f"the Prometheus endpoint needs prometheus-client: {EXTRA}") \
            from exc
    return prometheus_client


# -- counters of this process -------------------------------------------------------------
_COUNTERS = (
    # (name, help, label names)
    ("workflow_runs", "Workflow runs begun in this process (resumed: it continued an "
     "earlier run's journal)", ("workflow", "resumed")),
    ("workflow_runs_ended", "Workflow runs ended in this process, by outcome",
     ("workflow", "outcome")),
    ("steps", "Step calls finished in this process, by outcome",
     ("workflow", "step", "outcome")),
    ("step_attempts", "Attempts used by the step calls finished in this process",
     ("workflow", "step")),
    ("attempt_failures", "Failed step attempts recorded in this process, by failure class",
     ("workflow", "step", "failure_class")),
    ("checkpoints", "Checkpoints written", ("workflow",)),
    ("checkpoint_bytes", "Bytes of the checkpoints written (before compression and "
     "encryption)", ("workflow",)),
    ("timers", "Durable sleeps and waits for a signal begun", ("workflow", "kind")),
    ("recovery_claims", "Workflows of dead processes taken over by this process", ()),
    ("recovery_dead_letters", "Workflows dead-lettered by this process's recovery sweeps "
     "(recovered too often)", ()),
)
_HISTOGRAMS = (
    ("step_duration_seconds", "Step calls from their first attempt to their result",
     ("workflow", "step")),
    ("checkpoint_write_seconds", "Latency of the commits that wrote a checkpoint",
     ("workflow",)),
)


class Counters(_instrument.Sink):
    """In-process counters fed by the engine's hooks (see :func:`instrument`).

    Plain dicts under one lock, taken once per hook call (not per increment) and by a
    scrape while it copies them (:meth:`snapshot`); turned into Prometheus families
    only when scraped.
    """

    def __init__(self) -> None:
        pc = _client()
        self.counts: dict[str, dict[tuple[str, ...], float]] = {
            name: {} for name, _, _ in _COUNTERS}
        # Per label set: the count of each bucket (not cumulative), then the sum.
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {
            name: {} for name, _, _ in _HISTOGRAMS}
        self._runs, self._runs_ended = self.counts["workflow_runs"], \
            self.counts["workflow_runs_ended"]
        self.registry = pc.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._ok: dict[str, dict[str, list[float]]] = {}
        """Steps that succeeded, per workflow, per step: count, attempts, each bucket's
        count and the sum of their durations, as of the last :meth:`_fold`."""
        self._took: dict[str, dict[str, list[float]]] = {}
        """Durations of the steps that succeeded since (see :meth:`steps`)."""

    def _add(self, name: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        series = self.counts[name]
        series[labels] = series.get(labels, 0.0) + amount

    def _observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        series = self.histograms[name]
        cells = series.get(labels)
        if cells is None:
            cells = series[labels] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        cells[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        cells[-1] += value

    def run_started(self, run: Run) -> None:
        labels = (run.name, "true" if run.resumed else "false")
        series = self._runs
        with self._lock:  # _add, inline (once a run)
            series[labels] = series.get(labels, 0.0) + 1.0

    def run_ended(self, run: Run, outcome: str, error: BaseException | None, at: int) -> None:
        labels = (run.name, outcome)
        series = self._runs_ended
        with self._lock:
            series[labels] = series.get(labels, 0.0) + 1.0

    def recovered(self, claimed: int, dead_lettered: int) -> None:
        with self._lock:
            self._add("recovery_claims", (), claimed)
            self._add("recovery_dead_letters", (), dead_lettered)

    def committed(self, run: Run, ops: Sequence[Op], t0: int, t1: int) -> None:
        with self._lock:
            self._committed(run, ops, t0, t1)

    def steps(self, run: Run, entries: Sequence[JournalEntry]) -> None:
        """Steps that succeeded (nearly all): for each, its duration is kept in a list
        per workflow and step name, and the lists are turned into counts and buckets
        in bulk, with the interpreter's sort and bisect (:meth:`_fold`): about a
        third of the work of a bucket, a count and a sum updated per step."""
        with self._lock:
            took = self._took.get(run.name)
            if took is None:
                took = self._took[run.name] = {}
            for e in entries:
                durations = took.get(e.name)
                if durations is None:
                    durations = self._cell(run.name, e.name)
                if e.attempts == 1:
                    durations.append(e.ended_at - e.started_at)
                else:
                    self._retried(run, e)
            for step, durations in took.items():
                if len(durations) >= FOLD:
                    self._fold(self._ok[run.name][step], durations)

    def _cell(self, workflow: str, step: str) -> list[float]:
        self._ok.setdefault(workflow, {})[step] = [0.0] * (len(LATENCY_BUCKETS) + 4)
        durations: list[float] = []
        self._took[workflow][step] = durations
        return durations

    def _retried(self, run: Run, e: JournalEntry) -> None:
        """A step that succeeded after retries, or was recorded without running
        (``attempts == 0``: counted, with no duration)."""
        if e.attempts:
            self._took[run.name][e.name].append(e.ended_at - e.started_at)
            self._ok[run.name][e.name][1] += e.attempts - 1
        else:
            self._ok[run.name][e.name][0] += 1

    @staticmethod
    def _fold(cell: list[float], durations: list[float]) -> None:
        """Add ``durations`` (then emptied) to ``cell``: count, attempts (one each;
        retries are added as they come), buckets, sum. A duration of 0 or less (clocks
        apart) lands in the first bucket and adds nothing to the sum."""
        took = sorted(durations)
        durations.clear()
        n = len(took)
        cell[0] += n
        cell[1] += n
        below = 0
        for i, bound in enumerate(LATENCY_BUCKETS):
            upto = bisect.bisect_right(took, bound, below)
            cell[2 + i] += upto - below
            below = upto
        cell[2 + len(LATENCY_BUCKETS)] += n - below
        positive = bisect.bisect_right(took, 0.0)
        cell[-1] += sum(took[positive:]) if positive else sum(took)

    def snapshot(self) -> tuple[dict[str, dict[tuple[str, ...], float]],
                                dict[str, dict[tuple[str, ...], list[float]]]]:
        """Copies of the counters and histograms (per label set: each bucket's count,
        not cumulative, then the sum), as of now."""
        with self._lock:  # the workflows do not write meanwhile
            for workflow, took in self._took.items():
                for step, pending in took.items():
                    if pending:
                        self._fold(self._ok[workflow][step], pending)
            counts = {k: dict(v) for k, v in self.counts.items()}
            histograms = {k: {lb: list(c) for lb, c in v.items()}
                          for k, v in self.histograms.items()}
            ok = {(workflow, step): list(cell) for workflow, per in self._ok.items()
                  for step, cell in per.items()}
        steps, attempts = counts["steps"], counts["step_attempts"]
        durations = histograms["step_duration_seconds"]
        for pair, cell in ok.items():
            labels = (*pair, "ok")
            steps[labels] = steps.get(labels, 0.0) + cell[0]
            attempts[pair] = attempts.get(pair, 0.0) + cell[1]
            into = durations.setdefault(pair, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, n in enumerate(cell[2:]):
                into[i] += n
        return counts, histograms

    def _committed(self, run: Run, ops: Sequence[Op], t0: int, t1: int) -> None:
        name = run.name
        for op in ops:
            if type(op) is JournalEntry:
                kind = op.kind
                if kind == "step":
                    self._step(name, op)
                elif kind == "checkpoint":
                    self._add("checkpoints", (name,))
                    self._add("checkpoint_bytes", (name,), len(op.output or b""))
                    self._observe("checkpoint_write_seconds", (name,), (t1 - t0) / 1e9)
                elif kind in ("sleep", "wait"):
                    self._add("timers", (name, kind))
            elif type(op) is AttemptRecord and op.ended_at is not None and op.failure_class:
                self._add("attempt_failures", (name, op.step, op.failure_class))

    def _step(self, name: str, e: JournalEntry) -> None:
        if e.error is not None:
            outcome = "error"
            if e.attempts == 1:  # a first attempt that was not retried has no row
                self._add("attempt_failures", (name, e.name, _error_class(e.error)))
        else:
            outcome = "deduplicated" if (e.note or "").startswith("deduplicated") else "ok"
        self._add("steps", (name, e.name, outcome))
        if e.attempts:
            self._add("step_attempts", (name, e.name), e.attempts)
            self._observe("step_duration_seconds", (name, e.name),
                          max(0.0, e.ended_at - e.started_at))

    # The collector side (prometheus_client calls these) ----------------------------------
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        counts, histograms = self.snapshot()
        for name, doc, labels in _COUNTERS:
            family = CounterMetricFamily(f"crashsafe_{name}", doc, labels=list(labels))
            for values, total in sorted(counts[name].items()):
                family.add_metric(list(values), total)
            if not labels and not counts[name]:
                family.add_metric([], 0.0)
            yield family
        bounds = [*(f"{b}" for b in LATENCY_BUCKETS), "+Inf"]
        for name, doc, labels in _HISTOGRAMS:
            hist = HistogramMetricFamily(f"crashsafe_{name}", doc, labels=list(labels))
            for values, cells in sorted(histograms[name].items()):
                running, buckets = 0.0, []
                for bound, n in zip(bounds, cells[:-1], strict=True):
                    running += n
                    buckets.append((bound, running))
                hist.add_metric(list(values), buckets, cells[-1])
            yield hist


def _error_class(payload: bytes) -> str:
    try:
        return recorded_class(payload) or "unknown"
    except CrashsafeError:
        return "unknown"


_counters: Counters | None = None
_counters_lock = threading.Lock()


def instrument() -> Counters:
    """Count what the workflows of this process do, from now on (idempotent)."""
    global _counters
    with _counters_lock:
        if _counters is None:
            _counters = Counters()
            _instrument.add_sink(_counters)
        return _counters


def uninstrument() -> None:
    """Stop counting and forget the counts (tests)."""
    global _counters
    with _counters_lock:
        if _counters is not None:
            _instrument.remove_sink(_counters)
            _counters = None


# -- the exposition -----------------------------------------------------------------------
def exposition(store: Store, *, window: float | None = WINDOW,
               thresholds: Thresholds | None = None) -> tuple[bytes, str]:
    """The body and content type of a ``GET /metrics`` (see the module documentation).

    ``store``: ``app.store`` (records are verified as they are read); ``window``:
    seconds back from now that the journal figures cover (None: all time)."""
    pc = _client()
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

    since = None if window is None else store.clock() - float(window)
    figures = _JournalFigures(store, since, window, thresholds or Thresholds())
    registry = pc.CollectorRegistry(auto_describe=False)
    registry.register(figures)
    body: bytes = generate_latest(registry)
    if _counters is not None:
        body += generate_latest(_counters.registry)
    return body, CONTENT_TYPE_PLAIN_0_0_4


class _JournalFigures:
    """A collector of the figures of :func:`crashsafe.observe.compute`."""

    def __init__(self, store: Store, since: float | None, window: float | None,
                 thresholds: Thresholds) -> None:
        self.store, self.since, self.window, self.thresholds = store, since, window, thresholds

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        overall = compute(self.store, since=self.since)
        lo = self.since if self.since is not None else float("-inf")
        names = sorted({r.name for r in self.store.list_workflows(ListFilter(limit=10**9))
                        if not (r.status.terminal and r.updated_at < lo)})
        per = [("", overall)]
        if len(names) > 1:
            per += [(n, compute(self.store, since=self.since, name=n)) for n in names]
        elif names:
            per.append((names[0], overall))
        fams: dict[str, Any] = {}

        def gauge(name: str, doc: str, labels: Sequence[str] = ("workflow",)) -> Any:
            if name not in fams:
                fams[name] = GaugeMetricFamily(f"crashsafe_{name}", doc, labels=list(labels))
            return fams[name]

        window = gauge("window_seconds", "The trailing window of the journal figures "
                       "(absent: all time)", ())
        if self.window is not None:
            window.add_metric([], float(self.window))
        for label, m in per:
            _workflow_figures(gauge, label, m)
        _breakers(gauge, overall)
        _checks(gauge, overall, self.thresholds)
        yield from fams.values()


_SIMPLE = (
    # (metric name, Metrics field, help)
    ("workflow_throughput_per_second", "workflow_throughput",
     "Workflows finished per second of the window"),
    ("step_throughput_per_second", "step_throughput", "Steps finished per second"),
    ("step_calls", "step_calls", "Step calls of the window"),
    ("retried_step_calls", "retried_calls", "Step calls that needed more than one attempt"),
    ("retry_rate", "retry_rate", "Share of step calls that needed a retry"),
    ("success_after_retry_rate", "success_after_retry_rate",
     "Share of retried steps that eventually succeeded"),
    ("average_retry_delay_seconds", "average_retry_delay",
     "Mean delay planned before each retry"),
    ("failed_attempts", "failed_attempts", "Failed attempts of the window"),
    ("recovered_workflows", "recovered_workflows", "Workflows taken over at least once "
     "(approximate)"),
    ("recoveries", "recoveries", "Takeovers (approximate)"),
    ("recovery_success_rate", "recovery_success_rate",
     "Share of recovered workflows that ended other than as a dead letter (approximate)"),
    ("dead_letters", "dead_lettered", "Workflows parked as dead letters"),
    ("duplicate_effect_rate", "duplicate_effect_rate",
     "Effects applied twice per step call (0 by construction; see the docs)"),
    ("deduplicated_effects", "deduplicated_effects",
     "Effect calls answered from an already applied key"),
    ("unknown_outcome_reruns", "unknown_outcome_reruns",
     "Effect bodies re-run after an unknown outcome (upper bound of duplicates)"),
    ("state_consistency", "state_consistency",
     "Share of workflows whose records all pass their integrity check"),
    ("stuck_steps", "stuck_in_retries", "Steps retrying for longer than the stuck threshold"),
    ("rollbacks", "rollbacks", "Rollbacks of the window"),
    ("checkpoint_bytes_per_task", "checkpoint_bytes_per_task",
     "Mean checkpoint bytes per workflow with checkpoints"),
)
_QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"), ("1", "max"))


def _workflow_figures(gauge: Any, label: str, m: Metrics) -> None:
    statuses = gauge("workflows", "Workflows of the window by current status",
                     ("workflow", "status"))
    for status, n in m.by_status.items():
        statuses.add_metric([label, status], n)
    for metric, fieldname, doc in _SIMPLE:
        g = gauge(metric, doc)
        value = getattr(m, fieldname)
        if value is not None:
            g.add_metric([label], float(value))
    gauge("retrying_steps", "Steps of active workflows retrying without a result").add_metric(
        [label], len(m.retrying))
    for metric, p, doc in (("step_latency_seconds", m.step_latency,
                            "Step latency, first attempt to result"),
                           ("workflow_latency_seconds", m.workflow_latency,
                            "Workflow latency, creation to end"),
                           ("recovery_time_seconds", m.recovery_time,
                            "Recovery time, an upper bound (approximate)")):
        _quantiles(gauge(metric, doc, ("workflow", "quantile")), label, p)
    failures = gauge("failed_attempts_by_class", "Failed attempts of the window by "
                     "failure class", ("workflow", "failure_class"))
    for cls, n in m.failure_counts.items():
        failures.add_metric([label, cls], n)


def _quantiles(g: Any, label: str, p: Percentiles) -> None:
    for q, attr in _QUANTILES:
        value = getattr(p, attr)
        if value is not None:
            g.add_metric([label, q], float(value))


def _breakers(gauge: Any, m: Metrics) -> None:
    state = gauge("breaker_state", "1 for each breaker's current state",
                  ("breaker", "state"))
    changes = gauge("breaker_changes", "Breaker state changes in the window", ("breaker",))
    longest = gauge("breaker_longest_open_seconds", "Longest stretch the breaker was not "
                    "closed", ("breaker",))
    for b in m.breakers:
        for s in BreakerState:
            state.add_metric([b.name, s.value], 1.0 if b.state == s.value else 0.0)
        changes.add_metric([b.name], b.changes)
        longest.add_metric([b.name], b.longest_open)


def _checks(gauge: Any, m: Metrics, thresholds: Thresholds) -> None:
    status = gauge("check", "1 with each alert check's status (ok, alert, no_data)",
                   ("check", "status"))
    value = gauge("check_value", "The figure each alert check compares", ("check",))
    limit = gauge("check_threshold", "The threshold of each alert check", ("check",))
    alerts = gauge("alerts", "Alert checks that fire", ())
    fired = 0
    for c in evaluate(m, thresholds):
        slug = _slug(c.name)
        status.add_metric([slug, _STATUS[c.status]], 1.0)
        if c.value is not None:
            value.add_metric([slug], float(c.value))
        limit.add_metric([slug], float(c.threshold))
        fired += c.alert
    alerts.add_metric([], fired)


_STATUS = {Verdict.OK: "ok", Verdict.ALERT: "alert", Verdict.NO_DATA: "no_data"}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# -- a tiny server --------------------------------------------------------------------------
def serve(store: Store, port: int, host: str = "127.0.0.1", *,
          window: float | None = WINDOW) -> ThreadingHTTPServer:
    """Serve ``GET /metrics`` on ``host:port`` from a daemon thread (``port`` 0: any
    free port, see ``server.server_address``); stop it with ``server.shutdown()``."""
    _client()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "try /metrics")
                return
            try:
                body, ctype = exposition(store, window=window)
            except CrashsafeError as exc:
                self.send_error(500, str(exc)[:200])
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would flood the worker's output

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="crashsafe-metrics",
                     daemon=True).start()
    return server


__all__ = ["WINDOW", "Counters", "exposition", "instrument", "serve", "uninstrument"]
