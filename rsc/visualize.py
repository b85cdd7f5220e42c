"""Image grids with row labels (samples per prompt, uncorrected above corrected)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


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
        arrays = (row.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        for column, array in enumerate(arrays):
            tile = Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_width + padding + column * (width + padding), top))
    return canvas
