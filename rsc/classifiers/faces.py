"""Face handling with facenet-pytorch's MTCNN (its weights ship inside the package: nothing is downloaded).

:class:`MTCNNFaces` detects faces in a batch of images, keeps the largest
confident face of each image and crops a square around it with a margin, resized
to the classifier's input size. Images without a confident face are reported in
:attr:`FaceDetections.found` so metrics count them instead of dropping them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from rsc.classifiers.base import check_unit_images, module_device


@dataclass
class FaceDetections:
    """The largest confident face of each image of a batch.

    Attributes:
        found: (N,) bool, whether a face at least ``min_confidence`` was found.
        confidence: (N,) MTCNN probability of the kept face; 0 where none was found.
        boxes: (N, 4) ``x0, y0, x1, y1`` in pixels of the kept face; NaN where none was found.
    """

    found: Tensor
    confidence: Tensor
    boxes: Tensor


class MTCNNFaces(nn.Module):
    """Detect, keep the largest face, crop with a margin.

    Args:
        min_confidence: A detection counts as a face from this MTCNN probability on.
        min_face_size: Smallest face side MTCNN searches for, in pixels.
        margin: The square crop's side is the face box's larger side times ``1 + 2 * margin``.
        crop_size: Side of the returned crops.
    """

    def __init__(
        self, min_confidence: float = 0.9, min_face_size: int = 20, margin: float = 0.2, crop_size: int = 224
    ) -> None:
        super().__init__()
        from facenet_pytorch import MTCNN

        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if margin < 0 or crop_size < 1:
            raise ValueError(f"margin must be >= 0 and crop_size >= 1, got {margin} and {crop_size}")
        self.min_confidence, self.margin, self.crop_size = min_confidence, margin, crop_size
        # select_largest orders each image's boxes largest first; keep_all returns them all, so the
        # largest *confident* one can be chosen here rather than MTCNN's single pick.
        self.mtcnn = MTCNN(keep_all=True, select_largest=True, min_face_size=min_face_size)

    @torch.no_grad()
    def detect(self, images: Tensor) -> FaceDetections:
        """Find the largest confident face of every image (float (N, 3, H, W) in [0, 1], equal sizes)."""
        check_unit_images(images)
        device = module_device(self.mtcnn)
        self.mtcnn.device = device  # MTCNN reads its device from this attribute, which .to() does not update
        pixels = (images.detach().clamp(0, 1) * 255).round().permute(0, 2, 3, 1).to(device)
        batch_boxes, batch_probs = self.mtcnn.detect(pixels)
        n = len(images)
        found = torch.zeros(n, dtype=torch.bool)
        confidence = torch.zeros(n, dtype=torch.float32)
        boxes = torch.full((n, 4), float("nan"), dtype=torch.float32)
        for index, (image_boxes, image_probs) in enumerate(zip(batch_boxes, batch_probs)):
            if image_boxes is None:
                continue
            probs = np.asarray(image_probs, dtype=np.float64).reshape(-1)
            confident = np.flatnonzero(probs >= self.min_confidence)
            if len(confident):
                first = int(confident[0])  # boxes come largest first
                found[index] = True
                confidence[index] = float(probs[first])
                boxes[index] = torch.as_tensor(np.asarray(image_boxes[first], dtype=np.float32))
        return FaceDetections(found=found, confidence=confidence, boxes=boxes)

    def crop_boxes(self, detections: FaceDetections, height: int, width: int) -> Tensor:
        """Square crop windows (N, 4) around the kept faces, shifted inside the image; the whole image where none."""
        boxes = detections.boxes.clone()
        whole = torch.tensor([0.0, 0.0, float(width), float(height)])
        boxes[~detections.found] = whole
        side = (boxes[:, 2:] - boxes[:, :2]).amax(-1) * (1 + 2 * self.margin)
        side = torch.where(detections.found, side.clamp(max=min(height, width)), side)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        low = centre - side[:, None] / 2
        limit = torch.tensor([float(width), float(height)]) - side[:, None]
        low = torch.minimum(low.clamp(min=0), limit.clamp(min=0))
        crops = torch.cat([low, low + side[:, None]], dim=-1)
        crops[~detections.found] = whole
        return crops

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
