"""A small attribute classifier for the toy world.

:class:`ToyAttributeClassifier` stands in for FairFace-style classifiers in the
metrics: from a face image it predicts the group, the gender and whether the
planted stereotype is present. It reads images in the diffusion model's range
(float, ``[-1, 1]``, NCHW) and is trained on procedural renders
(:func:`rsc.toy.faces.render_faces`) with blur, noise and colour augmentation,
so that it keeps working on images decoded by the toy VAE and sampled by the
toy diffusion model.

Weights are stored as ``model.safetensors`` beside a ``config.json``
(:meth:`ToyAttributeClassifier.save_pretrained` /
:meth:`ToyAttributeClassifier.from_pretrained`, from
:class:`rsc.toy.pretrained.ToyPretrainedMixin`); no pickles.
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
from rsc.images import uint8_to_tensor
from rsc.toy.calibration import LabelledImages
from rsc.toy.faces import GENDERS, GROUPS, random_attributes, render_faces
from rsc.toy.pretrained import CONFIG_NAME, WEIGHTS_NAME, ToyPretrainedMixin

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ToyAttributeClassifier",
    "ToyClassifierConfig",
    "augment_images",
    "evaluate_classifier",
    "train_toy_classifier",
]

HEADS: tuple[str, ...] = ("group", "gender", "stereotype")


@dataclass
class ToyClassifierConfig(IntegerConfig):
    """Configuration of :class:`ToyAttributeClassifier`.

    Attributes:
        base_channels: Channels of the first conv block (doubled per block).
        num_groups: Number of group logits.
        num_genders: Number of gender logits.
        image_size: Expected input height and width.
    """

    base_channels: int = 16
    num_groups: int = len(GROUPS)
    num_genders: int = len(GENDERS)
    image_size: int = 64

    def __post_init__(self) -> None:
        self.check_positive_integers()
        if self.num_genders < 2 or self.num_groups < 2:
            raise ValueError(
                f"num_groups and num_genders must be >= 2, got {self.num_groups} and {self.num_genders}"
            )
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x poolings), got {self.image_size}")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ToyAttributeClassifier(ToyPretrainedMixin):
    """Small CNN predicting group, gender and stereotype from a face.

    Four conv blocks (conv 3x3, batch norm, ReLU, 2x max-pool; channels
    ``b, 2b, 4b, 8b``), a 3x3 conv, global average pooling, and one linear
    head per attribute.

    Args:
        config: A :class:`ToyClassifierConfig` (or ``None`` for the defaults).
    """

    config_class = ToyClassifierConfig

    def __init__(self, config: ToyClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ToyClassifierConfig()
        b = self.config.base_channels
        self.features = nn.Sequential(
            _block(3, b),
            _block(b, 2 * b),
            _block(2 * b, 4 * b),
            _block(4 * b, 8 * b),
            nn.Conv2d(8 * b, 8 * b, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict(
            {
                "group": nn.Linear(8 * b, self.config.num_groups),
                "gender": nn.Linear(8 * b, self.config.num_genders),
                "stereotype": nn.Linear(8 * b, 1),
            }
        )

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, 8 * base_channels)`` (globally pooled) of images in ``[-1, 1]``.

        The feature space of the toy world's KID and diversity measures: it encodes what the
        classifier tells apart (group, gender, stereotype) and the face's geometry.
        """
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return logits per head.

        Args:
            x: Float images in ``[-1, 1]``, shape ``(N, 3, image_size, image_size)``.

        Returns:
            ``{"group": (N, num_groups), "gender": (N, num_genders),
            "stereotype": (N,)}`` logits.
        """
        s = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"expected images of shape (N, 3, {s}, {s}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype}")
        h = self.embed(x)
        return {
            "group": self.heads["group"](h),
            "gender": self.heads["gender"](h),
            "stereotype": self.heads["stereotype"](h).squeeze(1),
        }

    @torch.no_grad()
    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Return probabilities per head, in eval mode and without gradients.

        The module's training flag is restored afterwards.

        Args:
            x: Float images in ``[-1, 1]``, shape ``(N, 3, H, W)``; moved to
                the model's device and dtype.

        Returns:
            ``{"group": (N, num_groups) softmax, "gender": (N, num_genders)
            softmax, "stereotype": (N,) sigmoid}``.
        """
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            logits = self(x.to(device=p.device, dtype=p.dtype))
        finally:
            self.train(was_training)
        return {
            "group": logits["group"].softmax(-1),
            "gender": logits["gender"].softmax(-1),
            "stereotype": logits["stereotype"].sigmoid(),
        }


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Blur each image with its own Gaussian ``sigma`` (separable, reflect-padded)."""
    n, c, h, w = x.shape
    offs = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (offs[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def augment_images(x: Tensor, gen: torch.Generator) -> Tensor:
    """Degrade a batch the way the toy VAE and diffusion model do.

    Applies a small per-image colour jitter (channel gain, contrast,
    brightness), a Gaussian blur (sigma 0.3-1.4 px) on ~70% of the images and
    additive Gaussian noise (std up to 0.12), then clamps to ``[-1, 1]``.

    Args:
        x: Float images in ``[-1, 1]``, shape ``(N, 3, H, W)``, on the CPU.
        gen: CPU generator drawing the random degradations.

    Returns:
        The degraded batch (a new tensor).
    """
    n = x.shape[0]

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    # Colour: per-channel gain, contrast, brightness (kept small: hue separates groups).
    gain = u(n, 3, 1, 1, lo=0.94, hi=1.06)
    contrast = u(n, 1, 1, 1, lo=0.8, hi=1.15)
    bright = u(n, 1, 1, 1, lo=-0.1, hi=0.1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x + 1) * gain - 1 - mean) * contrast + mean + bright
    # Blur on ~70% of the images.
    sigma = torch.where(u(n) < 0.7, u(n, lo=0.3, hi=1.4), torch.full((n,), 1e-3))
    x = _gaussian_blur(x, sigma)
    # Additive Gaussian noise of random strength.
    x = x + u(n, 1, 1, 1, hi=0.12) * torch.randn(x.shape, generator=gen)
    return x.clamp_(-1.0, 1.0)


def _check_labels(n: int, groups: Sequence[int], genders: Sequence[int], stereotypes: Sequence[bool]) -> tuple[
    np.ndarray, np.ndarray, np.ndarray
]:
    arrs = (np.asarray(groups), np.asarray(genders), np.asarray(stereotypes))
    lengths = [len(a) for a in arrs]
    if any(length != n for length in lengths):
        raise ValueError(
            f"expected {n} labels per head (one per image), got groups={lengths[0]}, "
            f"genders={lengths[1]}, stereotypes={lengths[2]}"
        )
    return arrs[0].astype(np.int64), arrs[1].astype(np.int64), arrs[2].astype(bool)


def evaluate_classifier(
    model: ToyAttributeClassifier,
    images_uint8: np.ndarray,
    groups: Sequence[int],
    genders: Sequence[int],
    stereotypes: Sequence[bool],
    batch_size: int = 256,
) -> dict[str, float]:
    """Return the accuracy of each head on labelled ``uint8`` NHWC images.

    Stereotype predictions are thresholded at probability 0.5.

    Returns:
        ``{"group": acc, "gender": acc, "stereotype": acc}``, each in [0, 1].
    """
    n = len(images_uint8)
    if n == 0:
        raise ValueError("evaluate_classifier needs at least one image, got 0")
    g, ge, st = _check_labels(n, groups, genders, stereotypes)
    return labelled_accuracy(model, LabelledImages(uint8_to_tensor(images_uint8), g, ge, st), batch_size)


def labelled_accuracy(model: ToyAttributeClassifier, data: LabelledImages, batch_size: int = 256) -> dict[str, float]:
    """Accuracy of each head on labelled images in ``[-1, 1]`` (stereotype thresholded at 0.5)."""
    if len(data) == 0:
        raise ValueError("labelled_accuracy needs at least one image, got 0")
    correct = {h: 0 for h in HEADS}
    for i in range(0, len(data), batch_size):
        p = model.predict(data.images[i : i + batch_size])
        sl = slice(i, i + batch_size)
        correct["group"] += int((p["group"].argmax(-1).cpu().numpy() == data.groups[sl]).sum())
        correct["gender"] += int((p["gender"].argmax(-1).cpu().numpy() == data.genders[sl]).sum())
        correct["stereotype"] += int(((p["stereotype"].cpu().numpy() > 0.5) == data.stereotypes[sl]).sum())
    return {h: correct[h] / len(data) for h in HEADS}


def train_toy_classifier(
    num_images: int = 3000,
    epochs: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    base_channels: int = 16,
    progress: bool = True,
    num_eval_images: int = 1000,
    lr: float = 3e-3,
    log: Callable[[str], None] | None = None,
    extra_training: LabelledImages | None = None,
) -> tuple[ToyAttributeClassifier, dict[str, float]]:
    """Train a :class:`ToyAttributeClassifier` on procedural faces.

    The training set (``num_images`` renders, stereotype on half of them) and
    the held-out set (``num_eval_images`` renders) use different render seeds
    (``2 * seed`` and ``2 * seed + 1``). Training uses Adam with a one-cycle
    learning-rate schedule and blur / noise / colour augmentation. The result
    is deterministic for a given seed and thread count; the global torch RNG
    state of the caller is left untouched.

    Args:
        num_images: Training renders.
        epochs: Passes over the training set.
        seed: Non-negative integer seed.
        batch_size: Images per step.
        base_channels: Width of the first conv block.
        progress: Show a tqdm progress bar.
        num_eval_images: Held-out renders for the returned accuracies.
        lr: Peak learning rate.
        log: Optional callable receiving a one-line summary.
        extra_training: Labelled images added to the training renders, e.g. the toy SD's views of
            renders (:func:`rsc.toy.calibration.model_views`), so the classifier is trained on the
            kind of images it judges.

    Returns:
        ``(model, accuracies)``: the classifier in eval mode, and its
        held-out accuracy per head (``{"group", "gender", "stereotype"}``).
    """
    for name, value, lo in (
        ("num_images", num_images, 1),
        ("epochs", epochs, 1),
        ("seed", seed, 0),
        ("batch_size", batch_size, 1),
        ("base_channels", base_channels, 1),
        ("num_eval_images", num_eval_images, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")

    t0 = time.perf_counter()
    tr_attrs = random_attributes(num_images, seed=2 * seed, stereotype_rate=0.5)
    tr_images = uint8_to_tensor(render_faces(*tr_attrs, seed=2 * seed))
    if extra_training is not None and len(extra_training):
        tr_images = torch.cat([tr_images, extra_training.images.float()])
        tr_attrs = tuple(
            np.concatenate([a, np.asarray(b)])
            for a, b in zip(tr_attrs, (extra_training.groups, extra_training.genders, extra_training.stereotypes))
        )
    num_images = len(tr_images)
    tr_g, tr_ge, tr_st = (torch.from_numpy(np.ascontiguousarray(a)) for a in tr_attrs)
    tr_g, tr_ge, tr_st = tr_g.long(), tr_ge.long(), tr_st.float()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyAttributeClassifier(ToyClassifierConfig(base_channels=base_channels))
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (num_images + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="toy classifier", unit="step")
    model.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(num_images, generator=gen)
            for i in range(0, num_images, batch_size):
                idx = perm[i : i + batch_size]
                x = augment_images(tr_images[idx], gen)
                out = model(x)
                loss = (
                    F.cross_entropy(out["group"], tr_g[idx])
                    + F.cross_entropy(out["gender"], tr_ge[idx])
                    + F.binary_cross_entropy_with_logits(out["stereotype"], tr_st[idx])
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar is not None:
            bar.close()
    model.eval()

    ev_attrs = random_attributes(num_eval_images, seed=2 * seed + 1, stereotype_rate=0.5)
    ev_images = render_faces(*ev_attrs, seed=2 * seed + 1)
    acc = evaluate_classifier(model, ev_images, *ev_attrs)
    if log is not None:
        log(
            f"toy classifier: {model.num_parameters()} params, {time.perf_counter() - t0:.1f} s, held-out accuracy "
            + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        )
    return model, acc
