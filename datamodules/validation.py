"""Validation of preference rows before anything is encoded: every prompt non-empty, every image decodable as RGB."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tqdm.auto import tqdm

from rsc.datamodules.schema import IMAGE_COLUMNS
from rsc.datamodules.sources import ImageProblem, PreferenceSplit, decode_image


@dataclass(frozen=True)
class RowProblem:
    """Why one row of a split cannot be used."""

    split: str
    row: int
    column: str
    reason: str
    detail: str
    location: str = ""

    def message(self) -> str:
        """A one-line, human-readable description naming split, row, column and file."""
        where = f" ({self.location})" if self.location else ""
        return f"split {self.split!r}, row {self.row}, column {self.column!r}{where}: {self.reason}: {self.detail}"



def validate_split(
    split: PreferenceSplit, skip_invalid: bool = False, progress: bool = True
) -> tuple[list[int], list[RowProblem]]:
    """Check every row (non-empty prompt, every image decodable as RGB); return kept row indices and problems.

    With ``skip_invalid=False`` the first problem raises a ``ValueError`` naming split,
    row, column and file. A row is reported once, for its first problem.
    """
    kept: list[int] = []
    problems: list[RowProblem] = []
    for index in tqdm(range(split.num_rows), desc=f"validating {split.name}", disable=not progress, leave=False):
        problem = _row_problem(split, index)
        if problem is None:
            kept.append(index)
            continue
        if not skip_invalid:
            raise ValueError(
                f"invalid preference row in dataset {split.source}: {problem.message()} "
                "(pass skip_invalid=True to skip such rows)"
            )
        problems.append(problem)
    if not kept:
        reasons = dict(Counter(problem.reason for problem in problems))
        raise ValueError(f"split {split.name!r} of dataset {split.source} has no valid rows left ({reasons})")
    return kept, problems


def _row_problem(split: PreferenceSplit, index: int) -> RowProblem | None:
    prompt, images = split.row(index)
    location = split.location(index)
    if not isinstance(prompt, str) or not prompt.strip():
        detail = f"expected a non-empty string, got {prompt!r}"
        return RowProblem(split.name, index, "prompt", "empty prompt", detail, location)
    for column in IMAGE_COLUMNS:
        ref = images[column]
        try:
            decode_image(ref)
        except ImageProblem as problem:
            where = ", ".join(part for part in (location, ref.describe() if ref else "") if part)
            return RowProblem(split.name, index, column, problem.reason, problem.detail, where)
    return None


def skip_summary(problems: list[RowProblem]) -> dict[str, int]:
    """Count problems by reason, e.g. ``{"unreadable image": 2, "empty prompt": 1}``."""
    return dict(sorted(Counter(problem.reason for problem in problems).items()))
