"""Test-only builders: randomly initialised Stable-Diffusion-style pipelines and CLIPs, built offline.

Tests need a real SD pipeline (real diffusers classes, a real CLIP tokenizer)
that builds in well under a second; benchmarks need a UNet of SD 1.5's
architecture; the metrics' tests need a CLIP. All come from here, with the
configs as plain dicts so the toy world can reuse the same builder at other
sizes. Nothing in rsc's training or inference path imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rsc.tokenizer import build_clip_tokenizer

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def tiny_unet_config(cross_attention_dim: int = 32) -> dict[str, Any]:
    """A ~200k-parameter SD-layout UNet (one plain and one cross-attention level)."""
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }


def tiny_vae_config() -> dict[str, Any]:
    """A small AutoencoderKL with downsampling factor 4 (64x64 images -> 4x16x16 latents)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (16, 16, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.5,
    }


def tiny_text_encoder_config(vocab_size: int, max_length: int = 77, hidden_size: int = 32) -> dict[str, Any]:
    """A 2-layer CLIP text transformer."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "projection_dim": hidden_size,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def sd15_unet_config(sample_size: int = 64) -> dict[str, Any]:
    """SD 1.5's UNet architecture (860M parameters); ``sample_size`` only sets the default latent size."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def default_scheduler_config(prediction_type: PredictionType = "epsilon") -> dict[str, Any]:
    """SD 1.x/2.x's DDIM schedule (scaled-linear betas, 1000 training steps)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
    }


@dataclass
class RandomSDSpec:
    """Everything needed to build a random SD pipeline; the defaults give the tiny test model."""

    num_merges: int = 1000
    max_length: int = 77
    text_hidden_size: int = 32
    prediction_type: PredictionType = "epsilon"
    unet: dict[str, Any] = field(default_factory=tiny_unet_config)
    vae: dict[str, Any] = field(default_factory=tiny_vae_config)


def build_random_sd(spec: RandomSDSpec | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """Build a randomly initialised ``StableDiffusionPipeline`` (no safety checker), deterministic for ``seed``."""
    spec = spec or RandomSDSpec()
    tokenizer = build_clip_tokenizer(spec.num_merges, spec.max_length)
    unet_config = dict(spec.unet, cross_attention_dim=spec.text_hidden_size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**tiny_text_encoder_config(len(tokenizer), spec.max_length, spec.text_hidden_size))
    )
    scheduler = DDIMScheduler(**default_scheduler_config(spec.prediction_type))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_random_clip(folder: str | os.PathLike[str], seed: int = 0, width: int = 32, image_size: int = 32) -> None:
    """Save a tiny randomly initialised CLIP (model, image processor, real CLIP BPE tokenizer) to ``folder``.

    It loads like any CLIP (``CLIPEncoder(folder)``); tests and offline demos use it where no real CLIP can be
    downloaded. Its embeddings are meaningless but deterministic for a given ``seed``.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_clip_tokenizer(num_merges=500, model_max_length=32)
    vocab_size = len(tokenizer)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, max_position_embeddings=32, bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **common,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **common),
        projection_dim=width,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
