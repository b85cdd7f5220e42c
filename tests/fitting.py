"""Helpers for tests that train: a small preference dataset, fit configs, and CLI runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import save_file

from rsc.classifiers import ToyClassifier
from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.toy.faces import render_faces

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "kill_driver.py"
PROMPTS = ("a photo of a belor woman", "a photo of a dovek man", "a photo of a ardan woman")


def build_preferences(folder: Path, train: int = 24, validation: int = 8, size: int = 64) -> Path:
    """A ``save_to_disk`` preference dataset of toy renders (clean vs stereotyped), ``train`` + ``validation`` pairs."""

    def split(n: int, seed: int) -> Dataset:
        groups, genders = [i % 4 for i in range(n)], [i % 2 for i in range(n)]
        anti = render_faces(groups, genders, [False] * n, seed=seed, size=size)
        stereo = render_faces(groups, genders, [True] * n, seed=seed, size=size)
        rows = [
            {"prompt": PROMPTS[i % len(PROMPTS)], "anti_stereotypical": Image.fromarray(anti[i]),
             "stereotypical": Image.fromarray(stereo[i]), "group": "belor", "gender": "woman",
             "anti_stereotypical_source": "render", "stereotypical_source": "render",
             "anti_stereotypical_seed": -1, "stereotypical_seed": -1, "rejection": "stereotype"}
            for i in range(n)
        ]
        return Dataset.from_list(rows, features=PREFERENCE_FEATURES)

    DatasetDict({"train": split(train, 1), "validation": split(validation, 2)}).save_to_disk(str(folder))
    return folder


def fit_config(
    backbone: Path,
    dataset: Path,
    run_dir: Path,
    cache: Path,
    max_epochs: int = 2,
    batch_size: int = 4,
    every_n_train_steps: int | None = None,
    devices: int = 1,
    callbacks: list[dict[str, Any]] | None = None,
    model: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
) -> Path:
    """Write a CPU fit config for a tiny refiner (CSV log in ``run_dir``) beside ``run_dir``; return its path."""
    checkpoint: dict[str, Any] = {"dirpath": str(run_dir / "checkpoints")}
    if every_n_train_steps:
        checkpoint["every_n_train_steps"] = every_n_train_steps
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_epochs": max_epochs,
            "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "rsc.callbacks.checkpoint.ResumableCheckpoint", "init_args": checkpoint},
                # before the export: a SamplingCalibration among them sets the strength the export records
                *(callbacks or []),
                {"class_path": "rsc.callbacks.export.ExportRefiner"},
            ],
            **(trainer or {}),
        },
        "model": {"backbone": str(backbone), "hidden_channels": 8, "num_blocks": 1, "embedding_dim": 8,
                  "norm_groups": 4, "learning_rate": 1e-2, "beta": 100.0, **(model or {})},
        "data": {"dataset": str(dataset), "batch_size": batch_size, "cache_dir": str(cache), "progress": False},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(
    command: str, arguments: list[str], kill_at: str | None = None, step_log: Path | None = None, timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``rsc.<command>`` in a fresh process (through tests/kill_driver.py), optionally SIGKILLed at ``kill_at``."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    environment.pop("RSC_KILL_AT", None)
    environment.pop("RSC_STEP_LOG", None)
    if kill_at:
        environment["RSC_KILL_AT"] = kill_at
    if step_log:
        environment["RSC_STEP_LOG"] = str(step_log)
    return subprocess.run(
        [sys.executable, str(DRIVER), command, *arguments],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout,
    )


def steps_run(step_log: Path) -> list[int]:
    """The global steps a run (or several, appended) started, in order."""
    return [int(line) for line in step_log.read_text().split()] if step_log.is_file() else []


class GradientRecorder(Callback):
    """Save the refiner's gradients (after DDP's all-reduce) of the first ``steps`` steps to ``<path>/grad<step>.safetensors``."""

    def __init__(self, path: str, steps: int = 1) -> None:
        super().__init__()
        self.path, self.steps = Path(path), steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.is_global_zero and trainer.global_step < self.steps:
            self.path.mkdir(parents=True, exist_ok=True)
            grads = {name: parameter.grad.detach().clone() for name, parameter in pl_module.refiner.named_parameters()
                     if parameter.grad is not None}
            save_file(grads, str(self.path / f"grad{trainer.global_step}.safetensors"))


class AlwaysStereotyped(ToyClassifier):
    """The toy classifier, except that every image is stereotyped: every prompt is biased and none is ever
    corrected, so a :class:`~rsc.callbacks.calibration.SamplingCalibration` measures every candidate strength."""

    def predict(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """The toy classifier's probabilities with "stereotype present" set to 1."""
        probabilities = super().predict(images, batch_size=batch_size)
        stereotype = torch.zeros_like(probabilities["stereotype"])
        stereotype[:, 1] = 1.0
        return {**probabilities, "stereotype": stereotype}


class LeftBrighterStereotyped(ToyClassifier):
    """The toy classifier, except that an image is "stereotyped" when its left half is brighter than its right
    half: on the random tiny SD a per-image coin (2 to 5 of 8 seeds per prompt) that makes both biased and fair
    prompts, so every measure of a :class:`~rsc.callbacks.calibration.SamplingCalibration` takes part."""

    def predict(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """The toy classifier's probabilities with "stereotype present" from the brightness of the two halves."""
        probabilities = super().predict(images, batch_size=batch_size)
        half = images.shape[-1] // 2
        left = (images[..., :half].mean(dim=(1, 2, 3)) > images[..., half:].mean(dim=(1, 2, 3))).float()
        left = left.to(probabilities["stereotype"])
        return {**probabilities, "stereotype": torch.stack([1 - left, left], dim=1)}
