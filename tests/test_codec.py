"""The codec: exact round trips, typed rebuild, hostile input, clear refusals."""

from __future__ import annotations

import datetime as dt
import enum
import json
import socket
import sys
import threading
import uuid
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashsafe import CorruptRecordError, SerializationError
from crashsafe._codec import decode, encode, rebuild, resolve_hints, to_jsonable
from strategies import TAG_KEYS, Order, Point, orders, points, same, storable

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def roundtrip(value: Any) -> Any:
    data, _ = encode(value, "value")
    assert isinstance(data, bytes)
    return decode(data, "value")


# -- round trips --------------------------------------------------------------------------
@FAST
@given(storable())
def test_decode_encode_round_trips_exactly(value: Any) -> None:
    assert same(roundtrip(value), value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(storable())
def test_encoding_is_stable_across_a_round_trip(value: Any) -> None:
    data, _ = encode(value, "value")
    again, _ = encode(decode(data), "value")
    assert again == data


@pytest.mark.parametrize(
    "value",
    [
        float("nan"), float("inf"), float("-inf"), -0.0,
        Decimal("NaN"), Decimal("sNaN"), Decimal("-Infinity"), Decimal("1.000"),
        dt.datetime(2026, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        dt.datetime(2026, 3, 1, 12, 30, 0, 123456),
        dt.time(23, 59, 59, 999999, tzinfo=dt.UTC),
        dt.date(1, 1, 1),
        dt.timedelta(days=-3, microseconds=7),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b"\x00\xff" * 10, (), (1, (2, (3,))), {1, 2, 3}, frozenset({"a", (1, 2)}),
        {1: "int key", (1, 2): "tuple key", None: "none key", b"k": "bytes key"},
        {"$dt": "not a date"}, {"$map": [[1, 2]]}, {"$f": "nan"}, {"$b": "!!"},
        {"$dt": 5}, {"$tuple": [1]}, {"outer": {"$uuid": "x"}},
        {"$dt": "x", "other": 1},
        [{"$set": []}, {"$fset": None}],
        2**64, -(2**63) - 1, 10**100,
    ],
    ids=repr,
)
def test_awkward_values_round_trip(value: Any) -> None:
    assert same(roundtrip(value), value)


def test_tag_lookalike_user_dicts_are_escaped_not_interpreted() -> None:
    for key in TAG_KEYS:
        value = {key: "2026-01-01"}
        data, _ = encode(value, "value")
        assert data.startswith(b'{"$map":[["' + key.encode() + b'",'), data
        assert decode(data) == value


def test_datetime_keeps_its_offset_and_naivety() -> None:
    aware = dt.datetime(2026, 1, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=-7)))
    naive = dt.datetime(2026, 1, 1, 9)
    got_aware, got_naive = roundtrip([aware, naive])
    assert got_aware.utcoffset() == dt.timedelta(hours=-7)
    assert got_naive.tzinfo is None


# -- typed rebuild ------------------------------------------------------------------------
class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Pair(NamedTuple):
    left: int
    right: str


class Address(pydantic.BaseModel):
    city: str
    zip: str


class Customer(pydantic.BaseModel):
    name: str
    since: dt.datetime
    credit: Decimal
    addresses: list[Address]
    tags: set[str] = set()


@FAST
@given(orders)
def test_dataclass_rebuilds_from_its_annotation(order: Order) -> None:
    data, structured = encode(order, "order")
    assert structured is True
    value = decode(data)
    assert isinstance(value, dict)  # never rebuilt from the data alone
    rebuilt = rebuild(value, Order, "order")
    assert isinstance(rebuilt, Order)
    assert same(rebuilt, order)


@FAST
@given(st.lists(points, max_size=4))
def test_generic_annotations_rebuild_nested_dataclasses(pts: list[Point]) -> None:
    value = decode(encode({"pts": pts, "first": pts[0] if pts else None}, "v")[0])
    assert rebuild(value["pts"], list[Point], "pts") == pts
    assert rebuild(value["first"], Point | None, "first") == (pts[0] if pts else None)


