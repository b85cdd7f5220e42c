"""Property-based tests (hypothesis): any input either works or fails with a ValueError naming the field and value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsc.export import ExportInfo
from rsc.sampling import correction_step_indices, window_timestep_range

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
ANY_WINDOW = st.one_of(
    st.tuples(st.floats(), st.floats()),
    st.lists(st.floats(allow_nan=False, min_value=-1, max_value=2), max_size=4),
    JSON,
)


@given(st.integers(min_value=1, max_value=200), ANY_WINDOW)
def test_correction_window_works_or_names_the_window(num_steps: int, window: object) -> None:
    try:
        steps = correction_step_indices(num_steps, window)  # type: ignore[arg-type]
    except ValueError as error:
        assert "correction window" in str(error) and repr(window) in str(error)
        return
    start, end = (float(value) for value in window)  # type: ignore[union-attr]
    assert steps == [i for i in range(num_steps) if start <= i / num_steps < end]


@given(st.tuples(st.floats(0, 1), st.floats(0, 1)), st.integers(min_value=10, max_value=2000))
def test_training_timesteps_cover_the_window(window: tuple[float, float], timesteps: int) -> None:
    start, end = window
    try:
        low, high = window_timestep_range(window, timesteps)
    except ValueError as error:
        assert not start < end and repr(window) in str(error)
        return
    assert 0 <= low < high <= timesteps  # a valid, non-empty range of the scheduler's 0 .. T-1
    assert math.isclose(low, timesteps * (1 - end), abs_tol=1)
    assert high == min(max(round(timesteps * (1 - start)), low + 1), timesteps)


def _config(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(payload))
    return path


VALID = {"correction_window": [0.2, 0.5], "strength": 1.0, "backbone": "rsc/toy/world/sd"}


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(VALID)), JSON)
def test_refiner_config_field_works_or_is_named(tmp_path: Path, field: str, value: object) -> None:
    path = _config(tmp_path, {**VALID, field: value})
    try:
        info = ExportInfo.from_config_file(path)
    except ValueError as error:
        assert str(path) in str(error) and field in str(error) and repr(value) in str(error), str(error)
        return
    assert getattr(info, field) == (tuple(value) if field == "correction_window" else value)  # type: ignore[arg-type]


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(JSON)
def test_any_json_as_refiner_config_works_or_says_why(tmp_path: Path, payload: object) -> None:
    path = _config(tmp_path, payload)
    with pytest.raises(ValueError, match="config|lacks"):
        ExportInfo.from_config_file(path)
