"""One measurement of an image set of known prompts and seeds, built from the metrics of :mod:`rsc.callbacks.metrics`.

Used by ``python -m rsc.evaluate`` (every method) and the toy efficacy report of
``rsc.fit``, so both compute every number the same way. Each metric is
reported per prompt, per group (prompts naming no group count in ``all`` only)
and as the gap between groups (largest minus smallest group value):

* ``stereotype_rate``, ``gender_consistency``, ``group_match`` (the attribute classifier),
* ``quality`` (an :class:`~rsc.classifiers.base.AestheticPredictor`: the toy judge or LAION's head),
* ``ssim`` to the uncorrected image of the same seed (when a baseline is given),
* ``kid`` to clean references (toy renders or a folder per group, when given),
* ``diversity``: RMS pairwise distance of the images' features per prompt (a group's value is the mean of
  its prompts'); :func:`add_ratio` adds ``diversity_ratio`` relative to the uncorrected model,
* ``kl_to_uniform`` of the predicted groups, for prompts that name no group.

Under DDP, call :func:`measure` on every rank with its share of the images: the metrics' states are
reduced by torchmetrics (sums, and "cat" with a global order for KID), so values equal a single process's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from rsc.callbacks.metrics import (
    AestheticScore,
    AttributeConsistency,
    DistributionFairness,
    Diversity,
    GroupKID,
    SSIMPreservation,
    StereotypeRate,
)
from rsc.classifiers.base import AestheticPredictor, AttributeClassifier, module_device

#: The per-image metrics, in report order; ``higher_is_better`` per metric.
HIGHER_IS_BETTER: dict[str, bool] = {
    "stereotype_rate": False, "gender_consistency": True, "group_match": True, "quality": True, "ssim": True,
    "kid": False, "diversity": True, "diversity_ratio": True, "kl_to_uniform": False,
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class ValidationPrompt:
    """One validation prompt and the attribute values it names.

    Attributes:
        prompt: The text prompt.
        group: The group it names (a label of the classifier's group attribute), or ``None`` for a prompt that
            names no group (measured by the distribution-fairness metrics).
        gender: The gender it names (a label of the classifier's gender attribute), or ``None``.
        name: Short name in metric keys and the grid; default: the prompt with non-word characters as ``_``.
    """

    prompt: str
    group: str | None = None
    gender: str | None = None
    name: str | None = None

    @property
    def key(self) -> str:
        """The name used in metric keys."""
        return self.name or re.sub(r"\W+", "_", self.prompt).strip("_")


def check_prompt_attributes(
    classifier: AttributeClassifier,
    prompts: Sequence[ValidationPrompt],
    group_attribute: str,
    gender_attribute: str | None,
    stereotype_attribute: str | None,
    where: str,
) -> tuple[str, ...]:
    """Check the classifier has every attribute a metric needs and every value a prompt names; return the groups."""
    labels = classifier.labels
    for attribute, field in ((group_attribute, "group_attribute"), (gender_attribute, "gender_attribute"),
                             (stereotype_attribute, "stereotype_attribute")):
        if attribute is not None and attribute not in labels:
            raise ValueError(f"{where}.{field}={attribute!r} is not an attribute of "
                             f"{type(classifier).__name__} (it has {sorted(labels)})")
    if stereotype_attribute is not None and len(labels[stereotype_attribute]) != 2:
        raise ValueError(f"{where}.stereotype_attribute={stereotype_attribute!r} must be binary, "
                         f"got labels {labels[stereotype_attribute]}")
    for index, prompt in enumerate(prompts):
        for value, attribute, field in ((prompt.group, group_attribute, "group"), (prompt.gender, gender_attribute, "gender")):
            if value is None:
                continue
            if attribute is None or value not in labels[attribute]:
                known = labels[attribute] if attribute is not None else "nothing (gender_attribute is None)"
                raise ValueError(f"{where}.prompts[{index}].{field}={value!r} ({prompt.prompt!r}) is not one of {known}")
    keys = [p.key for p in prompts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}.prompts have duplicate names {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return tuple(labels[group_attribute])


def attribute_metrics(
    names: Sequence[str], gender: bool, stereotype: bool, stereotype_threshold: float = 0.5
) -> dict[str, Any]:
    """The classifier's metrics over slots ``names``: group match, and gender consistency / stereotype rate if asked."""
    metrics: dict[str, Any] = {"group_match": AttributeConsistency(names, name="group_match")}
    if gender:
        metrics["gender_consistency"] = AttributeConsistency(names, name="gender_consistency")
    if stereotype:
        metrics["stereotype_rate"] = StereotypeRate(names, threshold=stereotype_threshold)
    return metrics


class ProbabilityFeatures(nn.Module):
    """Features of any attribute classifier: its probabilities of every attribute, concatenated."""

    def __init__(self, classifier: AttributeClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        """(N, sum of the attributes' label counts)."""
        probabilities = self.classifier.predict(images)
        return torch.cat([probabilities[name] for name in self.classifier.labels], dim=1)


def default_features(classifier: AttributeClassifier) -> nn.Module:
    """The toy classifier's penultimate features for the toy classifier, else :class:`ProbabilityFeatures`."""
    from rsc.classifiers.toy import ToyClassifier

    if isinstance(classifier, ToyClassifier):
        from rsc.toy.evaluate import ClassifierFeatures

        return ClassifierFeatures(classifier.model)
    return ProbabilityFeatures(classifier)


class References(Protocol):
    """Clean reference images of a group (and gender, where known) for KID, in [0, 1]."""

    def images(self, group: str, gender: str | None, index: int) -> Tensor | None:
        """Images (N, 3, H, W), or None where there are none (``index``: which slot asks, for distinct draws)."""


@dataclass
class ToyRenderReferences:
    """Clean procedural renders of the toy world (no stereotype): ``count`` per slot, seeded by ``seed`` and the slot."""

    count: int = 64
    seed: int = 0

    def images(self, group: str, gender: str | None, index: int) -> Tensor | None:
        """Renders of ``group`` (both genders alternating when ``gender`` is None)."""
        from rsc.images import uint8_to_tensor
        from rsc.toy.faces import GENDERS, GROUPS, render_faces

        if group not in GROUPS:
            return None
        n = self.count
        genders = [GENDERS.index(gender)] * n if gender is not None else [i % len(GENDERS) for i in range(n)]
        renders = render_faces([GROUPS.index(group)] * n, genders, [False] * n, seed=self.seed * 1000 + index)
        return uint8_to_tensor(renders) / 2 + 0.5


@dataclass
class FolderReferences:
    """A user's reference photos: ``<folder>/<group>/*.png|jpg`` (gender is not used), resized to the samples' size."""

    folder: str
    size: int = 64

    def images(self, group: str, gender: str | None, index: int) -> Tensor | None:
        """The group's images, sorted by name."""
        path = Path(self.folder) / group
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
        if not files:
            return None
        arrays = []
        for file in files:
            with Image.open(file) as image:
                arrays.append(np.asarray(image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@dataclass
class Analysis:
    """What the judges say about each image: attribute probabilities, quality score, features."""

    probabilities: dict[str, Tensor]
    quality: Tensor | None
    features: Tensor


@dataclass
class Judges:
    """The classifier, quality judge and feature extractor that every measurement uses.

    Args:
        classifier: Attribute classifier.
        quality: Facial-quality / aesthetic predictor; ``None`` to skip ``quality``.
        features: Images -> (N, D) features for diversity and KID; default :func:`default_features`.
        references: Clean references for KID; ``None`` to skip ``kid``.
        group_attribute, gender_attribute, stereotype_attribute: The classifier's attributes (``None``: skip).
        stereotype_threshold: Probability above which an image counts as stereotyped.
        batch_size: Classifier batch size.
    """

    classifier: AttributeClassifier
    quality: AestheticPredictor | None = None
    features: nn.Module | None = None
    references: References | None = None
    group_attribute: str = "group"
    gender_attribute: str | None = "gender"
    stereotype_attribute: str | None = "stereotype"
    stereotype_threshold: float = 0.5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.features is None:
            self.features = default_features(self.classifier)

    def groups(self, prompts: Sequence[ValidationPrompt], where: str) -> tuple[str, ...]:
        """Check the prompts against the classifier (see :func:`check_prompt_attributes`); the group names."""
        return check_prompt_attributes(self.classifier, prompts, self.group_attribute, self.gender_attribute,
                                       self.stereotype_attribute, where)

    @torch.no_grad()
    def analyse(self, images: Tensor) -> Analysis:
        """Classify, score and embed images (N, 3, H, W) in [0, 1]."""
        probabilities = {k: v.cpu() for k, v in self.classifier.predict(images, batch_size=self.batch_size).items()}
        quality = None
        if self.quality is not None:
            device = module_device(self.quality)
            quality = torch.cat([self.quality(images[i : i + self.batch_size].to(device)).cpu()
                                 for i in range(0, len(images), self.batch_size)])
        assert self.features is not None
        device = module_device(self.features)
        features = torch.cat([self.features(images[i : i + self.batch_size].to(device)).cpu()
                              for i in range(0, len(images), self.batch_size)])
        return Analysis(probabilities, quality, features)


def _value(tensor: Tensor) -> float | None:
    value = float(tensor)
    return None if math.isnan(value) else value


def measure(
    judges: Judges,
    prompts: Sequence[ValidationPrompt],
    prompt_ids: Tensor,
    order: Tensor,
    images: Tensor,
    analysis: Analysis | None = None,
    baseline: Tensor | None = None,
    kid_subsets: int = 100,
    where: str = "measure",
) -> dict[str, Any]:
    """Every metric of ``images`` (those of ``prompts[prompt_ids[i]]``), per prompt, per group, ``all`` and ``gap``.

    Args:
        judges: What measures.
        prompts: All prompts of the evaluation (the same list on every rank).
        prompt_ids: (N,) index into ``prompts`` per image.
        order: (N,) global index of each image (makes KID's subsets independent of the rank split).
        images: (N, 3, H, W) in [0, 1].
        analysis: ``judges.analyse(images)`` if already computed.
        baseline: The uncorrected images of the same (prompt, seed)s, for ``ssim``.
        kid_subsets: KID subsets per slot.
        where: Names the caller in errors.

    Returns:
        ``{"per_prompt": {key: {metric: value}}, "per_group": {group: {...}}, "all": {...}, "gap": {...}}``;
        a value is ``None`` where it is undefined (e.g. gender consistency of a prompt naming no gender).
    """
    groups = judges.groups(prompts, where)
    analysis = analysis if analysis is not None else judges.analyse(images)
    keys = [p.key for p in prompts]
    prompt_ids = torch.as_tensor(prompt_ids).long()
    labels = judges.classifier.labels

    def target(values: list[str | None], attribute: str | None) -> Tensor:
        return torch.tensor([labels[attribute].index(v) if v is not None and attribute else -1 for v in values])

    group_of_prompt = target([p.group for p in prompts], judges.group_attribute)
    gender_of_prompt = target([p.gender for p in prompts], judges.gender_attribute)
    group_ids, gender_targets = group_of_prompt[prompt_ids], gender_of_prompt[prompt_ids]

    # The same metric classes, once with groups as slots and once with prompts as slots.
    results: dict[str, dict[str, float | None]] = {}
    for level, names, slot_ids in (("group", groups, group_ids), ("prompt", tuple(keys), prompt_ids)):
        metrics = attribute_metrics(names, judges.gender_attribute is not None, judges.stereotype_attribute is not None,
                                    judges.stereotype_threshold)
        if analysis.quality is not None:
            metrics["quality"] = AestheticScore(names, name="quality")
        if baseline is not None:
            metrics["ssim"] = SSIMPreservation(names)
        metrics["group_match"].update(analysis.probabilities[judges.group_attribute], group_ids, slot_ids)
        if "gender_consistency" in metrics:
            metrics["gender_consistency"].update(analysis.probabilities[judges.gender_attribute], gender_targets, slot_ids)
        if "stereotype_rate" in metrics:
            metrics["stereotype_rate"].update(analysis.probabilities[judges.stereotype_attribute][:, 1], slot_ids)
        if "quality" in metrics:
            metrics["quality"].update(analysis.quality, slot_ids)
        if "ssim" in metrics:
            metrics["ssim"].update(images, baseline, slot_ids)
        if judges.references is not None:
            metrics["kid"] = _kid(judges, prompts, names, level, kid_subsets)
            metrics["kid"].update(analysis.features, slot_ids, order)
        for metric in metrics.values():
            for key, value in metric.compute().items():
                results.setdefault(f"{level}:{key.split('/', 1)[1]}", {})[key.split("/", 1)[0]] = _value(value)

    diversity = Diversity(keys, feature_dim=analysis.features.shape[1])
    diversity.update(analysis.features, prompt_ids)
    per_prompt_diversity = {key.split("/", 1)[1]: _value(v) for key, v in diversity.compute().items()}
    neutral = [p.key for p in prompts if p.group is None]
    distribution = None
    if neutral:
        distribution = DistributionFairness(neutral, len(groups))
        neutral_index = {key: i for i, key in enumerate(neutral)}
        neutral_ids = torch.tensor([neutral_index.get(keys[i], -1) for i in prompt_ids.tolist()], dtype=torch.long)
        mask = neutral_ids >= 0
        distribution.update(analysis.probabilities[judges.group_attribute][mask], neutral_ids[mask])
        kl = {key.split("/", 1)[1]: _value(v) for key, v in distribution.compute().items() if key.startswith("kl_")}

    out: dict[str, Any] = {"per_prompt": {}, "per_group": {}, "all": {}, "gap": {}}
    for key, prompt in zip(keys, prompts):
        row = dict(results.get(f"prompt:{key}", {}))
        row["diversity"] = per_prompt_diversity[key]
        if distribution is not None and key in kl:
            row["kl_to_uniform"] = kl[key]
        out["per_prompt"][key] = row
    for group in groups:
        row = dict(results.get(f"group:{group}", {}))
        values = [per_prompt_diversity[p.key] for p in prompts if p.group == group and per_prompt_diversity[p.key] is not None]
        row["diversity"] = float(np.mean(values)) if values else None
        out["per_group"][group] = row
    for summary in ("all", "gap"):
        out[summary] = dict(results.get(f"group:{summary}", {}))
    group_diversity = [row["diversity"] for row in out["per_group"].values() if row["diversity"] is not None]
    out["all"]["diversity"] = per_prompt_diversity["mean"]
    out["gap"]["diversity"] = max(group_diversity) - min(group_diversity) if group_diversity else None
    if distribution is not None:
        out["all"]["kl_to_uniform"] = kl["mean"]
    return out


def _kid(judges: Judges, prompts: Sequence[ValidationPrompt], names: Sequence[str], level: str, subsets: int) -> GroupKID:
    """A KID metric with every slot's references: a group's (both genders) or a prompt's group and gender."""
    assert judges.references is not None and judges.features is not None
    metric = GroupKID(names, subsets=subsets)  # every rank adds the same references (they are not reduced)
    by_key = {p.key: p for p in prompts}
    device = module_device(judges.features)
    for index, name in enumerate(names):
        prompt = by_key.get(name) if level == "prompt" else None
        group, gender = (prompt.group, prompt.gender) if prompt is not None else (name, None)
        if group is None:
            continue
        images = judges.references.images(group, gender, index + (1000 if level == "prompt" else 0))
        if images is None:
            continue
        with torch.no_grad():
            features = torch.cat([judges.features(images[i : i + judges.batch_size].to(device)).cpu()
                                  for i in range(0, len(images), judges.batch_size)])
        metric.add_references(features, index)
    return metric


def add_ratio(result: dict[str, Any], baseline: dict[str, Any], metric: str = "diversity") -> None:
    """Add ``<metric>_ratio`` = value / the baseline's value, per prompt, per group and in ``all``, in place."""
    for level in ("per_prompt", "per_group"):
        for key, row in result[level].items():
            row[f"{metric}_ratio"] = _ratio(row.get(metric), baseline[level].get(key, {}).get(metric))
    result["all"][f"{metric}_ratio"] = _ratio(result["all"].get(metric), baseline["all"].get(metric))


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None
