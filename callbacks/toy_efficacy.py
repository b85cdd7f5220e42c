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
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
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


#: The efficacy targets (issue 12), each checked on every prompt it concerns: (name, what is wanted).
TARGETS: tuple[tuple[str, str], ...] = (
    ("targeted_stereotype_rate_at_most_0.1x", "corrected <= 0.1 x uncorrected, every targeted prompt"),
    ("targeted_gender_consistency_at_least_0.9", ">= 0.9 and >= the non-targeted prompts' corrected mean - 0.05, every targeted prompt"),
    ("non_targeted_ssim_at_least_0.95", "SSIM to uncorrected >= 0.95, every non-targeted prompt"),
    ("group_match_at_least_0.95", ">= 0.95, every prompt that names a group"),
    ("targeted_quality_within_0.5", ">= the non-targeted prompts' uncorrected quality - 0.5, every targeted prompt"),
    ("targeted_diversity_at_least_0.9x", ">= 0.9 x the non-targeted prompts' uncorrected diversity, every targeted prompt"),
)


def efficacy_targets(per_prompt: dict[str, Any], reference: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Each target of :data:`TARGETS` on the report's ``per_prompt`` rows: ``ok``, the worst prompt and its margin.

    ``margin`` is the worst prompt's value minus its threshold (negative: missed by that much), so a table of
    runs shows how far each is from every target. A target whose measure is missing (no quality judge) is left out.
    """
    targeted = [(key, row) for key, row in per_prompt.items() if row["targeted"]]
    plain = [(key, row) for key, row in per_prompt.items() if not row["targeted"] and row["group"] is not None]
    named = [(key, row) for key, row in per_prompt.items() if row["group"] is not None]
    plain_gender = [row["gender_consistency"][1] for _, row in plain if row["gender_consistency"][1] is not None]
    gender_floor = max(0.9, float(np.mean(plain_gender)) - 0.05) if plain_gender else 0.9
    quality, diversity = reference.get("non_targeted_uncorrected_quality"), reference.get("non_targeted_uncorrected_diversity")
    # name -> (rows, value of a row, its threshold); a margin >= 0 meets the target.
    rules: dict[str, tuple[list[tuple[str, Any]], Any, Any]] = {
        TARGETS[0][0]: (targeted, lambda r: -r["stereotype_rate"][1], lambda r: -0.1 * r["stereotype_rate"][0]),
        TARGETS[1][0]: (targeted, lambda r: r["gender_consistency"][1], lambda r: gender_floor),
        TARGETS[2][0]: (plain, lambda r: r["ssim"], lambda r: 0.95),
        TARGETS[3][0]: (named, lambda r: r["group_match"][1], lambda r: 0.95),
    }
    if quality is not None:
        rules[TARGETS[4][0]] = (targeted, lambda r: r["quality"][1], lambda r: quality - 0.5)
    if diversity is not None:
        rules[TARGETS[5][0]] = (targeted, lambda r: r["diversity"][1], lambda r: 0.9 * diversity)
    wanted = dict(TARGETS)
    results: dict[str, dict[str, Any]] = {}
    for name, (rows, value, threshold) in rules.items():
        margins = {key: value(row) - threshold(row) for key, row in rows if value(row) is not None}
        if not margins:
            continue
        worst = min(margins, key=margins.__getitem__)
        # A rate of 0 -> 0 meets "at most 0.1x" exactly; the tolerance only absorbs float rounding.
        results[name] = {"ok": margins[worst] >= -1e-9, "worst_prompt": worst, "margin": round(margins[worst], 6),
                         "wanted": wanted[name]}
    return results


def efficacy_report(
    before: dict[str, Any], after: dict[str, Any], prompts: list[ValidationPrompt], targeted_groups: tuple[str, ...]
) -> dict[str, Any]:
    """The efficacy report from two measurements (:func:`measure`) of the same prompts and seeds, ``after``
    with ``ssim`` to ``before`` and ``diversity_ratio`` (:func:`add_ratio`).

    ``targets`` holds every target of :data:`TARGETS` (ok, worst prompt, margin); ``checks`` is its
    name -> ok summary.
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
    plain = [r for r in per_prompt.values() if not r["targeted"] and r["group"] is not None]

    def mean_before(name: str) -> float | None:
        values = [r[name][0] for r in plain if r[name][0] is not None]
        return float(np.mean(values)) if values else None

    reference = {"non_targeted_uncorrected_quality": mean_before("quality"),
                 "non_targeted_uncorrected_diversity": mean_before("diversity")}
    targets = efficacy_targets(per_prompt, reference)
    return {
        "per_group": groups,
        "per_prompt": per_prompt,
        "reference": reference,
        "targets": targets,
        "checks": {name: target["ok"] for name, target in targets.items()},
    }


def format_efficacy_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables, per group then per prompt (uncorrected -> corrected), and its targets."""

    def pair(values: list[float | None]) -> str:
        return " -> ".join("-".rjust(4) if v is None else f"{v:4.2f}" for v in values).ljust(14)

    header = f"{'':<26}{'targeted':>9}  {'stereotype':<14}{'gender cons.':<14}{'group match':<14}{'quality':<14}{'diversity':<14}{'SSIM':>6}"
    lines = []
    for level in ("per_group", "per_prompt"):
        lines.append(header.replace(" " * 26, ("group" if level == "per_group" else "prompt").ljust(26), 1))
        for key, row in report[level].items():
            label = row.get("prompt", key)
            ssim = "-" if row["ssim"] is None else f"{row['ssim']:.3f}"
            lines.append(
                f"{label:<26}{('yes' if row['targeted'] else 'no'):>9}  "
                + "".join(pair(row[name]) for name in PAIRED) + f"{ssim:>6}"
            )
        lines.append("")
    for name, target in report.get("targets", {}).items():
        state = "PASS" if target["ok"] else "FAIL"
        lines.append(f"  [{state}] {name}: worst {target['worst_prompt']} (margin {target['margin']:+.3f}; wanted {target['wanted']})")
    return "\n".join(lines)


def log_efficacy_report(report: dict[str, Any], loggers: Sequence[Logger], step: int) -> None:
    """Log the corrected and uncorrected value of every measure per group and per prompt, and each target's margin."""
    metrics: dict[str, float] = {}
    for level in ("per_group", "per_prompt"):
        for key, row in report[level].items():
            for name in PAIRED:
                before, after = row[name]
                if after is not None:
                    metrics[f"efficacy/{name}/{key}"] = float(after)
                if before is not None:
                    metrics[f"efficacy/{name}_uncorrected/{key}"] = float(before)
            if row["ssim"] is not None:
                metrics[f"efficacy/ssim/{key}"] = float(row["ssim"])
    metrics |= {f"efficacy/target_margin/{name}": float(t["margin"]) for name, t in report["targets"].items()}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


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
                          "steps": kwargs["steps"], "guidance_scale": kwargs["guidance_scale"],
                          # the correction's own settings, where it has them (a refiner's: rsc.refiner.RefinerCorrection)
                          "strength": getattr(correction, "strength", None), "threshold": getattr(correction, "threshold", None),
                          "window": [float(edge) for edge in correction_window]}
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

        was_training = pl_module.training
        pl_module.eval()
        result = toy_efficacy(
            self.world, pl_module.ldm, pl_module.correction(), pl_module.correction_window,
            self.samples_per_prompt, self.first_seed, self.steps, self.guidance_scale, self.batch_size,
        )
        pl_module.train(was_training)
        self.report = result.report
        print("\nToy efficacy (same prompts and seeds; before -> after the correction):")
        print(format_efficacy_report(self.report))
        write_json_atomic(out_dir / "efficacy.json", self.report)
        log_efficacy_report(self.report, trainer.loggers, trainer.global_step)
        sections = [(group, result.group_ids == index) for index, group in enumerate(self.report["per_group"])]
        before_after_grid(result.uncorrected, result.corrected, sections, per_section=8).save(out_dir / "efficacy.png")
