"""Faces with facenet-pytorch's MTCNN (its weights ship inside the package: nothing is downloaded).

One wrapper and one rule for every face rsc looks at, so training data is
cropped the way evaluation crops:

* :class:`MTCNNFaceDetector` is the one MTCNN wrapper: every face's box and
  probability, for a PIL image (the dataset builder) or a batch of tensors
  (the metrics).
* :class:`FacePolicy` is the one rule: a face counts from ``min_confidence``
  on; of the counted faces the largest is kept; its crop is a square of the
  box's larger side times ``1 + 2 * margin`` around the box's centre, shifted
  inside the image (and no larger than it).
* :class:`MTCNNFaces` detects, applies the rule and crops a batch of tensors
  for the metrics; images without a counted face are reported in
  :attr:`FaceDetections.found` so metrics count them instead of dropping them.
  ``rsc.datamodules.builder.FaceFilter`` applies the same rule to PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import roi_align

from rsc.classifiers.base import check_unit_images, module_device


@dataclass(frozen=True)
class FacePolicy:
    """Which detections count as faces, which one is kept, and the crop window around it.

    Attributes:
        min_confidence: A detection counts as a face from this MTCNN probability on.
        margin: The square crop's side is the kept box's larger side times ``1 + 2 * margin``.
    """

    min_confidence: float = 0.9
    margin: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def choose(self, boxes: np.ndarray, probs: np.ndarray) -> tuple[int, int | None]:
        """The number of counted faces among detections (K, 4) / (K,), and the index of the largest (``None``: none)."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        confident = np.flatnonzero(probs >= self.min_confidence)
        if not len(confident):
            return 0, None
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[confident]
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return len(confident), int(confident[int(np.argmax(areas))])  # ties: the first, as MTCNN orders them

    def windows(self, boxes: Tensor, found: Tensor, height: int, width: int) -> Tensor:
        """Square crop windows (N, 4) ``x0, y0, x1, y1`` around ``boxes`` (N, 4); the whole image where not ``found``."""
        boxes = boxes.clone().float()
        whole = torch.tensor([0.0, 0.0, float(width), float(height)])
        boxes[~found] = whole
        side = (boxes[:, 2:] - boxes[:, :2]).amax(-1) * (1 + 2 * self.margin)
        side = torch.where(found, side.clamp(max=min(height, width)), side)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        low = centre - side[:, None] / 2
        limit = torch.tensor([float(width), float(height)]) - side[:, None]
        low = torch.minimum(low.clamp(min=0), limit.clamp(min=0))
        crops = torch.cat([low, low + side[:, None]], dim=-1)
        crops[~found] = whole
        return crops

    def crop_image(self, image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
        """The crop window around ``box`` cut out of a PIL image, on whole pixels."""
        x0, y0, x1, _ = self.windows(torch.tensor([box]), torch.tensor([True]), image.height, image.width)[0].tolist()
        left, top, side = int(round(x0)), int(round(y0)), int(round(x1 - x0))
        return image.crop((left, top, left + side, top + side))


class MTCNNFaceDetector(nn.Module):
    """facenet-pytorch's MTCNN: every face's box (``x0, y0, x1, y1`` pixels) and probability, largest first.

    Args:
        device: Torch device of the three MTCNN nets (``.to()`` moves them too).
        min_face_size: Smallest face side MTCNN searches for, in pixels.
    """

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20) -> None:
        super().__init__()
        from facenet_pytorch import MTCNN

        # keep_all returns every face and select_largest orders them largest first, so the
        # policy, not MTCNN's single pick, decides which face is kept.
        self.mtcnn = MTCNN(keep_all=True, select_largest=True, min_face_size=min_face_size, device=device)

    @torch.no_grad()
    def detect_batch(self, pixels: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Boxes (K, 4) and probabilities (K,) per image of ``pixels`` (N, H, W, 3), values in [0, 255]."""
        device = module_device(self.mtcnn)
        self.mtcnn.device = device  # MTCNN reads its device from this attribute, which .to() does not update
        batch_boxes, batch_probs = self.mtcnn.detect(pixels.to(device))
        return [_as_arrays(boxes, probs) for boxes, probs in zip(batch_boxes, batch_probs)]

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 4) and probabilities (K,) of the faces in a PIL image (K = 0 when there are none)."""
        self.mtcnn.device = module_device(self.mtcnn)
        boxes, probs = self.mtcnn.detect(image.convert("RGB"))
        return _as_arrays(boxes, probs)


def _as_arrays(boxes: np.ndarray | None, probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(probs, dtype=np.float32).reshape(-1)


@dataclass
class FaceDetections:
    """The kept face of each image of a batch.

    Attributes:
        found: (N,) bool, whether a face at least ``min_confidence`` was found.
        confidence: (N,) MTCNN probability of the kept face; 0 where none was found.
        boxes: (N, 4) ``x0, y0, x1, y1`` in pixels of the kept face; NaN where none was found.
    """

    found: Tensor
    confidence: Tensor
    boxes: Tensor


class MTCNNFaces(nn.Module):
    """Detect, keep a face by :class:`FacePolicy`, crop with its margin: face crops for the metrics.

    Args:
        min_confidence: A detection counts as a face from this MTCNN probability on.
        min_face_size: Smallest face side MTCNN searches for, in pixels.
        margin: The square crop's side is the face box's larger side times ``1 + 2 * margin``.
        crop_size: Side of the returned crops.
    """

    def __init__(
        self,
        min_confidence: float = FacePolicy.min_confidence,
        min_face_size: int = 20,
        margin: float = FacePolicy.margin,
        crop_size: int = 224,
    ) -> None:
        super().__init__()
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        self.policy = FacePolicy(min_confidence, margin)
        self.crop_size = crop_size
        self.detector = MTCNNFaceDetector(min_face_size=min_face_size)

    def detect(self, images: Tensor) -> FaceDetections:
        """Find the kept face of every image (float (N, 3, H, W) in [0, 1], equal sizes)."""
        check_unit_images(images)
        pixels = (images.detach().clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
        n = len(images)
        found = torch.zeros(n, dtype=torch.bool)
        confidence = torch.zeros(n, dtype=torch.float32)
        boxes = torch.full((n, 4), float("nan"), dtype=torch.float32)
        for index, (image_boxes, image_probs) in enumerate(self.detector.detect_batch(pixels)):
            _, kept = self.policy.choose(image_boxes, image_probs)
            if kept is not None:
                found[index] = True
                confidence[index] = float(image_probs[kept])
                boxes[index] = torch.from_numpy(image_boxes[kept])
        return FaceDetections(found=found, confidence=confidence, boxes=boxes)

    def crop_boxes(self, detections: FaceDetections, height: int, width: int) -> Tensor:
        """Square crop windows (N, 4) around the kept faces (:meth:`FacePolicy.windows`)."""
        return self.policy.windows(detections.boxes, detections.found, height, width)

    def crop(self, images: Tensor, detections: FaceDetections) -> Tensor:
        """Face crops (N, 3, crop_size, crop_size); images without a face are resized whole."""
        check_unit_images(images)
        windows = self.crop_boxes(detections, images.shape[-2], images.shape[-1]).to(images)
        rois = torch.cat([torch.arange(len(images), dtype=images.dtype, device=images.device)[:, None], windows], dim=1)
        # roi_align samples bilinearly with several points per output pixel: a crop and an antialiased resize in one.
        return roi_align(images, rois, output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def forward(self, images: Tensor) -> tuple[Tensor, FaceDetections]:
        """Crops and detections of a batch."""
        detections = self.detect(images)
        return self.crop(images, detections), detections
