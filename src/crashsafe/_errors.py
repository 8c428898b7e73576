"""Recording exceptions and rebuilding them on replay.

A failure is stored as data (type name, message, arguments, traceback text). On
replay it is rebuilt only when its type is known *without importing anything*: a
builtin exception, a crashsafe exception, or a type the user registered with
:func:`register_exception`. Other types surface as :class:`~crashsafe.StepError`
(or :class:`~crashsafe.WorkflowFailedError`) — on the first run too, so workflow
code sees the same failure whether it runs live or replays.
"""

from __future__ import annotations

import builtins
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from . import exceptions as _exc
from ._codec import decode, encode
from .exceptions import SerializationError, StepError, WorkflowFailedError

_REGISTERED: dict[str, type[BaseException]] = {}
E = TypeVar("E", bound=type[BaseException])


def _type_key(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_exception(cls: E) -> E:
    """Let crashsafe rebuild ``cls`` when it replays a recorded failure.

    Use as a decorator on exception classes that steps raise and workflows catch.
    The class is rebuilt as ``cls(*args)`` from the recorded arguments, so its
    arguments must be storable values.
    """
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        raise TypeError(f"register_exception expects an Exception subclass, got {cls!r}")
    _REGISTERED[_type_key(cls)] = cls
    return cls


def _known_type(key: str) -> type[BaseException] | None:
    cls = _REGISTERED.get(key)
    if cls is not None:
        return cls
    module, _, name = key.rpartition(".")
    if module == "builtins":
        found = getattr(builtins, name, None)
    elif module == _exc.__name__:
        found = getattr(_exc, name, None)
    else:
        return None
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def rebuildable(exc: BaseException) -> bool:
    """Whether replay would rebuild an equal exception: known type, storable args, and a
    constructor that takes its own ``args`` back and gives the same message."""
    key = _type_key(type(exc))
    if _known_type(key) is not type(exc):
        return False
    try:
        encode(list(exc.args), "exception arguments")
    except SerializationError:
        return False
    trial = _rebuild(key, str(exc), list(exc.args))
    return trial is not None and type(trial) is type(exc) and str(trial) == str(exc)


def error_payload(exc: BaseException) -> bytes:
    """Serialize an exception as data."""
    try:
        args: list[Any] | None = list(exc.args)
        encode(args, "exception arguments")
    except SerializationError:
        args = None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # The first run decides whether this failure is rebuilt; replay follows the record,
    # so both runs raise the same type even if the rules or the registry change.
    data, _ = encode(
        {"type": _type_key(type(exc)), "message": str(exc), "args": args, "traceback": tb,
         "rebuild": rebuildable(exc), "class": failure_class(exc)},
        "exception",
    )
    return data


def failure_class(exc: BaseException) -> str:
    """The failure class of ``exc`` as recorded (a StepError keeps the one recorded at
    the first run, so decisions made on it are the same on replay)."""
    pinned = getattr(exc, CLASS_ATTR, None)
    if isinstance(pinned, str):
        return pinned
    recorded = getattr(exc, "failure_class", None)
    if isinstance(exc, StepError) and isinstance(recorded, str):
        return recorded
    from .policies.classify import classify

    return classify(exc).cls.value


CLASS_ATTR = "_crashsafe_failure_class"
"""Set on an exception to pin the failure class recorded for it (and, on replay, set
on the rebuilt exception from the record)."""


def pin_class(exc: BaseException, cls: str | None) -> None:
    if cls is not None:
        try:
            setattr(exc, CLASS_ATTR, cls)
        except AttributeError:  # an exception type with __slots__: classify it afresh
            pass


def recorded_class(payload: bytes) -> str | None:
    """The failure class stored in an error payload (None in records made before it was)."""
    info = decode(payload, "error")
    value = info.get("class") if isinstance(info, dict) else None
    return value if isinstance(value, str) else None


def _fields(payload: bytes, what: str) -> tuple[str, str, list[Any] | None, str, bool]:
    info = decode(payload, what)
    if not isinstance(info, dict):
        info = {}
    args = info.get("args")
    return (
        str(info.get("type", "Exception")),
        str(info.get("message", "")),
        args if isinstance(args, list) else None,
        str(info.get("traceback", "")),
        info.get("rebuild") is True,
    )


def _rebuild(type_key: str, message: str, args: list[Any] | None) -> BaseException | None:
    cls = _known_type(type_key)
    if cls is None:
        return None
    try:
        return cls(*args) if args is not None else cls(message)
    except Exception:  # a constructor that wants other arguments: fall back to a wrapper
        return None


Wrapper = Callable[[str, str, str, str], Exception]


def _recorded(owner: str, payload: bytes, wrap: Wrapper, what: str) -> BaseException:
    type_key, message, args, tb, rebuild = _fields(payload, what)
    rebuilt = _rebuild(type_key, message, args) if rebuild else None
    if rebuilt is not None:
        pin_class(rebuilt, recorded_class(payload))
        return rebuilt
    err = wrap(owner, type_key, message, tb)
    if isinstance(err, StepError):
        err.failure_class = recorded_class(payload)
    return err


def _live(owner: str, exc: BaseException, wrap: Wrapper) -> BaseException:
    masked = _masked(owner, exc, wrap)
    if masked is not None:
        return masked
    if rebuildable(exc):
        return exc
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    err = wrap(owner, _type_key(type(exc)), str(exc), tb)
    if isinstance(err, StepError):
        err.failure_class = failure_class(exc)
    err.__cause__ = exc
    return err


def _masked(owner: str, exc: BaseException, wrap: Wrapper) -> BaseException | None:
    """When the failure's text or arguments hold a credential (crashsafe._redaction),
    what a replay will raise: the exception rebuilt from its masked record, its cause
    not chained (the original's text would show in every traceback). None otherwise:
    the original is raised."""
    from ._redaction import Redactor

    redactor = Redactor(True)
    payload = error_payload(exc)
    doc = decode(payload, "error")
    # Judged on the message and arguments: source lines in the traceback such as
    # `token = load()` look like credentials to the free-text rules.
    probe, _ = encode({"message": doc.get("message"), "args": doc.get("args")}, "error")
    if redactor.error(probe) == probe:
        return None
    clean = redactor.error(payload)
    err = _recorded(owner, clean, wrap, f"error of {owner!r}")
    err.__cause__ = None
    err.__suppress_context__ = True
    return err


def step_failure(step_name: str, payload: bytes) -> BaseException:
    """The exception a workflow sees for a recorded step failure."""
    return _recorded(step_name, payload, StepError, f"error of step {step_name!r}")


def live_step_failure(step_name: str, exc: Exception) -> BaseException:
    """What the first run raises: the original if replay can rebuild it, else StepError."""
    return _live(step_name, exc, StepError)


def workflow_failure(workflow_id: str, payload: bytes) -> BaseException:
    """The exception ``result()`` raises for a failed workflow."""
    return _recorded(workflow_id, payload, WorkflowFailedError,
                     f"error of workflow {workflow_id!r}")


def live_workflow_failure(workflow_id: str, exc: BaseException) -> BaseException:
    """What a handle in the running process raises for a workflow that just failed."""
    return _live(workflow_id, exc, WorkflowFailedError)


def describe(payload: bytes | None) -> str:
    """One line for the CLI: ``Type: message``."""
    if not payload:
        return ""
    try:
        type_key, message, _, _, _ = _fields(payload, "error")
    except _exc.CrashsafeError as exc:
        return f"<unreadable error record: {exc}>"
    return f"{type_key.removeprefix('builtins.')}: {message}"
