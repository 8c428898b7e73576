"""Hypothesis strategies for values crashsafe stores; every feature's property tests join these.

``storable()`` draws any value the codec promises to round-trip (including the awkward
ones: NaN and infinities, tz-aware datetimes, Decimal NaN, non-str dict keys, dicts
whose only key looks like one of the codec's tags). ``same(a, b)`` is the equality
those round trips are checked with: exact types, NaN equal to NaN, Decimals equal
digit for digit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

# The codec's tags; user dicts that look like them must survive unchanged.
TAG_KEYS = ["$dt", "$date", "$time", "$td", "$uuid", "$dec", "$b", "$tuple", "$set",
            "$fset", "$map", "$f", "$secret"]

texts = st.text(max_size=20)
ints = st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
floats = st.floats(allow_nan=True, allow_infinity=True)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)

timezones = st.just(dt.UTC) | st.builds(
    dt.timezone,
    st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59),
                  max_value=dt.timedelta(hours=23, minutes=59)),
)
naive_datetimes = st.datetimes()
aware_datetimes = st.datetimes(timezones=timezones)
datetimes = naive_datetimes | aware_datetimes
times = st.times() | st.times(timezones=timezones)
decimals = st.decimals(allow_nan=False, allow_infinity=True) | st.sampled_from(
    [Decimal("NaN"), Decimal("-NaN"), Decimal("sNaN"), Decimal("NaN123"), Decimal("-0"),
     Decimal("1E+999"), Decimal("0.000100")]
)

#: Values that can be set members and dict keys (no NaN: it is never equal to itself).
hashable_scalars = (
    st.none() | st.booleans() | ints | texts | finite_floats | st.binary(max_size=16)
    | st.dates() | naive_datetimes | st.timedeltas() | st.uuids()
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)

scalars = (
    st.none() | st.booleans() | ints | floats | texts | st.binary(max_size=32)
    | datetimes | st.dates() | times | st.timedeltas() | st.uuids() | decimals
)

#: A dict whose only key is one of the codec's tags, like ``{"$dt": "x"}``.
tag_lookalikes = st.builds(lambda k, v: {k: v}, st.sampled_from(TAG_KEYS),
                           st.none() | ints | texts | st.lists(ints, max_size=3))


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.dictionaries(texts, inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=3)  # non-str keys
        | st.builds(lambda k, v: {k: v}, st.sampled_from(TAG_KEYS), inner)
        | st.lists(inner, max_size=3).map(tuple)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=3)
    )


def storable(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any plain value the codec must round-trip exactly."""
    return st.recursive(scalars | tag_lookalikes, _containers, max_leaves=max_leaves)


# -- dataclasses --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclasses.dataclass
class Order:
    id: str
    amount: Decimal
    placed: dt.datetime
    tags: set[str]
    lines: list[Point]
    note: str | None = None
    raw: bytes = b""


points = st.builds(Point, ints, ints)
orders = st.builds(
    Order,
    id=texts,
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    placed=aware_datetimes,
    tags=st.sets(texts, max_size=3),
    lines=st.lists(points, max_size=3),
    note=st.none() | texts,
    raw=st.binary(max_size=8),
)


# -- comparison --------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Exact structural equality: same types all the way down, NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        for k, v in a.items():
            if k not in b or not same(v, b[k]):
                return False
            # the key itself must keep its type (1 vs 1.0 vs True hash alike)
            if not any(same(k, kb) for kb in b if kb == k):
                return False
        return True
    if isinstance(a, set | frozenset):
        return a == b and all(any(same(x, y) for y in b if y == x) for x in a)
    if isinstance(a, dt.datetime | dt.time):
        # Same wall time and same UTC offset (a fixed-offset tzinfo may come back as
        # an equal but distinct object).
        return (a.replace(tzinfo=None) == b.replace(tzinfo=None)
                and (a.tzinfo is None) == (b.tzinfo is None)
                and a.utcoffset() == b.utcoffset())
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


__all__ = [
    "TAG_KEYS",
    "Order",
    "Point",
    "aware_datetimes",
    "datetimes",
    "decimals",
    "hashables",
    "orders",
    "points",
    "same",
    "storable",
]


def breaker_events(callers: int = 4, max_size: int = 80) -> st.SearchStrategy[
        list[tuple[str, int, float]]]:
    """Interleavings for a circuit breaker: ``(kind, caller, seconds)`` where kind is
    ``admit``, ``ok``, ``fail`` (the caller reports its last admitted call) or ``tick``
    (time moves on by ``seconds``, from a blink to past every lease and open period;
    ignored by the other kinds). Admits and failures are drawn more often, so the
    breaker trips and probes in most examples."""
    kind = st.sampled_from(["admit", "admit", "admit", "fail", "fail", "ok", "tick", "tick"])
    caller = st.integers(0, callers - 1)
    step = st.sampled_from([0.0, 0.01, 0.2, 0.49, 0.5, 0.51, 1.0, 2.5, 10.0])
    return st.lists(st.tuples(kind, caller, step), min_size=10, max_size=max_size)


AGENT_KEYS = ["task", "plan", "messages", "memory", "scratch", "notes", "tools"]


def agent_states(max_keys: int = 6) -> st.SearchStrategy[dict[str, Any]]:
    """Dict states as agents keep them, for selective checkpoints: a few named parts,
    some of them lists that grow (messages), others any storable value."""
    values = st.lists(st.text(max_size=40), max_size=30) | st.text(max_size=400) \
        | storable(max_leaves=6)
    return st.dictionaries(st.sampled_from(AGENT_KEYS), values, max_size=max_keys)
