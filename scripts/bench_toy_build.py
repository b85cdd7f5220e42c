#!/usr/bin/env python
"""Training-step time of the toy world's VAE and UNet in fp32 and under bf16 autocast, side by side.

The toy world's build (``python -m rsc.toy build``) spends most of its time in these two loops; its
``precision: auto`` trains the VAE under bf16 autocast where the CPU computes bf16 natively and the UNet
in fp32 everywhere. This measures both choices on this machine: one optimiser step (forward, backward,
AdamW) of each model as :mod:`rsc.toy.train_sd` configures it, on random data of the shipped world's
shapes, the two precisions interleaved. It prints ms per step and the ratio fp32 / bf16 (above 1: bf16
is faster here).

    python scripts/bench_toy_build.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarking import interleaved_times
from rsc.testing import tiny_text_encoder_config
from rsc.toy.train_sd import UNetTrainingConfig, VAETrainingConfig, cpu_has_native_bf16
from rsc.toy.world import ToyWorldConfig


def vae_step(config: VAETrainingConfig, image_size: int) -> Callable[[bool], Callable[[], None]]:
    """A VAE step on a batch of crops (``bf16`` -> the step)."""
    vae = AutoencoderKL(**config.model_config(image_size))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    side = config.crop_size or image_size
    batch = torch.rand(config.batch_size, 3, side, side) * 2 - 1

    def make(bf16: bool) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                posterior = vae.encode(batch).latent_dist
                reconstruction = vae.decode(posterior.sample()).sample.float()
            loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step
    return make


def unet_step(config: UNetTrainingConfig, latent_size: int, latent_channels: int) -> Callable[[bool], Callable[[], None]]:
    """A UNet + text encoder step on noisy latents and captions (``bf16`` -> the step)."""
    unet = UNet2DConditionModel(**config.model_config(latent_size, latent_channels))
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(1000, config.text_max_length, config.text_hidden_size)))
    optimizer = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), lr=1e-4)
    latents = torch.randn(config.batch_size, latent_channels, latent_size, latent_size)
    token_ids = torch.randint(1000, (config.batch_size, config.text_max_length))
    timesteps = torch.randint(1000, (config.batch_size,))

    def make(bf16: bool) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                prediction = unet(latents, timesteps, encoder_hidden_states=text_encoder(token_ids)[0]).sample.float()
            loss = F.mse_loss(prediction, latents)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step
    return make


def main() -> None:
    """Time both models' steps in both precisions and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    world = ToyWorldConfig.full()
    factor = 2 ** (len(world.vae.block_out_channels) - 1)
    models = {
        "VAE": vae_step(world.vae, world.image_size),
        "UNet": unet_step(world.unet, world.image_size // factor, world.vae.latent_channels),
    }
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}, torch {torch.__version__}")
    for name, make in models.items():
        times = interleaved_times({"fp32": make(False), "bf16": make(True)}, args.repeats, torch.device("cpu"))
        fp32, bf16 = (statistics.median(times[key]) for key in ("fp32", "bf16"))
        print(f"{name:<5} ms/step: fp32 {1000 * fp32:7.1f}  bf16 {1000 * bf16:7.1f} | fp32/bf16 {fp32 / bf16:.2f}")


if __name__ == "__main__":
    main()
