"""Architecture configs saved beside weights as JSON: all-positive-integer dataclasses with strict loading."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="IntegerConfig")


def json_value(value: Any) -> Any:
    """The JSON form of ``value`` (tuples become lists, FrozenDicts dicts, other objects strings), for comparing and writing."""
    return json.loads(json.dumps(value, default=str))


class IntegerConfig:
    """Mixin for dataclass configs whose fields are all positive integers.

    ``check_positive_integers`` validates (call it from ``__post_init__``);
    ``to_dict``/``from_dict`` round-trip through JSON, and ``from_dict`` rejects
    unknown keys so a config written by another version fails loudly.
    """

    def check_positive_integers(self) -> None:
        """Raise ValueError naming the first field that is not a positive integer."""
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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
