"""The toy world's attribute classifier behind the :class:`~rsc.classifiers.base.AttributeClassifier` interface."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from rsc.classifiers.base import STEREOTYPE_LABELS, AttributeClassifier
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.faces import GENDERS, GROUPS


class ToyClassifier(AttributeClassifier):
    """Group, gender and stereotype of toy faces (:class:`rsc.toy.classifier.ToyAttributeClassifier`).

    Attributes: ``group`` (:data:`rsc.toy.faces.GROUPS`), ``gender`` (:data:`rsc.toy.faces.GENDERS`),
    ``stereotype`` (:data:`STEREOTYPE_LABELS`).

    Args:
        path: Folder written by ``ToyAttributeClassifier.save_pretrained`` (e.g. ``rsc/toy/world/classifier``).
        model: An already loaded classifier instead of ``path``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, model: ToyAttributeClassifier | None = None) -> None:
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("ToyClassifier needs exactly one of `path` (a classifier folder) or `model`")
        self.model = model if model is not None else ToyAttributeClassifier.from_pretrained(path)  # type: ignore[arg-type]
        self.model.eval()

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """Toy groups, genders and the stereotype flag."""
        return {"group": GROUPS, "gender": GENDERS, "stereotype": STEREOTYPE_LABELS}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Probabilities per attribute; images are resized to the classifier's size if needed."""
        size = self.model.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        logits = self.model(images * 2 - 1)
        present = logits["stereotype"].sigmoid()
        return {
            "group": logits["group"].softmax(-1),
            "gender": logits["gender"].softmax(-1),
            "stereotype": torch.stack([1 - present, present], dim=-1),
        }
