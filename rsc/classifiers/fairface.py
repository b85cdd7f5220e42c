"""A FairFace-style ResNet-34 (7 race / 2 gender / 9 age outputs) loaded from a local weights file.

The FairFace project (Kärkkäinen and Joo, "FairFace: Face Attribute Dataset for
Balanced Race, Gender, and Age", https://github.com/joojs/fairface) publishes
ResNet-34 classifiers trained on aligned face crops:
``res34_fair_align_multi_7_20190809.pt`` (7 race groups) and
``res34_fair_align_multi_4_20190809.pt`` (4 race groups). Both are torchvision
``resnet34`` state dicts with an 18-way final layer: logits ``[0:7]`` race (the
4-group model uses ``[0:4]``), ``[7:9]`` gender, ``[9:18]`` age. Download them from
the links in that repository's README (Google Drive) and pass the local path;
rsc never downloads them. A ``.safetensors`` copy of the same state dict works too.

FairFace was trained on dlib-aligned crops; feed it face crops (see
:class:`rsc.classifiers.faces.MTCNNFaces`), not whole images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from rsc.classifiers.base import AttributeClassifier
from rsc.classifiers.weights import load_into, load_state_dict_file

#: The 7-group model's race labels, in output order.
FAIRFACE_RACES_7: tuple[str, ...] = (
    "White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern",
)
#: The 4-group model's race labels, in output order.
FAIRFACE_RACES_4: tuple[str, ...] = ("White", "Black", "Asian", "Indian")
FAIRFACE_GENDERS: tuple[str, ...] = ("Male", "Female")
FAIRFACE_AGES: tuple[str, ...] = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
FAIRFACE_OUTPUTS = 18
_GENDER_SLICE, _AGE_SLICE = slice(7, 9), slice(9, 18)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FairFaceClassifier(AttributeClassifier):
    """Race, gender and age from face crops with FairFace's ResNet-34.

    Attributes: ``race``, ``gender`` (:data:`FAIRFACE_GENDERS`), ``age`` (:data:`FAIRFACE_AGES`).

    Args:
        weights: Local ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` state dict.
        race_labels: :data:`FAIRFACE_RACES_7` for the 7-group model, :data:`FAIRFACE_RACES_4` for the 4-group one.
        image_size: Input side; FairFace uses 224.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str],
        race_labels: Sequence[str] = FAIRFACE_RACES_7,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        if not 2 <= len(race_labels) <= 7:
            raise ValueError(f"race_labels must name the 2-7 race outputs (logits 0..6), got {len(race_labels)}")
        self.race_labels = tuple(race_labels)
        self.image_size = image_size
        self.network = torchvision.models.resnet34(weights=None, num_classes=FAIRFACE_OUTPUTS)
        load_into(self.network, load_state_dict_file(weights, "FairFace weights"), weights, "FairFace weights")
        self.network.eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """FairFace's race, gender and age labels."""
        return {"race": self.race_labels, "gender": FAIRFACE_GENDERS, "age": FAIRFACE_AGES}

    def logits(self, images: Tensor) -> Tensor:
        """The network's 18 raw outputs for images in [0, 1] (resized to ``image_size``, ImageNet-normalised)."""
        size = (self.image_size, self.image_size)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.network((images - self.mean) / self.std)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Softmax over each output block."""
        logits = self.logits(images)
        return {
            "race": logits[:, : len(self.race_labels)].softmax(-1),
            "gender": logits[:, _GENDER_SLICE].softmax(-1),
            "age": logits[:, _AGE_SLICE].softmax(-1),
        }
