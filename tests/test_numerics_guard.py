"""The numerics guard: injected NaN losses and gradients skip the step, are counted, and stop the run; exports refuse NaNs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fitting import fit_config
from rsc.export import ExportInfo, export_refiner
from rsc.fit import main as fit_main
from rsc.module import RSCorrector
from rsc.numerics import NonFiniteTrainingError
from rsc.refiner import LatentRefiner, RefinerConfig


def _poison(monkeypatch: pytest.MonkeyPatch, steps: set[int], where: str) -> dict[int, dict[str, torch.Tensor]]:
    """Make the loss (or one gradient) NaN at ``steps``; record the refiner's weights before every step."""
    original = RSCorrector.pair_step
    before: dict[int, dict[str, torch.Tensor]] = {}

    def pair_step(self: RSCorrector, batch, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        output, delta = original(self, batch, *args, **kwargs)
        if self.training:
            before[self.global_step] = {k: v.detach().clone() for k, v in self.refiner.state_dict().items()}
        if self.training and self.global_step in steps:
            if where == "loss":
                output.loss = output.loss * float("nan")
            else:  # a one-shot hook: this step's gradient only
                def poison(grad: torch.Tensor) -> torch.Tensor:
                    handle.remove()
                    return grad * float("inf")

                handle = self.refiner.conv_out.weight.register_hook(poison)
        return output, delta

    monkeypatch.setattr(RSCorrector, "pair_step", pair_step)
    return before


def _fit(tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, **model) -> Path:  # noqa: ANN003
    run = tmp_path / "run"
    config = fit_config(tiny_sd_dir, tiny_prefs_dir, run, tmp_path / "cache", max_epochs=1, model=model)
    fit_main(["--config", str(config)])
    return run


def _logged(run: Path, key: str) -> list[float]:
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_steps_are_skipped_and_counted(
    where: str, tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _poison(monkeypatch, {1, 2, 4}, where)
    run = _fit(tiny_sd_dir, tiny_prefs_dir, tmp_path)
    exported = load_file(run / "refiner" / "refiner.safetensors")
    assert all(torch.isfinite(value).all() for value in exported.values())
    # A skipped step leaves every weight as it was; the others move the weights.
    for step in (1, 2):
        assert all(torch.equal(before[step][k], before[step + 1][k]) for k in before[step]), f"step {step} was taken"
    assert not torch.equal(before[0]["conv_out.weight"], before[1]["conv_out.weight"])
    assert _logged(run, "train/skipped_steps")[-1] == 3
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["numerics_guard"] == {"skipped": 3, "consecutive": 0}


def test_consecutive_non_finite_steps_stop_the_run(
    tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison(monkeypatch, {1, 2, 3}, "loss")
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive training steps .* global step 3: loss = nan"):
        _fit(tiny_sd_dir, tiny_prefs_dir, tmp_path, max_consecutive_skipped_steps=3)
    assert not (tmp_path / "run" / "refiner").exists(), "a stopped run exports nothing"


def test_export_refuses_non_finite_weights(tmp_path: Path) -> None:
    refiner = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=8, hidden_channels=8, num_blocks=1,
                                          embedding_dim=8, norm_groups=4))
    with torch.no_grad():
        refiner.blocks[0].conv1.weight[0, 0, 0, 0] = float("nan")
    info = ExportInfo(correction_window=(0.0, 0.5), strength=1.0, backbone="some/backbone")
    with pytest.raises(ValueError, match=r"non-finite weights: blocks\.0\.conv1\.weight"):
        export_refiner(refiner, tmp_path / "refiner", info)
    assert not (tmp_path / "refiner").exists()
