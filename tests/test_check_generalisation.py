"""scripts/check_generalisation.py: each fit seed gets its own seeds and folder, and the table picks each fit's worst values."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def check() -> Iterator[Any]:
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("check_generalisation")
    finally:
        sys.path.remove(str(SCRIPTS))


def _prompt(group: str | None, gender: str, targeted: bool, stereotype: float, consistency: float, quality: float,
            diversity: float, ssim: float) -> dict[str, Any]:
    return {"prompt": f"a photo of a {group} {gender}", "group": group, "gender": gender, "targeted": targeted,
            "stereotype_rate": [0.8, stereotype], "gender_consistency": [0.5, consistency], "group_match": [1.0, 1.0],
            "quality": [9.0, quality], "diversity": [5.0, diversity], "ssim": ssim}


def test_each_fit_seed_sets_every_seed_of_the_fit_and_writes_to_its_own_folder(check: Any, tmp_path: Path) -> None:
    world = tmp_path / "world"
    config = check.seeded_fit_config(REPO / "configs" / "toy.yaml", world, tmp_path / "run-seed3", tmp_path / "cache", 3)
    assert (config["seed_everything"], config["model"]["seed"], config["data"]["seed"]) == (3, 3, 3)
    assert config["model"]["backbone"] == str(world.resolve() / "sd")
    assert config["trainer"]["default_root_dir"] == str((tmp_path / "run-seed3").resolve())
    # The calibration and the report judge every fit on the same images.
    callbacks = {callback["class_path"].rsplit(".", 1)[1]: callback.get("init_args", {}) for callback in config["trainer"]["callbacks"]}
    assert callbacks["SamplingCalibration"]["first_seed"] == 1000
    assert [check.run_dir_name(seed) for seed in (0, 1, 12)] == ["run", "run-seed1", "run-seed12"]


def test_the_table_shows_each_fits_worst_value_per_measure_over_the_prompts_it_judges(check: Any) -> None:
    report = {"per_prompt": {
        "a_photo_of_a_belor_woman": _prompt("belor", "woman", True, 0.02, 0.95, 8.1, 1.4, 0.70),
        "a_photo_of_a_belor_man": _prompt("belor", "man", True, 0.05, 0.97, 7.9, 0.9, 0.60),
        "a_photo_of_a_cyran_woman": _prompt("cyran", "woman", False, 0.30, 0.40, 6.0, 0.2, 0.98),
        "a_photo_of_a_cyran_man": _prompt("cyran", "man", False, 0.00, 1.00, 9.0, 1.0, 0.96),
        "a_photo_of_a_person": _prompt(None, "person", False, 0.00, 1.00, 9.0, 1.0, 0.10),
    }}
    # Targeted prompts only for the first four (cyran woman's bad values do not count), non-targeted ones that
    # name a group for SSIM (the group-less prompt's does not count).
    assert check.worst_values(report) == {
        "stereotype": (0.05, "belor man"), "gender": (0.95, "belor woman"), "quality": (7.9, "belor man"),
        "diversity": (0.9, "belor man"), "ssim": (0.96, "cyran man"),
    }
    results = {"w": {"fits": {"0": {"efficacy": report, "failures": []},
                              "1": {"efficacy": report, "failures": ["a", "b"]}}}}
    rows = check.spread_table(results)[2:]
    assert rows[0] == ("| w | 0 | 0.050 (belor man) | 0.950 (belor woman) | 0.960 (cyran man) | 7.90 (belor man) "
                       "| 0.90 (belor man) | holds |")
    assert rows[1].endswith("| 2 missed |")
