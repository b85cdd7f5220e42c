"""Measuring the toy SD with the toy attribute classifier: group match, gender consistency, stereotype rate.

Images are sampled for every ``(group, gender)`` prompt with the same fixed
seeds, classified, and summarised per prompt and per group. The same
function measures a corrected sampler (pass ``correction``), so the
uncorrected and corrected numbers come from identical seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsc.backbone import FrozenLDM
from rsc.images import labelled_grid, unit_tensor_to_uint8
from rsc.sampling import CorrectionFn
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.data import toy_prompts
from rsc.toy.faces import GENDERS, GROUPS


@dataclass
class ToySamples:
    """Samples of the toy SD with their prompts' attributes and the classifier's predictions."""

    images: Tensor  # (N, 3, H, W) in [0, 1]
    prompts: list[str]
    groups: np.ndarray  # prompt group index per image
    genders: np.ndarray  # prompt gender index per image
    seeds: np.ndarray
    predicted_groups: np.ndarray
    predicted_genders: np.ndarray
    stereotype_probs: np.ndarray

    @property
    def stereotyped(self) -> np.ndarray:
        """Whether the classifier sees the stereotype (probability > 0.5)."""
        return self.stereotype_probs > 0.5

    def to_uint8(self) -> np.ndarray:
        """Images as uint8 (N, H, W, 3)."""
        return unit_tensor_to_uint8(self.images)


@torch.no_grad()
def classify(classifier: ToyAttributeClassifier, images: Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Classifier outputs for images in [0, 1]: group and gender indices, stereotype probability."""
    groups, genders, stereotype = [], [], []
    for start in range(0, len(images), batch_size):
        probabilities = classifier.predict(images[start : start + batch_size] * 2 - 1)
        groups.append(probabilities["group"].argmax(-1).cpu().numpy())
        genders.append(probabilities["gender"].argmax(-1).cpu().numpy())
        stereotype.append(probabilities["stereotype"].cpu().numpy())
    return {"group": np.concatenate(groups), "gender": np.concatenate(genders), "stereotype": np.concatenate(stereotype)}


def sample_toy_prompts(
    ldm: FrozenLDM,
    classifier: ToyAttributeClassifier,
    samples_per_prompt: int,
    first_seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 7.0,
    correction: CorrectionFn | None = None,
    correction_window: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 64,
    progress: bool = True,
) -> ToySamples:
    """Sample every toy prompt with seeds ``first_seed ... first_seed + samples_per_prompt - 1`` and classify."""
    table = toy_prompts()
    prompts = [prompt for prompt, _, _ in table for _ in range(samples_per_prompt)]
    seeds = np.tile(np.arange(first_seed, first_seed + samples_per_prompt), len(table))
    output = ldm.sample(
        prompts,
        seeds.tolist(),
        steps=steps,
        guidance_scale=guidance_scale,
        correction=correction,
        correction_window=correction_window,
        batch_size=batch_size,
        progress=progress,
    )
    predictions = classify(classifier, output.images)
    return ToySamples(
        images=output.images,
        prompts=prompts,
        groups=np.repeat([GROUPS.index(g) for _, g, _ in table], samples_per_prompt),
        genders=np.repeat([GENDERS.index(g) for _, _, g in table], samples_per_prompt),
        seeds=seeds,
        predicted_groups=predictions["group"],
        predicted_genders=predictions["gender"],
        stereotype_probs=predictions["stereotype"],
    )


def save_prompt_grid(samples: ToySamples, path: str | os.PathLike[str], per_prompt: int) -> None:
    """Save a labelled grid: one row per toy prompt, its first ``per_prompt`` samples."""
    rows, labels = [], []
    for prompt, _, _ in toy_prompts():
        indices = [i for i, p in enumerate(samples.prompts) if p == prompt][:per_prompt]
        rows.append(samples.images[indices])
        labels.append(prompt.removeprefix("a photo of a "))
    labelled_grid(rows, labels).save(path)


def _rates(samples: ToySamples, mask: np.ndarray) -> dict[str, float]:
    return {
        "images": int(mask.sum()),
        "group_match": float((samples.predicted_groups[mask] == samples.groups[mask]).mean()),
        "gender_consistency": float((samples.predicted_genders[mask] == samples.genders[mask]).mean()),
        "stereotype_rate": float(samples.stereotyped[mask].mean()),
    }


