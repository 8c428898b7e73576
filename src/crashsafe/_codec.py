"""Data-only serialization of everything crashsafe stores.

Values become JSON. Types JSON lacks travel as one-key objects whose key starts with
``$`` (``{"$dt": "2026-01-01T00:00:00+00:00"}``); a user dict that happens to look
like a tag is escaped. Decoding only ever builds plain containers and a fixed set of
standard types: it never imports a module or calls a class named by the stored bytes.

Dataclasses, pydantic models, enums and named tuples are stored as their fields.
They are rebuilt from the *annotation* of the function that produced or receives
them, never from the data, so a step returning a dataclass must say so in its
return annotation; otherwise encoding fails at once rather than replay returning a
dict where the first run returned an object.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import inspect
import math
import types
import typing
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any

import msgspec

from ._secrets import Secret
from .exceptions import CorruptRecordError, SerializationError

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()

_TAGS = frozenset({"$dt", "$date", "$time", "$td", "$uuid", "$dec", "$b", "$tuple", "$set",
                   "$fset", "$map", "$f", "$secret"})
_SCALARS = (str, int, bool, type(None))

SUPPORTED = (
    "JSON types (dict, list, str, int, float, bool, None), tuple, set, bytes, datetime, "
    "date, time, timedelta, UUID, Decimal, crashsafe.Secret (encrypted stores only), enums, "
    "dataclasses and pydantic models"
)


class _Unsupported(Exception):
    def __init__(self, obj: object) -> None:
        self.obj = obj
        self.path: list[str] = []


class _State:
    __slots__ = ("structured",)

    def __init__(self) -> None:
        self.structured = False


def _float(v: float) -> Any:
    if math.isfinite(v):
        return v
    return {"$f": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def _walk(v: Any, st: _State) -> Any:
    t = type(v)
    if t in _SCALARS:
        return v
    if t is float:
        return _float(v)
    try:
        if t is dict:
            if all(type(k) is str for k in v):
                out = {k: _walk(x, st) for k, x in v.items()}
                if len(out) == 1 and next(iter(out)) in _TAGS:
                    return {"$map": [[k, x] for k, x in out.items()]}
                return out
            return {"$map": [[_walk(k, st), _walk(x, st)] for k, x in v.items()]}
        if t is list:
            return [_walk(x, st) for x in v]
        return _walk_rare(v, t, st)
    except _Unsupported as exc:
        exc.path.append(_where_in(v, exc))
        raise


def _where_in(container: Any, exc: _Unsupported) -> str:
    # Only runs on the error path: find which element held the bad value.
    items: Any = ()
    if isinstance(container, dict):
        items = container.items()
    elif isinstance(container, list | tuple):
        items = enumerate(container)
    elif dataclasses.is_dataclass(container):
        items = ((f.name, getattr(container, f.name)) for f in dataclasses.fields(container))
    for key, val in items:
        if val is exc.obj or _contains(val, exc.obj):
            return f".{key}" if isinstance(key, str) and not isinstance(container, dict) \
                else f"[{key!r}]"
    return ""


def _contains(val: Any, target: object, depth: int = 0) -> bool:
    if val is target:
        return True
    if depth > 50:
        return False
    if isinstance(val, dict):
        return any(_contains(x, target, depth + 1) for x in val.values())
    if isinstance(val, list | tuple | set | frozenset):
        return any(_contains(x, target, depth + 1) for x in val)
    if dataclasses.is_dataclass(val) and not isinstance(val, type):
        return any(_contains(getattr(val, f.name), target, depth + 1)
                   for f in dataclasses.fields(val))
    return False


def _walk_rare(v: Any, t: type, st: _State) -> Any:
    if isinstance(v, enum.Enum):
        st.structured = True
        return _walk(v.value, st)
    if t is tuple:
        return {"$tuple": [_walk(x, st) for x in v]}
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # named tuple
        st.structured = True
        return [_walk(x, st) for x in v]
    if t is set or t is frozenset:
        items = [_walk(x, st) for x in v]
        try:
            items.sort(key=_ENCODER.encode)
        except (TypeError, msgspec.EncodeError):
            pass
        return {"$set" if t is set else "$fset": items}
    if t is bytes or t is bytearray:
        return {"$b": base64.b64encode(v).decode("ascii")}
    if t is dt.datetime:
        return {"$dt": _clock(v)}
    if t is dt.date:
        return {"$date": v.isoformat()}
    if t is dt.time:
        return {"$time": _clock(v)}
    if t is dt.timedelta:
        return {"$td": [v.days, v.seconds, v.microseconds]}
    if t is uuid.UUID:
        return {"$uuid": str(v)}
    if t is Decimal:
        return {"$dec": str(v)}
    if t is Secret:
        # Only ever stored inside an encrypted record: the store refuses it otherwise
        # (crashsafe._redaction).
        return {"$secret": v.reveal()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        st.structured = True
        return {f.name: _walk(getattr(v, f.name), st) for f in dataclasses.fields(v)}
    dump = getattr(v, "model_dump", None)
    if dump is not None and hasattr(type(v), "model_validate"):  # pydantic v2
        st.structured = True
        return _walk(dump(mode="python"), st)
    # Subclasses of the plain types are stored as the plain type.
    if isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return _float(float(v))
    if isinstance(v, dict):
        return _walk(dict(v), st)
    if isinstance(v, list):
        return _walk(list(v), st)
    raise _Unsupported(v)


def _clock(v: dt.datetime | dt.time) -> Any:
    """ISO text when it round-trips exactly; otherwise [naive ISO, UTC offset in
    microseconds, zone key, fold], which keeps sub-minute offsets, IANA zones
    (by name) and the fold of repeated wall times."""
    tz = v.tzinfo
    offset = v.utcoffset() if tz is not None else None
    key = getattr(tz, "key", None)
    if v.fold == 0 and key is None and (
        offset is None or (type(tz) is dt.timezone and offset % dt.timedelta(minutes=1) == _ZERO)
    ):
        return v.isoformat()
    micros = None if offset is None else offset // dt.timedelta(microseconds=1)
    return [v.replace(tzinfo=None).isoformat(), micros, key if isinstance(key, str) else None,
            v.fold]


_ZERO = dt.timedelta(0)


def _unclock(arg: Any, parse: Any) -> Any:
    if isinstance(arg, str):
        return parse(arg)
    if not (isinstance(arg, list) and len(arg) == 4 and isinstance(arg[0], str)):
        raise TypeError("expects ISO text or [iso, offset, zone, fold]")
    naive, micros, key, fold = arg
    if key is not None:
        tz: dt.tzinfo | None = zoneinfo.ZoneInfo(str(key))
    elif micros is not None:
        tz = dt.timezone(dt.timedelta(microseconds=int(micros)))
    else:
        tz = None
    return parse(naive).replace(tzinfo=tz, fold=int(fold))


def to_jsonable(value: Any) -> tuple[Any, bool]:
    """Return the tagged JSON form of ``value`` and whether it held structured objects."""
    st = _State()
    return _walk(value, st), st.structured


def _plain(v: Any, depth: int = 0) -> bool:
    """True when ``v`` is JSON as it stands (no tags needed): the common case, which
    then skips building a tagged copy."""
    t = type(v)
    if t in _SCALARS:
        return True
    if t is float:
        return math.isfinite(v)
    if depth > 32:
        return False
    if t is dict:
        if len(v) == 1 and next(iter(v)) in _TAGS:
            return False
        for k, x in v.items():
            if type(k) is not str or not (type(x) in _SCALARS or _plain(x, depth + 1)):
                return False
        return True
    if t is list:
        return all(type(x) in _SCALARS or _plain(x, depth + 1) for x in v)
    return False


def encode(value: Any, what: str) -> tuple[bytes, bool]:
    """Serialize ``value``; ``what`` names it in errors ("result of step 'x'").

    Returns the bytes and whether the value contained dataclasses, models or enums
    (which need a type annotation to be rebuilt).
    """
    try:
        if _plain(value):
            return _ENCODER.encode(value), False
        st = _State()
        data = _walk(value, st)
        return _ENCODER.encode(data), st.structured
    except _Unsupported as exc:
        path = "".join(reversed(exc.path))
        at = f" at {path}" if path else ""
        raise SerializationError(
            f"{what}: value of type {type(exc.obj).__module__}.{type(exc.obj).__qualname__}"
            f"{at} cannot be stored. crashsafe stores {SUPPORTED}. Convert it to one "
            "of these, or pass an identifier and load the object inside a step."
        ) from None
    except RecursionError:
        raise SerializationError(f"{what}: value is nested too deeply to store") from None
    except (ValueError, OverflowError, msgspec.EncodeError) as exc:
        # Lone surrogates in strings, integers past the encoder's limits, ...
        raise SerializationError(f"{what}: value cannot be stored: {exc}") from None


def decode(data: bytes, what: str = "record") -> Any:
    """Rebuild a value stored by :func:`encode` (without type conversion)."""
    try:
        raw = _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(f"{what} is not valid crashsafe data: {exc}") from None
    if b'"$' not in data:
        return raw
    try:
        return _revive(raw)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, ArithmeticError) as exc:
        raise CorruptRecordError(f"{what} holds a malformed tagged value: {exc}") from None


def _revive(v: Any) -> Any:
    t = type(v)
    if t is list:
        return [_revive(x) for x in v]
    if t is not dict:
        return v
    if len(v) == 1:
        key, arg = next(iter(v.items()))
        if key in _TAGS:
            return _revive_tag(key, arg)
    return {k: _revive(x) for k, x in v.items()}


def _revive_tag(key: str, arg: Any) -> Any:
    if key == "$map":
        return {_hashable(_revive(k)): _revive(x) for k, x in arg}
    if key == "$tuple":
        return tuple(_revive(x) for x in arg)
    if key == "$set":
        return {_hashable(_revive(x)) for x in arg}
    if key == "$fset":
        return frozenset(_hashable(_revive(x)) for x in arg)
    if key == "$td":
        if not (isinstance(arg, list) and len(arg) == 3):
            raise TypeError("$td expects [days, seconds, microseconds]")
        days, secs, micros = (int(x) for x in arg)
        return dt.timedelta(days=days, seconds=secs, microseconds=micros)
    if key == "$dt":
        return _unclock(arg, dt.datetime.fromisoformat)
    if key == "$time":
        return _unclock(arg, dt.time.fromisoformat)
    if not isinstance(arg, str):
        raise TypeError(f"{key} expects a string")
    if key == "$date":
        return dt.date.fromisoformat(arg)
    if key == "$uuid":
        return uuid.UUID(arg)
    if key == "$dec":
        return Decimal(arg)
    if key == "$secret":
        return Secret(arg)
    if key == "$b":
        return base64.b64decode(arg.encode("ascii"), validate=True)
    if key == "$f":
        if arg not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float tag {arg!r}")
        return float(arg)
    raise KeyError(key)  # pragma: no cover - _TAGS and this function agree


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        raise TypeError("a dict cannot be a set member or mapping key")
    return v


# --- typed rebuild --------------------------------------------------------------------

_PLAIN = {Any, object, None, type(None), inspect.Parameter.empty}


def needs_type(tp: Any) -> bool:
    """Whether values of annotation ``tp`` must be converted after decoding."""
    return tp not in _PLAIN


def rebuild(value: Any, tp: Any, what: str) -> Any:
    """Convert a decoded value to annotation ``tp`` (dataclass, pydantic model, ...)."""
    if tp in _PLAIN:
        return value
    try:
        validate = getattr(tp, "model_validate", None)
        if validate is not None and isinstance(tp, type):
            return validate(value)
        return msgspec.convert(value, tp, strict=False, builtin_types=_BUILTINS)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise SerializationError(
            f"{what}: stored value does not fit the annotation {_type_name(tp)}: {exc}"
        ) from None


def check_rebuild(value: Any, data: bytes, tp: Any, what: str) -> None:
    """Fail now if replay would not rebuild ``value`` with the same types from ``data``
    (for example a dataclass inside a ``dict`` annotated only as ``dict``)."""
    rebuilt = rebuild(decode(data, what), tp, what)
    if not _same_shape(value, rebuilt):
        raise SerializationError(
            f"{what}: replay would rebuild it as {_shape_name(rebuilt)} instead of "
            f"{_shape_name(value)}; annotate the type precisely (for example "
            "dict[str, MyDataclass] rather than dict)"
        )


def _shape_name(v: Any) -> str:
    return type(v).__qualname__


def _same_shape(a: Any, b: Any, depth: int = 0) -> bool:
    if depth > 100:
        return True
    if type(a) is not type(b):
        # A str/int enum member equals its value; a tuple may legitimately come back
        # as a list only if the annotation says list, which the first run also got.
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_shape(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(
            _same_shape(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_same_shape(getattr(a, f.name), getattr(b, f.name), depth + 1)
                   for f in dataclasses.fields(a))
    return True


_BUILTINS = (bytes, bytearray, dt.datetime, dt.date, dt.time, dt.timedelta, uuid.UUID, Decimal)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


def resolve_hints(fn: Any) -> dict[str, Any]:
    """Type hints of ``fn``. A hint that cannot be resolved (a forward reference to a
    name the module does not define) counts as no annotation rather than a string."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: S110 - one bad forward ref must not hide the good hints
        pass
    out: dict[str, Any] = {}
    globalns = getattr(inspect.unwrap(fn), "__globals__", {})
    for key, hint in (getattr(fn, "__annotations__", None) or {}).items():
        shim = types.SimpleNamespace(__annotations__={key: hint}, __globals__=globalns)
        try:
            out[key] = typing.get_type_hints(shim)[key]
        except Exception:  # noqa: S112 - unresolvable: treat as unannotated
            continue
    return out