def test_pydantic_model_rebuilds_from_its_annotation() -> None:
    cust = Customer(
        name="Ada", since=dt.datetime(2020, 5, 17, tzinfo=dt.UTC), credit=Decimal("12.50"),
        addresses=[Address(city="Paris", zip="75001")], tags={"vip"},
    )
    data, structured = encode(cust, "customer")
    assert structured is True
    rebuilt = rebuild(decode(data), Customer, "customer")
    assert isinstance(rebuilt, Customer)
    assert rebuilt == cust
    assert isinstance(rebuilt.addresses[0], Address)


def test_enums_and_named_tuples_rebuild_from_annotations() -> None:
    value = {"c": Color.BLUE, "l": Level.HIGH, "p": Pair(3, "x")}
    data, structured = encode(value, "v")
    assert structured is True
    plain = decode(data)
    assert plain == {"c": "blue", "l": 2, "p": [3, "x"]}
    assert rebuild(plain["c"], Color, "c") is Color.BLUE
    assert rebuild(plain["l"], Level, "l") is Level.HIGH
    assert rebuild(plain["p"], Pair, "p") == Pair(3, "x")
    assert isinstance(rebuild(plain["p"], Pair, "p"), Pair)


def test_plain_values_are_not_marked_structured() -> None:
    assert encode({"a": [1, (2, {3})], "b": dt.date(2020, 1, 1)}, "v")[1] is False
    assert to_jsonable(Point(1, 2)) == ({"x": 1, "y": 2}, True)


def test_rebuild_into_a_mismatched_annotation_names_it() -> None:
    with pytest.raises(SerializationError, match=r"result of step 'p'.*Point"):
        rebuild({"x": "not an int"}, Point, "result of step 'p'")


def test_unannotated_rebuild_returns_the_plain_value() -> None:
    value = {"x": 1}
    assert rebuild(value, Any, "v") is value


def test_string_annotations_from_an_unresolvable_module_still_rebuild_plain_types() -> None:
    """A module using ``from __future__ import annotations`` with a TYPE_CHECKING-only
    import: the hints cannot all be resolved, but ``-> int`` must still rebuild."""
    namespace: dict[str, Any] = {}
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from decimal import Context\n"
        "def step(n: int, ctx: Context | None = None) -> int:\n"
        "    return n\n"
    )
    exec(compile(source, "<future-annotations-module>", "exec"), namespace)
    hints = resolve_hints(namespace["step"])
    stored = decode(encode(5, "v")[0])
    assert rebuild(stored, hints.get("return", Any), "result of step 'step'") == 5


# -- hostile input to decode --------------------------------------------------------------
def decode_is_safe(data: bytes) -> None:
    """decode() either returns a value or raises CorruptRecordError, nothing else."""
    try:
        decode(data, "hostile record")
    except CorruptRecordError as exc:
        assert "hostile record" in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_corrupt_record_error(data: bytes) -> None:
    decode_is_safe(data)


@FAST
@given(storable(), st.data())
def test_truncated_records_raise_only_corrupt_record_error(value: Any, data: st.DataObject) -> None:
    raw, _ = encode(value, "v")
    cut = data.draw(st.integers(min_value=0, max_value=max(0, len(raw) - 1)))
    decode_is_safe(raw[:cut])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["nan", "inf", "2026-01-01", "!!", "AAAA"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=10,
)
tag_keys = st.sampled_from(TAG_KEYS)
forged_tags = st.recursive(
    st.builds(lambda k, v: {k: v}, tag_keys, json_values),
    lambda inner: st.lists(inner, max_size=3)
    | st.builds(lambda k, v: {k: v}, tag_keys, inner)
    | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=6,
)


tag_args = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.lists(st.integers() | st.text(max_size=4), max_size=4)
)


@settings(max_examples=300, deadline=None)
@given(tag_keys, tag_args)
def test_forged_tag_arguments_raise_only_corrupt_record_error(key: str, arg: Any) -> None:
    decode_is_safe(json.dumps({key: arg}).encode())


