"""End to end: the demo config trains a refiner that corrects the toy world's planted stereotype.

This is the acceptance test of the method: ``configs/toy.yaml`` as shipped (only its output
folders moved to a temporary directory) is fitted on the shipped toy world, and the efficacy
report written at the end of fit must pass every check (stereotype rate of the targeted groups
at most a third of the uncorrected rate, group match >= 0.85 everywhere, targeted gender
consistency up, non-targeted SSIM >= 0.9), and the fairness validation callback of the same run
must report the same direction on its own smaller sample.
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
    groups = report["per_group"]
    targeted = [name for name, row in groups.items() if row["targeted"]]
    assert sorted(targeted) == ["belor", "dovek"]
    # The shipped world's own bias target (0.7 x the planted rate, see rsc.toy.manifest.world_targets).
    planted = json.loads((REPO / "rsc" / "toy" / "world" / "manifest.json").read_text())["config"]["bias"]
    for name in targeted:
        before, after = groups[name]["stereotype_rate"]
        assert before >= 0.7 * planted["stereotype_rate_targeted"], (
            f"{name}: the uncorrected toy SD should show its planted stereotype ({before})"
        )
        assert after <= before / 3, f"{name}: stereotype rate {before:.2f} -> {after:.2f}"
        assert groups[name]["gender_consistency"][1] > groups[name]["gender_consistency"][0], name
    for name, row in groups.items():
        assert row["group_match"][1] >= 0.85, f"{name}: group match {row['group_match']}"
    assert all(report["checks"].values()), report["checks"]
    # The paper's headline, per prompt (a group mean can hide one gender pushed towards the other): every targeted
    # prompt's gender consistency ends >= 0.9 (toy v3 with the shipped recipe: 0.94 / 1.00 / 0.92 / 1.00).
    for key, row in report["per_prompt"].items():
        if row["targeted"]:
            assert row["gender_consistency"][1] >= 0.9, f"{key}: gender consistency {row['gender_consistency']}"
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

    # Preservation of the non-targeted groups (toy v3, shipped recipe at sampling strength 0.7: ardan 0.931,
    # cyran 0.943 on 64 seeds; at the trained strength 1.0 ardan was 0.898). Issue 12 wants >= 0.95.
    changed = {name: round(row["ssim"], 3) for name, row in groups.items() if not row["targeted"] and row["ssim"] < 0.9}
    changed |= {f"{name} (8 seeds)": round(values[f"val/ssim/{name}"], 3)
                for name, row in groups.items() if not row["targeted"] and values[f"val/ssim/{name}"] < 0.85}
    assert not changed, f"non-targeted images changed too much (SSIM {changed})"
