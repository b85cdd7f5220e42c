"""``python -m rsc.generate``: corrected (and optionally uncorrected) images from an exported refiner.

    python -m rsc.generate --refiner runs/toy/version_0/refiner --backbone rsc/toy/world/sd \\
        --prompts prompts.txt --out samples/ --num-per-prompt 4 --steps 20 --guidance 7 --compare

For every (prompt, seed) it writes ``<index>_<prompt>_seed<seed>.png`` and a
JSON sidecar with the prompt, seed, steps, guidance, strength, scheduler,
window, backbone and the refiner's sha256; ``--compare`` adds
``..._compare.png`` with the uncorrected and the corrected image side by side.

Runs resume: an image whose sidecar (written last, every file atomically)
records the same settings is skipped, so a killed run picks up where it
stopped and never leaves half-written files. A sidecar with other settings
stops the run (use another ``--out`` or ``--overwrite``). Image ``i`` depends
only on its prompt and seed, not on the batch it was sampled in (up to float
rounding: a resumed run's images match an uninterrupted run's to one grey level).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from rsc import __version__
from rsc.atomic import atomic_path, write_json_atomic
from rsc.backbone import DTYPES
from rsc.cli import run_cli
from rsc.export import ExportInfo, load_refiner_for
from rsc.identity import BackboneConfigs
from rsc.refiner import CONFIG_NAME

log = logging.getLogger(__name__)

# Sidecar fields that define an image: a finished image with other values is not this run's.
IDENTITY_FIELDS = (
    "prompt", "seed", "steps", "guidance", "strength", "correction_window", "scheduler", "negative_prompt",
    "backbone", "refiner_sha256",
)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one a line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist (expected a text file with one prompt a line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (blank lines and # comments are skipped)")
    return prompts


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0,1,7"`` or ranges ``"0-7"`` (inclusive), or a mix: ``"0-3,10"``."""
    seeds: list[int] = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"--seeds: {part!r} is not a seed (N) or an increasing range (N-M)")
        low = int(match.group(1))
        seeds.extend(range(low, int(match.group(2) or low) + 1))
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seeds")
    return seeds


def _slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "prompt"


@dataclass
class ImageJob:
    """One image to produce: its prompt, seed, file stem and sidecar settings."""

    prompt: str
    seed: int
    stem: str
    settings: dict[str, Any]

    def paths(self, out: Path) -> tuple[Path, Path, Path]:
        """Corrected PNG, comparison PNG and sidecar."""
        return out / f"{self.stem}.png", out / f"{self.stem}_compare.png", out / f"{self.stem}.json"


@dataclass
class GenerateSummary:
    """What a run did."""

    out: Path
    generated: int
    skipped: int


