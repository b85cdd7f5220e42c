#!/usr/bin/env python
"""Inference cost of the correction: time per image and peak memory of plain vs. corrected sampling, side by side.

For each backbone (the toy SD; a UNet of SD 1.5's architecture with random
weights on small latents, with the default SD 1.x refiner) it runs rsc's
sampler on the same prompts, seeds, steps, guidance and batch:

* ``plain``: no correction;
* ``corrected``: the refiner inside the training window (the toy demo's 0.1-0.5; 0-0.5 for SD 1.5);
* ``corrected, full window``: the refiner at every step, the worst case;
* ``x0-reading``: a refiner with ``x0_input`` inside the training window (one more
  conditional UNet call per corrected step, for the frozen model's x0-prediction).

Repeats are interleaved (plain, corrected, full, plain, ...) after a warm-up
run of each; the median and the fastest run are reported. On a CPU the
clock is the process's CPU time (wall time on a shared machine would measure
the other jobs too; with one thread it equals wall time on an idle machine);
on CUDA it is synchronised wall time. It prints seconds per image, the
ratio corrected / plain (goal: <= 1.03 at SD 1.5 size; methods that add UNet
passes per step cost >= 1.5x) and the peak memory of each workload above the
memory held before it: ``torch.cuda.max_memory_allocated`` on CUDA; on a
Linux CPU the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``, after ``malloc_trim`` returned freed memory to the
system), measured in a separate pass after the timing.

    python scripts/bench_inference.py [--batch 2] [--steps 4] [--repeats 3] [--sd15-latent 16] [--skip-sd15]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from benchmarking import interleaved_times
from rsc.backbone import DTYPES, FrozenLDM
from rsc.testing import RandomSDSpec, build_random_sd, sd15_unet_config
from rsc.refiner import LatentRefiner, RefinerConfig, RefinerCorrection
from rsc.sampling import sample

TOY_SD = Path(__file__).resolve().parents[1] / "rsc" / "toy" / "world" / "sd"


class PeakMemory:
    """Peak memory of a call above what was held before it, in bytes (``None`` where it cannot be measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc: ctypes.CDLL | None = None
        if device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def measure(self, function: Callable[[], object]) -> int | None:
        """Run ``function`` once and return its peak memory."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            function()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device) - base
        if self.libc is None:
            function()
            return None
        # Hand back what earlier calls freed but glibc kept, so this call's peak is its own.
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = self._status_kib("VmRSS")
        function()
        return (self._status_kib("VmHWM") - base) * 1024


def random_refiner(config: RefinerConfig, device: torch.device, dtype: torch.dtype) -> LatentRefiner:
    """A refiner with a non-zero output layer (an untrained one is zero there; the cost is the same)."""
    torch.manual_seed(0)
    refiner = LatentRefiner(config)
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.01)
    return refiner.to(device, dtype).eval()


def bench(name: str, ldm: FrozenLDM, config: RefinerConfig, window: tuple[float, float], args: argparse.Namespace) -> None:
    """Time and measure the four workloads interleaved and print one block of results."""
    device = ldm.device
    prompts = ["a photo of a doctor"] * args.batch
    seeds = list(range(args.batch))
    refiner = random_refiner(config, device, ldm.dtype)
    correction = RefinerCorrection(refiner, 1.0)
    x0_correction = RefinerCorrection(random_refiner(replace(config, x0_input=True), device, ldm.dtype), 1.0,
                                      x0_predictor=ldm.predict_x0)

    def run(correction_window: tuple[float, float] | None, chosen: RefinerCorrection = correction) -> Callable[[], object]:
        return lambda: sample(
            ldm, prompts, seeds, steps=args.steps, guidance_scale=7.5, batch_size=args.batch, progress=False,
            correction=None if correction_window is None else chosen, correction_window=correction_window or (0.0, 1.0),
        )

    workloads = {
        "plain": run(None),
        f"corrected {window[0]:g}-{window[1]:g}": run(window),
        "corrected 0-1 (every step)": run((0.0, 1.0)),
        f"x0-reading {window[0]:g}-{window[1]:g}": run(window, x0_correction),
    }
    # On a CPU, this process's CPU time: wall time on a shared machine measures the other jobs too.
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times = interleaved_times(workloads, args.repeats, device, clock)
    per_image = {key: statistics.median(values) / args.batch for key, values in times.items()}
    fastest = {key: min(values) / args.batch for key, values in times.items()}
    memory = PeakMemory(device)
    peaks = {key: memory.measure(function) for key, function in workloads.items()}

    latent = ldm.image_size // ldm.vae_scale_factor
    unit = "CPU s" if device.type == "cpu" else "s"
    print(f"\n{name}: {latent}x{latent} latents, {args.steps} steps, batch {args.batch}, CFG 7.5, "
          f"refiner {refiner.num_parameters():,} params, UNet {sum(p.numel() for p in ldm.unet.parameters()):,} params")
    for key in workloads:
        peak = "n/a" if peaks[key] is None else f"{peaks[key] / 2**20:.1f} MiB"
        print(f"  {key:<28} median {per_image[key]:8.4f} {unit}/image (ratio {per_image[key] / per_image['plain']:.3f})  "
              f"fastest {fastest[key]:8.4f} {unit}/image (ratio {fastest[key] / fastest['plain']:.3f})  peak {peak}")


def main() -> None:
    """Benchmark the toy SD and an SD 1.5-architecture UNet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="images per run (one sampler batch)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--toy-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sd15-latent", type=int, default=16, help="latent side for the SD 1.5 UNet (64 = 512px)")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"device {device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")

    toy = FrozenLDM.from_pretrained(TOY_SD, dtype=dtype, device=device)
    toy_refiner = RefinerConfig(latent_channels=toy.latent_channels, text_embedding_dim=toy.text_embedding_dim,
                                hidden_channels=64, num_blocks=3, embedding_dim=128, norm_groups=16)  # configs/toy.yaml
    toy_args = argparse.Namespace(**{**vars(args), "steps": args.toy_steps})
    bench("toy SD", toy, toy_refiner, (0.1, 0.5), toy_args)
    if args.skip_sd15:
        return
    spec = RandomSDSpec(num_merges=1000, text_hidden_size=768, unet=sd15_unet_config(args.sd15_latent))
    sd15 = FrozenLDM.from_pipeline(build_random_sd(spec)).to(device, dtype)
    bench("SD 1.5 UNet (random weights; tiny VAE and text encoder)", sd15, RefinerConfig(), (0.0, 0.5), args)


if __name__ == "__main__":
    main()