@settings(max_examples=200, deadline=None)
@given(forged_tags)
def test_nested_forged_tags_raise_only_corrupt_record_error(value: Any) -> None:
    decode_is_safe(json.dumps(value).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"{\"a\":" * 50_000,
        b"[" * 5_000 + b"]" * 5_000,
        b'{"$tuple":' * 3_000 + b"[]" + b"}" * 3_000,
        b'{"$dt": 5}',
        b'{"$b": "!!"}',
        b'{"$b": "YQ"}',
        b'{"$b": 1}',
        b'{"$dec": "abc"}',
        b'{"$dec": 1}',
        b'{"$td": [1000000000000, 0, 0]}',
        b'{"$td": [1, 2]}',
        b'{"$td": "1 day"}',
        b'{"$f": "NaN"}',
        b'{"$uuid": "not-a-uuid"}',
        b'{"$date": "2026-13-40"}',
        b'{"$time": "25:00"}',
        b'{"$map": 5}',
        b'{"$map": [[1]]}',
        b'{"$map": [[{"a": 1}, 2]]}',
        b'{"$set": [{}]}',
        b'{"$fset": [{"$set": [1]}]}',
        b'{"$tuple": null}',
        b"",
        b"\x00",
        b'"\xff\xfe"',
        b"1" * 5000,
        b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94.",
    ],
    ids=lambda d: repr(d[:30]),
)
def test_hostile_records_raise_only_corrupt_record_error(data: bytes) -> None:
    decode_is_safe(data)


_AUDIT = threading.local()
_SEEN: list[str] = []
_WATCHED = ("import", "exec", "compile", "pickle.find_class", "os.system", "subprocess.Popen",
            "builtins.input", "ctypes.dlopen")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if getattr(_AUDIT, "on", False) and event in _WATCHED:
        _SEEN.append(event)


sys.addaudithook(_audit)


@pytest.mark.parametrize(
    "data",
    [
        b'{"lc": 1, "type": "constructor", "id": ["os", "system"], "kwargs": {"command": "id"}}',
        b'{"__class__": "os.system", "args": ["id"]}',
        b'{"$map": [["__reduce__", ["os.system", ["id"]]]]}',
        b'{"py/object": "subprocess.Popen", "args": ["id"]}',
        b"cos\nsystem\n(S'id'\ntR.",
    ],
)
def test_constructor_like_envelopes_stay_plain_data(data: bytes) -> None:
    _SEEN.clear()
    _AUDIT.on = True
    try:
        try:
            value = decode(data, "hostile record")
        except CorruptRecordError:
            value = None
    finally:
        _AUDIT.on = False
    assert _SEEN == []
    assert value is None or isinstance(value, dict)


# -- refusing what cannot be stored -------------------------------------------------------
def test_unsupported_object_names_its_type() -> None:
    with pytest.raises(SerializationError, match=r"result of step 'x'.*builtins\.object"):
        encode(object(), "result of step 'x'")


def test_lambda_is_refused() -> None:
    with pytest.raises(SerializationError, match="function"):
        encode({"callback": lambda: 1}, "argument 'cb'")


def test_socket_nested_in_dict_in_list_names_path_and_type() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        value = {"peers": [{"name": "a"}, {"name": "b", "conn": sock}]}
        with pytest.raises(SerializationError) as info:
            encode(value, "argument 'peers'")
    message = str(info.value)
    assert "argument 'peers'" in message
    assert "socket.socket" in message
    assert "['peers'][1]['conn']" in message
    assert isinstance(info.value, TypeError)


def test_unsupported_value_inside_a_dataclass_field_names_the_field() -> None:
    with pytest.raises(SerializationError, match=r"\[0\]\.x"):
        encode([Point(object(), 1)], "v")  # type: ignore[arg-type]


def test_too_deep_value_is_refused_cleanly() -> None:
    value: list[Any] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(SerializationError, match="nested too deeply"):
        encode(value, "v")


def test_lone_surrogate_string_is_refused_with_serialization_error() -> None:
    # Strings from os.fsdecode() of undecodable file names hold lone surrogates.
    with pytest.raises(SerializationError):
        encode({"file": "report-\udcff.txt"}, "result of step 'ls'")


def test_integer_too_long_to_store_is_refused_with_serialization_error() -> None:
    with pytest.raises(SerializationError):
        encode(10**5000, "result of step 'factorial'")


def test_encoded_bytes_are_plain_json() -> None:
    data, _ = encode({"when": dt.date(2026, 1, 2), "n": [1, 2.5, None]}, "v")
    assert msgspec.json.decode(data) == {"when": {"$date": "2026-01-02"}, "n": [1, 2.5, None]}