def _finished(job: ImageJob, out: Path, compare: bool) -> bool:
    """Whether ``job`` is done; raise if its sidecar records other settings."""
    image, comparison, sidecar = job.paths(out)
    if not sidecar.is_file():
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    differing = {key: (recorded.get(key), job.settings[key]) for key in IDENTITY_FIELDS if recorded.get(key) != job.settings[key]}
    if differing:
        details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differing.items())
        raise FileExistsError(
            f"{sidecar} was made with other settings ({details}); use another --out, or --overwrite to replace it"
        )
    return image.is_file() and (comparison.is_file() or not compare)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 4) -> Image.Image:
    """Two images next to each other on white, ``gap`` pixels apart."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def generate(
    refiner: str | Path,
    prompts_file: str | Path,
    out: str | Path,
    backbone: str | None = None,
    seeds: Sequence[int] | None = None,
    num_per_prompt: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    strength: float | None = None,
    scheduler: str | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    compare: bool = False,
    overwrite: bool = False,
    backbone_config: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    allow_backbone_mismatch: bool = False,
    progress: bool = True,
) -> GenerateSummary:
    """Generate the images of ``python -m rsc.generate`` (see the module docstring); returns what was done."""
    from rsc.backbone import FrozenLDM
    from rsc.sampling import make_scheduler, sample

    prompts = read_prompts(prompts_file)
    seeds = list(seeds) if seeds is not None else list(range(num_per_prompt))
    if not seeds:
        raise ValueError("no seeds: pass --seeds or --num-per-prompt >= 1")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"--batch-size and --steps must be >= 1, got {batch_size} and {steps}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    refiner_dir = Path(refiner)
    info = ExportInfo.from_config_file(refiner_dir / CONFIG_NAME)  # fails fast, before the backbone loads
    backbone = backbone or info.backbone
    out = Path(out)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ldm = FrozenLDM.from_pretrained(backbone, config=backbone_config, dtype=DTYPES[dtype], device=device)
    exported = load_refiner_for(
        refiner_dir, BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler),
        allow_mismatch=allow_backbone_mismatch, device=ldm.device,
    )
    strength = exported.info.strength if strength is None else float(strength)
    common = {
        "steps": steps, "guidance": guidance, "strength": strength,
        "correction_window": list(exported.info.correction_window),
        "scheduler": type(make_scheduler(ldm.scheduler, scheduler)).__name__,
        "negative_prompt": negative_prompt, "backbone": backbone,
        "refiner": str(refiner_dir), "refiner_sha256": exported.weights_sha256,
        "height": ldm.image_size, "width": ldm.image_size, "rsc_version": __version__,
    }
    jobs = [
        ImageJob(prompt, seed, f"{index:04d}_{_slug(prompt)}_seed{seed}", {"prompt": prompt, "seed": seed, **common})
        for index, prompt in enumerate(prompts)
        for seed in seeds
    ]
    pending = [job for job in jobs if overwrite or not _finished(job, out, compare)]
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(steps=steps, guidance_scale=guidance, scheduler=scheduler, negative_prompt=negative_prompt,
                  batch_size=batch_size, progress=False)
    correction = exported.correction(strength, x0_predictor=ldm.predict_x0)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="generating", unit="image", disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        batch_prompts, batch_seeds = [job.prompt for job in batch], [job.seed for job in batch]
        corrected = sample(ldm, batch_prompts, batch_seeds, correction=correction,
                           correction_window=exported.info.correction_window, **kwargs).to_pil()
        plain = sample(ldm, batch_prompts, batch_seeds, **kwargs).to_pil() if compare else [None] * len(batch)
        for job, image, uncorrected in zip(batch, corrected, plain):
            image_path, comparison_path, sidecar_path = job.paths(out)
            _save_png(image, image_path)
            if uncorrected is not None:
                _save_png(side_by_side(uncorrected, image), comparison_path)
            # The sidecar goes last: its presence marks the image finished.
            write_json_atomic(sidecar_path, {
                **job.settings, "image": image_path.name,
                "compare_image": comparison_path.name if uncorrected is not None else None,
            })
            bar.update(1)
    bar.close()
    return GenerateSummary(out=out, generated=len(pending), skipped=len(jobs) - len(pending))


def main(argv: list[str] | None = None) -> GenerateSummary:
    """Parse the command line and generate; a bad input ends with one line (:mod:`rsc.cli`)."""
    return run_cli(_main, argv, "rsc.generate")


def _main(argv: list[str] | None) -> GenerateSummary:
    parser = argparse.ArgumentParser(
        prog="python -m rsc.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--refiner", required=True, help="exported refiner folder (python -m rsc.export)")
    parser.add_argument("--backbone", default=None, help="Hub id, diffusers folder or single file (default: the refiner's)")
    parser.add_argument("--backbone-config", default=None, help="diffusers config folder of a single-file backbone")
    parser.add_argument("--prompts", required=True, help="text file, one prompt a line (# comments allowed)")
    parser.add_argument("--out", required=True, help="output folder")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=parse_seeds, default=None, help='seeds for every prompt: "0,1,7", "0-7"')
    seeds.add_argument("--num-per-prompt", type=int, default=1, help="seeds 0..N-1 for every prompt (default 1)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--strength", type=float, default=None, help="correction strength (default: the refiner's)")
    parser.add_argument("--scheduler", default=None, help="diffusers scheduler class, e.g. EulerDiscreteScheduler")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--compare", action="store_true", help="also write uncorrected | corrected side by side")
    parser.add_argument("--overwrite", action="store_true", help="regenerate finished images too")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--allow-backbone-mismatch", action="store_true",
                        help="use the refiner with a backbone of another fingerprint or other weights, "
                        "e.g. a fine-tune (a deliberate transfer)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = generate(
        args.refiner, args.prompts, args.out, backbone=args.backbone, seeds=args.seeds,
        num_per_prompt=args.num_per_prompt, steps=args.steps, guidance=args.guidance, strength=args.strength,
        scheduler=args.scheduler, negative_prompt=args.negative_prompt, batch_size=args.batch_size,
        compare=args.compare, overwrite=args.overwrite, backbone_config=args.backbone_config, device=args.device,
        dtype=args.dtype, allow_backbone_mismatch=args.allow_backbone_mismatch, progress=not args.no_progress,
    )
    log.info("%d images generated, %d already there, in %s", summary.generated, summary.skipped, summary.out)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
