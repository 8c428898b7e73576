"""Secrets: the masked ``Secret`` type, field-name redaction and free-text redaction.

Canaries (unique strings that must never be seen) are planted in values, nested
structures and real SDK exceptions; each test checks every place they could leak.
"""

from __future__ import annotations

import copy
import json
import pickle
import secrets
import traceback
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashsafe import SerializationError
from crashsafe._codec import encode
from crashsafe._secrets import (
    DEFAULT_PATTERNS,
    MASK,
    Secret,
    is_sensitive_name,
    redact,
    redact_text,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def canary() -> str:
    return "canary" + secrets.token_hex(12)


def everywhere(value: Any) -> list[str]:
    """Every textual form a value can take on its way to a log or a database."""
    return [repr(value), str(value), json.dumps(value, default=str), f"{value}"]


# -- Secret --------------------------------------------------------------------------------


def test_secret_is_masked_in_repr_str_and_format() -> None:
    c = canary()
    s = Secret(c)
    assert repr(s) == "Secret('***')"
    assert str(s) == MASK == f"{s}" == "%s" % s  # noqa: UP031 - the old style too
    assert f"{s:>5}" == "  ***"
    assert s.reveal() == c
    for text in [*everywhere({"key": s}), *everywhere([s, (s,)]), repr({s: 1})]:
        assert c not in text


def test_secret_equality_and_hashing_are_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert Secret("a") != "a"
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2
    assert {Secret("a"): 1}[Secret("a")] == 1


def test_secret_refuses_pickling_in_every_protocol() -> None:
    c = canary()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled") as info:
            pickle.dumps(Secret(c), protocol=protocol)
        assert c not in "".join(traceback.format_exception(info.value))
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [Secret(c)]})


def test_secret_is_immutable_copyable_and_only_wraps_str() -> None:
    s = Secret("x")
    with pytest.raises(AttributeError):
        s._value = "y"  # type: ignore[misc]
    assert copy.copy(s) is s and copy.deepcopy({"k": s})["k"] is s
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_an_unencrypted_store_refuses_a_secret_without_leaking_it(tmp_path: Any) -> None:
    """The codec tags a Secret; only an encrypted store keeps it (as ciphertext, see
    tests/test_redaction.py), any other refuses the payload."""
    from crashsafe._redaction import Redactor

    c = canary()
    data, _ = encode({"headers": {"x-api-key": Secret(c)}}, "inputs of step 'call'")
    for redactor in (Redactor(True), Redactor(False)):
        with pytest.raises(SerializationError) as info:
            redactor.value(data, encrypted=False, what="inputs of step 'call'")
        assert "Secret" in str(info.value)
        assert c not in "".join(traceback.format_exception(info.value))


def test_a_secret_in_an_exception_message_stays_masked() -> None:
    c = canary()
    try:
        raise RuntimeError(f"login failed for key {Secret(c)} ({Secret(c)!r})")
    except RuntimeError as exc:
        assert c not in "".join(traceback.format_exception(exc))


# -- field names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "api_key", "apiKey", "APIKey", "X-Api-Key", "OPENAI_API_KEY", "anthropic_api_key",
    "apikey", "token", "access_token", "accessToken", "refresh_token", "id_token",
    "github_token", "secret", "client_secret", "clientSecret", "aws_secret_access_key",
    "secret_key", "password", "db_password", "passwd", "passphrase", "Authorization",
    "proxy-authorization", "auth", "basic_auth", "cookie", "Set-Cookie", "cookies",
    "session", "session_token", "private_key", "privateKey", "access_key", "bearer",
    "credentials", "credential",
])
def test_sensitive_names(name: str) -> None:
    assert is_sensitive_name(name)


@pytest.mark.parametrize("name", [
    "max_tokens", "maxTokens", "prompt_tokens", "completion_tokens", "total_tokens",
    "input_tokens", "output_tokens", "tokens", "token_count", "author", "authors",
    "authority", "session_id", "sessionId", "idempotency_key", "key", "keys", "model",
    "content", "role", "secretary", "passage", "compass", "cookbook", "tokenizer", "",
])
def test_ordinary_names_are_left_alone(name: str) -> None:
    assert not is_sensitive_name(name)


