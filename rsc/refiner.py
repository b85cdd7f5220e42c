"""The latent refiner R_theta(z_t, t, c) -> delta: the only trained network in rsc.

A small residual conv net at the latent resolution, conditioned on the
timestep (sinusoidal embedding + MLP) and on the prompt (attention-pooled
token embeddings, projected), both injected into every block as a FiLM scale
and shift. With ``x0_input`` it also reads the frozen model's x0-prediction at
z_t (the image the trajectory is heading to). Its output convolution starts at
zero, so an untrained refiner is the identity correction. Saved as
``refiner.safetensors`` + ``config.json``.

Why not a diffusers ``ModelMixin`` + ``ConfigMixin``: their ``save_pretrained``
writes ``diffusion_pytorch_model.safetensors`` and a flat ``config.json``,
while the export format (format version 1, read by every export already
written and by the frontends) keeps the architecture under ``"architecture"``
beside the export's own entries, in ``refiner.safetensors``; and
``@register_to_config`` wants the constructor's arguments flat, where rsc's
callers pass a :class:`RefinerConfig`. Overriding both methods to keep the
format would leave the mixins nothing to do, so the refiner keeps its
``save_pretrained``/``from_pretrained`` on the shared helpers of
:mod:`rsc.atomic` (atomic safetensors and JSON writes, the files check).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file
from torch import Tensor, nn

from rsc.atomic import require_files, write_json_atomic, write_safetensors_atomic
from rsc.config import IntegerConfig

WEIGHTS_NAME = "refiner.safetensors"
CONFIG_NAME = "config.json"


#: The largest size any field of a :class:`RefinerConfig` may have (SD's own UNet is at most 1280 channels wide).
MAX_REFINER_WIDTH = 2**16


@dataclass
class RefinerConfig(IntegerConfig):
    """Architecture of a :class:`LatentRefiner`.

    Attributes:
        latent_channels: Channels of the latent code (4 for SD 1.x/2.x).
        text_embedding_dim: Width of the text encoder's token embeddings (768 for SD 1.x, 1024 for 2.x).
        hidden_channels: Width of the residual blocks.
        num_blocks: Number of residual blocks.
        embedding_dim: Width of the timestep/prompt conditioning vector.
        norm_groups: GroupNorm groups in the blocks.
        x0_input: Also read the frozen model's conditional x0-prediction at z_t, as ``latent_channels``
            more input channels. Early in a trajectory z_t is mostly noise, while the x0-prediction
            already shows the face it is heading to, stereotyped or not: the refiner can tell the two
            apart there and leave clean trajectories alone. Training computes that prediction anyway
            (the reference term); sampling costs one more conditional UNet call per corrected step.
    """

    latent_channels: int = 4
    text_embedding_dim: int = 768
    hidden_channels: int = 128
    num_blocks: int = 4
    embedding_dim: int = 256
    norm_groups: int = 32
    x0_input: bool = False

    def __post_init__(self) -> None:
        self.check_positive_integers()
        for item in fields(self):
            # A typo such as 1e9 fails here, named, instead of as an allocation error deep in torch.
            if not isinstance(getattr(self, item.name), bool) and getattr(self, item.name) > MAX_REFINER_WIDTH:
                raise ValueError(
                    f"RefinerConfig.{item.name} must be <= {MAX_REFINER_WIDTH}, got {getattr(self, item.name)!r}"
                )
        if self.hidden_channels % self.norm_groups:
            raise ValueError(
                f"RefinerConfig.hidden_channels ({self.hidden_channels}) must be divisible by norm_groups ({self.norm_groups})"
            )


class _FiLMResBlock(nn.Module):
    def __init__(self, channels: int, embedding_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(embedding_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        scale, shift = self.film(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(self.act(h))


#: ``x0_predictor(z_t, t, c)``: the frozen model's x0-prediction, e.g. :meth:`rsc.backbone.FrozenLDM.predict_x0`.
X0Predictor = Callable[[Tensor, Tensor, Tensor], Tensor]


class LatentRefiner(nn.Module):
    """R_theta(z_t, t, c): a latent-code correction of z_t's shape.

    Args:
        config: Architecture; default :class:`RefinerConfig` (SD 1.x sizes).
    """

    def __init__(self, config: RefinerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RefinerConfig()
        c = self.config
        self.time_proj = Timesteps(c.embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c.embedding_dim, c.embedding_dim)
        # Attention pooling: a learned score per token. The words that carry an attribute
        # (a group, a gender) are a few tokens of 77; a mean dilutes them. Zero-initialised,
        # so pooling starts as the plain mean.
        self.text_token_score = nn.Sequential(nn.LayerNorm(c.text_embedding_dim), nn.Linear(c.text_embedding_dim, 1))
        nn.init.zeros_(self.text_token_score[1].weight)
        nn.init.zeros_(self.text_token_score[1].bias)
        self.text_projection = nn.Sequential(
            nn.LayerNorm(c.text_embedding_dim), nn.Linear(c.text_embedding_dim, c.embedding_dim)
        )
        in_channels = 2 * c.latent_channels if c.x0_input else c.latent_channels
        self.conv_in = nn.Conv2d(in_channels, c.hidden_channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            [_FiLMResBlock(c.hidden_channels, c.embedding_dim, c.norm_groups) for _ in range(c.num_blocks)]
        )
        self.norm_out = nn.GroupNorm(c.norm_groups, c.hidden_channels)
        self.conv_out = nn.Conv2d(c.hidden_channels, c.latent_channels, 3, padding=1)
        # Zero output layer: an untrained refiner leaves the sampler exactly as it was.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor, x0_prediction: Tensor | None = None
    ) -> Tensor:
        """The correction delta for ``latents`` (B, C, h, w) at ``timesteps`` (B,) given token embeddings (B, L, D).

        ``x0_prediction`` (the frozen model's, of ``latents``' shape) is required when ``config.x0_input``
        and refused otherwise.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        if self.config.x0_input != (x0_prediction is not None):
            raise ValueError(
                "this refiner reads the frozen model's x0-prediction (x0_input=True): pass x0_prediction"
                if self.config.x0_input
                else "this refiner was built without x0_input, so it takes no x0_prediction"
            )
        if x0_prediction is not None and x0_prediction.shape != latents.shape:
            raise ValueError(
                f"x0_prediction must have the latents' shape {tuple(latents.shape)}, got {tuple(x0_prediction.shape)}"
            )
        if text_embeddings.ndim != 3 or text_embeddings.shape[-1] != self.config.text_embedding_dim:
            raise ValueError(
                f"text_embeddings must be (B, L, {self.config.text_embedding_dim}), got {tuple(text_embeddings.shape)}"
            )
        dtype = self.conv_in.weight.dtype
        timesteps = timesteps.reshape(-1).expand(latents.shape[0]) if timesteps.numel() == 1 else timesteps
        embedding = self.time_embedding(self.time_proj(timesteps.to(latents.device)).to(dtype))
        embedding = embedding + self.text_projection(self.pool_text(text_embeddings.to(dtype)))
        embedding = nn.functional.silu(embedding)
        inputs = latents if x0_prediction is None else torch.cat([latents, x0_prediction.to(latents.dtype)], dim=1)
        h = self.conv_in(inputs.to(dtype))
        for block in self.blocks:
            h = block(h, embedding)
        return self.conv_out(nn.functional.silu(self.norm_out(h))).to(latents.dtype)

    def pool_text(self, text_embeddings: Tensor) -> Tensor:
        """Attention-pool token embeddings (B, L, D) -> (B, D) with the learned per-token scores."""
        weights = self.text_token_score(text_embeddings).softmax(dim=1)
        return (weights * text_embeddings).sum(dim=1)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, save_directory: str | os.PathLike[str], extra_config: dict[str, Any] | None = None) -> None:
        """Write ``refiner.safetensors`` and ``config.json`` (architecture plus ``extra_config``), atomically."""
        directory = Path(save_directory)
        write_safetensors_atomic(directory / WEIGHTS_NAME, self.state_dict())
        write_json_atomic(directory / CONFIG_NAME, {"architecture": self.config.to_dict(), **(extra_config or {})})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> LatentRefiner:
        """Load a refiner written by :meth:`save_pretrained`."""
        directory = require_files(directory, (CONFIG_NAME, WEIGHTS_NAME), "LatentRefiner.save_pretrained")
        payload = json.loads((directory / CONFIG_NAME).read_text())
        if "architecture" not in payload:
            raise ValueError(f"{directory / CONFIG_NAME} has no 'architecture' entry")
        refiner = cls(RefinerConfig.from_dict(payload["architecture"]))
        refiner.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(device)))
        return refiner.to(device)


