"""Labelled renders as the toy SD shows them, so the toy judges are trained and tested on what they judge.

The attribute classifier scores the toy SD's samples, which are smoother than
the procedural renders it could be trained on alone. Two views of a labelled
render bring it into the model's domain while keeping its labels:

- ``vae``: a round trip through the toy VAE (encode to the posterior mean, decode);
- ``img2img``: a light image-to-image pass through the toy SD (diffusers'
  ``StableDiffusionImg2ImgPipeline``, strength <= 0.3, prompted with the render's
  own group and gender), which redraws the finest details the way sampling does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rsc.images import uint8_to_tensor
from rsc.toy.data import toy_prompt
from rsc.toy.faces import GENDERS, GROUPS, random_attributes, render_faces

#: The views of a labelled render that :func:`model_views` produces.
VIEWS: tuple[str, ...] = ("vae", "img2img")


@dataclass
class LabelledImages:
    """Images in ``[-1, 1]`` (N, 3, H, W) with their true attributes (indices into GROUPS / GENDERS)."""

    images: Tensor
    groups: np.ndarray
    genders: np.ndarray
    stereotypes: np.ndarray

    def __post_init__(self) -> None:
        lengths = {len(self.images), len(self.groups), len(self.genders), len(self.stereotypes)}
        if len(lengths) != 1:
            raise ValueError(
                f"LabelledImages needs one label per image, got {len(self.images)} images, {len(self.groups)} groups, "
                f"{len(self.genders)} genders and {len(self.stereotypes)} stereotype flags"
            )

    def __len__(self) -> int:
        return len(self.images)

    def with_images(self, images: Tensor) -> LabelledImages:
        """The same labels on other images (a view of these)."""
        return LabelledImages(images, self.groups, self.genders, self.stereotypes)

    @staticmethod
    def concat(parts: list[LabelledImages]) -> LabelledImages:
        """All parts, in order."""
        return LabelledImages(
            torch.cat([p.images for p in parts]),
            np.concatenate([p.groups for p in parts]),
            np.concatenate([p.genders for p in parts]),
            np.concatenate([p.stereotypes for p in parts]),
        )


def labelled_renders(num_images: int, seed: int, stereotype_rate: float = 0.5, size: int = 64) -> LabelledImages:
    """Balanced procedural renders with their labels, deterministic for ``seed``."""
    groups, genders, stereotypes = random_attributes(num_images, seed=seed, stereotype_rate=stereotype_rate)
    images = uint8_to_tensor(render_faces(groups, genders, stereotypes, seed=seed, size=size))
    return LabelledImages(images, groups, genders, stereotypes)


def psnr(images: Tensor, references: Tensor) -> float:
    """Mean peak signal-to-noise ratio (dB) of images against references, both in ``[-1, 1]``."""
    mse = ((images.float() - references.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def vae_round_trip(vae: torch.nn.Module, images: Tensor, batch_size: int = 128) -> Tensor:
    """Decode(posterior mean of encode(images)) for images in ``[-1, 1]``, clamped to ``[-1, 1]``."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        parts.append(vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(parts)


@torch.no_grad()
def img2img(
    sd: str | os.PathLike[str],
    renders: LabelledImages,
    seed: int,
    strengths: tuple[float, ...] = (0.1, 0.2, 0.3),
    steps: int = 20,
    guidance_scale: float = 7.0,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """Each render redrawn by the toy SD at one of ``strengths`` (cycled), prompted with its own attributes.

    Image ``i`` uses strength ``strengths[i % len(strengths)]`` and its own generator
    (seed ``seed * 100_003 + i``), so the result does not depend on the batching.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    if not strengths or any(not 0.0 < s <= 1.0 for s in strengths):
        raise ValueError(f"img2img strengths must lie in (0, 1], got {strengths}")
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(Path(sd), safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [toy_prompt(GROUPS[g], GENDERS[s]) for g, s in zip(renders.groups, renders.genders)]
    out = torch.empty_like(renders.images)
    order = [i for k in range(len(strengths)) for i in range(k, len(renders), len(strengths))]
    bar = tqdm(total=len(order), desc="img2img views", unit="image", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for strength in strengths:
            indices = [i for i in chunk if strengths[i % len(strengths)] == strength]
            if not indices:
                continue
            result = pipeline(
                prompt=[prompts[i] for i in indices],
                image=(renders.images[indices] + 1) / 2,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(seed * 100_003 + i) for i in indices],
                output_type="pt",
            ).images
            out[indices] = result.float().clamp(0, 1) * 2 - 1
        bar.update(len(chunk))
    bar.close()
    return out


def model_views(
    sd: str | os.PathLike[str], renders: LabelledImages, seed: int, max_strength: float = 0.3, progress: bool = True
) -> dict[str, LabelledImages]:
    """The ``vae`` and ``img2img`` views of ``renders`` (each a :class:`LabelledImages` with the same labels).

    Half of the renders (even indices) get the VAE view, the other half the img2img view,
    so each view costs half the renders.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(sd) / "vae").eval()
    halves = {view: np.arange(k, len(renders), 2) for k, view in enumerate(VIEWS)}

    def subset(view: str) -> LabelledImages:
        index = halves[view]
        return LabelledImages(
            renders.images[index], renders.groups[index], renders.genders[index], renders.stereotypes[index]
        )

    vae_part, img2img_part = subset("vae"), subset("img2img")
    strengths = tuple(round(max_strength * k / 3, 3) for k in (1, 2, 3))
    return {
        "vae": vae_part.with_images(vae_round_trip(vae, vae_part.images)),
        "img2img": img2img_part.with_images(img2img(sd, img2img_part, seed, strengths=strengths, progress=progress)),
    }
