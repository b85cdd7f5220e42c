"""Image conversions between the formats rsc meets, and labelled image grids.

Formats: ``uint8`` (N, H, W, 3) arrays (renders, datasets, PNGs); float
(N, 3, H, W) tensors in [-1, 1] (VAE/classifier inputs) or [0, 1] (sampler
outputs).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def uint8_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) images -> float (N, 3, H, W) tensor in [-1, 1]."""
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got dtype {array.dtype} shape {array.shape}")
    return torch.from_numpy(np.array(array, copy=True)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def unit_tensor_to_uint8(images: Tensor) -> np.ndarray:
    """float (N, 3, H, W) tensor in [0, 1] -> uint8 (N, H, W, 3) images (rounded, clamped)."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def resize_square(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) images resized to ``size`` x ``size`` (bilinear, antialiased); unchanged if already that size."""
    if images.shape[-2:] == (size, size):
        return images
    # Antialiasing keeps a downscaled large sample's statistics (blur, noise) close to a native-size one's.
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def labelled_grid(
    rows: Sequence[Tensor], labels: Sequence[str], padding: int = 2, label_width: int = 110, scale: int = 2
) -> Image.Image:
    """One row of images per entry of ``rows`` ((N, 3, H, W) in [0, 1]) with its label on the left.

    Rows may hold different numbers of images; images are upscaled ``scale``x
    (nearest) so small toy images stay legible.
    """
    if len(rows) != len(labels):
        raise ValueError(f"got {len(rows)} rows but {len(labels)} labels")
    if not rows:
        raise ValueError("no rows to draw")
    height, width = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    columns = max(len(row) for row in rows)
    canvas = Image.new(
        "RGB",
        (label_width + columns * (width + padding) + padding, len(rows) * (height + padding) + padding),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row_index, (row, label) in enumerate(zip(rows, labels)):
        top = padding + row_index * (height + padding)
        draw.text((4, top + height // 2 - 6), label, fill="black", font=font)
        for column, array in enumerate(unit_tensor_to_uint8(row)):
            tile = Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_width + padding + column * (width + padding), top))
    return canvas


def before_after_grid(
    uncorrected: Tensor, corrected: Tensor, sections: Iterable[tuple[str, Tensor]], per_section: int
) -> Image.Image | None:
    """Per section, its first ``per_section`` uncorrected images in a row above the same images corrected.

    ``uncorrected`` and ``corrected`` are (N, 3, H, W) in [0, 1], image ``i`` the same prompt and seed in
    both; each section is a name and an (N,) bool mask. Empty sections are left out; ``None`` when all are.
    """
    rows: list[Tensor] = []
    labels: list[str] = []
    for name, mask in sections:
        picks = torch.nonzero(torch.as_tensor(mask, dtype=torch.bool)).flatten()[:per_section]
        if len(picks):
            rows += [uncorrected[picks], corrected[picks]]
            labels += [f"{name} before", f"{name} after"]
    return labelled_grid(rows, labels) if rows else None
