"""Graded degradations of toy faces that are not the stereotype, and the quality score they leave.

The training material of the toy facial-quality judge (:mod:`rsc.toy.quality`). Each kind
(:data:`KINDS`) has a severity in ``[0, 1]`` (0: untouched, 1: the face is no longer usable):

- ``erase``: facial features (brows, eyes, nose, mouth) fade into the skin;
- ``smear``: facial features blurred in place (the rest of the face stays sharp);
- ``mix``: a ghost of another face blended in (up to 50 / 50);
- ``washout``: colour drained towards a light grey (saturation and contrast lost);
- ``blur``: Gaussian blur (sigma up to 3 px at 64 px);
- ``blocky``: downsampled and upsampled with nearest neighbours (blocks up to 8 px);
- ``noise``: additive Gaussian noise (std up to 0.25).

Images are float ``(N, 3, H, W)`` in ``[0, 1]`` throughout (what the sampler
returns). Degradation parameters are in pixels of a 64 px image and scale with
the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rsc.toy.classifier import _gaussian_blur

__all__ = ["KINDS", "MAX_SCORE", "apply_degradations", "check_images", "degrade", "quality_target", "random_severities"]

#: Degradation kinds, in the order :func:`apply_degradations` applies them: the ones that need the
#: featureless render first (they compare the image with it), sensor-like ones (blur, blocks, noise) last.
KINDS: tuple[str, ...] = ("erase", "smear", "mix", "washout", "blur", "blocky", "noise")
#: Score of an undegraded face.
MAX_SCORE = 10.0

_BLUR_SIGMA = 3.0  # px at 64 px, severity 1
_SMEAR_SIGMA = 4.0  # px at 64 px, severity 1
_NOISE_STD = 0.25
_MIX_WEIGHT = 0.5  # other face's weight at severity 1: a full double exposure
_WASH_DESATURATE, _WASH_GREY, _WASH_LEVEL = 0.9, 0.6, 0.85
_BLOCK = 7.0  # extra block size in px at 64 px, severity 1 (blocks of 8 px)
_FEATURE_THRESHOLD = 0.03  # |render - featureless render| above which a pixel belongs to a feature


def check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        got = f"dtype {images.dtype} shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be float images of shape (N, 3, H, W) in [0, 1], got {got}")


def _severity_vector(severity: float | Tensor, n: int, kind: str) -> Tensor:
    s = torch.as_tensor(severity, dtype=torch.float32).flatten()
    if s.numel() not in (1, n):
        raise ValueError(f"severity of {kind!r} must be a number or one value per image ({n}), got {s.numel()} values")
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise ValueError(f"severity of {kind!r} must lie in [0, 1], got {s[(s < 0) | (s > 1) | s.isnan()][:4].tolist()}")
    return s.expand(n)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    radius = max(1, math.ceil(3 * float(sigma.max())))
    return _gaussian_blur(x, sigma, radius=min(radius, x.shape[-1] - 1, x.shape[-2] - 1))


def _feature_mask(x: Tensor, featureless: Tensor, px: float) -> Tensor:
    """Soft (N, 1, H, W) mask of the facial features: where the render differs from its featureless twin, grown ~2 px."""
    mask = ((x - featureless).abs().amax(1, keepdim=True) > _FEATURE_THRESHOLD).to(x.dtype)
    k = 2 * max(1, round(2 * px)) + 1
    mask = F.max_pool2d(mask, k, stride=1, padding=k // 2)
    return _blur(mask, torch.full((len(x),), px, dtype=x.dtype)).clamp(0, 1)


@dataclass
class _Context:
    """What some degradations need besides the image: noise source, featureless twins, other faces."""

    generator: torch.Generator
    featureless: Tensor | None
    others: Tensor | None
    px: float  # pixels per pixel of a 64 px image

    def need(self, field: str, kind: str, x: Tensor) -> Tensor:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"degradation {kind!r} needs `{field}` (images of shape {tuple(x.shape)})")
        if value.shape != x.shape:
            raise ValueError(f"`{field}` for {kind!r} must have the images' shape {tuple(x.shape)}, got {tuple(value.shape)}")
        return value.to(x)


def _erase(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    return torch.lerp(x, c.need("featureless", "erase", x), s)


def _smear(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    mask = _feature_mask(x, c.need("featureless", "smear", x), c.px)
    return torch.lerp(x, _blur(x, _SMEAR_SIGMA * c.px * s.flatten()), mask * s)


def _mix(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    return torch.lerp(x, c.need("others", "mix", x), _MIX_WEIGHT * s)


def _washout(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    luminance = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    grey = torch.lerp(x, luminance.expand_as(x), _WASH_DESATURATE * s)
    return torch.lerp(grey, torch.full_like(grey, _WASH_LEVEL), _WASH_GREY * s)


def _gauss(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    return _blur(x, _BLUR_SIGMA * c.px * s.flatten())


def _blocky(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    h, w = x.shape[-2:]
    small = [max(1, round(h / (1 + _BLOCK * float(v)))) for v in s.flatten()]
    out = x.clone()
    for size in set(small):  # one resize per block size; images with the same size go together
        idx = torch.tensor([i for i, k in enumerate(small) if k == size])
        down = F.interpolate(x[idx], size=(size, round(size * w / h) or 1), mode="area")
        out[idx] = F.interpolate(down, size=(h, w), mode="nearest")
    return out


def _noise(x: Tensor, s: Tensor, c: _Context) -> Tensor:
    # Drawn for every image whatever its severity, so the draws do not depend on the severities.
    return x + _NOISE_STD * s * torch.randn(x.shape, generator=c.generator).to(x)


_DEGRADATIONS: dict[str, Callable[[Tensor, Tensor, _Context], Tensor]] = {
    "erase": _erase, "smear": _smear, "mix": _mix, "washout": _washout, "blur": _gauss, "blocky": _blocky,
    "noise": _noise,
}


def degrade(
    images: Tensor,
    kind: str,
    severity: float | Tensor,
    generator: torch.Generator | None = None,
    featureless: Tensor | None = None,
    others: Tensor | None = None,
) -> Tensor:
    """Degrade images by one kind of defect at a given severity.

    Severity 0 returns the images unchanged (bit for bit); the result is
    clamped to ``[0, 1]``.

    Args:
        images: Float images ``(N, 3, H, W)`` in ``[0, 1]``.
        kind: One of :data:`KINDS`.
        severity: In ``[0, 1]``, one number or one per image.
        generator: CPU generator of the noise (``noise`` only); ``None``: a
            generator seeded with 0, so the result is deterministic either way.
        featureless: ``erase`` and ``smear``: the same renders drawn with
            ``omit=FACE_PARTS`` (:func:`rsc.toy.faces.render_faces`).
        others: ``mix``: the faces to blend in; ``None``: each image's
            neighbour in the batch (``images.roll(1, 0)``; needs ``N >= 2``).

    Returns:
        The degraded images (a new tensor).
    """
    check_images(images)
    if kind not in _DEGRADATIONS:
        raise ValueError(f"unknown degradation kind {kind!r}; expected one of {KINDS}")
    s = _severity_vector(severity, len(images), kind).to(images).view(-1, 1, 1, 1)
    if kind == "mix" and others is None:
        if len(images) < 2:
            raise ValueError("degradation 'mix' without `others` blends each image with its neighbour: needs >= 2 images")
        others = images.roll(1, 0)
    context = _Context(generator if generator is not None else torch.Generator().manual_seed(0), featureless, others,
                       images.shape[-1] / 64)
    out = _DEGRADATIONS[kind](images, s, context).clamp(0, 1)
    return torch.where(s > 0, out, images)  # exact identity at severity 0, whatever an operator rounds


def apply_degradations(
    images: Tensor,
    severities: Tensor,
    generator: torch.Generator | None = None,
    featureless: Tensor | None = None,
    others: Tensor | None = None,
) -> Tensor:
    """Apply several degradations per image, in the order of :data:`KINDS`.

    Args:
        images: Float images ``(N, 3, H, W)`` in ``[0, 1]``.
        severities: ``(N, len(KINDS))`` severities in ``[0, 1]`` (0: kind not applied).
        generator, featureless, others: As in :func:`degrade` (needed only where used).

    Returns:
        The degraded images.
    """
    check_images(images)
    if severities.shape != (len(images), len(KINDS)):
        raise ValueError(f"severities must have shape (N, {len(KINDS)}) = ({len(images)}, {len(KINDS)}) "
                         f"(one column per kind in {KINDS}), got {tuple(severities.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if others is None and len(images) > 1:
        others = images.roll(1, 0)  # the undegraded neighbour, as degrade() would pick for the whole batch
    images = images.clone()
    for k, kind in enumerate(KINDS):
        # Only the images that get this kind: most get one or two kinds, so this saves most of the work.
        picked = torch.nonzero(severities[:, k] > 0).flatten()
        if len(picked):
            images[picked] = degrade(images[picked], kind, severities[picked, k], generator,
                                     *(None if extra is None else extra[picked] for extra in (featureless, others)))
    return images


def quality_target(severities: Tensor) -> Tensor:
    """The target score of degraded faces: ``10 * prod_k (1 - s_k**2)`` over the kinds' severities.

    Why this mapping:

    - an undegraded face scores 10 and any kind at full severity scores 0
      (severity 1 is defined as "the face is no longer usable");
    - the quadratic onset follows how people rate image quality: a barely
      visible defect (blur sigma 0.3 px, severity 0.1) costs 0.1 points, not 1,
      while a plainly visible one (severity 0.5) costs 2.5; so a judge on this
      scale does not punish imperceptible softness, yet ranks every level;
    - the product compounds two defects without an order and never goes below
      0: a defect costs a share of the quality that is left.

    The stereotype does not enter: it is not a quality defect.

    Args:
        severities: ``(N, len(KINDS))`` severities in ``[0, 1]``.

    Returns:
        ``(N,)`` scores in ``[0, 10]``.
    """
    if severities.ndim != 2 or severities.shape[1] != len(KINDS):
        raise ValueError(f"severities must have shape (N, {len(KINDS)}) (one column per kind in {KINDS}), "
                         f"got {tuple(severities.shape)}")
    return MAX_SCORE * (1 - severities.clamp(0, 1) ** 2).prod(dim=1)


def random_severities(n: int, generator: torch.Generator, clean: float = 0.2, pairs: float = 0.35) -> Tensor:
    """Random training severities: a share of clean images, one kind on most, two kinds on ``pairs`` of them.

    Kinds are drawn uniformly (two distinct ones for a pair), severities uniformly in ``(0, 1]``.

    Returns:
        ``(n, len(KINDS))`` severities.
    """
    if not (0 <= clean and 0 <= pairs and clean + pairs <= 1):
        raise ValueError(f"clean and pairs must be shares with clean + pairs <= 1, got {clean} and {pairs}")
    u = torch.rand(n, generator=generator)
    count = (u >= clean).long() + (u >= 1 - pairs).long()  # 0, 1 or 2 kinds per image
    rank = torch.rand(n, len(KINDS), generator=generator).argsort(1).argsort(1)  # a random permutation per image
    levels = 1 - torch.rand(n, len(KINDS), generator=generator)  # (0, 1]
    return torch.where(rank < count[:, None], levels, torch.zeros(()))
