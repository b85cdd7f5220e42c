"""Fairness, quality and preservation metrics as ``torchmetrics.Metric`` classes (DDP-correct by construction).

Every metric keeps explicit sums and counts reduced with ``dist_reduce_fx="sum"``
(never per-rank ratios), so its value under DDP equals the single-process value
on the same images. ``compute()`` returns a flat ``{"<name>/<key>": value}`` dict:

* per group ``<name>/<group>`` (NaN for a group without images),
* ``<name>/all``: pooled over every image, including those of prompts that name no
  group (``group_ids == -1``),
* ``<name>/gap``: largest minus smallest group value.

Inputs: ``group_ids`` (N,) index the metric's ``groups`` (``-1``: the prompt names no
group); ``valid`` (N,) bool marks the images that count (e.g. those where a face was
found); images are float (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.multimodal.clip_score import CLIPScore

from rsc.classifiers.clip import CLIPEncoder
from rsc.classifiers.weights import load_state_dict_file

__all__ = [
    "AestheticScore",
    "AttributeConsistency",
    "DistributionFairness",
    "Diversity",
    "FaceDetection",
    "GroupKID",
    "GroupMean",
    "LPIPSPreservation",
    "PromptFidelity",
    "SSIMPreservation",
    "StereotypeRate",
    "find_local_lpips_backbone",
]


def _add_group_states(metric: Metric, num_groups: int, sums: str = "sums", counts: str = "counts") -> None:
    # One slot per group plus a last slot for images whose prompt names no group.
    metric.add_state(sums, torch.zeros(num_groups + 1, dtype=torch.float64), dist_reduce_fx="sum")
    metric.add_state(counts, torch.zeros(num_groups + 1, dtype=torch.long), dist_reduce_fx="sum")


def _slots(group_ids: Tensor, num_groups: int) -> Tensor:
    group_ids = torch.as_tensor(group_ids).long()
    if group_ids.ndim != 1 or bool(((group_ids < -1) | (group_ids >= num_groups)).any()):
        raise ValueError(f"group_ids must be a 1-d tensor of values in [-1, {num_groups - 1}], got {group_ids.tolist()}")
    return torch.where(group_ids < 0, num_groups, group_ids)


def _mask(valid: Tensor | None, n: int, device: torch.device) -> Tensor:
    if valid is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    valid = torch.as_tensor(valid, dtype=torch.bool, device=device)
    if valid.shape != (n,):
        raise ValueError(f"valid must have shape ({n},), got {tuple(valid.shape)}")
    return valid


def _accumulate(sums: Tensor, counts: Tensor, values: Tensor, group_ids: Tensor, valid: Tensor | None) -> None:
    """Add ``values[valid]`` to their groups' sums and counts, in place."""
    values = values.detach().reshape(-1)
    slots = _slots(group_ids, len(sums) - 1).to(sums.device)
    if slots.shape != values.shape:
        raise ValueError(f"got {values.numel()} values but {slots.numel()} group ids")
    keep = _mask(valid, len(values), sums.device)
    sums.index_add_(0, slots[keep], values.to(sums.device, torch.float64)[keep])
    counts.index_add_(0, slots[keep], torch.ones_like(slots[keep]))


def _summaries(name: str, groups: Sequence[str], sums: Tensor, counts: Tensor, floor: float | None = None) -> dict[str, Tensor]:
    """Per-group means, the pooled mean ("all") and the best-worst group gap, as ``{name/key: value}``."""
    means = sums / counts.clamp(min=1)
    means = torch.where(counts > 0, means, torch.full_like(means, float("nan")))
    pooled = sums.sum() / counts.sum() if counts.sum() > 0 else torch.tensor(float("nan"), dtype=sums.dtype)
    if floor is not None:
        means, pooled = means.clamp(min=floor), pooled.clamp(min=floor)
    per_group = means[: len(groups)]
    present = per_group[counts[: len(groups)] > 0]
    gap = present.max() - present.min() if len(present) else torch.tensor(float("nan"), dtype=sums.dtype)
    out = {f"{name}/{group}": per_group[index] for index, group in enumerate(groups)}
    out[f"{name}/all"], out[f"{name}/gap"] = pooled, gap
    return out


