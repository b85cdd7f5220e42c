"""scripts/gpu_check.py: the GPU check runs on CPU at tiny sizes and writes every field of its JSON."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def gpu_check():  # noqa: ANN201
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_tiny_run_writes_training_and_inference_measures(gpu_check, tmp_path: Path) -> None:  # noqa: ANN001
    returned = gpu_check.main(["--tiny", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["training"] == returned["training"] and result["tiny"] is True
    assert result["backbone_dtype"] == "bfloat16" and result["gradient_checkpointing"] is True
    assert [row["batch"] for row in result["training"]] == [2, 4]
    for row in result["training"]:
        assert row["pairs_per_s"] > 0 and row["step_s"] > 0 and row["loss_finite"] is True, row
        assert row["peak_memory_mib"] is None or row["peak_memory_mib"] > 0
    inference = result["inference"]
    assert inference["steps"] == 2 and inference["correction_window"] == [0.2, 0.5]
    assert inference["plain_s_per_image"] > 0 and inference["corrected_s_per_image"] > 0
    assert math.isclose(inference["ratio"], inference["corrected_s_per_image"] / inference["plain_s_per_image"])
    assert result["refiner_parameters"] > 0 and result["wall_s"] > 0


def test_full_defaults_are_the_issues_sizes(gpu_check) -> None:  # noqa: ANN001
    args = gpu_check.parse_args(["--device", "cpu", "--out", "x"])
    assert (args.batches, args.latent, args.steps) == ([8, 32], 64, 25)
    model = yaml.safe_load((SCRIPTS.parent / "configs" / "sd15.yaml").read_text())["model"]
    assert gpu_check.SD15_REFINER == {key: model[key] for key in gpu_check.SD15_REFINER}
    assert list(gpu_check.WINDOW) == model["correction_window"] and model["gradient_checkpointing"] is True
