#!/usr/bin/env python
"""One prepared GPU check (at most 8 minutes), everything built from configs: nothing is downloaded.

An SD-1.5-architecture backbone with random weights (the UNet of SD 1.5; a tiny VAE and text encoder of
SD 1.5's text width 768), trained as ``configs/sd15.yaml`` does: bfloat16 backbone, bf16 autocast
(``bf16-mixed``), gradient checkpointing, the config's refiner, 64x64 latents. It measures

* training: pairs/s and peak memory of a full step (``RSCorrector.pair_step`` + backward + AdamW) at
  batch 8 and 32 (a batch that does not fit is recorded as ``"error": "out of memory"``);
* inference: time per image of plain vs. corrected sampling (the config's window) at 25 steps,

and writes them as JSON to ``<out>/gpu_check.json`` after every measurement, so a run cut short still
leaves what it measured. ``--tiny`` runs the same code on a tiny SD on CPU in seconds (CI runs it so the
script cannot rot).

    bash scripts/gpu_check.sh                    # writes to $OUT
    python scripts/gpu_check.py --tiny --out DIR # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import PeakMemory  # noqa: E402
from benchmarking import interleaved_times  # noqa: E402
from rsc.module import RSCorrector  # noqa: E402
from rsc.refiner import RefinerCorrection  # noqa: E402
from rsc.sampling import sample  # noqa: E402
from rsc.testing import RandomSDSpec, build_random_sd, sd15_unet_config, tiny_unet_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT_NAME = "gpu_check.json"
# configs/sd15.yaml's refiner and window; the tiny run uses a refiner that fits a tiny backbone.
SD15_REFINER = {"hidden_channels": 128, "num_blocks": 4, "embedding_dim": 256, "norm_groups": 32}
TINY_REFINER = {"hidden_channels": 8, "num_blocks": 1, "embedding_dim": 8, "norm_groups": 4}
WINDOW = (0.2, 0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--tiny`` switches every default to CPU-sized ones)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for gpu_check.json ($OUT)")
    parser.add_argument("--tiny", action="store_true", help="a tiny SD on CPU at tiny sizes (CI)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="training batches (default 8 32; tiny 2 4)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 64; tiny 16)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; tiny 2)")
    parser.add_argument("--images", type=int, default=None, help="images per sampling run (default 4; tiny 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 5; tiny 1)")
    args = parser.parse_args(argv)
    defaults = ({"batches": [2, 4], "latent": 16, "steps": 2, "images": 1, "repeats": 1, "device": "cpu"} if args.tiny
                else {"batches": [8, 32], "latent": 64, "steps": 25, "images": 4, "repeats": 5,
                      "device": "cuda" if torch.cuda.is_available() else "cpu"})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_backbone(folder: Path, tiny: bool, latent: int) -> None:
    """Save a random SD-1.5-architecture pipeline (or the tiny test SD) to ``folder`` in diffusers format."""
    if tiny:
        spec = RandomSDSpec(unet=dict(tiny_unet_config(), sample_size=latent))
    else:
        spec = RandomSDSpec(text_hidden_size=768, unet=sd15_unet_config(latent))
    build_random_sd(spec, seed=0).save_pretrained(folder)


def measure_training(module: RSCorrector, batch: int, latent: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """pairs/s and peak memory of full training steps (bf16 autocast) on one batch of random latents."""
    ldm = module.ldm
    generator = torch.Generator().manual_seed(0)
    shape = (batch, ldm.latent_channels, latent, latent)
    pairs = {
        "anti_stereotypical_latents": torch.randn(shape, generator=generator).to(device),
        "stereotypical_latents": torch.randn(shape, generator=generator).to(device),
        "prompt_embeds": torch.randn(batch, ldm.tokenizer.model_max_length, ldm.text_embedding_dim,
                                     generator=generator).to(device),
    }
    optimizer = torch.optim.AdamW(module.refiner.parameters(), lr=1e-4)
    losses: list[float] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output, _ = module.pair_step(pairs, torch.Generator().manual_seed(1))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        losses.append(float(output.loss))

    try:
        seconds = interleaved_times({"step": step}, repeats, device)["step"]
        peak = PeakMemory(device).measure(step)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"batch": batch, "error": "out of memory"}
    median = statistics.median(seconds)
    return {"batch": batch, "step_s": median, "pairs_per_s": batch / median, "repeats": repeats,
            "peak_memory_mib": None if peak is None else peak / 2**20,
            "loss_finite": all(torch.isfinite(torch.tensor(losses)).tolist())}


def measure_inference(module: RSCorrector, images: int, steps: int, latent: int, repeats: int,
                      device: torch.device) -> dict[str, Any]:
    """Seconds per image of plain vs. corrected sampling (the config's window), interleaved."""
    ldm, refiner = module.ldm, module.refiner.eval()
    with torch.no_grad():  # an untrained refiner is zero at the output: give it one that changes the images
        torch.nn.init.normal_(refiner.conv_out.weight, std=0.01)
    prompts, seeds = ["a photo of a doctor"] * images, list(range(images))
    size = latent * ldm.vae_scale_factor

    def run(correction: RefinerCorrection | None) -> Callable[[], object]:
        return lambda: sample(ldm, prompts, seeds, steps=steps, guidance_scale=7.5, correction=correction,
                              correction_window=WINDOW, batch_size=images, height=size, width=size, progress=False)

    times = interleaved_times({"plain": run(None), "corrected": run(RefinerCorrection(refiner, 1.0))}, repeats, device)
    per_image = {key: statistics.median(values) / images for key, values in times.items()}
    return {"steps": steps, "images": images, "guidance_scale": 7.5, "correction_window": list(WINDOW),
            "plain_s_per_image": per_image["plain"], "corrected_s_per_image": per_image["corrected"],
            "ratio": per_image["corrected"] / per_image["plain"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement and write ``<out>/gpu_check.json`` after each; return the result."""
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "latent": args.latent,
        "backbone": "tiny test SD" if args.tiny else "SD 1.5 UNet architecture, random weights; tiny VAE, 768-d text encoder",
        "backbone_dtype": "bfloat16", "autocast": "bfloat16", "gradient_checkpointing": True,
        "refiner": TINY_REFINER if args.tiny else SD15_REFINER, "training": [], "inference": None,
    }

    def write() -> None:
        result["wall_s"] = time.perf_counter() - start
        (out / RESULT_NAME).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)

    with tempfile.TemporaryDirectory() as folder:
        build_backbone(Path(folder), args.tiny, args.latent)
        module = RSCorrector(folder, backbone_dtype="bfloat16", gradient_checkpointing=True,
                             correction_window=WINDOW, **(TINY_REFINER if args.tiny else SD15_REFINER)).to(device)
    result["refiner_parameters"] = module.refiner.num_parameters()
    write()
    for batch in args.batches:
        result["training"].append(measure_training(module, batch, args.latent, args.repeats, device))
        write()
    result["inference"] = measure_inference(module, args.images, args.steps, args.latent, args.repeats, device)
    write()
    return result


if __name__ == "__main__":
    main()
