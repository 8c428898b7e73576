"""Alert thresholds as data, and the checks that compare :class:`Metrics` with them.

The defaults are the figures operators of production agents alert on (issue 7 of the
project); override any of them with ``Thresholds(retry_rate=0.2)`` or
``dataclasses.replace(thresholds, ...)``. A check whose figure could not be computed
(no data in the window, or a figure not recorded yet) is ``NO DATA``, never ``OK``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Literal

from .metrics import Metrics

Compare = Literal["above", "below", "at least"]


class Verdict(enum.StrEnum):
    OK = "OK"
    ALERT = "ALERT"
    NO_DATA = "NO DATA"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When each figure alerts. Ratios are fractions (0.1 is 10 %), durations seconds."""

    recovery_time: float = 30.0
    """Alert when the longest recovery time (approximate, an upper bound) is above this."""
    recovery_time_p95: float = 20.0
    """Alert when the 95th percentile recovery time is above this."""
    recovery_success_rate: float = 0.998
    """Alert when the recovery success rate is below this."""
    duplicate_effect_rate: float = 0.001
    """Alert when the duplicate-effect rate is above this (0.1 %)."""
    state_consistency: float = 1.0
    """Alert when the share of workflows whose records verify is below this."""
    retry_rate: float = 0.10
    """Alert when more than this share of step calls needed a retry."""
    success_after_retry_rate: float = 0.80
    """Alert when less than this share of retried steps eventually succeeded."""
    average_retry_delay: float = 60.0
    """Alert when the mean planned retry delay is above this."""
    failure_type_share: float = 0.30
    """Alert when one failure class is more than this share of the failed attempts ..."""
    min_failures: int = 10
    """... counted only from this many failed attempts on (below, the mix is NO DATA:
    a single failure is always 100 % of one type)."""
    breaker_open: float = 300.0
    """Alert when a breaker stayed open (or half-open) longer than this."""
    breaker_flaps: int = 3
    """Alert when a breaker tripped (closed to open) at least this many times ..."""
    breaker_flap_window: float = 600.0
    """... within this many seconds."""
    stuck_in_retries: float = 1800.0
    """Alert when a step of an active workflow has been retrying for longer than this."""
    checkpoint_latency_overhead: float = 0.15
    """Alert when checkpoints add more than this share to task latency."""
    checkpoint_bytes_per_task: float = 50 * 1024
    """Alert when checkpoints store more than this many bytes per task."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Thresholds.{f.name} must be a number >= 0, not {value!r}")
        for name in ("recovery_success_rate", "duplicate_effect_rate", "state_consistency",
                     "retry_rate", "success_after_retry_rate", "failure_type_share"):
            if getattr(self, name) > 1:
                raise ValueError(f"Thresholds.{name} is a fraction: give a value in [0, 1] "
                                 "(0.1 means 10 %)")


@dataclass(frozen=True, slots=True)
class Check:
    """One figure against its threshold."""

    name: str
    value: float | None
    threshold: float
    alert_when: Compare
    """``above``: alert when value > threshold; ``below``: when value < threshold;
    ``at least``: when value >= threshold."""
    unit: Literal["s", "ratio", "count", "bytes"]
    status: Verdict
    detail: str = ""

    @property
    def alert(self) -> bool:
        return self.status is Verdict.ALERT


def _check(name: str, value: float | None, threshold: float, alert_when: Compare,
           unit: Literal["s", "ratio", "count", "bytes"], detail: str = "",
           enough: bool = True) -> Check:
    if value is None or not enough:
        status = Verdict.NO_DATA
    elif alert_when == "above":
        status = Verdict.ALERT if value > threshold else Verdict.OK
    elif alert_when == "below":
        status = Verdict.ALERT if value < threshold else Verdict.OK
    else:
        status = Verdict.ALERT if value >= threshold else Verdict.OK
    return Check(name, value, threshold, alert_when, unit, status, detail)


def evaluate(metrics: Metrics, thresholds: Thresholds | None = None) -> list[Check]:
    """Every check, in a fixed order, each OK, ALERT or NO DATA."""
    t = thresholds or Thresholds()
    m = metrics
    checks = [
        _check("recovery time (max, approx.)", m.recovery_time.max, t.recovery_time,
               "above", "s", f"upper bound over {m.recovered_workflows} recovered workflows"),
        _check("recovery time p95 (approx.)", m.recovery_time.p95, t.recovery_time_p95,
               "above", "s", f"upper bound over {m.recovered_workflows} recovered workflows"),
        _check("recovery success rate (approx.)", m.recovery_success_rate,
               t.recovery_success_rate, "below", "ratio",
               f"{m.recoveries} takeovers; {m.dead_lettered} dead letter(s)"),
        _check("duplicate-effect rate", m.duplicate_effect_rate, t.duplicate_effect_rate,
               "above", "ratio",
               f"{m.deduplicated_effects} deduplicated (correct); "
               f"{m.unknown_outcome_reruns} re-run after an unknown outcome"),
        _check("state consistency", m.state_consistency, t.state_consistency, "below",
               "ratio", _unreadable(m)),
        _check("retry rate", m.retry_rate, t.retry_rate, "above", "ratio",
               f"{m.retried_calls} of {m.step_calls} step calls"),
        _check("success after retry", m.success_after_retry_rate,
               t.success_after_retry_rate, "below", "ratio",
               f"{m.succeeded_after_retry} of {m.retried_finished} retried steps"),
        _check("average retry delay", m.average_retry_delay, t.average_retry_delay,
               "above", "s", f"over {m.retry_delays} planned retries"),
        _mix(m, t),
        *_breaker_checks(m, t),
        _stuck(m, t),
        _check("checkpoint latency overhead", m.checkpoint_latency_overhead,
               t.checkpoint_latency_overhead, "above", "ratio",
               m.unavailable.get("checkpoint_latency_overhead", "")),
        _check("checkpoint storage per task", m.checkpoint_bytes_per_task,
               t.checkpoint_bytes_per_task, "above", "bytes",
               f"over {m.checkpointed_workflows} workflows with checkpoints"),
    ]
    return checks


def _unreadable(m: Metrics) -> str:
    if not m.unreadable:
        return f"{m.workflows} workflows verified"
    shown = ", ".join(m.unreadable[:3]) + (" ..." if len(m.unreadable) > 3 else "")
    return f"{len(m.unreadable)} with bad records ({shown}); run `crashsafe verify`"


def _mix(m: Metrics, t: Thresholds) -> Check:
    top = max(m.failure_mix.items(), key=lambda kv: kv[1], default=None)
    detail = f"{top[0]}: {m.failure_counts[top[0]]} of {m.failed_attempts} failed attempts" \
        if top else "no failed attempts"
    if top and m.failed_attempts < t.min_failures:
        detail += f" (fewer than {t.min_failures}: not judged)"
    return _check("largest failure type", top[1] if top else None, t.failure_type_share,
                  "above", "ratio", detail, enough=m.failed_attempts >= t.min_failures)


def _breaker_checks(m: Metrics, t: Thresholds) -> list[Check]:
    if not m.breakers:
        return [_check("breaker open longest", None, t.breaker_open, "above", "s",
                       "no breakers recorded"),
                _check("breaker flapping", None, t.breaker_flaps, "at least", "count",
                       "no breakers recorded")]
    worst = max(m.breakers, key=lambda b: b.longest_open)
    flaps = {b.name: b.most_trips_within(t.breaker_flap_window) for b in m.breakers}
    flapper = max(flaps, key=lambda k: flaps[k])
    return [
        _check("breaker open longest", worst.longest_open, t.breaker_open, "above", "s",
               f"{worst.name} ({worst.state} now)" if worst.longest_open else
               f"{len(m.breakers)} breakers, none opened"),
        _check("breaker flapping", flaps[flapper], t.breaker_flaps, "at least", "count",
               f"{flapper}: trips within {t.breaker_flap_window:g} s"),
    ]


def _stuck(m: Metrics, t: Thresholds) -> Check:
    stuck = m.stuck(t.stuck_in_retries)
    if stuck:
        s = stuck[0]
        detail = (f"{len(stuck)} stuck; longest: {s.workflow_id} step {s.step!r} "
                  f"(#{s.index}), {s.attempts} attempts")
    else:
        detail = f"{len(m.retrying)} steps retrying, none longer than the threshold"
    return _check("stuck in retries (longest)", m.longest_retry_span, t.stuck_in_retries,
                  "above", "s", detail)
