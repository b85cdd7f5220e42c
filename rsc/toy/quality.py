"""A toy facial-quality judge: graded degradations of toy faces and a small CNN that scores them 0-10.

The toy stand-in for the LAION aesthetic predictor and face-quality models. It
is trained on procedural renders (:func:`rsc.toy.faces.render_faces`) under
degradations that are *not* the stereotype (:data:`KINDS`), each with a
severity in ``[0, 1]`` (0: untouched, 1: the face is no longer usable):

- ``erase``: facial features (brows, eyes, nose, mouth) fade into the skin;
- ``smear``: facial features blurred in place (the rest of the face stays sharp);
- ``mix``: a ghost of another face blended in (up to 50 / 50);
- ``washout``: colour drained towards a light grey (saturation and contrast lost);
- ``blur``: Gaussian blur (sigma up to 3 px at 64 px);
- ``blocky``: downsampled and upsampled with nearest neighbours (blocks up to 8 px);
- ``noise``: additive Gaussian noise (std up to 0.25).

Half of the training renders carry the planted stereotype and the target score
ignores it, so the judge learns that the stereotype is a fairness harm, not a
quality defect: a stereotyped face scores like the matched clean one.

Images are float ``(N, 3, H, W)`` in ``[0, 1]`` throughout (what the sampler
returns). Degradation parameters are in pixels of a 64 px image and scale with
the image size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsc.config import IntegerConfig
from rsc.images import resize_square, uint8_to_tensor
from rsc.toy.classifier import _block, _gaussian_blur
from rsc.toy.faces import FACE_PARTS, random_attributes, render_faces
from rsc.toy.pretrained import ToyPretrainedMixin

__all__ = [
    "KINDS",
    "MAX_SCORE",
    "ToyQualityConfig",
    "ToyQualityJudge",
    "apply_degradations",
    "degrade",
    "evaluate_quality_judge",
    "quality_target",
    "random_severities",
    "render_with_featureless",
    "train_quality_judge",
]

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


def _check_images(images: Tensor, name: str = "images") -> None:
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
    _check_images(images)
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
    _check_images(images)
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


@dataclass
class ToyQualityConfig(IntegerConfig):
    """Configuration of :class:`ToyQualityJudge`.

    Attributes:
        base_channels: Channels of the first conv block (doubled per block).
        image_size: Height and width the judge reads (other sizes are resized).
    """

    base_channels: int = 16
    image_size: int = 64

    def __post_init__(self) -> None:
        self.check_positive_integers()
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x poolings), got {self.image_size}")


class ToyQualityJudge(ToyPretrainedMixin):
    """Small CNN scoring the facial quality of toy faces, 0 (unusable) to 10 (a clean render).

    The attribute classifier's four conv blocks (channels ``b, 2b, 4b, 8b``),
    a 3x3 conv, average and max pooling (a local defect such as smeared
    features shows in the max), and a linear head squashed to ``[0, 10]``.

    Args:
        config: A :class:`ToyQualityConfig` (or ``None`` for the defaults).
    """

    config_class = ToyQualityConfig

    def __init__(self, config: ToyQualityConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ToyQualityConfig()
        b = self.config.base_channels
        self.features = nn.Sequential(
            _block(3, b), _block(b, 2 * b), _block(2 * b, 4 * b), _block(4 * b, 8 * b),
            nn.Conv2d(8 * b, 8 * b, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(16 * b, 1)

    def forward(self, images: Tensor) -> Tensor:
        """Scores ``(N,)`` in ``[0, 10]`` for float images ``(N, 3, H, W)`` in ``[0, 1]`` (resized to ``image_size``)."""
        _check_images(images)
        h = self.features(resize_square(images, self.config.image_size) * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return MAX_SCORE * torch.sigmoid(self.head(pooled).squeeze(1))

    @torch.no_grad()
    def score(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`forward` in eval mode, without gradients, in batches, on the judge's device; ``(N,)`` on the CPU.

        The module's training flag is restored afterwards.
        """
        _check_images(images)
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            parts = [self(images[i : i + batch_size].to(device=p.device, dtype=p.dtype)).cpu()
                     for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0)


def render_with_featureless(n: int, seed: int, stereotype: bool | None = None) -> tuple[Tensor, Tensor]:
    """``n`` renders of all groups and genders and their featureless twins (``omit=FACE_PARTS``), float in [0, 1].

    Attributes come from :func:`rsc.toy.faces.random_attributes` ``(n, seed)``. ``stereotype=None``: the
    stereotype on about half of the faces (drawn); ``True``/``False``: on all or none, so the same
    ``(n, seed)`` gives matched stereotyped and clean faces.

    Returns:
        ``(renders, featureless)``, each ``(n, 3, 64, 64)``.
    """
    groups, genders, stereotypes = random_attributes(n, seed=seed, stereotype_rate=0.5)
    if stereotype is not None:
        stereotypes = np.full(n, stereotype)
    faces = [uint8_to_tensor(render_faces(groups, genders, stereotypes, seed=seed, omit=omit)).add_(1).div_(2)
             for omit in ((), FACE_PARTS)]
    return faces[0], faces[1]


