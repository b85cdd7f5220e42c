"""Measuring the toy SD with the toy attribute classifier: group match, gender consistency, stereotype rate.

Images are sampled for every ``(group, gender)`` prompt with the same fixed
seeds, classified, and summarised per prompt and per group. The same
function measures a corrected sampler (pass ``correction``), so the
uncorrected and corrected numbers come from identical seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsc.backbone import FrozenLDM
from rsc.images import unit_tensor_to_uint8
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
