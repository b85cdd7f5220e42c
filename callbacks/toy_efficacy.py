"""At the end of fit on the toy world: sample with and without the refiner and report the effect per group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from rsc.atomic import write_json_atomic


class ToyEfficacyReport(Callback):
    """Print (and save as ``efficacy.json`` + ``efficacy.png``) the toy efficacy table when fit ends.

    The same prompts and seeds are sampled with and without the correction; the toy world's
    classifier measures stereotype rate, gender consistency and group match per group, and SSIM
    measures how much each group's images changed.

    Args:
        world: A built toy world folder (its classifier and targeted groups are used).
        samples_per_prompt: Images per prompt (seeds ``first_seed ...``).
        first_seed: First sampling seed.
        steps: Sampling steps; default: the world's.
        guidance_scale: Guidance; default: the world's.
        batch_size: Sampling batch size.
    """

    def __init__(
        self,
        world: str = "rsc/toy/world",
        samples_per_prompt: int = 64,
        first_seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.world, self.samples_per_prompt, self.first_seed = world, samples_per_prompt, first_seed
        self.steps, self.guidance_scale, self.batch_size = steps, guidance_scale, batch_size
        self.report: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        """The last report (JSON-like), so a checkpoint written after it keeps it."""
        return {"report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last report."""
        self.report = state_dict.get("report")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample, measure, print and save (global-zero process only)."""
        # trainer.log_dir broadcasts under DDP: every rank must ask for it.
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        from rsc.images import before_after_grid
        from rsc.toy.evaluate import efficacy_report, format_efficacy, sample_toy_prompts
        from rsc.toy.faces import GROUPS
        from rsc.toy.world import load_toy_world

        world = load_toy_world(self.world)
        config = world.manifest["config"]
        classifier = world.load_classifier().to(pl_module.device)
        kwargs = dict(
            samples_per_prompt=self.samples_per_prompt,
            first_seed=self.first_seed,
            steps=self.steps or config["sampling_steps"],
            guidance_scale=self.guidance_scale or config["guidance_scale"],
            batch_size=self.batch_size,
        )
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            uncorrected = sample_toy_prompts(pl_module.ldm, classifier, **kwargs)
            corrected = sample_toy_prompts(
                pl_module.ldm, classifier, correction=pl_module.correction(),
                correction_window=tuple(pl_module.hparams.correction_window), **kwargs,
            )
        pl_module.train(was_training)
        self.report = efficacy_report(uncorrected, corrected, world.targeted_groups)
        self.report["sampling"] = {k: v for k, v in kwargs.items() if k != "batch_size"}
        print("\nToy efficacy (same prompts and seeds; before -> after the correction):")
        print(format_efficacy(self.report))
        write_json_atomic(out_dir / "efficacy.json", self.report)
        sections = [(group, torch.from_numpy(uncorrected.groups == index)) for index, group in enumerate(GROUPS)]
        before_after_grid(uncorrected.images, corrected.images, sections, per_section=8).save(out_dir / "efficacy.png")