def toy_statistics(samples: ToySamples) -> dict[str, Any]:
    """Group match, gender consistency and stereotype rate per group and per prompt."""
    per_group = {group: _rates(samples, samples.groups == index) for index, group in enumerate(GROUPS)}
    per_prompt = {
        prompt: _rates(samples, np.array([p == prompt for p in samples.prompts]))
        for prompt, _, _ in toy_prompts()
    }
    return {"per_group": per_group, "per_prompt": per_prompt}


def format_statistics(statistics: dict[str, Any], targeted_groups: tuple[str, ...] = ()) -> str:
    """A plain-text table of per-group statistics."""
    lines = [f"{'group':<8} {'targeted':>8} {'group match':>11} {'gender cons.':>12} {'stereotype':>10}"]
    for group, rates in statistics["per_group"].items():
        lines.append(
            f"{group:<8} {('yes' if group in targeted_groups else 'no'):>8} {rates['group_match']:>11.2f} "
            f"{rates['gender_consistency']:>12.2f} {rates['stereotype_rate']:>10.2f}"
        )
    return "\n".join(lines)


def efficacy_report(
    uncorrected: ToySamples, corrected: ToySamples, targeted_groups: tuple[str, ...]
) -> dict[str, Any]:
    """Per-group effect of a correction measured on the same prompts and seeds, with the toy acceptance checks.

    Checks: the targeted groups' stereotype rate falls to at most a third; group match stays
    >= 0.85 for every group; the targeted groups' gender consistency rises; non-targeted groups
    barely change (mean SSIM between corrected and uncorrected images >= 0.9).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if uncorrected.prompts != corrected.prompts or not np.array_equal(uncorrected.seeds, corrected.seeds):
        raise ValueError("efficacy needs the same prompts and seeds with and without the correction")
    before, after = toy_statistics(uncorrected), toy_statistics(corrected)
    groups: dict[str, Any] = {}
    for index, group in enumerate(GROUPS):
        mask = torch.from_numpy(uncorrected.groups == index)
        ssim = structural_similarity_index_measure(corrected.images[mask], uncorrected.images[mask], data_range=1.0)
        groups[group] = {
            "targeted": group in targeted_groups,
            "stereotype_rate": [before["per_group"][group]["stereotype_rate"], after["per_group"][group]["stereotype_rate"]],
            "gender_consistency": [before["per_group"][group]["gender_consistency"], after["per_group"][group]["gender_consistency"]],
            "group_match": [before["per_group"][group]["group_match"], after["per_group"][group]["group_match"]],
            "ssim": float(ssim),
        }
    targeted = [g for g in GROUPS if g in targeted_groups]
    others = [g for g in GROUPS if g not in targeted_groups]
    checks = {
        "stereotype_rate_at_most_a_third": all(
            groups[g]["stereotype_rate"][1] <= groups[g]["stereotype_rate"][0] / 3 for g in targeted
        ),
        "group_match_at_least_0.85": all(groups[g]["group_match"][1] >= 0.85 for g in GROUPS),
        "targeted_gender_consistency_rises": all(
            groups[g]["gender_consistency"][1] > groups[g]["gender_consistency"][0] for g in targeted
        ),
        "non_targeted_ssim_at_least_0.9": all(groups[g]["ssim"] >= 0.9 for g in others),
    }
    return {"per_group": groups, "checks": checks, "images_per_group": int((uncorrected.groups == 0).sum())}


def format_efficacy(report: dict[str, Any]) -> str:
    """The efficacy report as a plain-text table (before -> after)."""
    lines = [
        f"{'group':<8} {'targeted':>8} {'stereotype rate':>17} {'gender cons.':>14} {'group match':>13} {'SSIM':>6}"
    ]
    for group, row in report["per_group"].items():
        lines.append(
            f"{group:<8} {('yes' if row['targeted'] else 'no'):>8} "
            f"{row['stereotype_rate'][0]:>7.2f} -> {row['stereotype_rate'][1]:<5.2f} "
            f"{row['gender_consistency'][0]:>5.2f} -> {row['gender_consistency'][1]:<5.2f} "
            f"{row['group_match'][0]:>4.2f} -> {row['group_match'][1]:<4.2f} {row['ssim']:>6.3f}"
        )
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)
