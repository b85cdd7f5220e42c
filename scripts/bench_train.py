#!/usr/bin/env python
"""Training throughput of rsc's step vs. the bare frozen-UNet work on the same batch, side by side.

For each backbone (the toy SD; a UNet of SD 1.5's architecture with random
weights on small latents) it times, interleaved on the same batch of pairs:

* ``step``: ``RSCorrector.pair_step`` + backward + optimizer step (refiner, noising,
  policy UNet forward+backward, reference UNet forward, loss);
* ``unet_fb``: the bare UNet forward+backward (gradients to the input) on the 2B latents;
* ``unet_fb+ref``: that plus the no-grad reference forward, i.e. the UNet work the method
  cannot avoid.

It prints pairs/s and the ratios step / unet_fb and step / (unet_fb+ref); the goal is a
step at most 1.15x the UNet work it needs.

    python scripts/bench_train.py [--pairs 8] [--repeats 5] [--sd15-latent 16] [--skip-sd15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarking import interleaved_times
from rsc.module import RSCorrector
from rsc.testing import RandomSDSpec, build_random_sd, sd15_unet_config


def bench(name: str, module: RSCorrector, pairs: int, latent: int, repeats: int) -> None:
    """Time the three workloads interleaved and print the table row."""
    device = module.device
    ldm = module.ldm
    generator = torch.Generator().manual_seed(0)
    shape = (pairs, ldm.latent_channels, latent, latent)
    batch = {
        "anti_stereotypical_latents": torch.randn(shape, generator=generator).to(device),
        "stereotypical_latents": torch.randn(shape, generator=generator).to(device),
        "prompt_embeds": torch.randn(pairs, ldm.tokenizer.model_max_length, ldm.text_embedding_dim, generator=generator).to(device),
    }
    optimizer = torch.optim.AdamW(module.refiner.parameters(), lr=1e-4)
    timesteps = torch.randint(0, 1000, (2 * pairs,), generator=generator).to(device)
    text = torch.cat([batch["prompt_embeds"]] * 2)
    latents = torch.cat([batch["anti_stereotypical_latents"], batch["stereotypical_latents"]])

    def step() -> None:
        output, _ = module.pair_step(batch, torch.Generator().manual_seed(1))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()

    def unet_forward_backward() -> None:
        inputs = latents.clone().requires_grad_(True)
        ldm.unet_output(inputs, timesteps, text).float().pow(2).mean().backward()

    def unet_forward_backward_and_reference() -> None:
        unet_forward_backward()
        with torch.no_grad():
            ldm.unet_output(latents, timesteps, text)

    workloads = {"step": step, "unet_fb": unet_forward_backward, "unet_fb+ref": unet_forward_backward_and_reference}
    times = interleaved_times(workloads, repeats, device)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(
        f"{name:<28} pairs/s: step {pairs / median['step']:8.2f}  unet_fb {pairs / median['unet_fb']:8.2f}  "
        f"unet_fb+ref {pairs / median['unet_fb+ref']:8.2f} | step/unet_fb {median['step'] / median['unet_fb']:.3f}  "
        f"step/(unet_fb+ref) {median['step'] / median['unet_fb+ref']:.3f}"
    )


def main() -> None:
    """Run the benchmark on the toy SD and on an SD 1.5-architecture UNet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sd15-latent", type=int, default=16, help="latent side for the SD 1.5 UNet (64 = 512px)")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    toy = Path(__file__).resolve().parents[1] / "rsc" / "toy" / "world" / "sd"
    module = RSCorrector(str(toy), hidden_channels=64, num_blocks=3, embedding_dim=128, norm_groups=16).to(device)
    bench("toy SD (16x16 latents)", module, args.pairs, 16, args.repeats)
    if args.skip_sd15:
        return
    with tempfile.TemporaryDirectory() as folder:
        spec = RandomSDSpec(num_merges=1000, text_hidden_size=768, unet=sd15_unet_config(args.sd15_latent))
        build_random_sd(spec).save_pretrained(folder)
        module = RSCorrector(folder).to(device)  # SD 1.x refiner defaults
        bench(f"SD 1.5 UNet ({args.sd15_latent}x{args.sd15_latent} latents)", module, args.pairs, args.sd15_latent, args.repeats)


if __name__ == "__main__":
    main()
