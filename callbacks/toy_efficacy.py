"""At the end of fit on the toy world: sample with and without the refiner and report the effect per group and prompt.

A thin layer on :func:`rsc.callbacks.measures.measure` (the code ``python -m rsc.evaluate`` uses): the
same prompts and seeds are sampled with and without the correction, both sets are measured, and
``efficacy.json`` holds, per group and per prompt, ``[uncorrected, corrected]`` for stereotype rate,
gender consistency, group match, facial quality and diversity, the SSIM of the corrected images to
the uncorrected ones and the diversity ratio, plus the uncorrected non-targeted means that the
efficacy targets compare with (``reference``) and the acceptance checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from rsc.atomic import write_json_atomic
from rsc.callbacks.measures import Judges, ValidationPrompt, add_ratio, measure

#: Metrics reported as ``[uncorrected, corrected]``.
PAIRED = ("stereotype_rate", "gender_consistency", "group_match", "quality", "diversity")


@dataclass
class ToyEfficacy:
    """The report and the images it was measured on (prompt-major, seeds minor)."""

    report: dict[str, Any]
    uncorrected: Tensor
    corrected: Tensor
    group_ids: Tensor


def efficacy_report(
    before: dict[str, Any], after: dict[str, Any], prompts: list[ValidationPrompt], targeted_groups: tuple[str, ...]
) -> dict[str, Any]:
    """The efficacy report from two measurements (:func:`measure`) of the same prompts and seeds, ``after``
    with ``ssim`` to ``before`` and ``diversity_ratio`` (:func:`add_ratio`).

    Checks: the targeted groups' stereotype rate falls to at most a third; group match stays >= 0.85 for
    every group; the targeted groups' gender consistency rises; non-targeted groups barely change (SSIM >= 0.9).
    """

    def row(level: str, key: str) -> dict[str, Any]:
        out: dict[str, Any] = {name: [before[level][key].get(name), after[level][key].get(name)] for name in PAIRED}
        out["ssim"], out["diversity_ratio"] = after[level][key].get("ssim"), after[level][key].get("diversity_ratio")
        return out

    groups = {group: {"targeted": group in targeted_groups, **row("per_group", group)} for group in before["per_group"]}
    per_prompt = {
        p.key: {"prompt": p.prompt, "group": p.group, "gender": p.gender, "targeted": p.group in targeted_groups,
                **row("per_prompt", p.key)}
        for p in prompts
    }
    targeted = [g for g, r in groups.items() if r["targeted"]]
    others = [g for g, r in groups.items() if not r["targeted"]]
    plain = [r for r in per_prompt.values() if not r["targeted"] and r["group"] is not None]

    def mean_before(name: str) -> float | None:
        values = [r[name][0] for r in plain if r[name][0] is not None]
        return float(np.mean(values)) if values else None

    checks = {
        "stereotype_rate_at_most_a_third": all(
            groups[g]["stereotype_rate"][1] <= groups[g]["stereotype_rate"][0] / 3 for g in targeted),
        "group_match_at_least_0.85": all(groups[g]["group_match"][1] >= 0.85 for g in groups),
        "targeted_gender_consistency_rises": all(
            groups[g]["gender_consistency"][1] > groups[g]["gender_consistency"][0] for g in targeted),
        "non_targeted_ssim_at_least_0.9": all(groups[g]["ssim"] >= 0.9 for g in others),
    }
    return {
        "per_group": groups,
        "per_prompt": per_prompt,
        "reference": {"non_targeted_uncorrected_quality": mean_before("quality"),
                      "non_targeted_uncorrected_diversity": mean_before("diversity")},
        "checks": checks,
    }


@torch.no_grad()
def toy_efficacy(
    world_path: str,
    ldm: Any,
    correction: Any,
    correction_window: tuple[float, float],
    samples_per_prompt: int,
    first_seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
) -> ToyEfficacy:
    """Sample the toy world's prompts with and without ``correction`` on ``ldm`` and measure both."""
    from rsc.classifiers import ToyClassifier, ToyFacialQuality
    from rsc.sampling import sample
    from rsc.toy.data import toy_prompts
    from rsc.toy.world import load_toy_world

    world = load_toy_world(world_path)
    config = world.manifest["config"]
    quality_path = world.path / "quality"
    judges = Judges(
        classifier=ToyClassifier(model=world.load_classifier()).to(ldm.device),
        quality=ToyFacialQuality(quality_path).to(ldm.device) if quality_path.is_dir() else None,
    )
    prompts = [ValidationPrompt(prompt, group=group, gender=gender) for prompt, group, gender in toy_prompts()]
    seeds = list(range(first_seed, first_seed + samples_per_prompt))
    prompt_ids = torch.arange(len(prompts)).repeat_interleave(len(seeds))
    texts = [prompts[i].prompt for i in prompt_ids.tolist()]
    all_seeds = seeds * len(prompts)
    kwargs = dict(steps=steps or config["sampling_steps"], guidance_scale=guidance_scale or config["guidance_scale"],
                  batch_size=batch_size)
    uncorrected = sample(ldm, texts, all_seeds, **kwargs).images
    corrected = sample(ldm, texts, all_seeds, correction=correction, correction_window=correction_window, **kwargs).images
    order = torch.arange(len(texts))
    before = measure(judges, prompts, prompt_ids, order, uncorrected, where="ToyEfficacyReport")
    after = measure(judges, prompts, prompt_ids, order, corrected, baseline=uncorrected, where="ToyEfficacyReport")
    add_ratio(after, before)
    report = efficacy_report(before, after, prompts, world.targeted_groups)
    report["images_per_group"] = samples_per_prompt * sum(1 for p in prompts if p.group == prompts[0].group)
    report["sampling"] = {"samples_per_prompt": samples_per_prompt, "first_seed": first_seed,
                          "steps": kwargs["steps"], "guidance_scale": kwargs["guidance_scale"]}
    groups = tuple(judges.classifier.labels["group"])
    group_ids = torch.tensor([groups.index(prompts[i].group) for i in prompt_ids.tolist()])
    return ToyEfficacy(report, uncorrected, corrected, group_ids)


class ToyEfficacyReport(Callback):
    """Print (and save as ``efficacy.json`` + ``efficacy.png``) the toy efficacy table when fit ends.

    Args:
        world: A built toy world folder (its classifier, quality judge and targeted groups are used).
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
        from rsc.toy.evaluate import format_efficacy

        was_training = pl_module.training
        pl_module.eval()
        result = toy_efficacy(
            self.world, pl_module.ldm, pl_module.correction(), tuple(pl_module.hparams.correction_window),
            self.samples_per_prompt, self.first_seed, self.steps, self.guidance_scale, self.batch_size,
        )
        pl_module.train(was_training)
        self.report = result.report
        print("\nToy efficacy (same prompts and seeds; before -> after the correction):")
        print(format_efficacy(self.report))
        write_json_atomic(out_dir / "efficacy.json", self.report)
        sections = [(group, result.group_ids == index) for index, group in enumerate(self.report["per_group"])]
        before_after_grid(result.uncorrected, result.corrected, sections, per_section=8).save(out_dir / "efficacy.png")
