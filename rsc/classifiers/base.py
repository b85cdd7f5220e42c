"""The attribute-classifier interface (images -> per-attribute class probabilities) and the aesthetic-score one.

Every classifier reads float images ``(N, 3, H, W)`` in ``[0, 1]`` (what
:func:`rsc.sampling.sample` returns), of any size (implementations resize), and
returns, per attribute it knows, an ``(N, K)`` tensor of probabilities over that
attribute's labels (:attr:`AttributeClassifier.labels`). Binary attributes such as
the stereotype have two labels, :data:`STEREOTYPE_LABELS`.

An :class:`AestheticPredictor` reads the same images and returns one score per
image (LAION's aesthetic predictor, the toy facial-quality judge).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Labels of a binary stereotype attribute; column 1 is the probability that the stereotype is present.
STEREOTYPE_LABELS: tuple[str, str] = ("absent", "present")


def check_unit_images(images: Tensor) -> None:
    """Raise ValueError unless ``images`` is a float (N, 3, H, W) batch."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"expected float images of shape (N, 3, H, W) in [0, 1], got dtype {images.dtype} shape {tuple(images.shape)}"
        )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _enter_eval(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a judge: switch to eval mode if something (a constructor, a parent) left it training."""
    if module.training:
        module.train(False)


class FrozenJudge(nn.Module):
    """A module that judges images and never trains: it stays in eval mode, whatever is asked.

    Judges wrap networks with batch norm and dropout. In train mode a batch norm layer normalises
    with the statistics of the batch at hand and folds them into its running statistics, so every
    later judgement would depend on what was judged before (e.g. corrected images judged by a
    classifier whose statistics the uncorrected ones had moved). Like :class:`rsc.backbone.FrozenLDM`,
    ``train(True)`` is ignored, and a forward pass first leaves train mode if a constructor left it on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_enter_eval)

    def train(self, mode: bool = True) -> FrozenJudge:
        """Stay in eval mode whatever is asked (batch norm keeps its running statistics, no dropout)."""
        return super().train(False)


class AttributeClassifier(FrozenJudge, ABC):
    """Images in ``[0, 1]`` -> ``{attribute: (N, K) probabilities}`` over :attr:`labels`."""

    @property
    @abstractmethod
    def labels(self) -> dict[str, tuple[str, ...]]:
        """The label names of every attribute, in column order."""

    @abstractmethod
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Probabilities per attribute for float images (N, 3, H, W) in [0, 1]."""

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
        """:meth:`forward` (in eval mode, as always: :class:`FrozenJudge`) without gradients, in batches, on the
        classifier's device."""
        check_unit_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = module_device(self)
        parts = [self(images[start : start + batch_size].to(device)) for start in range(0, len(images), batch_size)]
        return {name: torch.cat([part[name] for part in parts]) for name in self.labels}

    def label_index(self, attribute: str, label: str) -> int:
        """Column of ``label`` in ``attribute``'s probabilities, with an error naming the known labels."""
        if attribute not in self.labels:
            raise ValueError(f"{type(self).__name__} has no attribute {attribute!r}; it knows {sorted(self.labels)}")
        names = self.labels[attribute]
        if label not in names:
            raise ValueError(f"{type(self).__name__}: {label!r} is not a {attribute} label; expected one of {names}")
        return names.index(label)


class AestheticPredictor(FrozenJudge, ABC):
    """Images in ``[0, 1]`` -> one quality / aesthetic score per image, higher is better.

    A base class rather than a Protocol because LightningCLI (jsonargparse) resolves a
    ``class_path`` against the annotated type by subclassing.
    """

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """Scores ``(N,)`` for float images (N, 3, H, W) in [0, 1]."""


class CombinedClassifier(AttributeClassifier):
    """Several classifiers read as one, e.g. FairFace for race and gender plus a user's stereotype classifier.

    Args:
        classifiers: Classifiers with pairwise disjoint attribute names.
    """

    def __init__(self, classifiers: Sequence[AttributeClassifier]) -> None:
        super().__init__()
        if not classifiers:
            raise ValueError("CombinedClassifier needs at least one classifier")
        seen: dict[str, str] = {}
        for classifier in classifiers:
            for attribute in classifier.labels:
                if attribute in seen:
                    raise ValueError(
                        f"attribute {attribute!r} is given by both {seen[attribute]} and {type(classifier).__name__}"
                    )
                seen[attribute] = type(classifier).__name__
        self.classifiers = nn.ModuleList(classifiers)

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """The union of the parts' labels."""
        return {name: names for classifier in self.classifiers for name, names in classifier.labels.items()}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Every part's probabilities."""
        return {name: value for classifier in self.classifiers for name, value in classifier(images).items()}
