"""Configs: architecture dataclasses saved beside weights as JSON (strict loading), and checks of numeric fields."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="IntegerConfig")

#: The largest seed rsc accepts: torch generators take 64-bit seeds, and samplers add the epoch to it.
MAX_SEED = 2**63 - 1


def json_value(value: Any) -> Any:
    """The JSON form of ``value`` (tuples become lists, FrozenDicts dicts, other objects strings), for comparing and writing."""
    return json.loads(json.dumps(value, default=str))


class IntegerConfig:
    """Mixin for dataclass configs whose fields are positive integers (and on/off switches typed ``bool``).

    ``check_positive_integers`` validates (call it from ``__post_init__``);
    ``to_dict``/``from_dict`` round-trip through JSON, and ``from_dict`` rejects
    unknown keys so a config written by another version fails loudly.
    """

    def check_positive_integers(self) -> None:
        """Raise ValueError naming the first field that is not a positive integer (or, typed ``bool``, not a bool)."""
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if item.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{type(self).__name__}.{item.name} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{item.name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
        """Build from a dict, rejecting unknown keys."""
        known = {item.name for item in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    integer: bool = False,
) -> None:
    """Raise ValueError naming ``name`` and ``value`` unless ``value`` is a finite number in range.

    Args:
        name: The field, as the user writes it (e.g. ``"learning_rate"``).
        value: What the user gave.
        minimum: The smallest allowed value (inclusive).
        maximum: The largest allowed value (inclusive).
        positive: Require ``value > 0``.
        integer: Require an ``int`` (a ``bool`` is not one here).
    """
    kind = "an integer" if integer else "a finite number"
    bounds = " > 0" if positive else (f" >= {minimum}" if minimum is not None else "")
    if maximum is not None:
        bounds += f" and <= {maximum}" if bounds else f" <= {maximum}"
    is_number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if (
        not is_number
        or not math.isfinite(value)
        or (positive and not value > 0)
        or (minimum is not None and not value >= minimum)
        or (maximum is not None and not value <= maximum)
    ):
        raise ValueError(f"{name} must be {kind}{bounds}, got {value!r}")