def test_allow_and_custom_patterns() -> None:
    assert not is_sensitive_name("auth", allow=["auth"])
    assert not is_sensitive_name("apiKey", allow=["api_key"])  # normalized both sides
    assert is_sensitive_name("session_id", patterns=(*DEFAULT_PATTERNS, r"session_?id"))
    assert is_sensitive_name("my_pin", patterns=[r".*pin"])
    assert not is_sensitive_name("api_key", patterns=[r".*pin"])
    with pytest.raises(ValueError, match="invalid field-name pattern"):
        redact({"a": 1}, patterns=["("])


# -- redact ----------------------------------------------------------------------------------


def test_redact_masks_nested_sensitive_fields_and_secrets() -> None:
    c = canary()
    value = {
        "model": "gpt-4o",
        "max_tokens": 512,
        "api_key": c,
        "request": {"headers": {"Authorization": f"Bearer {c}", "Accept": "json"},
                    "auth": {"user": "bob", "password": c}},
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "tool", "content": Secret(c), "tokens": [1, 2]}],
        "pair": ("ok", Secret(c)),
        "tags": frozenset({"a", Secret(c)}),
        "clientSecret": [c, c],
        42: c,  # a non-str key is not a field name: left alone
        "refresh_token": None,
        "password": "",
    }
    out = redact(value)
    assert out["model"] == "gpt-4o" and out["max_tokens"] == 512
    assert out["api_key"] == MASK
    assert out["request"]["headers"] == {"Authorization": MASK, "Accept": "json"}
    assert out["request"]["auth"] == MASK  # the whole sub-dict under a sensitive name
    assert out["messages"] == [{"role": "user", "content": "hi"},
                               {"role": "tool", "content": MASK, "tokens": [1, 2]}]
    assert out["pair"] == ("ok", MASK)
    assert out["tags"] == frozenset({"a", MASK})
    assert out["clientSecret"] == MASK
    assert out["refresh_token"] is None and out["password"] == ""  # nothing to hide
    del out[42]
    for text in everywhere(out):
        assert c not in text


def test_redact_copies_and_never_mutates_its_input() -> None:
    value = {"api_key": "x", "items": [{"token": "y"}], "keep": [1, 2]}
    before = copy.deepcopy(value)
    out = redact(value)
    assert value == before
    out["items"].append("new")
    out["keep"].append(3)
    assert value == before


def test_redact_allow_exempts_named_fields() -> None:
    value = {"auth": {"method": "oauth"}, "token": "t", "nested": {"token": "u"}}
    assert redact(value, allow=["auth"]) == {"auth": {"method": "oauth"}, "token": MASK,
                                             "nested": {"token": MASK}}
    assert redact(value, allow="token")["nested"] == {"token": "u"}


def test_redact_leaves_other_objects_as_they_are() -> None:
    class Thing:
        pass

    thing = Thing()
    assert redact({"x": thing, "n": 1.5, "b": b"raw"}) == {"x": thing, "n": 1.5, "b": b"raw"}
    assert redact("Bearer abc") == "Bearer abc"  # free text is redact_text's job


def test_redact_of_a_very_deep_value_is_a_typed_error() -> None:
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SerializationError, match="nested too deeply"):
        redact(deep)


json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) \
    | st.text(max_size=8)
names = st.sampled_from(["a", "model", "max_tokens", "content", "api_key", "Authorization",
                         "x-api-key", "token", "clientSecret", "data", "items"])


@FAST
@given(st.data())
def test_planted_canaries_never_survive_redaction(data: st.DataObject) -> None:
    c = canary()
    planted = st.just(Secret(c)) | st.just(c).map(lambda v: {"api_key": v}) \
        | st.just(c).map(lambda v: {"password": [v]}) \
        | st.just(c).map(lambda v: {"headers": {"Authorization": f"Bearer {v}"}})
    leaves = json_leaves | planted
    value = data.draw(st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4)
        | st.tuples(inner, inner),
        max_leaves=30))
    out = redact(value)
    for text in everywhere(out):
        assert c not in text


# -- redact_text -----------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]


def _transport(status: int, body: Any) -> httpx2.MockTransport:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": "application/json"},
                               content=json.dumps(body).encode())
    return httpx2.MockTransport(handler)


def _openai_error(key: str, body: Any) -> openai.OpenAIError:
    client = openai.OpenAI(api_key=key, max_retries=0,
                           http_client=httpx2.Client(transport=_transport(401, body)))
    with pytest.raises(openai.OpenAIError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)  # type: ignore[arg-type]
    return info.value


