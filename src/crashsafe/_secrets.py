"""Keeping secrets out of stored payloads, logs and exception text.

Two tools:

* :class:`Secret` wraps a credential so it cannot leak by accident: its ``repr``,
  ``str`` and ``format`` are masked, it refuses to be pickled, and it is stored only
  inside encrypted records (a store without a keyring refuses it; see
  :mod:`crashsafe._redaction`). Code that needs the value calls :meth:`Secret.reveal`.
* :func:`redact` copies a JSON-like value, masking values whose *field name* looks
  sensitive and every :class:`Secret`; :func:`redact_text` masks credentials that
  appear in free text (``Bearer ...``, ``sk-...`` API keys, ``password=...``,
  passwords in URLs), for exception messages and log lines.

How field names are matched: a name is first normalized (camelCase split at the case
change, every run of characters other than letters and digits turned into ``_``,
lower-cased: ``X-Api-Key`` → ``x_api_key``, ``clientSecret`` → ``client_secret``),
then each pattern, a regular expression, must match the **whole** normalized name
(``re.fullmatch``, case-insensitive). Whole-name matching is deliberate: ``token``
must catch ``access_token`` (``(.*_)?token``) but not ``max_tokens`` or
``prompt_tokens``, which LLM payloads are full of. A pattern of your own that should
match anywhere needs ``.*`` on both sides.

Redaction changes data: a redacted step result replays as ``"***"``. So the defaults
stay narrow, and ``allow`` exempts field names that are needed verbatim.
``session_id`` is not matched by default because agent frameworks use it for the
conversation id; add ``r"session_?id"`` if yours is a credential.
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from .exceptions import SerializationError

MASK = "***"
"""What a redacted value is replaced with."""

PATTERN_SETS: dict[int, tuple[str, ...]] = {1: (
    r"(.*_)?api_?keys?",
    r"(.*_)?(access|refresh|id|auth|bearer|session|csrf|xsrf)?_?token",
    r"(.*_)?secrets?(_.*)?",
    r"(.*_)?(password|passwd|passphrase|pwd)",
    r"(.*_)?(proxy_)?authorization",
    r"(.*_)?auth",
    r"(.*_)?(set_)?cookies?",
    r"(.*_)?session(_?(key|token|secret|cookie))?",
    r"(.*_)?private_?key",
    r"(.*_)?access_?key",
    r"(.*_)?bearer",
    r"(.*_)?credentials?",
)}
"""Every set of default patterns a release has shipped, by number. Never edit a set: a
checkpoint's hash is taken under the redaction settings of its time and records them
(absent: set 1, see :meth:`crashsafe._redaction.Redactor.hash_tag`); to change the
defaults, add a set and point :data:`DEFAULT_PATTERNS` at it."""

DEFAULT_PATTERNS: tuple[str, ...] = PATTERN_SETS[1]
"""Field-name patterns :func:`redact` masks by default (see the module docstring)."""


class Secret:
    """A string that must not leak: masked in ``repr``/``str``, never pickled, stored
    only encrypted.

    ``Secret("sk-...")`` compares equal to another ``Secret`` with the same value (in
    constant time) and can be hashed; ``.reveal()`` returns the value.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The secret value. Use it only where the credential is needed."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode("utf-8", "surrogatepass"),
                                   other._value.encode("utf-8", "surrogatepass"))

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or serialized; pass it to each "
                        "process from its environment or secret store instead")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        self.__reduce__()

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


# --- field names ----------------------------------------------------------------------

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_WORD = re.compile(r"[^A-Za-z0-9]+")


def _normalize(name: str) -> str:
    return _NON_WORD.sub("_", _CAMEL.sub("_", name)).strip("_").lower()


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...], allow: frozenset[str]) -> Any:
    try:
        combined = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) \
            if patterns else None
    except re.error as exc:
        raise ValueError(f"redact: invalid field-name pattern: {exc}") from None

    @functools.lru_cache(maxsize=4096)
    def sensitive(name: str) -> bool:
        norm = _normalize(name)
        if norm in allow:
            return False
        return combined is not None and combined.fullmatch(norm) is not None

    return sensitive


def is_sensitive_name(name: str, patterns: Iterable[str] = DEFAULT_PATTERNS,
                      allow: Iterable[str] = ()) -> bool:
    """Whether :func:`redact` would mask a value stored under field ``name``."""
    result: bool = _matcher(tuple(patterns), _allowed(allow))(name)
    return result


def _allowed(allow: Iterable[str]) -> frozenset[str]:
    if isinstance(allow, str):
        allow = (allow,)
    return frozenset(_normalize(a) for a in allow)