def _check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    groups = tuple(groups)
    if not groups or len(set(groups)) != len(groups) or not all(isinstance(g, str) and g for g in groups):
        raise ValueError(f"groups must be distinct non-empty names, got {groups}")
    if {"all", "gap"} & set(groups):
        raise ValueError(f"'all' and 'gap' are summary keys and cannot name a group, got {groups}")
    return groups


class GroupMean(Metric):
    """Mean of a per-image value per group (sums and counts, reduced by "sum").

    Args:
        groups: Group names (index = group id).
        name: Key prefix of :meth:`compute`'s output.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = None
    sums: Tensor
    counts: Tensor

    def __init__(self, groups: Sequence[str], name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups, self.name = _check_groups(groups), name
        _add_group_states(self, len(self.groups))

    def update(self, values: Tensor, group_ids: Tensor, valid: Tensor | None = None) -> None:  # type: ignore[override]
        """Add per-image ``values`` (N,)."""
        _accumulate(self.sums, self.counts, torch.as_tensor(values), group_ids, valid)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Per-group means, ``all`` and ``gap``."""
        return _summaries(self.name, self.groups, self.sums, self.counts)


class AttributeConsistency(GroupMean):
    """Per group, the share of images whose predicted attribute (argmax) is the one the prompt names.

    Images whose prompt names no value of the attribute (target ``-1``) do not count.

    Args:
        groups: Group names.
        name: Key prefix, e.g. ``"gender_consistency"`` or ``"group_match"``.
    """

    higher_is_better = True

    def update(  # type: ignore[override]
        self, probabilities: Tensor, targets: Tensor, group_ids: Tensor, valid: Tensor | None = None
    ) -> None:
        """Add (N, K) ``probabilities`` against (N,) ``targets`` (label index, ``-1`` = not named)."""
        targets = torch.as_tensor(targets, device=probabilities.device).long()
        if probabilities.ndim != 2 or targets.shape != probabilities.shape[:1]:
            raise ValueError(f"expected probabilities (N, K) and targets (N,), got {tuple(probabilities.shape)} and {tuple(targets.shape)}")
        named = (targets >= 0) & _mask(valid, len(targets), probabilities.device)
        super().update((probabilities.argmax(-1) == targets).double(), group_ids, named)


