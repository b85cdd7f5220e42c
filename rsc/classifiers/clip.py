"""CLIP from a local folder or the Hub: normalised image/text embeddings and zero-shot attribute classification.

transformers 5 changed ``CLIPModel.get_image_features`` / ``get_text_features``
to return a ``BaseModelOutputWithPooling`` (the projected embedding is its
``pooler_output``) instead of a tensor. :class:`CLIPEncoder` accepts both, so the
same code runs with transformers 4 and 5; torchmetrics 1.9's ``CLIPScore`` does not
(``'BaseModelOutputWithPooling' object has no attribute 'norm'``, torchmetrics
issue 3407, fixed upstream after 1.9), which is why
:class:`rsc.callbacks.metrics.PromptFidelity` embeds through this class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsc.classifiers.base import AttributeClassifier, check_unit_images


def _embedding(output: Tensor | object) -> Tensor:
    # transformers < 5 returns the projected embedding itself; 5 wraps it as pooler_output.
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, Tensor):
        raise TypeError(f"CLIP feature call returned {type(output).__name__} without a pooler_output tensor")
    return pooled


class CLIPEncoder(nn.Module):
    """A frozen CLIP model with its image preprocessing done in torch, on the model's device.

    Images are resized (bicubic, antialiased) so the shorter side is the processor's
    ``shortest_edge``, centre-cropped to its ``crop_size`` and normalised with its mean/std,
    as ``CLIPImageProcessor`` does, but batched on tensors.

    Args:
        model: A local folder written by ``save_pretrained`` (model, image processor, tokenizer)
            or a Hub id (resolved from the cache when ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, model: str | os.PathLike[str]) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.source = str(model)
        try:
            self.model = CLIPModel.from_pretrained(self.source)
            processor = CLIPImageProcessor.from_pretrained(self.source)
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        except OSError as error:
            raise OSError(
                f"cannot load CLIP {self.source!r}: expected a local folder with the model, image processor and "
                f"tokenizer (save_pretrained) or a Hub id in the local cache when offline ({error})"
            ) from error
        self.model.eval().requires_grad_(False)
        size = processor.size
        self.resize_to = int(size["shortest_edge"] if size.get("shortest_edge") else min(size["height"], size["width"]))
        crop = processor.crop_size if processor.do_center_crop else {"height": self.resize_to, "width": self.resize_to}
        self.crop_to = (int(crop["height"]), int(crop["width"]))
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def num_features(self) -> int:
        """Embedding width (read by torchmetrics' FID/KID when this encoder is their feature extractor)."""
        return int(self.model.config.projection_dim)

    def pixel_values(self, images: Tensor) -> Tensor:
        """CLIP's input for float images (N, 3, H, W) in [0, 1]."""
        check_unit_images(images)
        height, width = images.shape[-2:]
        scale = self.resize_to / min(height, width)
        resized = (max(self.crop_to[0], round(height * scale)), max(self.crop_to[1], round(width * scale)))
        if resized != (height, width):
            images = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (resized[0] - self.crop_to[0]) // 2, (resized[1] - self.crop_to[1]) // 2
        images = images[..., top : top + self.crop_to[0], left : left + self.crop_to[1]]
        return (images - self.mean) / self.std

    def encode_images(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Projected float32 image embeddings (N, D), L2-normalised unless ``normalize=False``."""
        pixels = self.pixel_values(images.to(self.mean)).to(self.model.dtype)
        features = _embedding(self.model.get_image_features(pixel_values=pixels)).float()  # float32 for fp16 models too
        return F.normalize(features, dim=-1) if normalize else features

    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        """Projected float32 text embeddings (N, D), L2-normalised unless ``normalize=False``; long texts are truncated."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.mean.device)
        features = _embedding(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        ).float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Tensor) -> Tensor:
        """Normalised image embeddings (so the encoder can serve as FID/KID's feature extractor)."""
        return self.encode_images(images)


class CLIPZeroShotClassifier(AttributeClassifier):
    """Zero-shot attribute classification with CLIP over user-given class prompts.

    For each attribute, each label's prompts are embedded and averaged (then
    re-normalised); an image's probabilities are the softmax of
    ``logit_scale * cosine(image, label)`` over that attribute's labels.

    Args:
        model: Local CLIP folder or Hub id, or a loaded :class:`CLIPEncoder`.
        classes: ``{attribute: {label: prompt or [prompts]}}``, e.g.
            ``{"gender": {"woman": "a photo of a woman", "man": ["a photo of a man", "a man"]}}``.
        logit_scale: Softmax temperature; default: the model's learned ``logit_scale.exp()``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | CLIPEncoder,
        classes: dict[str, dict[str, str | list[str]]],
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("CLIPZeroShotClassifier needs at least one attribute in `classes`")
        self.encoder = model if isinstance(model, CLIPEncoder) else CLIPEncoder(model)
        self._labels: dict[str, tuple[str, ...]] = {}
        for index, (attribute, prompts) in enumerate(classes.items()):
            if len(prompts) < 2:
                raise ValueError(f"classes[{attribute!r}] must name at least two labels, got {list(prompts)}")
            rows = []
            for label, texts in prompts.items():
                texts = [texts] if isinstance(texts, str) else list(texts)
                if not texts or not all(isinstance(t, str) and t for t in texts):
                    raise ValueError(f"classes[{attribute!r}][{label!r}] must be a prompt or a list of prompts")
                with torch.no_grad():
                    rows.append(F.normalize(self.encoder.encode_texts(texts).mean(0), dim=-1))
            self._labels[attribute] = tuple(prompts)
            self.register_buffer(f"_text_{index}", torch.stack(rows), persistent=False)
        scale = self.encoder.model.logit_scale.exp().item() if logit_scale is None else logit_scale
        self.logit_scale = float(scale)

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """The attributes and labels given as ``classes``."""
        return dict(self._labels)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Softmax over each attribute's labels of the scaled cosine similarities."""
        embeddings = self.encoder.encode_images(images)
        return {
            attribute: (self.logit_scale * embeddings @ getattr(self, f"_text_{index}").T).softmax(-1)
            for index, attribute in enumerate(self._labels)
        }