class RefinerCorrection:
    """The sampling-time update ``z_t <- z_t + strength * shrink(R(z_t, t, c))``, usable as a sampler's ``correction``.

    ``threshold`` is a dead zone on the refiner's output, relative to the latent: per sample,
    ``shrink(d) = d * max(0, 1 - threshold * |z_t| / |d|)``, so an output smaller than ``threshold``
    of the latent's norm changes nothing, and a larger one loses that much of its length. A trained
    refiner moves every prompt's latent by a small floor (about 3-5% of |z_t| on the toy world,
    whatever the prompt) on top of the large update it gives the stereotyped prompts (11-14% at the
    first corrected step); the floor only blurs and changes the images of fairly treated prompts.
    ``threshold=0`` is the plain update.

    A refiner with ``x0_input`` needs ``x0_predictor``, the frozen model's conditional
    x0-prediction (:meth:`rsc.backbone.FrozenLDM.predict_x0`; the diffusers frontend builds one from a
    pipeline's UNet); for other refiners it is not called.
    """

    def __init__(
        self, refiner: LatentRefiner, strength: float = 1.0, threshold: float = 0.0,
        x0_predictor: X0Predictor | None = None,
    ) -> None:
        if not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        self.reads_x0 = bool(getattr(getattr(refiner, "config", None), "x0_input", False))
        if self.reads_x0 and x0_predictor is None:
            raise ValueError(
                "this refiner reads the frozen model's x0-prediction (x0_input=True): pass "
                "x0_predictor, e.g. RefinerCorrection(refiner, x0_predictor=ldm.predict_x0)"
            )
        self.refiner, self.strength, self.threshold = refiner, strength, threshold
        self.x0_predictor = x0_predictor

    @torch.no_grad()
    def __call__(self, latents: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """Corrected latents."""
        if self.reads_x0:
            assert self.x0_predictor is not None  # checked in __init__
            delta = self.refiner(latents, timesteps, cond, self.x0_predictor(latents, timesteps, cond))
        else:
            delta = self.refiner(latents, timesteps, cond)
        if self.threshold > 0:
            delta = shrink_relative(delta, latents, self.threshold)
        return latents + self.strength * delta


def shrink_relative(delta: Tensor, latents: Tensor, threshold: float) -> Tensor:
    """Soft-threshold each sample's ``delta`` by ``threshold`` times its latent's norm (the dead zone of
    :class:`RefinerCorrection`)."""
    delta_norm = delta.float().flatten(1).norm(dim=1)
    latent_norm = latents.float().flatten(1).norm(dim=1)
    keep = (1 - threshold * latent_norm / delta_norm.clamp_min(torch.finfo(torch.float32).tiny)).clamp_min(0)
    return delta * keep.to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
