"""The toy world's judges behind rsc's interfaces.

* :class:`ToyClassifier`: the attribute classifier, an :class:`~rsc.classifiers.base.AttributeClassifier`;
* :class:`ToyFacialQuality`: the facial-quality judge, an :class:`~rsc.classifiers.base.AestheticPredictor`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rsc.classifiers.base import STEREOTYPE_LABELS, AestheticPredictor, AttributeClassifier
from rsc.images import resize_square
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.faces import GENDERS, GROUPS
from rsc.toy.quality import ToyQualityJudge


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
        logits = self.model(resize_square(images, self.model.config.image_size) * 2 - 1)
        present = logits["stereotype"].sigmoid()
        return {
            "group": logits["group"].softmax(-1),
            "gender": logits["gender"].softmax(-1),
            "stereotype": torch.stack([1 - present, present], dim=-1),
        }


class ToyFacialQuality(AestheticPredictor):
    """Facial quality of toy faces, 0 (unusable) to 10 (a clean render) (:class:`rsc.toy.quality.ToyQualityJudge`).

    The toy stand-in for :class:`~rsc.classifiers.aesthetic.LaionAestheticPredictor` in
    ``FairnessValidation(aesthetic=...)``. Frozen: eval mode, no gradients.

    Args:
        path: Folder written by ``ToyQualityJudge.save_pretrained``.
        model: An already loaded judge instead of ``path``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, model: ToyQualityJudge | None = None) -> None:
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("ToyFacialQuality needs exactly one of `path` (a judge folder) or `model`")
        self.model = model if model is not None else ToyQualityJudge.from_pretrained(path)  # type: ignore[arg-type]
        self.model.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """Scores (N,) in [0, 10] for float images (N, 3, H, W) in [0, 1] of any size (resized to the judge's)."""
        return self.model(images)
