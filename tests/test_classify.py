"""Failure classification against the real exception types of openai, anthropic and httpx.

SDK errors are produced by the real clients talking to an in-process mock transport
(``httpx2.MockTransport``, the transport library the installed SDKs use), so every
attribute is exactly what production code sees.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashsafe import StepError, StepTimeoutError, WorkflowFailedError
from crashsafe._errors import error_payload, live_step_failure, step_failure
from crashsafe.exceptions import ConfigurationError
from crashsafe.policies.classify import (
    DEFAULT_RULES,
    ClassRule,
    Failure,
    FailureClass,
    classify,
    clear_classifiers,
    register_classifier,
)

C = FailureClass
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _no_registrations() -> Iterator[None]:
    clear_classifiers()
    yield
    clear_classifiers()


def _transport(status: int, body: Any, headers: dict[str, str] | None = None,
               ) -> httpx2.MockTransport:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if isinstance(body, BaseException):
            raise body
        content = json.dumps(body).encode() if not isinstance(body, bytes) else body
        return httpx2.Response(status, headers={"content-type": "application/json",
                                                **(headers or {})}, content=content)
    return httpx2.MockTransport(handler)


def openai_error(status: int, body: Any, headers: dict[str, str] | None = None) -> Exception:
    """The exception the real openai client raises for this HTTP answer."""
    client = openai.OpenAI(api_key="sk-test", max_retries=0,
                           http_client=httpx2.Client(transport=_transport(status, body, headers)))
    with pytest.raises(openai.OpenAIError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)  # type: ignore[arg-type]
    return info.value


def anthropic_error(status: int, body: Any, headers: dict[str, str] | None = None) -> Exception:
    """The exception the real anthropic client raises for this HTTP answer."""
    client = anthropic.Anthropic(
        api_key="sk-ant-test", max_retries=0,
        http_client=httpx2.Client(transport=_transport(status, body, headers)))
    with pytest.raises(anthropic.AnthropicError) as info:
        client.messages.create(model="claude-x", max_tokens=10, messages=CHAT)  # type: ignore[arg-type]
    return info.value


def oai_body(message: str, type_: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def ant_body(type_: str, message: str, **details: str) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if details:
        error["details"] = details
    return {"type": "error", "error": error}


# -- the rules as data --------------------------------------------------------------------
def test_default_rules_cover_every_class_and_are_read_only() -> None:
    assert set(DEFAULT_RULES) == set(FailureClass)
    assert all(rule.describe for rule in DEFAULT_RULES.values())
    retried = {cls for cls, rule in DEFAULT_RULES.items() if rule.retry}
    assert retried == {C.RATE_LIMITED, C.OVERLOADED, C.SERVER_ERROR, C.TIMEOUT, C.UNKNOWN}
    assert DEFAULT_RULES[C.UNKNOWN].counts_for_breaker
    assert DEFAULT_RULES[C.OVERLOADED].counts_for_breaker
    assert DEFAULT_RULES[C.OVERLOADED].min_delay == 2.0
    assert DEFAULT_RULES[C.OVERLOADED].delay_factor == 2.0
    assert DEFAULT_RULES[C.RATE_LIMITED].min_delay == 1.0
    assert DEFAULT_RULES[C.CONTEXT_OVERFLOW].fallback
    assert not DEFAULT_RULES[C.BAD_REQUEST].fallback
    assert {c for c, r in DEFAULT_RULES.items() if r.escalate} == {
        C.INSUFFICIENT_QUOTA, C.AUTH, C.CONTENT_POLICY}
    with pytest.raises(TypeError):
        DEFAULT_RULES[C.AUTH] = DEFAULT_RULES[C.UNKNOWN]  # type: ignore[index]


def test_class_rule_is_frozen_and_validated() -> None:
    rule = ClassRule(True, True, True, False)
    assert (rule.min_delay, rule.delay_factor) == (0.0, 1.0)
    with pytest.raises(AttributeError):
        rule.retry = False  # type: ignore[misc]
    for bad in ({"min_delay": -1.0}, {"min_delay": math.nan}, {"delay_factor": 0.0},
                {"delay_factor": math.inf}):
        with pytest.raises(ConfigurationError):
            ClassRule(True, True, True, False, **bad)


def test_failure_class_values_are_stable_strings() -> None:
    assert C.CONTEXT_OVERFLOW == "context_overflow"
    assert C("insufficient_quota") is C.INSUFFICIENT_QUOTA


# -- openai ------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "body", "sdk_type", "expected", "code"), [
    (429, oai_body("Rate limit reached for gpt-4o on requests per min.", "requests",
                   "rate_limit_exceeded"), openai.RateLimitError, C.RATE_LIMITED,
     "rate_limit_exceeded"),
    (429, oai_body("You exceeded your current quota, please check your plan and billing "
                   "details.", "insufficient_quota", "insufficient_quota"),
     openai.RateLimitError, C.INSUFFICIENT_QUOTA, "insufficient_quota"),
    (429, oai_body("Rate limit reached: too many tokens per min", "tokens",
                   "rate_limit_exceeded"), openai.RateLimitError, C.RATE_LIMITED,
     "rate_limit_exceeded"),
    (400, oai_body("This model's maximum context length is 128000 tokens. However, your "
                   "messages resulted in 130000 tokens.", "invalid_request_error",
                   "context_length_exceeded"), openai.BadRequestError, C.CONTEXT_OVERFLOW,
     "context_length_exceeded"),
    (400, oai_body("This model's maximum context length is 8192 tokens.",
                   "invalid_request_error"), openai.BadRequestError, C.CONTEXT_OVERFLOW,
     "invalid_request_error"),
    (400, oai_body("Your request was rejected as a result of our safety system.",
                   "invalid_request_error", "content_policy_violation"),
     openai.BadRequestError, C.CONTENT_POLICY, "content_policy_violation"),
    (400, oai_body("The response was filtered due to the prompt triggering Azure OpenAI's "
                   "content management policy.", None, "content_filter"),
     openai.BadRequestError, C.CONTENT_POLICY, "content_filter"),
    (400, oai_body("Your prompt was flagged by our safety system.", "invalid_request_error"),
     openai.BadRequestError, C.CONTENT_POLICY, "invalid_request_error"),
    (400, oai_body("Invalid value for 'temperature'.", "invalid_request_error"),
     openai.BadRequestError, C.BAD_REQUEST, "invalid_request_error"),
    (401, oai_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
     openai.AuthenticationError, C.AUTH, "invalid_api_key"),
    (403, oai_body("Country, region, or territory not supported", "request_forbidden",
                   "unsupported_country_region_territory"), openai.PermissionDeniedError,
     C.AUTH, "unsupported_country_region_territory"),
    (404, oai_body("The model `gpt-9` does not exist", "invalid_request_error",
                   "model_not_found"), openai.NotFoundError, C.BAD_REQUEST, "model_not_found"),
    (422, oai_body("Unprocessable", "invalid_request_error"), openai.UnprocessableEntityError,
     C.BAD_REQUEST, "invalid_request_error"),
    (409, oai_body("Lock timeout", "conflict"), openai.ConflictError, C.SERVER_ERROR, "conflict"),
    (408, oai_body("Request timeout", "timeout"), openai.APIStatusError, C.SERVER_ERROR,
     "timeout"),
    (500, oai_body("The server had an error", "server_error"), openai.InternalServerError,
     C.SERVER_ERROR, "server_error"),
    (503, oai_body("The engine is currently overloaded", "server_error"),
     openai.InternalServerError, C.SERVER_ERROR, "server_error"),
])
def test_openai_status_errors(status: int, body: dict[str, Any], sdk_type: type[Exception],
                              expected: FailureClass, code: str) -> None:
    exc = openai_error(status, body)
    assert type(exc) is sdk_type
    failure = classify(exc)
    assert failure.cls is expected
    assert failure.status == status
    assert failure.code == code
    assert failure.detail.startswith(f"{sdk_type.__module__}.{sdk_type.__qualname__} {status}: ")


def test_openai_error_built_by_hand_like_the_sdk() -> None:
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx2.Response(429, headers={"Retry-After": "12"}, request=request)
    exc = openai.RateLimitError("Error code: 429 - slow down", response=response,
                                body={"message": "slow down", "type": "requests",
                                      "code": "rate_limit_exceeded"})
    assert classify(exc) == Failure(C.RATE_LIMITED, 429, 12.0, "retry-after header",
                                    "rate_limit_exceeded",
                                    "openai.RateLimitError 429: Error code: 429 - slow down")


@pytest.mark.parametrize(("raised", "sdk_type", "expected"), [
    (httpx2.ConnectError("connection refused"), openai.APIConnectionError, C.SERVER_ERROR),
    (httpx2.RemoteProtocolError("server disconnected"), openai.APIConnectionError,
     C.SERVER_ERROR),
    (httpx2.ReadTimeout("read timed out"), openai.APITimeoutError, C.TIMEOUT),
    (httpx2.ConnectTimeout("connect timed out"), openai.APITimeoutError, C.TIMEOUT),
])
def test_openai_transport_errors(raised: Exception, sdk_type: type[Exception],
                                 expected: FailureClass) -> None:
    exc = openai_error(0, raised)
    assert type(exc) is sdk_type
    failure = classify(exc)
    assert failure.cls is expected
    assert failure.status is None


def test_openai_content_filter_finish_reason() -> None:
    assert classify(openai.ContentFilterFinishReasonError()).cls is C.CONTENT_POLICY


# -- anthropic ---------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "body", "expected", "code"), [
    (529, ant_body("overloaded_error", "Overloaded"), C.OVERLOADED, "overloaded_error"),
    (529, {"detail": "no json error envelope"}, C.OVERLOADED, None),
    (429, ant_body("rate_limit_error", "Number of request tokens has exceeded your per-minute "
                   "rate limit"), C.RATE_LIMITED, "rate_limit_error"),
    (429, ant_body("rate_limit_error", "Monthly spend limit reached",
                   error_code="enforced_spend_limit_reached"), C.INSUFFICIENT_QUOTA,
     "enforced_spend_limit_reached"),
    (400, ant_body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 "
                   "maximum"), C.CONTEXT_OVERFLOW, "invalid_request_error"),
    (400, ant_body("invalid_request_error", "input length and `max_tokens` exceed context "
                   "limit: 198000 + 8192 > 200000"), C.CONTEXT_OVERFLOW, "invalid_request_error"),
    (400, ant_body("invalid_request_error", "Your credit balance is too low to access the "
                   "Anthropic API."), C.INSUFFICIENT_QUOTA, "invalid_request_error"),
    (400, ant_body("invalid_request_error", "messages: field required"), C.BAD_REQUEST,
     "invalid_request_error"),
    (402, ant_body("billing_error", "Payment required"), C.INSUFFICIENT_QUOTA, "billing_error"),
    (401, ant_body("authentication_error", "invalid x-api-key"), C.AUTH,
     "authentication_error"),
    (403, ant_body("permission_error", "no access to model"), C.AUTH, "permission_error"),
    (404, ant_body("not_found_error", "model: claude-x"), C.BAD_REQUEST, "not_found_error"),
    (413, ant_body("request_too_large", "Request exceeds the maximum size"), C.BAD_REQUEST,
     "request_too_large"),
    (500, ant_body("api_error", "Internal server error"), C.SERVER_ERROR, "api_error"),
    (504, ant_body("timeout_error", "Gateway timeout"), C.SERVER_ERROR, "timeout_error"),
])
def test_anthropic_status_errors(status: int, body: dict[str, Any], expected: FailureClass,
                                 code: str | None) -> None:
    exc = anthropic_error(status, body)
    assert isinstance(exc, anthropic.APIStatusError)
    assert exc.status_code == status
    failure = classify(exc)
    assert failure.cls is expected
    assert failure.status == status
    assert failure.code == code


def test_anthropic_529_is_the_overloaded_error_type() -> None:
    exc = anthropic_error(529, ant_body("overloaded_error", "Overloaded"))
    overloaded = getattr(anthropic, "OverloadedError", None)
    if overloaded is not None:
        assert isinstance(exc, overloaded)
    rule = DEFAULT_RULES[classify(exc).cls]
    assert rule.retry and rule.counts_for_breaker and rule.min_delay >= 2.0


def test_anthropic_overloaded_mid_stream_by_body_type() -> None:
    """Mid-stream the HTTP status is 200; only the SSE error event says overloaded."""
    start = {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1}}}
    sse = (f"event: message_start\ndata: {json.dumps(start)}\n\n"
           f"event: error\ndata: {json.dumps(ant_body('overloaded_error', 'Overloaded'))}\n\n")

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=sse.encode())
    client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0,
                                 http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with pytest.raises(anthropic.APIStatusError) as info, client.messages.stream(
            model="claude-x", max_tokens=10, messages=CHAT) as stream:  # type: ignore[arg-type]
        for _ in stream:
            pass
    assert info.value.status_code == 200
    failure = classify(info.value)
    assert failure.cls is C.OVERLOADED
    assert failure.code == "overloaded_error"


@pytest.mark.parametrize(("raised", "expected"), [
    (httpx2.ConnectError("refused"), C.SERVER_ERROR),
    (httpx2.ReadTimeout("slow"), C.TIMEOUT),
])
def test_anthropic_transport_errors(raised: Exception, expected: FailureClass) -> None:
    exc = anthropic_error(0, raised)
    assert isinstance(exc, anthropic.APIConnectionError)
    assert classify(exc).cls is expected


# -- httpx -------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [httpx, httpx2])
@pytest.mark.parametrize(("name", "expected"), [
    ("ConnectError", C.SERVER_ERROR), ("ReadError", C.SERVER_ERROR),
    ("WriteError", C.SERVER_ERROR), ("RemoteProtocolError", C.SERVER_ERROR),
    ("NetworkError", C.SERVER_ERROR), ("ReadTimeout", C.TIMEOUT),
    ("ConnectTimeout", C.TIMEOUT), ("PoolTimeout", C.TIMEOUT), ("WriteTimeout", C.TIMEOUT),
    ("TimeoutException", C.TIMEOUT), ("UnsupportedProtocol", C.UNKNOWN),
])
def test_httpx_transport_errors(module: Any, name: str, expected: FailureClass) -> None:
    exc = getattr(module, name)("boom")
    assert classify(exc).cls is expected


@pytest.mark.parametrize("module", [httpx, httpx2])
@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, C.RATE_LIMITED),
    (429, {"error": {"message": "quota", "code": "insufficient_quota"}}, C.INSUFFICIENT_QUOTA),
    (503, b"<html>unavailable</html>", C.SERVER_ERROR),
    (401, b"", C.AUTH),
    (422, {"detail": "bad"}, C.BAD_REQUEST),
])
def test_httpx_status_errors_from_raise_for_status(module: Any, status: int, body: Any,
                                                   expected: FailureClass) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    def handler(request: Any) -> Any:
        return module.Response(status, headers={"retry-after": "3"}, content=content)
    client = module.Client(transport=module.MockTransport(handler))
    response = client.post("https://api.example.com/v1/chat")
    with pytest.raises(module.HTTPStatusError) as info:
        response.raise_for_status()
    failure = classify(info.value)
    assert failure.cls is expected
    assert (failure.status, failure.retry_after, failure.retry_after_source) == (
        status, 3.0, "retry-after header")


def test_httpx_status_error_on_an_unread_stream_does_not_read_it() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, stream=httpx.ByteStream(b'{"error": {"code": "x"}}'))
    client = httpx.Client(transport=httpx.MockTransport(handler))
    with client.stream("GET", "https://api.example.com/") as response:
        exc = httpx.HTTPStatusError("429", request=response.request, response=response)
        assert classify(exc).cls is C.RATE_LIMITED
        assert not response.is_stream_consumed


# -- Retry-After ---------------------------------------------------------------------------
def _rate_limited(headers: dict[str, str], message: str = "Rate limit reached.") -> Failure:
    return classify(openai_error(429, oai_body(message, "requests", "rate_limit_exceeded"),
                                 headers))


def test_retry_after_ms_header_is_preferred() -> None:
    failure = _rate_limited({"retry-after-ms": "1500", "retry-after": "9"},
                            "Please try again in 20s.")
    assert (failure.retry_after, failure.retry_after_source) == (1.5, "retry-after-ms header")


def test_retry_after_seconds_header_beats_body() -> None:
    failure = _rate_limited({"Retry-After": "9"}, "Please try again in 20s.")
    assert (failure.retry_after, failure.retry_after_source) == (9.0, "retry-after header")


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    failure = _rate_limited({"retry-after": when})
    assert failure.retry_after_source == "retry-after header"
    assert failure.retry_after is not None and 25.0 <= failure.retry_after <= 31.0


def test_retry_after_http_date_in_the_past_is_zero_not_negative() -> None:
    failure = _rate_limited({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert (failure.retry_after, failure.retry_after_source) == (0.0, "retry-after header")


@pytest.mark.parametrize(("message", "seconds"), [
    ("Rate limit reached for gpt-4o. Please try again in 20s.", 20.0),
    ("Please try again in 1.5s. Visit https://platform.openai.com", 1.5),
    ("Limit 10000, Used 9990. Please try again in 350ms.", 0.35),
    ("Rate limit reached on tokens per day. Please try again in 6m0s.", 360.0),
    ("Please try again in 1h2m3.5s.", 3723.5),
    ("Please retry after 2 seconds.", 2.0),
    ("Try again in 3 minutes", 180.0),
])
def test_retry_after_from_body_text(message: str, seconds: float) -> None:
    failure = _rate_limited({}, message)
    assert failure.retry_after_source == "body"
    assert failure.retry_after == pytest.approx(seconds)


@pytest.mark.parametrize("headers", [
    {"retry-after-ms": "-5"}, {"retry-after-ms": "nan"}, {"retry-after-ms": "inf"},
    {"retry-after-ms": "86400001"}, {"retry-after": "-1"}, {"retry-after": "NaN"},
    {"retry-after": "100000"}, {"retry-after": "soon"}, {"retry-after": ""},
])
def test_absurd_retry_after_values_are_absent(headers: dict[str, str]) -> None:
    failure = _rate_limited(headers)
    assert failure.cls is C.RATE_LIMITED
    assert (failure.retry_after, failure.retry_after_source) == (None, None)


def test_absurd_value_falls_through_to_the_next_source() -> None:
    failure = _rate_limited({"retry-after-ms": "-1", "retry-after": "1e9"}, "try again in 4s")
    assert (failure.retry_after, failure.retry_after_source) == (4.0, "body")
    assert _rate_limited({"retry-after": "90000"}, "try again in 2 days").retry_after is None


def test_plain_dict_headers_are_matched_case_insensitively() -> None:
    class Throttled(Exception):
        status_code = 429
        headers = {"Retry-After-MS": "250"}

    failure = classify(Throttled())
    assert (failure.cls, failure.status, failure.retry_after, failure.retry_after_source) == (
        C.RATE_LIMITED, 429, 0.25, "retry-after-ms header")
    assert failure.detail.endswith("Throttled 429")


# -- builtins ----------------------------------------------------------------------------
class _TLSLikeError(OSError):
    """An OSError subclass: Python does not remap its errno to a ConnectionError type."""


@pytest.mark.parametrize(("exc", "expected"), [
    (TimeoutError(), C.TIMEOUT),
    (StepTimeoutError("step 'x' ran past 5s"), C.TIMEOUT),
    (ConnectionError(), C.SERVER_ERROR),
    (ConnectionResetError(), C.SERVER_ERROR),
    (ConnectionRefusedError(), C.SERVER_ERROR),
    (BrokenPipeError(), C.SERVER_ERROR),
    (OSError(errno.ECONNRESET, "reset"), C.SERVER_ERROR),
    (_TLSLikeError(errno.EPIPE, "broken pipe"), C.SERVER_ERROR),
    (_TLSLikeError(errno.ECONNREFUSED, "refused"), C.SERVER_ERROR),
    (_TLSLikeError(errno.ENOENT, "no such file"), C.UNKNOWN),
    (ValueError("prompt is too long"), C.UNKNOWN),  # heuristics only apply to API errors
    (KeyError("x"), C.UNKNOWN),
    (RuntimeError("content policy"), C.UNKNOWN),
])
def test_builtin_exceptions(exc: BaseException, expected: FailureClass) -> None:
    assert classify(exc).cls is expected


def test_real_asyncio_and_socket_timeouts() -> None:
    async def late() -> BaseException:
        try:
            await asyncio.wait_for(asyncio.sleep(5), 0.001)
        except BaseException as exc:
            return exc
        raise AssertionError("wait_for did not time out")

    assert classify(asyncio.run(late())).cls is C.TIMEOUT
    server = socket.create_server(("127.0.0.1", 0))
    with (server, socket.create_connection(server.getsockname(), timeout=0.01) as conn,
          pytest.raises(TimeoutError) as info):
        conn.recv(1)
    assert classify(info.value).cls is C.TIMEOUT


def test_unknown_failure_carries_a_readable_detail() -> None:
    failure = classify(ValueError("bad\n  input"))
    assert failure == Failure(C.UNKNOWN, detail="ValueError: bad input")


# -- chains ------------------------------------------------------------------------------
class WrapperError(Exception):
    pass


def _chain(inner: BaseException, links: int) -> BaseException:
    exc = inner
    for i in range(links):
        outer = WrapperError(f"wrapper {i}")
        outer.__cause__ = exc
        exc = outer
    return exc


def test_explicit_cause_is_classified() -> None:
    inner = openai_error(429, oai_body("slow", "requests", "rate_limit_exceeded"),
                         {"retry-after": "2"})
    try:
        raise WrapperError("agent step failed") from inner
    except WrapperError as exc:
        failure = classify(exc)
    assert (failure.cls, failure.retry_after, failure.status) == (C.RATE_LIMITED, 2.0, 429)
    assert failure.detail.startswith("openai.RateLimitError 429")


def test_implicit_context_is_classified() -> None:
    try:
        try:
            raise TimeoutError("read")
        except TimeoutError:
            raise WrapperError("while handling")  # noqa: B904
    except WrapperError as exc:
        assert exc.__cause__ is None and isinstance(exc.__context__, TimeoutError)
        assert classify(exc).cls is C.TIMEOUT


def test_chain_depth_is_bounded_to_five_causes() -> None:
    assert classify(_chain(TimeoutError(), 5)).cls is C.TIMEOUT
    deep = classify(_chain(TimeoutError(), 6))
    assert deep.cls is C.UNKNOWN
    assert deep.detail.endswith("WrapperError: wrapper 5")  # the outermost exception


def test_own_opinion_wins_over_the_cause() -> None:
    exc = TimeoutError("gave up")
    exc.__cause__ = openai_error(401, oai_body("bad key", None, "invalid_api_key"))
    assert classify(exc).cls is C.TIMEOUT


def test_cause_cycle_terminates() -> None:
    a, b = WrapperError("a"), WrapperError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify(a).cls is C.UNKNOWN


# -- crashsafe's recorded failures ---------------------------------------------------------
@pytest.mark.parametrize(("type_name", "message", "expected", "status"), [
    ("openai.RateLimitError", "Error code: 429 - Rate limit reached", C.RATE_LIMITED, 429),
    ("openai.RateLimitError", "Error code: 429 - You exceeded your current quota",
     C.INSUFFICIENT_QUOTA, 429),
    ("anthropic.OverloadedError", "Overloaded", C.OVERLOADED, 529),
    ("anthropic.APIStatusError", "{'type': 'error', 'error': {'type': 'overloaded_error'}}",
     C.OVERLOADED, None),
    ("anthropic.types.shared.enforced_spend_limit_reached_error.EnforcedSpendLimitReachedError",
     "Error code: 429 - {'error': {'details': {'error_code': 'enforced_spend_limit_reached'}}}",
     C.INSUFFICIENT_QUOTA, 429),
    ("openai.BadRequestError", "Error code: 400 - This model's maximum context length is 8192",
     C.CONTEXT_OVERFLOW, 400),
    ("openai.AuthenticationError", "Incorrect API key", C.AUTH, 401),
    ("openai.APITimeoutError", "Request timed out.", C.TIMEOUT, None),
    ("openai.APIConnectionError", "Connection error.", C.SERVER_ERROR, None),
    ("httpx.ReadTimeout", "timed out", C.TIMEOUT, None),
    ("httpx.HTTPStatusError", "Server error '502 Bad Gateway' for url 'https://x'",
     C.SERVER_ERROR, 502),
    ("builtins.ConnectionResetError", "reset", C.SERVER_ERROR, None),
    ("crashsafe.exceptions.StepTimeoutError", "ran past 5s", C.TIMEOUT, None),
    ("myapp.errors.Weird", "Error somewhere", C.UNKNOWN, None),
    ("builtins.ValueError", "prompt is too long", C.UNKNOWN, None),  # not an API error
])
def test_step_error_is_classified_by_recorded_type_name(
        type_name: str, message: str, expected: FailureClass, status: int | None) -> None:
    for exc in (StepError("call_llm", type_name, message),
                WorkflowFailedError("wf-1", type_name, message)):
        failure = classify(exc)
        assert (failure.cls, failure.status) == (expected, status)


def test_step_error_keeps_the_class_recorded_at_the_first_run() -> None:
    register_classifier(StepError, C.AUTH)  # the recorded class wins even over registrations
    recorded = StepError("call_llm", "openai.RateLimitError", "Error code: 429 - x",
                         failure_class="content_policy")
    assert (classify(recorded).cls, classify(recorded).status) == (C.CONTENT_POLICY, 429)
    for bogus in ("not-a-class", None):
        stale = StepError("call_llm", "openai.RateLimitError", "Error code: 429 - x",
                          failure_class=bogus)
        assert classify(stale).cls is C.AUTH
    clear_classifiers()
    assert classify(stale).cls is C.RATE_LIMITED


def test_step_error_live_and_replayed() -> None:
    original = anthropic_error(529, ant_body("overloaded_error", "Overloaded"))
    live = live_step_failure("call_llm", original)
    replayed = step_failure("call_llm", error_payload(original))
    assert isinstance(replayed, StepError) and replayed.__cause__ is None
    assert classify(live).cls is C.OVERLOADED
    assert classify(replayed).cls is C.OVERLOADED


# -- user registrations ------------------------------------------------------------------
class DomainError(Exception):
    pass


class SlowTool(TimeoutError):
    pass


def test_registered_type_takes_precedence_over_builtin_rules() -> None:
    assert classify(SlowTool()).cls is C.TIMEOUT
    register_classifier(SlowTool, C.BAD_REQUEST)
    assert classify(SlowTool()).cls is C.BAD_REQUEST
    assert classify(TimeoutError()).cls is C.TIMEOUT  # the base class is untouched


def test_latest_registration_wins() -> None:
    register_classifier(DomainError, C.AUTH)
    register_classifier(DomainError, C.SERVER_ERROR)
    assert classify(DomainError()).cls is C.SERVER_ERROR


def test_predicate_precedence_and_no_opinion() -> None:
    exc = openai_error(429, oai_body("slow", "requests", "rate_limit_exceeded"),
                       {"retry-after": "5"})

    def only_rate_limits(e: BaseException) -> FailureClass | None:
        return C.OVERLOADED if getattr(e, "status_code", None) == 429 else None
    register_classifier(only_rate_limits)
    failure = classify(exc)
    assert (failure.cls, failure.retry_after, failure.status) == (C.OVERLOADED, 5.0, 429)
    assert classify(openai_error(500, oai_body("x", "server_error"))).cls is C.SERVER_ERROR


def test_predicate_with_cls_and_broken_predicates() -> None:
    def boom(e: BaseException) -> FailureClass | None:
        raise RuntimeError("broken predicate")
    register_classifier(lambda e: "quota" in str(e), C.INSUFFICIENT_QUOTA)
    register_classifier(boom)
    register_classifier(lambda e: "not-a-class")  # type: ignore[arg-type, return-value]
    assert classify(DomainError("monthly quota")).cls is C.INSUFFICIENT_QUOTA
    assert classify(DomainError("other")).cls is C.UNKNOWN


def test_registration_is_consulted_on_causes() -> None:
    register_classifier(DomainError, C.CONTENT_POLICY)
    assert classify(_chain(DomainError("refused"), 2)).cls is C.CONTENT_POLICY


def test_registered_unknown_is_final() -> None:
    register_classifier(WrapperError, C.UNKNOWN)
    assert classify(_chain(TimeoutError(), 1)).cls is C.UNKNOWN


def test_clear_classifiers() -> None:
    register_classifier(DomainError, C.AUTH)
    register_classifier(lambda e: C.AUTH)
    assert classify(ValueError()).cls is C.AUTH
    clear_classifiers()
    assert classify(DomainError()).cls is C.UNKNOWN
    assert classify(ValueError()).cls is C.UNKNOWN


@pytest.mark.parametrize(("match", "cls"), [
    (DomainError, None), (int, C.AUTH), ("DomainError", C.AUTH), (DomainError, "auth"),
])
def test_bad_registrations_are_refused(match: Any, cls: Any) -> None:
    with pytest.raises(ConfigurationError):
        register_classifier(match, cls)
    assert classify(DomainError()).cls is C.UNKNOWN


# -- hostile input ---------------------------------------------------------------------------
class _Raises:
    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raise RuntimeError("attribute exploded")


class HostileError(Exception):
    status_code = _Raises()
    status = _Raises()
    response = _Raises()
    body = _Raises()
    code = _Raises()
    type = _Raises()
    headers = _Raises()
    errno = _Raises()
    __cause__ = _Raises()  # type: ignore[assignment]
    __context__ = _Raises()  # type: ignore[assignment]

    def __str__(self) -> str:
        raise RuntimeError("str exploded")


def test_hostile_exception_is_unknown_without_raising() -> None:
    failure = classify(HostileError())
    assert failure.cls is C.UNKNOWN
    assert failure.status is None and failure.retry_after is None
    assert "HostileError" in failure.detail


def test_one_exploding_attribute_does_not_hide_the_others() -> None:
    class HalfBroken(Exception):
        status_code = 503
        body = _Raises()
        code = _Raises()

    failure = classify(HalfBroken("upstream"))
    assert (failure.cls, failure.status, failure.code) == (C.SERVER_ERROR, 503, None)
    assert failure.detail.endswith("HalfBroken 503: upstream")


def test_hostile_headers_keep_the_status_class() -> None:
    class BadHeaders:
        def items(self) -> Any:
            raise RuntimeError("headers exploded")

    class Response:
        status_code = 429
        headers = BadHeaders()

    class Throttled(Exception):
        response = Response()

    failure = classify(Throttled())
    assert (failure.cls, failure.status, failure.retry_after) == (C.RATE_LIMITED, 429, None)


def test_detail_is_short_and_leaks_no_secrets() -> None:
    exc = openai_error(401, oai_body("Incorrect API key provided: sk-proj-AbCdEf0123456789xyz. "
                                     "Authorization: Bearer sk-live-zzzzzzzzzzz " + "x" * 400,
                                     "invalid_request_error", "invalid_api_key"),
                       {"set-cookie": "session=TOPSECRET", "x-api-key": "sk-header-secret"})
    failure = classify(exc)
    assert failure.cls is C.AUTH
    assert len(failure.detail) <= 200
    assert "AbCdEf0123456789" not in failure.detail
    assert "zzzzzzzz" not in failure.detail
    assert "TOPSECRET" not in failure.detail and "sk-header-secret" not in failure.detail
    assert failure.detail.startswith("openai.AuthenticationError 401: Error code: 401")


# -- optional dependencies ----------------------------------------------------------------------
def test_importing_crashsafe_imports_no_provider_sdk() -> None:
    code = ("import sys, crashsafe, crashsafe.policies.classify as c\n"
            "c.classify(TimeoutError())\n"
            "bad = [m for m in ('openai', 'anthropic', 'httpx', 'httpx2') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print('clean')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


# -- properties --------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["error", "type", "code", "message", "details", "error_code", "x"])
        | st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
header_values = (st.text(max_size=20) | st.floats().map(str) | st.integers().map(str)
                 | st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "inf", "-0", "1e400"]))
headers = st.dictionaries(
    st.sampled_from(["retry-after", "Retry-After", "retry-after-ms", "RETRY-AFTER-MS",
                     "x-request-id"]), header_values, max_size=3)
messages = st.text(max_size=60) | st.builds(
    lambda n, u: f"Please try again in {n}{u}", st.floats(allow_nan=True), st.sampled_from(
        ["s", "ms", "m", "h", " seconds", "x"]))


def _sdk_exception(kind: str, status: int, head: dict[str, str], body: Any, message: str,
                   ) -> BaseException:
    ascii_headers = {k: v.encode("ascii", "replace").decode() for k, v in head.items()}
    response = httpx2.Response(status, headers=ascii_headers,
                               request=httpx2.Request("POST", "https://api.example.com/"))
    if kind == "openai":
        return openai.APIStatusError(message, response=response, body=body)
    if kind == "anthropic":
        return anthropic.APIStatusError(message, response=response, body=body)
    plain = httpx.Response(status, headers=ascii_headers,
                           request=httpx.Request("GET", "https://api.example.com/"))
    return httpx.HTTPStatusError(message, request=plain.request, response=plain)


@FAST
@given(st.sampled_from(["openai", "anthropic", "httpx"]), st.integers(100, 599),
       headers, json_values, messages)
def test_classify_never_raises_on_sdk_errors(kind: str, status: int, head: dict[str, str],
                                             body: Any, message: str) -> None:
    try:
        exc = _sdk_exception(kind, status, head, body, message)
    except Exception:  # the SDK itself refuses this input: nothing to classify
        return
    failure = classify(exc)
    _check_invariants(failure)
    assert failure.status == status


class _Duck(Exception):
    def __init__(self, attrs: dict[str, Any]) -> None:
        super().__init__("duck")
        for key, value in attrs.items():
            setattr(self, key, value)


@FAST
@given(st.dictionaries(st.sampled_from(["status_code", "status", "body", "code", "type",
                                        "headers", "error_code", "errno", "response",
                                        "type_name", "message"]),
                       json_values | headers | st.integers(-10, 1000), max_size=6))
def test_classify_never_raises_on_arbitrary_attributes(attrs: dict[str, Any]) -> None:
    _check_invariants(classify(_Duck(attrs)))


def _check_invariants(failure: Failure) -> None:
    assert isinstance(failure, Failure) and failure.cls in FailureClass
    assert failure.status is None or 100 <= failure.status <= 599
    assert (failure.retry_after is None) == (failure.retry_after_source is None)
    if failure.retry_after is not None:
        assert math.isfinite(failure.retry_after) and 0 <= failure.retry_after <= 86_400
    assert len(failure.detail) <= 200


@FAST
@given(st.floats(min_value=0, max_value=86_400_000, allow_nan=False))
def test_retry_after_ms_round_trips(ms: float) -> None:
    failure = classify(_sdk_exception("openai", 429, {"retry-after-ms": repr(ms)}, None, "x"))
    assert failure.retry_after_source == "retry-after-ms header"
    assert failure.retry_after == pytest.approx(ms / 1000.0)
