"""Training the toy world's tiny Stable Diffusion on a CPU: VAE, then UNet with its text encoder.

The components are the real diffusers/transformers classes (AutoencoderKL,
UNet2DConditionModel, CLIPTextModel + a CLIP BPE tokenizer, DDIM), so the
result is an ordinary SD pipeline folder. Training choices are for speed on
two cores: a factor-4 VAE, latents centred per channel (baked into the VAE so
plain diffusers sees the same model), min-SNR loss weighting, the text encoder
trained jointly with the UNet, and an EMA of both.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rsc.testing import default_scheduler_config, tiny_text_encoder_config


PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo (Linux).

    Elsewhere (no /proc/cpuinfo) it answers False: fp32 is the safe choice.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``"bf16"`` or ``"fp32"`` for a configured precision; ``"auto"`` picks bf16 only where the CPU has it natively.

    Measured on 2 cores: bf16 autocast halves a toy VAE step on an AVX512-BF16 CPU, and makes
    convolutions about 11x slower on an AVX2-only one, where bf16 is emulated.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


@dataclass
class VAETrainingConfig:
    """Architecture and schedule of the toy VAE."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    steps: int = 2400
    batch_size: int = 32
    learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    precision: str = "auto"
    # Fully convolutional (no mid-block attention) so that it can train on crops: a 32x32 crop
    # costs a quarter of a 64x64 image, and edges and features are local.
    mid_block_attention: bool = False
    crop_size: int | None = 32

    def model_config(self, image_size: int) -> dict[str, Any]:
        """AutoencoderKL constructor arguments."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": tuple(self.block_out_channels),
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": image_size,
            "mid_block_add_attention": self.mid_block_attention,
        }


def _random_crops(images: Tensor, size: int | None, generator: torch.Generator) -> Tensor:
    """One random ``size`` x ``size`` crop per image (the images themselves if ``size`` is None or too large)."""
    height, width = images.shape[-2:]
    if size is None or size >= min(height, width):
        return images
    tops = torch.randint(height - size + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(width - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([image[:, top : top + size, left : left + size] for image, top, left in zip(images, tops, lefts)])


def train_vae(images: Tensor, config: VAETrainingConfig, seed: int, progress: bool = True) -> AutoencoderKL:
    """Train an AutoencoderKL on images in [-1, 1] with L1 + MSE reconstruction and a small KL term."""
    torch.manual_seed(seed)
    use_bf16 = resolve_precision(config.precision) == "bf16"
    vae = AutoencoderKL(**config.model_config(images.shape[-1]))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(config.steps), desc="toy VAE", disable=not progress)
    for _ in bar:
        batch = _random_crops(images[torch.randint(len(images), (config.batch_size,), generator=generator)], config.crop_size, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample.float()
        loss = (
            F.l1_loss(reconstruction, batch)
            + F.mse_loss(reconstruction, batch)
            + config.kl_weight * posterior.kl().float().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_posteriors(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior means and standard deviations (unscaled) of all images."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def center_latents(vae: AutoencoderKL, posterior_means: Tensor) -> float:
    """Shift the VAE's latent space so each channel has mean 0 over the data; return the scaling factor.

    The shift is baked into ``quant_conv`` (subtract the mean) and
    ``post_quant_conv`` (add it back), so the autoencoder's reconstructions are
    unchanged and plain diffusers, which only knows ``scaling_factor``, sees
    centred latents. The scaling factor makes the scaled latents unit-variance.
    """
    channel_mean = posterior_means.mean(dim=(0, 2, 3))
    channels = channel_mean.numel()
    vae.quant_conv.bias[:channels] -= channel_mean
    weight = vae.post_quant_conv.weight[:, :, 0, 0]
    vae.post_quant_conv.bias += weight @ channel_mean
    scaling_factor = float(1.0 / (posterior_means - channel_mean[None, :, None, None]).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor


@dataclass
class UNetTrainingConfig:
    """Architecture and schedule of the toy UNet and text encoder."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    text_hidden_size: int = 64
    text_max_length: int = 16
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 1e-3
    text_learning_rate: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0
    extra: dict[str, Any] = field(default_factory=dict)

    def model_config(self, latent_size: int, latent_channels: int) -> dict[str, Any]:
        """UNet2DConditionModel constructor arguments."""
        return {
            "sample_size": latent_size,
            "in_channels": latent_channels,
            "out_channels": latent_channels,
            "block_out_channels": tuple(self.block_out_channels),
            "down_block_types": tuple(self.down_block_types),
            "up_block_types": tuple(self.up_block_types),
            "layers_per_block": self.layers_per_block,
            "cross_attention_dim": self.text_hidden_size,
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            **self.extra,
        }


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1.0 - decay)


def train_text_to_image(
    tokenizer: CLIPTokenizer,
    latent_means: Tensor,
    latent_stds: Tensor,
    scaling_factor: float,
    captions: list[str],
    config: UNetTrainingConfig,
    seed: int,
    progress: bool = True,
    on_step: Callable[[int, UNet2DConditionModel, CLIPTextModel], None] | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train a UNet and a CLIP text encoder from scratch on cached VAE posteriors; return their EMA copies.

    Latents are drawn from the cached posteriors at every step (``mean + std * eps``)
    so the VAE encoder never runs inside the loop. ``on_step(step, ema_unet, ema_text)``,
    if given, is called after every optimiser step (e.g. to snapshot the EMA models).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config.model_config(latent_means.shape[-1], latent_means.shape[1]))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**tiny_text_encoder_config(len(tokenizer), config.text_max_length, config.text_hidden_size))
    )
    noise_scheduler = DDPMScheduler(**{k: v for k, v in default_scheduler_config().items() if k != "set_alpha_to_one"})
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)

    # Few distinct captions: tokenise each once; "" is the unconditional caption for guidance.
    vocabulary = sorted(set(captions)) + [""]
    token_ids = tokenizer(
        vocabulary, padding="max_length", max_length=config.text_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    empty_index = len(vocabulary) - 1

    optimizer = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": config.learning_rate},
            {"params": text_encoder.parameters(), "lr": config.text_learning_rate},
        ],
        weight_decay=1e-2,
    )
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)) * 0.9 + 0.1
    )
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(config.steps), desc="toy UNet", disable=not progress)
    for step in bar:
        index = torch.randint(len(captions), (config.batch_size,), generator=generator)
        latents = latent_means[index] + latent_stds[index] * torch.randn(latent_means[index].shape, generator=generator)
        latents = latents * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        ids = token_ids[torch.where(drop, torch.full_like(index, empty_index), caption_index[index])]
        text = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=config.min_snr_gamma) / snr
        loss = (weights * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            on_step(step + 1, ema_unet, ema_text)
    return ema_unet.eval(), ema_text.eval()


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """An SD pipeline (DDIM, no safety checker) from trained components."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**default_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
