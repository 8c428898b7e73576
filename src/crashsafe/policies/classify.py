"""Classify the exception a step raised into a failure class; what each class means is data.

==================  =====  =======  ========  ========  ===================================
class               retry  breaker  fallback  escalate  typical cause
==================  =====  =======  ========  ========  ===================================
rate_limited        yes    no       yes       no        429; honour Retry-After; >= 1 s
overloaded          yes    yes      yes       no        529 / ``overloaded_error``; >= 2 s, x2
server_error        yes    yes      yes       no        5xx, 408, 409, dropped connections
timeout             yes    yes      yes       no        SDK, httpx and builtin timeouts
insufficient_quota  no     no       yes       yes       429 ``insufficient_quota``, billing
auth                no     no       yes       yes       401 / 403
bad_request         no     no       no        no        400 / 404 / 422 and other 4xx
context_overflow    no     no       yes       no        prompt longer than the context window
content_policy      no     no       yes       yes       content filter / safety system
unknown             yes    yes      yes       no        any other exception
==================  =====  =======  ========  ========  ===================================

``fallback``: a fallback chain moves on to its next alternative once such a failure is
final (a larger-context model after ``context_overflow``, say). The table is
:data:`DEFAULT_RULES`; policies may override it per class.

The exceptions of ``openai``, ``anthropic`` and ``httpx`` (and ``httpx2``, the fork the
current SDKs use) are recognised by the names in their class hierarchy and by duck-typed
attributes (``status_code``, ``response``, ``body``, ``code``, ``type``, ``error_code``);
this module never imports them. Order of rules: user registrations
(:func:`register_classifier`, latest first, their answer is final), error codes in the
body, timeout and connection types, message heuristics for API errors, the HTTP status,
body error types. An exception with no opinion (``unknown``) defers to its ``__cause__``
(else ``__context__``), up to five links. A :class:`~crashsafe.StepError` keeps the class
recorded at its first run, if any; otherwise it (or a ``WorkflowFailedError``) is classified
from the recorded type name and message, best effort (the status comes from the SDK type
name or the SDK's ``Error code: NNN`` message prefix).
Turn the SDK's own retries off (``max_retries=0``) so that retries happen at one layer.

``Failure.retry_after`` comes from the ``retry-after-ms`` header, else ``retry-after``
(seconds, or an HTTP date: seconds from now, never negative), else a hint in the error
message ("try again in 1.5s", "in 350ms", "in 6m0s"). A value that is negative, not
finite or longer than one day is treated as absent, and the next source is tried.
:func:`classify` never raises: whatever breaks while inspecting yields ``unknown``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import enum
import errno
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .._secrets import redact_text
from ..exceptions import ConfigurationError, StepError, WorkflowFailedError


class FailureClass(enum.StrEnum):
    """What kind of failure an exception is, as far as retrying is concerned."""

    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    CONTEXT_OVERFLOW = "context_overflow"
    CONTENT_POLICY = "content_policy"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ClassRule:
    """What a failure class means for retries, breakers, fallbacks and escalation."""

    retry: bool
    counts_for_breaker: bool
    fallback: bool
    escalate: bool
    min_delay: float = 0.0
    delay_factor: float = 1.0
    describe: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_delay) and self.min_delay >= 0):
            raise ConfigurationError(f"min_delay must be finite and >= 0: {self.min_delay}")
        if not (math.isfinite(self.delay_factor) and self.delay_factor > 0):
            raise ConfigurationError(f"delay_factor must be finite and > 0: {self.delay_factor}")


_C = FailureClass
_T, _F = True, False
#: The shipped meaning of every class (read-only).
DEFAULT_RULES: Mapping[FailureClass, ClassRule] = MappingProxyType({
    _C.RATE_LIMITED: ClassRule(_T, _F, _T, _F, 1.0, 1.0,
                               "Throttled by the provider: wait at least Retry-After, retry."),
    _C.OVERLOADED: ClassRule(_T, _T, _T, _F, 2.0, 2.0,
                             "The provider is overloaded: retry more slowly."),
    _C.SERVER_ERROR: ClassRule(_T, _T, _T, _F, 0.0, 1.0,
                               "A 5xx, 408, 409 or dropped connection: retry with jitter."),
    _C.TIMEOUT: ClassRule(_T, _T, _T, _F, 0.0, 1.0,
                          "The call ran out of time: retry, or hedge."),
    _C.INSUFFICIENT_QUOTA: ClassRule(_F, _F, _T, _T, 0.0, 1.0,
                                     "Quota or billing exhausted: not transient, ask a person."),
    _C.AUTH: ClassRule(_F, _F, _T, _T, 0.0, 1.0,
                       "Credentials rejected (401/403): fail fast, ask a person."),
    _C.BAD_REQUEST: ClassRule(_F, _F, _F, _F, 0.0, 1.0,
                              "The request itself is invalid: never retried."),
    _C.CONTEXT_OVERFLOW: ClassRule(_F, _F, _T, _F, 0.0, 1.0,
                                   "The prompt exceeds the context window: use a larger model."),
    _C.CONTENT_POLICY: ClassRule(_F, _F, _T, _T, 0.0, 1.0,
                                 "Refused by a content policy: fall back or ask a person."),
    _C.UNKNOWN: ClassRule(_T, _T, _T, _F, 0.0, 1.0,
                          "Any other exception: retried with backoff."),
})


@dataclass(frozen=True, slots=True)
class Failure:
    """The classification of one exception, with what the server said about waiting."""

    cls: FailureClass
    status: int | None = None
    retry_after: float | None = None
    retry_after_source: str | None = None
    code: str | None = None
    detail: str = ""


Predicate = Callable[[BaseException], "FailureClass | bool | None"]
_registry: tuple[tuple[type[BaseException] | Predicate, FailureClass | None], ...] = ()
_registry_lock = threading.Lock()


def register_classifier(match: type[BaseException] | Predicate,
                        cls: FailureClass | None = None) -> None:
    """User-registered types and predicates, consulted before the built-in rules (latest
    registration first). With a type, ``cls`` is required. With a predicate, it returns a
    FailureClass or None (no opinion); given ``cls`` too, a ``True`` result means ``cls``.
    A predicate that raises has no opinion."""
    global _registry
    if cls is not None and not isinstance(cls, FailureClass):
        raise ConfigurationError(f"cls must be a FailureClass, got {cls!r}")
    if isinstance(match, type):
        if not issubclass(match, BaseException):
            raise ConfigurationError(f"{match!r} is not an exception type")
        if cls is None:
            raise ConfigurationError(f"register_classifier({match.__qualname__}) needs a cls")
    elif not callable(match):
        raise ConfigurationError(f"expected an exception type or a predicate, got {match!r}")
    with _registry_lock:
        _registry = ((match, cls), *_registry)


def clear_classifiers() -> None:
    """Remove every user registration (for tests)."""
    global _registry
    with _registry_lock:
        _registry = ()


def _user_opinion(exc: BaseException) -> FailureClass | None:
    for match, cls in _registry:
        if isinstance(match, type):
            if isinstance(exc, match):
                return cls
            continue
        try:
            got = match(exc)
            answer = FailureClass(got) if isinstance(got, str) else cls if got is True else None
        except Exception:  # a broken predicate, or a string that names no class
            answer = None
        if answer is not None:
            return answer
    return None


_SDKS, _HTTPX = frozenset({"openai", "anthropic"}), frozenset({"httpx", "httpx2"})
_SDK_STATUS = {"BadRequestError": 400, "AuthenticationError": 401, "PaymentRequiredError": 402,
               "PermissionDeniedError": 403, "NotFoundError": 404, "RequestTimeoutError": 408,
               "ConflictError": 409, "ContentTooLargeError": 413, "UnprocessableEntityError": 422,
               "RateLimitError": 429, "InternalServerError": 500, "HTTPNotImplementedError": 501,
               "ServiceUnavailableError": 503, "GatewayTimeoutError": 504, "OverloadedError": 529}
_TIMEOUT_NAMES = frozenset({
    "openai.APITimeoutError", "anthropic.APITimeoutError", "builtins.TimeoutError",
    "socket.timeout", "crashsafe.StepTimeoutError",
    *(f"{m}.{n}" for m in _HTTPX for n in ("TimeoutException", "ConnectTimeout", "ReadTimeout",
                                            "WriteTimeout", "PoolTimeout"))})
_CONNECTION_NAMES = frozenset({
    "openai.APIConnectionError", "anthropic.APIConnectionError",
    *(f"builtins.{n}" for n in ("ConnectionError", "ConnectionResetError", "BrokenPipeError",
                                "ConnectionRefusedError", "ConnectionAbortedError")),
    *(f"{m}.{n}" for m in _HTTPX for n in ("NetworkError", "ConnectError", "ReadError",
                                            "WriteError", "CloseError", "RemoteProtocolError",
                                            "ProxyError"))})
_CONNECTION_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
                                errno.ECONNABORTED})
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_error", "billing_not_active",
                          "billing_hard_limit_reached", "contract_spend_limit_reached",
                          "enforced_spend_limit_reached", "linked_organization_spend_limit_reached",
                          "linked_organization_billing_unavailable"})
_CONTENT_CODES = frozenset({"content_policy_violation", "content_filter"})
_LATE_CODES = {"rate_limit_exceeded": _C.RATE_LIMITED, "rate_limit_error": _C.RATE_LIMITED,
               "ramp_limit_exceeded": _C.RATE_LIMITED, "api_error": _C.SERVER_ERROR,
               "server_error": _C.SERVER_ERROR, "timeout_error": _C.TIMEOUT,
               "authentication_error": _C.AUTH, "permission_error": _C.AUTH,
               "invalid_api_key": _C.AUTH, "invalid_request_error": _C.BAD_REQUEST,
               "not_found_error": _C.BAD_REQUEST}
_KNOWN_CODES = (*sorted(_QUOTA_CODES), "overloaded_error", "context_length_exceeded",
                *sorted(_CONTENT_CODES), *_LATE_CODES)
_QUOTA_TEXT = re.compile(r"exceeded your current quota|credit balance is too low")
_CONTEXT_TEXT = re.compile(r"maximum context length|prompt is too long|too many tokens|"
                           r"context window|exceed(?:s|ed)? (?:the )?context limit")
_CONTENT_TEXT = re.compile(r"content (?:management )?policy|safety system|content filter")
_STATUS_TEXT = re.compile(r"error code: (\d{3})|(?:client|server) error '(\d{3})", re.I)
_UNIT = r"(?:ms|milli[a-z]*|h[a-z]*|m(?:in[a-z]*)?|s[a-z]*)(?![a-z])"
_HINT = re.compile(rf"(?:try again|retry)\s+(?:in|after)\s+((?:\d+(?:\.\d+)?\s*{_UNIT}\s*)+)", re.I)
_HINT_PART = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT})", re.I)
_SECRET = re.compile(r"\b(sk-[\w*-]{3})[\w*-]+|(bearer\s+)\S+", re.I)
_MAX_WAIT = 86_400.0
_VALUES = frozenset(c.value for c in FailureClass)


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property that raises has no value for us
        return None


def _text(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return ""


def _status(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if type(value) is int and 100 <= value <= 599 else None


@dataclass(slots=True)
class _Facts:
    names: tuple[str, ...]  # "top_package.QualName" for each class of the MRO
    message: str
    status: int | None = None
    headers: Any = None
    codes: tuple[str, ...] = ()
    text: str = ""  # lower-cased message (+ body message) for heuristics and hints
    api_like: bool = False  # an HTTP/SDK error: message heuristics apply


def _facts(exc: BaseException) -> _Facts:
    recorded = _get(exc, "type_name")
    if isinstance(exc, StepError | WorkflowFailedError) and isinstance(recorded, str):
        parts, message = recorded.split("."), _text(_get(exc, "message"))
        f = _Facts((f"{parts[0]}.{parts[-1]}",), message, text=message.lower()[:4000])
        f.codes = tuple(c for c in _KNOWN_CODES if c in f.text)
        found = _STATUS_TEXT.search(message)
        f.status = _status(found.group(1) or found.group(2)) if found else None
        f.api_like = f.status is not None or parts[0] in _SDKS | _HTTPX
    else:
        names = tuple(f"{_text(_get(c, '__module__')).partition('.')[0]}.{_get(c, '__qualname__')}"
                      for c in type(exc).__mro__)
        f = _Facts(names, _text(exc))
        response = _get(exc, "response")
        for source, attr in ((exc, "status_code"), (exc, "status"), (response, "status_code")):
            f.status = f.status or _status(_get(source, attr))
        f.headers = _get(response, "headers") if response is not None else _get(exc, "headers")
        body = _get(exc, "body")
        if body is None and type(response).__module__ in _HTTPX:
            try:  # httpx's json() parses content already read; it never reads the network
                body = response.json()
            except Exception:
                body = None
        inner = body.get("error") if isinstance(body, Mapping) else None
        inner = inner if isinstance(inner, Mapping) else body
        raw: list[Any] = [_get(exc, "error_code"), _get(exc, "code"), _get(exc, "type")]
        extra: Any = ""
        if isinstance(inner, Mapping):
            details = inner.get("details")
            raw += [details.get("error_code") if isinstance(details, Mapping) else None,
                    inner.get("code"), inner.get("type")]
            extra = inner.get("message") if isinstance(inner.get("message"), str) else ""
        codes = (c.lower() for c in raw if isinstance(c, str) and c and c != "error")
        f.codes = tuple(dict.fromkeys(codes))
        f.text = f"{f.message} {extra}".lower()[:4000]
        f.api_like = (f.status is not None or body is not None
                      or any(n.partition(".")[0] in _SDKS | _HTTPX for n in names))
    if f.status is None:  # an SDK class whose status its name tells
        f.status = next((_SDK_STATUS[leaf] for top, _, leaf in (n.partition(".") for n in f.names)
                         if top in _SDKS and leaf in _SDK_STATUS), None)
    return f


def _decide(exc: BaseException, f: _Facts) -> FailureClass:
    codes, names, status = set(f.codes), set(f.names), f.status
    if codes & _QUOTA_CODES or status == 402:
        return _C.INSUFFICIENT_QUOTA
    if "overloaded_error" in codes or status == 529:
        return _C.OVERLOADED
    if "context_length_exceeded" in codes:
        return _C.CONTEXT_OVERFLOW
    if codes & _CONTENT_CODES or "openai.ContentFilterFinishReasonError" in names:
        return _C.CONTENT_POLICY
    if names & _TIMEOUT_NAMES or isinstance(exc, TimeoutError):
        return _C.TIMEOUT
    if (names & _CONNECTION_NAMES or isinstance(exc, ConnectionError)
            or (isinstance(exc, OSError) and _get(exc, "errno") in _CONNECTION_ERRNOS)):
        return _C.SERVER_ERROR
    if f.api_like and (status is None or (400 <= status < 500
                                          and status not in (401, 403, 408, 409))):
        if _QUOTA_TEXT.search(f.text):
            return _C.INSUFFICIENT_QUOTA
        if status != 429 and _CONTEXT_TEXT.search(f.text):
            return _C.CONTEXT_OVERFLOW
        if status != 429 and _CONTENT_TEXT.search(f.text):
            return _C.CONTENT_POLICY
    if status is not None and status >= 400:
        if status == 429:
            return _C.RATE_LIMITED
        if status in (401, 403):
            return _C.AUTH
        return _C.SERVER_ERROR if status >= 500 or status in (408, 409) else _C.BAD_REQUEST
    return next((_LATE_CODES[c] for c in f.codes if c in _LATE_CODES), _C.UNKNOWN)


def _header(headers: Any, name: str) -> str | None:
    try:  # compare lower-cased names: a plain dict is not case-insensitive
        return next((_text(v).strip() for k, v in headers.items() if _text(k).lower() == name),
                    None)
    except Exception:
        return None


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _seconds(value: str) -> float | None:
    if (number := _number(value)) is not None:
        return number
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _unit(unit: str) -> float:
    unit = unit.lower()
    if unit.startswith(("ms", "milli")):
        return 0.001
    return 3600.0 if unit[0] == "h" else 60.0 if unit[0] == "m" else 1.0


def _hint(text: str) -> float | None:
    found = _HINT.search(text)
    return (sum(float(n) * _unit(u) for n, u in _HINT_PART.findall(found.group(1)))
            if found else None)


def _sane(seconds: float | None) -> float | None:
    ok = seconds is not None and math.isfinite(seconds) and 0 <= seconds <= _MAX_WAIT
    return seconds if ok else None


def _retry_after(f: _Facts) -> tuple[float | None, str | None]:
    ms = _number(_header(f.headers, "retry-after-ms") or "")
    if ms is not None and (value := _sane(ms / 1000.0)) is not None:
        return value, "retry-after-ms header"
    raw = _header(f.headers, "retry-after")
    if raw and (value := _sane(_seconds(raw))) is not None:
        return value, "retry-after header"
    if (value := _sane(_hint(f.text))) is not None:
        return value, "body"
    return None, None


def _detail(f: _Facts) -> str:
    head = f.names[0].removeprefix("builtins.") + (f" {f.status}" if f.status else "")
    message = redact_text(_SECRET.sub(lambda m: f"{m.group(1) or m.group(2)}***",
                                      " ".join(f.message.split())))
    line = f"{head}: {message}" if message else head
    return line if len(line) <= 200 else line[:197] + "..."


def _classify_one(exc: BaseException) -> tuple[Failure, bool]:
    facts = _facts(exc)
    recorded = _get(exc, "failure_class") if isinstance(exc, StepError) else None
    if isinstance(recorded, str) and recorded in _VALUES:  # the first run's decision
        user: FailureClass | None = FailureClass(recorded)
    else:
        user = _user_opinion(exc)
    cls = user if user is not None else _decide(exc, facts)
    retry_after, source = _retry_after(facts)
    code = facts.codes[0] if facts.codes else None
    return Failure(cls, facts.status, retry_after, source, code, _detail(facts)), user is not None


def classify(exc: BaseException) -> Failure:
    """Classify ``exc`` (or, if it has no opinion, its causes) into a :class:`Failure`.

    Never raises: an exception whose attributes break on access is ``unknown``.
    """
    try:
        first: Failure | None = None
        seen: set[int] = set()
        current: Any = exc
        for _ in range(6):  # the exception itself and up to five causes
            if not isinstance(current, BaseException) or id(current) in seen:
                break
            seen.add(id(current))
            failure, final = _classify_one(current)
            if final or failure.cls is not FailureClass.UNKNOWN:
                return failure
            first = first or failure
            cause = _get(current, "__cause__")
            current = cause if cause is not None else _get(current, "__context__")
        return first or Failure(FailureClass.UNKNOWN)
    except Exception:
        return Failure(FailureClass.UNKNOWN, detail=type(exc).__qualname__[:200])


__all__ = ["DEFAULT_RULES", "ClassRule", "Failure", "FailureClass", "classify",
           "clear_classifiers", "register_classifier"]
