"""Measuring the toy SD with the toy attribute classifier: group match, gender consistency, stereotype rate.

Images are sampled for every ``(group, gender)`` prompt with the same fixed
seeds, classified, and summarised per prompt and per group. The same
function measures a corrected sampler (pass ``correction``), so the
uncorrected and corrected numbers come from identical seeds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsc.backbone import FrozenLDM
from rsc.images import labelled_grid, uint8_to_tensor, unit_tensor_to_uint8
from rsc.sampling import CorrectionFn
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.data import toy_prompts
from rsc.toy.faces import GENDERS, GROUPS, render_faces


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

    def concat(self, other: ToySamples) -> ToySamples:
        """These samples followed by ``other``'s."""
        return ToySamples(
            images=torch.cat([self.images, other.images]),
            prompts=[*self.prompts, *other.prompts],
            **{
                name: np.concatenate([getattr(self, name), getattr(other, name)])
                for name in ("groups", "genders", "seeds", "predicted_groups", "predicted_genders", "stereotype_probs")
            },
        )


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
    prompt_table: list[tuple[str, str | None, str | None]] | None = None,
) -> ToySamples:
    """Sample every toy prompt with seeds ``first_seed ... first_seed + samples_per_prompt - 1`` and classify.

    ``prompt_table`` (default :func:`rsc.toy.data.toy_prompts`) lists ``(prompt, group, gender)``; a group or
    gender the prompt does not name is ``None`` and is stored as index -1.
    """
    table = prompt_table if prompt_table is not None else toy_prompts()
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
        groups=np.repeat([GROUPS.index(g) if g is not None else -1 for _, g, _ in table], samples_per_prompt),
        genders=np.repeat([GENDERS.index(g) if g is not None else -1 for _, _, g in table], samples_per_prompt),
        seeds=seeds,
        predicted_groups=predictions["group"],
        predicted_genders=predictions["gender"],
        stereotype_probs=predictions["stereotype"],
    )