def evaluate_quality_judge(
    judge: ToyQualityJudge, num_images: int = 256, seed: int = 1, severities: Sequence[float] = (0.0, 1 / 3, 2 / 3, 1.0)
) -> dict[str, float]:
    """Held-out scores per degradation kind and severity, on clean and on matched stereotyped renders.

    Both sets are rendered from the same ``(seed, index)`` (so they differ only
    in the stereotype) and degraded identically (same noise, same neighbour for
    ``mix``).

    Returns:
        ``{"<kind>/<severity>": mean score of clean renders, "stereotype_gap/<kind>/<severity>": mean
        |stereotyped - clean| score (per-image disagreement), "stereotype_bias/<kind>/<severity>": mean
        stereotyped - clean score (a systematic preference), "clean": mean of undegraded clean renders,
        "stereotyped": the same for stereotyped ones, "stereotype_gap": the largest gap}``; severities are
        formatted with two decimals.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an integer >= 2 (mix blends neighbours), got {num_images!r}")
    sets = [render_with_featureless(num_images, seed, stereotype) for stereotype in (False, True)]
    stats: dict[str, float] = {}
    for kind in KINDS:
        for level in severities:
            scores = [judge.score(degrade(x, kind, level, torch.Generator().manual_seed(seed), featureless=f))
                      for x, f in sets]
            stats[f"{kind}/{level:.2f}"] = float(scores[0].mean())
            stats[f"stereotype_gap/{kind}/{level:.2f}"] = float((scores[1] - scores[0]).abs().mean())
            stats[f"stereotype_bias/{kind}/{level:.2f}"] = float((scores[1] - scores[0]).mean())
    stats["clean"], stats["stereotyped"] = (float(judge.score(x).mean()) for x, _ in sets)
    stats["stereotype_gap"] = max(v for k, v in stats.items() if k.startswith("stereotype_gap/"))
    return stats


def train_quality_judge(
    num_images: int = 6000,
    epochs: int = 5,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    base_channels: int = 16,
    lr: float = 3e-3,
    num_eval_images: int = 256,
    log: Callable[[str], None] | None = None,
) -> tuple[ToyQualityJudge, dict[str, float]]:
    """Train a :class:`ToyQualityJudge` on randomly degraded renders.

    Training renders (``num_images``: ``num_images / 2`` faces of all groups and
    genders, each rendered clean and stereotyped, render seed ``2 * seed``) get
    fresh random degradations every epoch (:func:`random_severities`: 20% clean,
    45% one kind, 35% two kinds; ``mix`` blends in another training face), the
    same for both twins; the target is :func:`quality_target`, which ignores the
    stereotype. Adam with a one-cycle schedule on the squared error of the score
    / 10 for each twin plus the squared difference of the twins' scores.
    Deterministic for a seed and thread count; the caller's global torch RNG
    state is left untouched.

    Args:
        num_images: Training renders.
        epochs: Passes over the training set.
        seed: Non-negative integer seed.
        progress: Show a tqdm progress bar.
        batch_size: Images per step.
        base_channels: Width of the first conv block.
        lr: Peak learning rate.
        num_eval_images: Held-out renders (render seed ``2 * seed + 1``) for the returned statistics.
        log: Optional callable receiving a one-line summary.

    Returns:
        ``(judge, stats)``: the judge in eval mode, and :func:`evaluate_quality_judge`'s held-out
        statistics plus ``"mae"`` (mean absolute error on randomly degraded held-out renders) and
        ``"train_seconds"``.
    """
    for name, value, lo in (("num_images", num_images, 2), ("epochs", epochs, 1), ("seed", seed, 0),
                            ("batch_size", batch_size, 1), ("base_channels", base_channels, 1),
                            ("num_eval_images", num_eval_images, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")

    started = time.perf_counter()
    # Matched pairs: every training face is rendered clean and stereotyped (same pose, tones and background)
    # and both get the same degradations and the same target, plus a term that asks for equal scores,
    # so the judge learns that the stereotype is no quality defect at any degradation level.
    half = (num_images + 1) // 2
    clean, clean_featureless = render_with_featureless(half, 2 * seed, stereotype=False)
    stereotyped, stereotyped_featureless = render_with_featureless(half, 2 * seed, stereotype=True)
    num_images = half
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = ToyQualityJudge(ToyQualityConfig(base_channels=base_channels))
    gen = torch.Generator().manual_seed(seed)
    total = epochs * ((num_images + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="toy quality judge", unit="step")
    judge.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(num_images, generator=gen)
            for i in range(0, num_images, batch_size):
                idx = perm[i : i + batch_size]
                # Another face for `mix`: a random other index (never the image itself).
                other = (idx + torch.randint(1, num_images, (len(idx),), generator=gen)) % num_images
                severities = random_severities(len(idx), gen)
                twin_gen = torch.Generator().manual_seed(0)
                twin_gen.set_state(gen.get_state())  # the stereotyped twin gets the very same degradations
                x = apply_degradations(clean[idx], severities, gen, clean_featureless[idx], clean[other])
                x_twin = apply_degradations(stereotyped[idx], severities, twin_gen, stereotyped_featureless[idx], stereotyped[other])
                scores = judge(torch.cat([x, x_twin])) / MAX_SCORE
                target = quality_target(severities) / MAX_SCORE
                score, score_twin = scores.chunk(2)
                loss = F.mse_loss(score, target) + F.mse_loss(score_twin, target) + 4 * F.mse_loss(score_twin, score)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        if bar is not None:
            bar.close()
    judge.eval()
    train_seconds = time.perf_counter() - started

    stats = evaluate_quality_judge(judge, num_eval_images, seed=2 * seed + 1)
    eval_gen = torch.Generator().manual_seed(2 * seed + 1)
    x, f = render_with_featureless(num_eval_images, 2 * seed + 1)
    severities = random_severities(num_eval_images, eval_gen)
    scores = judge.score(apply_degradations(x, severities, eval_gen, f, x.roll(1, 0)))
    stats["mae"] = float((scores - quality_target(severities)).abs().mean())
    stats["train_seconds"] = train_seconds
    if log is not None:
        log(f"toy quality judge: {judge.num_parameters()} params, {train_seconds:.1f} s, held-out MAE "
            f"{stats['mae']:.2f}, clean {stats['clean']:.2f}, stereotype gap <= {stats['stereotype_gap']:.2f}")
    return judge, stats
