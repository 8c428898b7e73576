"""Selective checkpoints: which parts of an agent's state must be kept, which may go.

A :class:`Selective` describes a state that is a dict: its ``essential`` keys are
always stored whole; ``drop`` keys never are; ``truncate`` rules (:class:`KeepLast`)
shorten long lists or strings. Without a ``budget_bytes`` the rules always apply. With
one they apply only while the state's encoded size is over it, in this order until it
fits: the truncation rules (in the order given), then the other non-essential keys are
dropped (largest first), then the truncated keys themselves. Essential keys are never
touched: a state whose essentials alone exceed the budget is stored with them and
marked over budget.

What was dropped or cut is recorded in the checkpoint's metadata
(:attr:`CheckpointInfo.dropped`, :attr:`CheckpointInfo.truncated`), and restoring the
checkpoint gives the state as kept. The selection is a pure function of the state, so a
replay selects the same and its hash verifies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import _codec
from .exceptions import ConfigurationError, SerializationError


@dataclass(frozen=True, slots=True)
class KeepLast:
    """Keep the last ``n`` items of a list (or characters of a string), and the first
    ``head`` ones too (a system prompt, say). Other values are kept whole."""

    n: int
    head: int = 0
    """Items kept from the start as well (default 0)."""

    def __post_init__(self) -> None:
        for name in ("n", "head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(f"KeepLast({name}=...) must be an int >= 0, "
                                         f"not {value!r}")

    def apply(self, value: Any) -> tuple[Any, int, int] | None:
        """``(kept value, items kept, items before)``, or None when nothing is cut."""
        if not isinstance(value, list | tuple | str) or len(value) <= self.n + self.head:
            return None
        start = len(value) - self.n
        if isinstance(value, str):
            return value[:self.head] + value[start:], self.head + self.n, len(value)
        return [*value[:self.head], *value[start:]], self.head + self.n, len(value)


@dataclass(frozen=True, slots=True)
class Selective:
    """Which parts of a dict state a checkpoint keeps (see the module documentation).

    ``Selective(essential=["task", "plan"], truncate={"messages": KeepLast(20)},
    budget_bytes=64_000)``
    """

    essential: Iterable[str] = ()
    """Keys always kept whole (default: none)."""
    truncate: Mapping[str, KeepLast] = field(default_factory=dict)
    """Key -> rule shortening its value (default: none)."""
    drop: Iterable[str] = ()
    """Keys never stored (scratch data; default: none)."""
    budget_bytes: int | None = None
    """Largest encoded state, in bytes; None (default): apply the rules always."""

    def __post_init__(self) -> None:
        for name in ("essential", "drop"):
            keys = getattr(self, name)
            if isinstance(keys, str | bytes):
                raise ConfigurationError(f"Selective({name}=...) takes a list of keys, "
                                         f"e.g. {name}=[{keys!r}]")
            object.__setattr__(self, name, tuple(keys))
        rules = dict(self.truncate)
        for key, rule in rules.items():
            if not isinstance(rule, KeepLast):
                raise ConfigurationError(f"Selective(truncate=...): the rule for {key!r} "
                                         f"must be a crashsafe.KeepLast, not {rule!r}")
        object.__setattr__(self, "truncate", MappingProxyType(rules))
        both = set(self.essential) & (set(rules) | set(self.drop))
        if both:
            raise ConfigurationError(f"Selective: {sorted(both)} cannot be essential and "
                                     "truncated or dropped at once")
        budget = self.budget_bytes
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                                   or budget < 1):
            raise ConfigurationError(f"Selective(budget_bytes=...) must be an int >= 1 or "
                                     f"None, not {budget!r}")

    def apply(self, state: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The state as kept, and what was done (None: nothing), as recorded."""
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise SerializationError(
                "a selective checkpoint's state must be a dict with string keys, not "
                f"{type(state).__name__}; put the parts in a dict, or checkpoint without "
                "select=")
        out = dict(state)
        dropped = [k for k in self.drop if k in out]
        for k in dropped:
            del out[k]
        sizes = {k: _entry_size(k, v) for k, v in out.items()}
        budget = self.budget_bytes

        def over() -> bool:
            # {"k":v,...}: each entry and its separator, the braces; "{}" when empty.
            return budget is not None and max(2, 1 + sum(sizes.values())) > budget

        cut: dict[str, list[int]] = {}
        for key, rule in self.truncate.items():
            if budget is not None and not over():
                break
            done = rule.apply(out[key]) if key in out else None
            if done is not None:
                out[key], kept, total = done
                sizes[key] = _entry_size(key, out[key])
                cut[key] = [kept, total]
        essential = set(self.essential)
        others = [k for k in out if k not in essential and k not in self.truncate]
        for group in (others, [k for k in out if k in self.truncate]):
            for key in sorted(group, key=lambda k: (-sizes[k], k)):
                if not over():
                    break
                del out[key]
                del sizes[key]
                cut.pop(key, None)
                dropped.append(key)
        info: dict[str, Any] = {}
        if dropped:
            info["drop"] = dropped
        if cut:
            info["cut"] = cut
        if over():
            info["over"] = 1
        return out, info or None


def _entry_size(key: str, value: Any) -> int:
    # Its share of the dict's compact JSON: "key":value and a separator.
    return len(_codec.encode(key, "key")[0]) + 2 + len(_codec.encode(value, "state")[0])