def _anthropic_error(key: str, body: Any) -> anthropic.AnthropicError:
    client = anthropic.Anthropic(api_key=key, max_retries=0,
                                 http_client=httpx2.Client(transport=_transport(401, body)))
    with pytest.raises(anthropic.AnthropicError) as info:
        client.messages.create(model="claude-x", max_tokens=10,  # type: ignore[arg-type]
                               messages=CHAT)
    return info.value


def test_redact_text_on_a_real_openai_authentication_error() -> None:
    key = "sk-proj-" + secrets.token_urlsafe(48)
    # A proxy in front of the API echoing the key it was given.
    exc = _openai_error(key, {"error": {
        "message": f"Incorrect API key provided: {key}. You can find your API key at "
                   "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
    assert isinstance(exc, openai.AuthenticationError)
    request = exc.request
    # openai 3.x keeps the Authorization header off the request it attaches to the
    # error (older versions did not); a log of what was sent may still carry it.
    headers = {"authorization": f"Bearer {key}", **dict(request.headers)}
    log_line = f"{exc!s} | {exc!r} | request headers: {headers}"
    assert key in log_line  # the leak is real
    clean = redact_text(log_line)
    assert key not in clean and key[8:30] not in clean
    assert "Incorrect API key provided: sk-proj-***" in clean
    assert "'authorization': 'Bearer ***'" in clean
    assert "Error code: 401" in clean and "'x-stainless-retry-count': '0'" in clean


def test_redact_text_on_a_real_anthropic_authentication_error() -> None:
    key = "sk-ant-api03-" + secrets.token_urlsafe(70)
    exc = _anthropic_error(key, {"type": "error", "error": {
        "type": "authentication_error", "message": f"invalid x-api-key: {key}"}})
    assert isinstance(exc, anthropic.AuthenticationError)
    log_line = f"{exc} | headers: {dict(exc.request.headers)}"
    assert key in log_line
    clean = redact_text(log_line)
    assert key not in clean and key[13:40] not in clean
    assert "invalid x-api-key: ***" in clean
    assert "'authorization': 'Bearer ***'" in clean
    assert "authentication_error" in clean and "'anthropic-version'" in clean


@pytest.mark.parametrize(("text", "leaked", "kept"), [
    ("Authorization: Bearer abc.def-ghi_jkl~mno+pqr/stu=", "abc.def", "Authorization: Bearer ***"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA=='", "dXNlcjpw", "Basic ***"),
    ("token expired: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "c2lnbmF0",
     "Bearer ***"),
    ("jwt=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "c2lnbmF0", "jwt=eyJ***"),
    ("could not connect to postgresql://app:hunter2@db:5432/prod", "hunter2",
     "postgresql://app:***@db:5432/prod"),
    ("login failed: password=hunter2 user=bob", "hunter2", "password=*** user=bob"),
    ("DB_PASSWORD: 'hunter2' next", "hunter2", "DB_PASSWORD: '***' next"),
    ('{"api_key": "abc 123", "model": "m"}', "abc 123", '"api_key": "***", "model": "m"'),
    ("client_secret=s3cr3t&grant_type=x", "s3cr3t", "client_secret=***&grant_type=x"),
    ("key sk-abcdefghijklmnopqrstuvwx rejected", "abcdefghijkl", "key sk-*** rejected"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789 leaked", "abcdefghijklm", "ghp_***"),
    ("aws AKIAIOSFODNN7EXAMPLE", "ODNN7EXAMPLE", "AKIAIOSF***"),
    ("headers {'x-api-key': 'sk-ant-api03-AbC_dEf-123456789012345', 'accept': 'json'}",
     "AbC_dEf", "{'x-api-key': '***', 'accept': 'json'}"),
    ("slack xoxb-123456789012-abcdefghij", "abcdefghij", "xoxb-***"),
])
def test_redact_text_patterns(text: str, leaked: str, kept: str) -> None:
    clean = redact_text(text)
    assert leaked not in clean, clean
    assert kept in clean, clean


@pytest.mark.parametrize("text", [
    "max_tokens: 4096 exceeded the context window",
    "This model's maximum context length is 8192 tokens.",
    "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM)",
    "Authorization header missing",
    "use scikit-learn and sk-learn",
    "see https://example.com/path?q=1",
    "",
])
def test_redact_text_leaves_ordinary_text_alone(text: str) -> None:
    assert redact_text(text) == text