class ClassifierFeatures(torch.nn.Module):
    """The toy classifier's penultimate features of float images in ``[0, 1]``: a KID feature extractor.

    Each feature vector is scaled to norm ``sqrt(D)``: KID's kernel ``(x.y / D + 1)^3`` then sees
    inner products in ``[-1, 1]`` as with Inception features, and values do not depend on how
    large one world's classifier's activations happen to be.
    """

    def __init__(self, classifier: ToyAttributeClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Features ``(N, D)``."""
        features = self.classifier.embed(images.float() * 2 - 1)
        return torch.nn.functional.normalize(features, dim=1) * features.shape[1] ** 0.5


@torch.no_grad()
def kernel_inception_distance(
    features: torch.nn.Module, images: Tensor, references: Tensor, seed: int = 0, subsets: int = 100
) -> float:
    """Mean KID (torchmetrics) between two image sets in ``[0, 1]`` with a custom feature extractor.

    Subsets hold at most 50 images (fewer for smaller sets); the subset draws are seeded, so the value
    is reproducible.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(50, len(images), len(references))
    with warnings.catch_warnings():  # its memory warning is about datasets far larger than a prompt's images
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
        metric = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=subset_size, normalize=True)
    metric.update(references, real=True)
    metric.update(images, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


def sample_fidelity(
    samples: ToySamples, classifier: ToyAttributeClassifier, judge: torch.nn.Module, seed: int
) -> dict[str, dict[str, float]]:
    """Per prompt: facial quality (``judge``, 0-10) of the samples and of as many clean renders of the
    prompt's group and gender, and the KID between the two sets in the classifier's feature space."""
    features = ClassifierFeatures(classifier)
    result: dict[str, dict[str, float]] = {}
    for index, prompt in enumerate(dict.fromkeys(samples.prompts)):
        mask = np.array([p == prompt for p in samples.prompts])
        group, gender = int(samples.groups[mask][0]), int(samples.genders[mask][0])
        count = int(mask.sum())
        renders = render_faces([group] * count, [gender] * count, [False] * count, seed=seed * 1000 + index)
        references = uint8_to_tensor(renders) / 2 + 0.5
        images = samples.images[torch.from_numpy(mask)]
        result[prompt] = {
            "quality": float(judge.score(images).mean()),
            "render_quality": float(judge.score(references).mean()),
            "kid": kernel_inception_distance(features, images, references, seed=seed),
        }
    return result


def save_prompt_grid(samples: ToySamples, path: str | os.PathLike[str], per_prompt: int) -> None:
    """Save a labelled grid: one row per toy prompt, its first ``per_prompt`` samples."""
    rows, labels = [], []
    for prompt, _, _ in toy_prompts():
        indices = [i for i, p in enumerate(samples.prompts) if p == prompt][:per_prompt]
        rows.append(samples.images[indices])
        labels.append(prompt.removeprefix("a photo of a "))
    labelled_grid(rows, labels).save(path)


def save_render_grid(path: str | os.PathLike[str], per_prompt: int, seed: int) -> None:
    """Save a labelled grid of clean procedural renders, one row per toy prompt (to set beside the samples' grid)."""
    rows, labels = [], []
    for index, (prompt, group, gender) in enumerate(toy_prompts()):
        renders = render_faces([GROUPS.index(group)] * per_prompt, [GENDERS.index(gender)] * per_prompt, [False] * per_prompt,
                               seed=seed * 1000 + index)
        rows.append(uint8_to_tensor(renders) / 2 + 0.5)
        labels.append(prompt.removeprefix("a photo of a "))
    labelled_grid(rows, labels).save(path)


def _rates(samples: ToySamples, mask: np.ndarray) -> dict[str, float]:
    """Rates over the masked images; a rate about an attribute the prompts do not name is left out."""
    rates: dict[str, float] = {"images": int(mask.sum())}
    if (samples.groups[mask] >= 0).all():
        rates["group_match"] = float((samples.predicted_groups[mask] == samples.groups[mask]).mean())
    if (samples.genders[mask] >= 0).all():
        rates["gender_consistency"] = float((samples.predicted_genders[mask] == samples.genders[mask]).mean())
    rates["stereotype_rate"] = float(samples.stereotyped[mask].mean())
    return rates


def group_distribution(samples: ToySamples, mask: np.ndarray) -> dict[str, Any]:
    """Predicted group frequencies of the masked images and their KL divergence to a uniform distribution (nats)."""
    counts = np.bincount(samples.predicted_groups[mask], minlength=len(GROUPS)).astype(np.float64)
    frequencies = counts / max(1.0, counts.sum())
    nonzero = frequencies > 0
    kl = float((frequencies[nonzero] * np.log(frequencies[nonzero] * len(GROUPS))).sum())
    return {"images": int(mask.sum()), "group_frequencies": dict(zip(GROUPS, frequencies.round(4).tolist())), "kl_to_uniform": kl}


def toy_statistics(samples: ToySamples) -> dict[str, Any]:
    """Group match, gender consistency and stereotype rate per group (of the group-naming prompts) and per prompt.

    Prompts that name no group also get their predicted group frequencies and KL to uniform.
    """
    per_group = {
        group: _rates(samples, samples.groups == index)
        for index, group in enumerate(GROUPS)
        if (samples.groups == index).any()
    }
    per_prompt: dict[str, Any] = {}
    for prompt in dict.fromkeys(samples.prompts):
        mask = np.array([p == prompt for p in samples.prompts])
        per_prompt[prompt] = _rates(samples, mask)
        if (samples.groups[mask] < 0).all():
            per_prompt[prompt].update(group_distribution(samples, mask))
    return {"per_group": per_group, "per_prompt": per_prompt}


def format_statistics(statistics: dict[str, Any], targeted_groups: tuple[str, ...] = ()) -> str:
    """A plain-text table of per-prompt statistics (facial quality and KID where measured)."""
    lines = [
        f"{'prompt':<26} {'targeted':>8} {'group match':>11} {'gender cons.':>12} {'stereotype':>10}"
        f" {'quality':>7} {'renders':>7} {'KID':>7}"
    ]
    for prompt, group, _ in toy_prompts():
        rates = statistics["per_prompt"].get(prompt)
        if rates is None:
            continue
        quality = "".join(
            f" {rates[key]:>7.3f}" if key == "kid" else f" {rates[key]:>7.2f}" if key in rates else f" {'-':>7}"
            for key in ("quality", "render_quality", "kid")
        )
        lines.append(
            f"{prompt.removeprefix('a photo of a '):<26} {('yes' if group in targeted_groups else 'no'):>8} "
            f"{rates['group_match']:>11.2f} {rates['gender_consistency']:>12.2f} {rates['stereotype_rate']:>10.2f}{quality}"
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
