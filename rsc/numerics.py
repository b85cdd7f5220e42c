"""The numerics guard: a non-finite loss or gradient skips the optimizer step instead of poisoning the refiner.

Each skipped step is counted (``train/skipped_steps``); after ``max_consecutive``
skipped steps in a row the run stops with :class:`NonFiniteTrainingError`, which
names the step and what was not finite. The counters travel in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def non_finite_tensors(named: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """Names of the tensors (``None`` ones skipped) that hold a NaN or an infinity."""
    return [name for name, value in named if value is not None and not bool(torch.isfinite(value).all())]


class NumericsGuard:
    """Counts skipped steps and decides when to give up.

    Args:
        max_consecutive: Stop after this many consecutive skipped steps (>= 1).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_skipped_steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def ok(self) -> None:
        """A step was taken: the run of skipped steps is over."""
        self.consecutive = 0

    def skip(self, step: int, what: str) -> None:
        """Count a skipped step; raise once ``max_consecutive`` steps in a row were skipped."""
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} consecutive training steps had non-finite values (the last, global step "
                f"{step}: {what}); {self.skipped} step(s) skipped in all. Lower the learning rate, check the data "
                "and the backbone dtype, or raise model.max_consecutive_skipped_steps"
            )

    def state_dict(self) -> dict[str, int]:
        """The counters, for the checkpoint."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters."""
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))
