"""Point a shipped toy fit config (``configs/toy.yaml``) at another toy world and another run folder.

The demo config names the shipped world (``rsc/toy/world``) in four places: the backbone, the
preference dataset, and the classifier and quality judge of its callbacks. Training "the shipped
config" on another world (the generalisation check, the efficacy test) changes exactly those
paths and the output folders, and nothing of the recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

SHIPPED_WORLD = "rsc/toy/world"


def relocate_toy_fit_config(
    config: dict[str, Any] | str | os.PathLike[str],
    world: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """A copy of a toy fit config that trains on ``world`` and writes to ``run_dir``.

    Every string that starts with the shipped world's path (``rsc/toy/world``) is re-rooted at
    ``world``; the trainer's, logger's and checkpoints' folders move under ``run_dir``.

    Args:
        config: The parsed YAML, or the path of a YAML file.
        world: A built toy world folder.
        run_dir: Where the run writes logs, checkpoints, the efficacy report and the exported refiner.
        cache_dir: The latent cache's folder (default: the data module's default).
        progress: Keep progress bars (off for logs written to files).
    """
    if not isinstance(config, dict):
        config = yaml.safe_load(Path(config).read_text())
    world, run_dir = Path(world).resolve(), Path(run_dir).resolve()

    def rebase(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: rebase(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rebase(item) for item in value]
        if isinstance(value, str) and (value == SHIPPED_WORLD or value.startswith(SHIPPED_WORLD + "/")):
            return str(world / value[len(SHIPPED_WORLD) :].lstrip("/"))
        return value

    config = rebase(config)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir)
    trainer["enable_progress_bar"] = progress
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"].setdefault("init_args", {})["save_dir"] = str(run_dir)
    for callback in trainer.get("callbacks", []):
        # Lightning's ModelCheckpoint and rsc's ResumableCheckpoint alike.
        if callback["class_path"].endswith("Checkpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(run_dir / "checkpoints")
    data = config.setdefault("data", {})
    data["progress"] = progress
    if cache_dir is not None:
        data["cache_dir"] = str(Path(cache_dir).resolve())
    return config