def redact(value: Any, patterns: Iterable[str] = DEFAULT_PATTERNS,
           allow: Iterable[str] = ()) -> Any:
    """A copy of ``value`` with sensitive fields and every :class:`Secret` masked.

    ``value`` is JSON-like: dicts, lists, tuples, sets, strings, numbers, ``None``,
    nested to any depth. A value under a dict key matching one of ``patterns`` is
    replaced by ``"***"`` whatever its type (a whole sub-dict under ``"auth"`` goes),
    except ``None`` and ``""``, which hide nothing and are kept. ``allow`` names fields
    never to mask (normalized like the keys, so ``"apiKey"`` also allows
    ``api_key``). Other objects are returned as they are.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    sensitive = _matcher(tuple(patterns), _allowed(allow))
    try:
        return _redact(value, sensitive)
    except RecursionError:
        raise SerializationError("redact: value is nested too deeply") from None


def _redact(v: Any, sensitive: Any) -> Any:
    if isinstance(v, Secret):
        return MASK
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if isinstance(k, str) and x is not None and x != "" and sensitive(k):
                out[k] = MASK
            else:
                out[k] = _redact(x, sensitive)
        return out
    if isinstance(v, list):
        return [_redact(x, sensitive) for x in v]
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_redact(x, sensitive) for x in v)
    if isinstance(v, set | frozenset):
        return type(v)(_redact(x, sensitive) for x in v)
    return v


# --- free text ------------------------------------------------------------------------

_KEY_CHARS = r"[A-Za-z0-9_\-*]"
_TEXT_RULES: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # Authorization headers: keep the scheme, mask the credentials.
    (re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
                r"(?:(bearer|basic|digest|token|apikey)\s+)?[^\s\"',;}]+"),
     lambda m: f"{m[1]}{m[2] + ' ' if m[2] else ''}{MASK}"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*"), r"\1 ***"),
    # Passwords in URLs: scheme://user:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
    # Provider key formats; the recognizable prefix stays for debugging.
    (re.compile(rf"\b(sk-(?:ant-(?:[a-z]+\d*-)?|proj-|svcacct-|admin-)?){_KEY_CHARS}{{10,}}"),
     r"\1***"),
    (re.compile(r"\b(gh[pousr]_|github_pat_)[A-Za-z0-9_]{20,}"), r"\1***"),
    (re.compile(r"\b((?:AKIA|ASIA)[0-9A-Z]{4})[0-9A-Z]{12}\b"), r"\1***"),
    (re.compile(r"\b(AIza)[0-9A-Za-z\-_]{30,}"), r"\1***"),
    (re.compile(r"\b(xox[abposr]-)[A-Za-z0-9\-]{10,}"), r"\1***"),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]+"), "eyJ***"),
    # name=value and name: value pairs, quoted or not ('api_key': 'x', password=x).
    (re.compile(r"""(?ix)
        (?P<key>["']?\b(?:[a-z0-9]+[_-])*
            (?:password|passwd|pwd|passphrase|secret|api[_-]?key|apikey|token
              |access[_-]?key|private[_-]?key|client[_-]?secret|cookie)
        \b["']?)
        (?P<sep>\s*[:=]\s*)
        (?:(?P<q>["'])[^"'\n]*|[^\s,;&"'}\])]+)"""),
     r"\g<key>\g<sep>\g<q>***"),
)


# Every rule above needs one of these (in lower case); text without any is returned at
# once: log lines are redacted on their way out, and most hold no credential. Plain
# substring tests, because one case-insensitive regex of alternatives is slower than
# these twenty-odd scans of a short line.
_TEXT_TRIGGERS = (
    "authoriz", "bearer", "://", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
    "github_pat_", "akia", "asia", "aiza", "xox", "eyj", "passw", "pwd", "passphrase",
    "secret", "apikey", "api_key", "api-key", "token", "accesskey", "access_key",
    "access-key", "privatekey", "private_key", "private-key", "cookie",
)


def redact_text(text: str) -> str:
    """Mask credentials in free text: ``Authorization``/``Bearer`` values, provider
    API keys (OpenAI ``sk-...``, Anthropic ``sk-ant-...``, GitHub, AWS access key ids,
    Google, Slack, JWTs), passwords in URLs, and ``password=...``-style pairs
    (``api_key``, ``token``, ``secret``, ...; ``=`` or ``:``, quoted or not).

    Meant for exception messages and log lines; it masks what it recognises and
    cannot promise to find every credential, so prefer :class:`Secret` at the source.
    """
    low = text.lower()
    if not any(t in low for t in _TEXT_TRIGGERS):
        return text
    for pattern, replacement in _TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


__all__ = ["DEFAULT_PATTERNS", "MASK", "Secret", "is_sensitive_name", "redact",
           "redact_text"]
