"""rsc.relocate: the shipped toy config pointed at another world and run folder keeps nothing of the shipped paths."""

from __future__ import annotations

from pathlib import Path

import yaml

from rsc.relocate import relocate_toy_fit_config

REPO = Path(__file__).resolve().parents[1]


def test_every_world_path_and_output_folder_moves(tmp_path: Path) -> None:
    shipped = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    world, run = tmp_path / "world", tmp_path / "run"
    config = relocate_toy_fit_config(REPO / "configs" / "toy.yaml", world, run, tmp_path / "cache")
    text = yaml.safe_dump(config)
    assert "rsc/toy/world" not in text and "runs/toy" not in text, text
    assert config["model"]["backbone"] == str(world / "sd")
    assert config["data"]["dataset"] == str(world / "preferences")
    assert config["data"]["cache_dir"] == str(tmp_path / "cache")
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == str(run) and trainer["logger"]["init_args"]["save_dir"] == str(run)
    [checkpoint] = [c for c in trainer["callbacks"] if c["class_path"].endswith("Checkpoint")]
    assert checkpoint["init_args"]["dirpath"] == str(run / "checkpoints")
    # The recipe itself is untouched.
    assert config["model"] | {"backbone": shipped["model"]["backbone"]} == shipped["model"]