class StereotypeRate(GroupMean):
    """Per group, the share of images the stereotype classifier flags (probability above ``threshold``).

    Args:
        groups: Group names.
        threshold: Decision threshold on the probability that the stereotype is present.
        name: Key prefix.
    """

    higher_is_better = False

    def __init__(self, groups: Sequence[str], threshold: float = 0.5, name: str = "stereotype_rate", **kwargs: Any) -> None:
        super().__init__(groups, name, **kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def update(self, probabilities: Tensor, group_ids: Tensor, valid: Tensor | None = None) -> None:  # type: ignore[override]
        """Add (N,) probabilities that the stereotype is present."""
        super().update((probabilities > self.threshold).double(), group_ids, valid)


class AestheticScore(GroupMean):
    """Mean aesthetic score per group; ``gap`` is the best minus the worst group."""

    higher_is_better = True

    def __init__(self, groups: Sequence[str], name: str = "aesthetic", **kwargs: Any) -> None:
        super().__init__(groups, name, **kwargs)


class SSIMPreservation(GroupMean):
    """Mean SSIM (torchmetrics, per image) between corrected and uncorrected images of the same seed, per group."""

    higher_is_better = True

    def __init__(self, groups: Sequence[str], name: str = "ssim", **kwargs: Any) -> None:
        super().__init__(groups, name, **kwargs)

    def update(  # type: ignore[override]
        self, corrected: Tensor, uncorrected: Tensor, group_ids: Tensor, valid: Tensor | None = None
    ) -> None:
        """Add per-image SSIM of two aligned batches in [0, 1]."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        values = structural_similarity_index_measure(corrected, uncorrected, data_range=1.0, reduction="none")
        super().update(values, group_ids, valid)


_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def find_local_lpips_backbone(net: str = "alex") -> Path | None:
    """torchvision's ImageNet weights of LPIPS' backbone if they are in the torch hub cache, else ``None``."""
    import torchvision

    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
    url = getattr(torchvision.models, _LPIPS_BACKBONES[net]).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.is_file() else None


class LPIPSPreservation(GroupMean):
    """Mean LPIPS between corrected and uncorrected images of the same seed, per group (lower = closer).

    torchmetrics' LPIPS ships its linear layers but downloads the backbone; here the
    backbone comes from a local torchvision state dict (e.g. ``alexnet-owt-7be5be79.pth``,
    see :func:`find_local_lpips_backbone`), so nothing is downloaded.

    Args:
        groups: Group names.
        backbone_weights: Local torchvision state dict of the backbone (``features.*`` keys).
        net: ``"alex"``, ``"vgg"`` or ``"squeeze"``.
        name: Key prefix.
    """

    higher_is_better = False

    def __init__(
        self, groups: Sequence[str], backbone_weights: str | os.PathLike[str], net: str = "alex", name: str = "lpips",
        **kwargs: Any,
    ) -> None:
        super().__init__(groups, name, **kwargs)
        # A private torchmetrics class: the public LPIPS metric offers no way to pass local backbone weights.
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        if net not in _LPIPS_BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
        self.net = _NoTrainLpips(pretrained=True, net=net, pnet_rand=True)
        state = load_state_dict_file(backbone_weights, f"LPIPS {net} backbone weights")
        # LPIPS splits torchvision's `features` Sequential into slices that keep the original indices.
        wanted = {key: "features." + key.split(".", 1)[1] for key in self.net.net.state_dict()}
        missing = sorted(source for source in wanted.values() if source not in state)
        if missing:
            raise ValueError(
                f"LPIPS {net} backbone weights {str(backbone_weights)!r} lack {missing[:4]}; expected torchvision's "
                f"{_LPIPS_BACKBONES[net]} state dict"
            )
        self.net.net.load_state_dict({key: state[source] for key, source in wanted.items()})

    def update(  # type: ignore[override]
        self, corrected: Tensor, uncorrected: Tensor, group_ids: Tensor, valid: Tensor | None = None
    ) -> None:
        """Add per-image LPIPS of two aligned batches in [0, 1]."""
        with torch.no_grad():
            values = self.net(corrected, uncorrected, normalize=True).reshape(-1)
        super().update(values, group_ids, valid)


class FaceDetection(Metric):
    """Per group, the face detection rate and the mean MTCNN confidence of the faces found.

    A low rate or confidence for one group is a proxy for distorted faces. Keys:
    ``face_detection_rate/<group>`` and ``face_confidence/<group>`` (+ ``all``, ``gap``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    detected: Tensor
    images: Tensor
    confidence_sums: Tensor
    faces: Tensor

    def __init__(self, groups: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = _check_groups(groups)
        _add_group_states(self, len(self.groups), "detected", "images")
        _add_group_states(self, len(self.groups), "confidence_sums", "faces")

    def update(self, found: Tensor, confidence: Tensor, group_ids: Tensor) -> None:  # type: ignore[override]
        """Add (N,) bool ``found`` and (N,) MTCNN ``confidence`` (ignored where no face was found)."""
        found = torch.as_tensor(found, dtype=torch.bool)
        _accumulate(self.detected, self.images, found.double(), group_ids, None)
        _accumulate(self.confidence_sums, self.faces, torch.as_tensor(confidence), group_ids, found)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Detection rates and mean confidences."""
        return {
            **_summaries("face_detection_rate", self.groups, self.detected, self.images),
            **_summaries("face_confidence", self.groups, self.confidence_sums, self.faces),
        }


class Diversity(Metric):
    """Per prompt, how different its images are: the root mean square pairwise distance of their features.

    With ``n`` images of features ``x_i``, sum_{i<j} ||x_i - x_j||^2 = n sum_i ||x_i||^2 - ||sum_i x_i||^2,
    so the value follows from summed states (DDP-exact) without keeping the features. Keys:
    ``diversity/<prompt>`` (NaN below two images) and ``diversity/mean`` over the prompts that have a value.
    Compare methods by the ratio to the uncorrected model's value on the same prompts and seeds.

    Args:
        prompts: Names of the prompts (index = prompt id).
        feature_dim: Length of a feature vector (e.g. the attribute classifier's penultimate features).
        name: Key prefix.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    feature_sums: Tensor
    squared_norms: Tensor
    counts: Tensor

    def __init__(self, prompts: Sequence[str], feature_dim: int, name: str = "diversity", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompts, self.name = tuple(prompts), name
        if not self.prompts or len(set(self.prompts)) != len(self.prompts) or "mean" in self.prompts:
            raise ValueError(f"prompts must be distinct names other than 'mean', got {self.prompts}")
        self.add_state("feature_sums", torch.zeros(len(self.prompts), feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squared_norms", torch.zeros(len(self.prompts), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.prompts), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor, prompt_ids: Tensor) -> None:  # type: ignore[override]
        """Add (N, D) features of images of the prompts ``prompt_ids`` (N,)."""
        features = torch.as_tensor(features).detach().to(self.feature_sums.device, torch.float64)
        prompt_ids = torch.as_tensor(prompt_ids, device=features.device).long()
        if features.ndim != 2 or features.shape[1] != self.feature_sums.shape[1] or prompt_ids.shape != features.shape[:1]:
            raise ValueError(f"expected features (N, {self.feature_sums.shape[1]}) and prompt_ids (N,), "
                             f"got {tuple(features.shape)} and {tuple(prompt_ids.shape)}")
        if bool(((prompt_ids < 0) | (prompt_ids >= len(self.prompts))).any()):
            raise ValueError(f"prompt_ids must be in [0, {len(self.prompts) - 1}], got {prompt_ids.tolist()}")
        self.feature_sums.index_add_(0, prompt_ids, features)
        self.squared_norms.index_add_(0, prompt_ids, (features**2).sum(-1))
        self.counts.index_add_(0, prompt_ids, torch.ones_like(prompt_ids))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Per prompt RMS pairwise distance, and their mean."""
        n = self.counts.double()
        pair_sums = n * self.squared_norms - (self.feature_sums**2).sum(-1)
        pairs = n * (n - 1) / 2
        values = (pair_sums.clamp(min=0) / pairs.clamp(min=1)).sqrt()
        values = torch.where(self.counts >= 2, values, torch.full_like(values, float("nan")))
        out = {f"{self.name}/{prompt}": values[index] for index, prompt in enumerate(self.prompts)}
        present = self.counts >= 2
        out[f"{self.name}/mean"] = values[present].mean() if bool(present.any()) else torch.tensor(float("nan"))
        return out


class GroupKID(Metric):
    """Per group (or any named slot), the kernel inception distance of its images' features to its references.

    torchmetrics' KID (``poly_mmd``) on subsets of at most ``subset_size`` images, ``subsets`` times, with a
    generator seeded by ``seed``; the features are "cat" states and are sorted by the images' ``order``
    (e.g. their (prompt, seed) index) before subsets are drawn, so the value under DDP equals the
    single-process one. Keys ``<name>/<group>`` (NaN without images or references), ``all`` (the mean of
    the groups' values) and ``gap``. A reference set is added once per slot with :meth:`add_references`
    (on every rank: references are not reduced).

    Args:
        groups: Slot names.
        subset_size: Largest KID subset.
        subsets: Number of subsets.
        seed: Seed of the subset draws.
        name: Key prefix.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, groups: Sequence[str], subset_size: int = 50, subsets: int = 100, seed: int = 0,
                 name: str = "kid", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups, self.name = _check_groups(groups), name
        self.subset_size, self.subsets, self.seed = subset_size, subsets, seed
        for state in ("features", "slots", "order"):
            self.add_state(state, [], dist_reduce_fx="cat")
        # Not states: every rank adds the same references. (A list state that is empty on some ranks
        # makes torchmetrics skip its gather there, and the ranks' collectives no longer match.)
        self.reference_features: list[Tensor] = []
        self.reference_slots: list[Tensor] = []

    def add_references(self, features: Tensor, slot: int) -> None:
        """Reference features (M, D) of one slot; under DDP every rank adds the same ones (they are not reduced)."""
        features = torch.as_tensor(features).detach().double()
        self.reference_features.append(features)
        self.reference_slots.append(torch.full((len(features),), slot, dtype=torch.long, device=features.device))

    def reset(self) -> None:
        """Forget the images and the references."""
        super().reset()
        self.reference_features, self.reference_slots = [], []

    def update(self, features: Tensor, group_ids: Tensor, order: Tensor) -> None:  # type: ignore[override]
        """Add (N, D) features of images of the groups ``group_ids`` (N,; -1 = none), ``order`` (N,) their global index."""
        slots = torch.as_tensor(group_ids).long()
        keep = slots >= 0
        self.features.append(torch.as_tensor(features).detach().double()[keep])  # type: ignore[attr-defined]
        self.slots.append(slots[keep].to(features.device))  # type: ignore[attr-defined]
        self.order.append(torch.as_tensor(order).long()[keep].to(features.device))  # type: ignore[attr-defined]

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Per-slot KID, their mean and the gap."""
        from torchmetrics.image.kid import poly_mmd
        from torchmetrics.utilities import dim_zero_cat

        def cat(state: Any) -> Tensor:
            return dim_zero_cat(state) if (isinstance(state, Tensor) or state) else torch.zeros(0)

        features, slots, order = cat(self.features), cat(self.slots), cat(self.order)
        references = cat(self.reference_features).to(features.device)
        reference_slots = cat(self.reference_slots).to(features.device)
        if len(order):
            ranking = order.argsort()
            features, slots = features[ranking], slots[ranking]
        generator = torch.Generator().manual_seed(self.seed)
        values = torch.full((len(self.groups),), float("nan"), dtype=torch.float64)
        for index in range(len(self.groups)):
            fake, real = features[slots == index], references[reference_slots == index]
            size = min(self.subset_size, len(fake), len(real))
            if size < 2:
                continue
            scores = [
                poly_mmd(real[torch.randperm(len(real), generator=generator)[:size]],
                         fake[torch.randperm(len(fake), generator=generator)[:size]])
                for _ in range(self.subsets)
            ]
            values[index] = torch.stack(scores).mean()
        present = values[~values.isnan()]
        out = {f"{self.name}/{group}": values[index] for index, group in enumerate(self.groups)}
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        out[f"{self.name}/all"] = present.mean() if len(present) else nan
        out[f"{self.name}/gap"] = present.max() - present.min() if len(present) else nan
        return out


class DistributionFairness(Metric):
    """For prompts that name no group: how far the predicted group frequencies are from uniform.

    Per prompt, with ``f`` the frequencies of the predicted (argmax) classes over ``K`` classes:

    * ``kl_to_uniform/<prompt>`` = KL(f || uniform) = sum_k f_k log(K f_k) (0 for a uniform split);
    * ``pairwise_gap/<prompt>`` = mean over pairs i < j of |f_i - f_j|;
    * ``low_confidence/<prompt>`` = share of images whose top probability is below ``low_confidence``.

    ``<name>/mean`` averages each over the prompts that have images.

    Args:
        prompts: Names of the prompts (index = prompt id).
        num_classes: Number of classes (e.g. groups) the classifier predicts.
        low_confidence: Top-probability threshold of a low-confidence prediction.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    class_counts: Tensor
    low: Tensor
    totals: Tensor

    def __init__(self, prompts: Sequence[str], num_classes: int, low_confidence: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompts = tuple(prompts)
        if not self.prompts or len(set(self.prompts)) != len(self.prompts) or "mean" in self.prompts:
            raise ValueError(f"prompts must be distinct names other than 'mean', got {self.prompts}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= low_confidence <= 1.0:
            raise ValueError(f"low_confidence must be in [0, 1], got {low_confidence}")
        self.num_classes, self.low_confidence = num_classes, low_confidence
        size = len(self.prompts)
        self.add_state("class_counts", torch.zeros(size, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("low", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("totals", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probabilities: Tensor, prompt_ids: Tensor, valid: Tensor | None = None) -> None:  # type: ignore[override]
        """Add (N, num_classes) probabilities of images of the prompts ``prompt_ids`` (N,)."""
        if probabilities.ndim != 2 or probabilities.shape[1] != self.num_classes:
            raise ValueError(f"expected probabilities (N, {self.num_classes}), got {tuple(probabilities.shape)}")
        device = self.totals.device
        prompt_ids = torch.as_tensor(prompt_ids, device=device).long()
        if prompt_ids.shape != probabilities.shape[:1] or bool(((prompt_ids < 0) | (prompt_ids >= len(self.prompts))).any()):
            raise ValueError(f"prompt_ids must be (N,) values in [0, {len(self.prompts) - 1}], got {prompt_ids.tolist()}")
        keep = _mask(valid, len(prompt_ids), device)
        probabilities, prompt_ids = probabilities.detach().to(device)[keep], prompt_ids[keep]
        top, predicted = probabilities.max(-1)
        flat = prompt_ids * self.num_classes + predicted
        self.class_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.totals.index_add_(0, prompt_ids, torch.ones_like(prompt_ids))
        self.low.index_add_(0, prompt_ids, (top < self.low_confidence).long())

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """KL to uniform, mean pairwise gap and low-confidence share per prompt, and their means."""
        totals = self.totals.double()
        frequencies = self.class_counts.double() / totals.clamp(min=1)[:, None]
        kl = torch.where(frequencies > 0, frequencies * torch.log(frequencies * self.num_classes), 0.0).sum(-1)
        pairs = torch.triu_indices(self.num_classes, self.num_classes, offset=1, device=frequencies.device)
        gap = (frequencies[:, pairs[0]] - frequencies[:, pairs[1]]).abs().mean(-1)
        low = self.low.double() / totals.clamp(min=1)
        present = self.totals > 0
        out: dict[str, Tensor] = {}
        for name, values in (("kl_to_uniform", kl), ("pairwise_gap", gap), ("low_confidence", low)):
            values = torch.where(present, values, torch.full_like(values, float("nan")))
            out.update({f"{name}/{prompt}": values[index] for index, prompt in enumerate(self.prompts)})
            out[f"{name}/mean"] = values[present].mean() if bool(present.any()) else torch.tensor(float("nan"))
        return out


class PromptFidelity(CLIPScore):
    """CLIP score (``100 * cosine(image, prompt)``, floored at 0 as in torchmetrics) per group and pooled.

    A ``torchmetrics`` ``CLIPScore`` whose embeddings come from :class:`rsc.classifiers.clip.CLIPEncoder`:
    torchmetrics 1.9 calls ``.norm`` on what ``get_image_features`` returns, which transformers 5 made a
    ``BaseModelOutputWithPooling`` (torchmetrics issue 3407, fixed upstream after 1.9). ``clip_score/all``
    is the parent's ``score / n_samples``; per-group sums and counts are extra "sum" states.

    Args:
        model: Local CLIP folder or Hub id, or a loaded encoder.
        groups: Group names.
    """

    group_sums: Tensor
    group_counts: Tensor

    def __init__(self, model: str | os.PathLike[str] | CLIPEncoder, groups: Sequence[str], **kwargs: Any) -> None:
        encoder = model if isinstance(model, CLIPEncoder) else CLIPEncoder(model)
        # The parent keeps (model, processor) for its own update, which this class replaces.
        loader: Callable[[], tuple[Any, Any]] = lambda: (encoder.model, encoder.tokenizer)  # noqa: E731
        super().__init__(model_name_or_path=loader, **kwargs)
        self.encoder, self.groups = encoder, _check_groups(groups)
        _add_group_states(self, len(self.groups), "group_sums", "group_counts")

    def update(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor) -> None:  # type: ignore[override]
        """Add images (N, 3, H, W) in [0, 1] with the prompts they were sampled from."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        with torch.no_grad():
            image_features = self.encoder.encode_images(images.to(self.encoder.mean.device))
            text_features = self.encoder.encode_texts(list(prompts))
        scores = 100 * (image_features * text_features).sum(-1)
        self.score += scores.sum().to(self.score)
        self.n_samples += len(scores)
        _accumulate(self.group_sums, self.group_counts, scores, group_ids, None)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """``clip_score/<group>``, ``clip_score/all`` (the parent's value) and ``clip_score/gap``."""
        out = _summaries("clip_score", self.groups, self.group_sums, self.group_counts, floor=0.0)
        out["clip_score/all"] = super().compute()
        return out
