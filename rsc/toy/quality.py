"""A toy facial-quality judge: a small CNN that scores toy faces 0-10.

The toy stand-in for the LAION aesthetic predictor and face-quality models. It
is trained on procedural renders (:func:`rsc.toy.faces.render_faces`) under
degradations that are *not* the stereotype (:mod:`rsc.toy.degradations`).

Half of the training renders carry the planted stereotype and the target score
ignores it, so the judge learns that the stereotype is a fairness harm, not a
quality defect: a stereotyped face scores like the matched clean one.

Images are float ``(N, 3, H, W)`` in ``[0, 1]`` throughout (what the sampler
returns). Degradation parameters are in pixels of a 64 px image and scale with
the image size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsc.config import IntegerConfig
from rsc.images import resize_square, uint8_to_tensor
from rsc.toy.classifier import _block
from rsc.toy.degradations import KINDS, MAX_SCORE, apply_degradations, check_images, degrade, quality_target, random_severities
from rsc.toy.faces import FACE_PARTS, random_attributes, render_faces
from rsc.toy.pretrained import ToyPretrainedMixin

__all__ = [
    "ToyQualityConfig",
    "ToyQualityJudge",
    "evaluate_quality_judge",
    "render_with_featureless",
    "train_quality_judge",
]

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
        check_images(images)
        h = self.features(resize_square(images, self.config.image_size) * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return MAX_SCORE * torch.sigmoid(self.head(pooled).squeeze(1))

    @torch.no_grad()
    def score(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`forward` in eval mode, without gradients, in batches, on the judge's device; ``(N,)`` on the CPU.

        The module's training flag is restored afterwards.
        """
        check_images(images)
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
