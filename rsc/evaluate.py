"""``python -m rsc.evaluate --config configs/eval/toy.yaml --out DIR``: de-biasing methods side by side.

Every method (:mod:`rsc.methods`) draws the same prompts x seeds from the same
frozen backbone and scheduler; every image set is measured by
:func:`rsc.callbacks.measures.measure` (per prompt, per group, gap), the
methods' cost is timed interleaved on a few images, and ``--out`` receives:

* ``results.json``: every number (method x prompt/group x metric, cost), the settings and the versions;
* ``report.md`` and a self-contained ``report.html`` (:mod:`rsc.report`);
* ``cache/<method>/``: one PNG per (method, prompt, seed), named by a hash of everything that defines it
  (method options and weights, sampling settings, backbone, prompt, seed). A killed run re-renders
  nothing finished; a changed setting re-renders only the images it changes.

Under ``torchrun --nproc_per_node N -m rsc.evaluate ...`` (or with ``torch.distributed`` initialised by
the caller) the (prompt, seed) items are split by striding across ranks like ``FairnessValidation``. The
methods are set up before the processes join the group (a file lock lets one of them train an adapter
while the others wait and load it), the metrics' states are reduced by torchmetrics, and rank 0 times
the methods and writes the report (its grids read every rank's PNGs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from rsc import __version__
from rsc.atomic import atomic_path, write_json_atomic
from rsc.cli import run_cli
from rsc.callbacks.measures import FolderReferences, Judges, ToyRenderReferences, ValidationPrompt, add_ratio, measure
from rsc.classifiers.base import AestheticPredictor, AttributeClassifier
from rsc.methods import Method, MethodContext, SamplingSettings, build_method

log = logging.getLogger(__name__)

BASELINE = "none"


@dataclass
class MethodSpec:
    """A method of the comparison: its registered ``name``, a unique ``label`` (default: the name), its ``options``."""

    name: str
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The label used in results, cache folders and the report."""
        return self.label or self.name


@dataclass
class Item:
    """One (prompt, seed) of the evaluation and its global index."""

    index: int
    prompt_id: int
    seed: int


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str, length: int = 40) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "prompt"


def _load_png(path: Path) -> Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB")).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def _save_png(image: Tensor, path: Path) -> None:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


class ImageCache:
    """PNG per (method, prompt, seed) under ``root/<method label>/``, named by the hash of what defines it.

    Every file is written atomically, so a file that exists is finished.
    """

    def __init__(self, root: Path, label: str, identity: dict[str, Any]) -> None:
        self.folder, self.identity = root / label, identity

    def path(self, prompt: ValidationPrompt, seed: int) -> Path:
        """Where the image of ``prompt`` and ``seed`` lives."""
        digest = _hash({**self.identity, "prompt": prompt.prompt, "seed": seed})[:16]
        return self.folder / f"{_slug(prompt.key)}_seed{seed}_{digest}.png"


def _check_inputs(prompts: list[ValidationPrompt], seeds: list[int], methods: list[MethodSpec]) -> None:
    if not prompts:
        raise ValueError("prompts is empty; list at least one {prompt, group, gender} in the config")
    if not seeds:
        raise ValueError("seeds is empty; give a count (e.g. 64) or a list of seeds")
    if not methods:
        raise ValueError("methods is empty; name at least one method (e.g. {name: rsc})")
    keys = [m.key for m in methods]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"methods have duplicate labels {duplicates}; give each a distinct label")


def _unet_counter(unets: list[torch.nn.Module]) -> tuple[list[int], list[Any]]:
    """Count images through the UNets (forward pre-hooks adding each call's batch size)."""
    count = [0]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        count[0] += int(sample.shape[0])

    unique = {id(unet): unet for unet in unets}
    return count, [unet.register_forward_pre_hook(hook, with_kwargs=True) for unet in unique.values()]


def measure_cost(
    methods: dict[str, Method], prompts: list[ValidationPrompt], sampling: SamplingSettings, images: int, rounds: int,
) -> dict[str, dict[str, float]]:
    """Seconds per image (median of ``rounds``), ratio to ``none``, UNet passes per image and peak memory per method.

    The methods run interleaved (round 1: every method, round 2: every method, ...) on the same
    ``images`` (prompt, seed) pairs after one untimed warm-up call each, so load on the machine affects
    them alike (on a busy machine the ratios are still noisy: time on a quiet one). Peak memory is the
    CUDA peak allocated during the method's runs, or on a CPU the process's peak RSS so far (an upper bound).
    """
    if images < 1 or rounds < 1:
        return {}
    chosen = [prompts[i % len(prompts)] for i in range(images)]
    seeds = [1_000_000 + i for i in range(images)]  # not the evaluation's seeds: nothing is cached
    times: dict[str, list[float]] = {key: [] for key in methods}
    passes: dict[str, int] = {}
    peaks: dict[str, float] = {key: 0.0 for key in methods}
    unets = [unet for method in methods.values() for unet in method.unets()]
    cuda = next(unets[0].parameters()).is_cuda
    for method in methods.values():  # untimed warm-up: first calls pay for allocations and lazy set-up
        method.render(chosen[:1], seeds[:1], sampling)
    count, handles = _unet_counter(unets)
    try:
        for _ in range(rounds):
            for key, method in methods.items():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                count[0] = 0
                started = time.perf_counter()
                method.render(chosen, seeds, sampling)
                if cuda:
                    torch.cuda.synchronize()
                times[key].append((time.perf_counter() - started) / images)
                passes[key] = count[0]
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                peaks[key] = max(peaks[key], peak)
    finally:
        for handle in handles:
            handle.remove()
    seconds = {key: statistics.median(values) for key, values in times.items()}
    base = seconds.get(BASELINE)
    return {
        key: {"seconds_per_image": seconds[key], "ratio_to_none": seconds[key] / base if base else None,
              "unet_passes_per_image": passes[key] / images,
              "peak_memory_mb": peaks[key], "memory_kind": "cuda_allocated" if cuda else "process_rss"}
        for key in methods
    }


def _summary(metrics: dict[str, Any], targeted: list[str]) -> dict[str, float | None]:
    """The trade-off at a glance: targeted stereotype rate, non-targeted SSIM, quality, diversity ratio."""
    groups = metrics["per_group"]

    def mean(names: list[str], metric: str) -> float | None:
        values = [groups[g].get(metric) for g in names if groups.get(g, {}).get(metric) is not None]
        return float(np.mean(values)) if values else None

    others = [g for g in groups if g not in targeted]
    return {
        "targeted_stereotype_rate": mean(targeted, "stereotype_rate"),
        "non_targeted_ssim": mean(others, "ssim"),
        "targeted_gender_consistency": mean(targeted, "gender_consistency"),
        "quality": metrics["all"].get("quality"),
        "diversity_ratio": metrics["all"].get("diversity_ratio"),
    }


def evaluate(
    out: str,
    classifier: AttributeClassifier,
    prompts: list[ValidationPrompt],
    methods: list[MethodSpec],
    backbone: str = "rsc/toy/world/sd",
    seeds: list[int] | int = 64,
    quality: AestheticPredictor | None = None,
    references: str | None = "toy",
    reference_count: int = 64,
    refiner: str | None = None,
    targeted_groups: list[str] | None = None,
    steps: int = 20,
    guidance_scale: float = 7.5,
    scheduler: str | None = None,
    batch_size: int = 16,
    cost_images: int = 4,
    cost_rounds: int = 3,
    grid_seeds: int = 4,
    kid_subsets: int = 100,
    group_attribute: str = "group",
    gender_attribute: str | None = "gender",
    stereotype_attribute: str | None = "stereotype",
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Render, measure and report every method (see the module docstring); returns what ``results.json`` holds.

    Args:
        out: Output folder (results, report, image cache).
        classifier: Attribute classifier of the metrics (and of ``classifier_guidance``).
        prompts: The prompts and the group / gender each names.
        methods: The methods to compare; ``none`` is added first if absent (every comparison needs it).
        backbone: Hub id, diffusers folder or single file of the frozen model.
        seeds: Seeds for every prompt; an integer ``n`` means ``0 .. n-1``.
        quality: Facial-quality / aesthetic predictor; ``None`` to skip.
        references: ``"toy"`` (clean toy renders), a folder with one subfolder of photos per group, or ``None``.
        reference_count: Toy renders per group / prompt.
        refiner: Overrides the ``refiner`` option of every ``rsc`` method (e.g. ``--refiner runs/toy/refiner``).
        targeted_groups: Groups the backbone stereotypes (the report's trade-off summary).
        steps: Sampling steps.
        guidance_scale: Classifier-free guidance.
        scheduler: Diffusers scheduler class name; default: the backbone's.
        batch_size: Images per rendering batch.
        cost_images: Images per method and round of the interleaved timing (0: no timing).
        cost_rounds: Timing rounds (the median is reported).
        grid_seeds: Seeds per prompt in the report's before/after grids.
        kid_subsets: KID subsets per group / prompt.
        group_attribute: The classifier attribute that prompts' ``group`` names.
        gender_attribute: The attribute that prompts' ``gender`` names (``None``: skip).
        stereotype_attribute: A binary attribute whose column 1 is "stereotype present" (``None``: skip).
        device: Default: this process's GPU if there is one (under torchrun: LOCAL_RANK's), else cpu.
        progress: Progress bars.
    """
    from rsc.backbone import FrozenLDM
    from rsc.identity import BackboneConfigs
    from rsc.report import write_report

    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    prompts = [p if isinstance(p, ValidationPrompt) else ValidationPrompt(**p) for p in prompts]
    methods = [m if isinstance(m, MethodSpec) else MethodSpec(**m) for m in methods]
    _check_inputs(prompts, seeds, methods)
    built: dict[str, Method] = {}
    for index, spec in enumerate(methods):
        options = dict(spec.options)
        if spec.name == "rsc" and refiner is not None:
            options["refiner"] = refiner
        built[spec.key] = build_method(spec.name, options, where=f"methods[{index}] ({spec.key})")
    if BASELINE not in [m.name for m in methods]:  # every comparison is relative to plain sampling
        built = {BASELINE: build_method(BASELINE), **built}
    baseline_key = next(key for key, method in built.items() if method.name == BASELINE)
    if references is None:
        reference_source = None
    elif references == "toy":
        reference_source = ToyRenderReferences(count=reference_count)
    elif Path(references).is_dir():
        reference_source = FolderReferences(references)
    else:
        raise FileNotFoundError(f"references={references!r} is neither 'toy' nor a folder")
    judges = Judges(classifier=classifier, quality=quality, references=reference_source, group_attribute=group_attribute,
                    gender_attribute=gender_attribute, stereotype_attribute=stereotype_attribute)
    groups = judges.groups(prompts, "rsc.evaluate")  # fails before any model loads
    targeted = list(targeted_groups or [])
    unknown = sorted(set(targeted) - set(groups))
    if unknown:
        raise ValueError(f"targeted_groups {unknown} are not groups of the classifier ({list(groups)})")

    device = device or _default_device()
    ldm = FrozenLDM.from_pretrained(backbone, device=device)
    for module in (classifier, quality, judges.features):
        if module is not None:
            module.to(device).eval()  # judges are frozen: batch norm uses its running statistics
    context = MethodContext(ldm=ldm, classifier=classifier)
    # Before joining torchrun's process group: a method that trains (finetune_dpo) trains once, under a file
    # lock the other processes wait on, with Lightning in this process alone.
    for method in built.values():
        method.setup(context)
    created = init_distributed_from_env()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    sampling = SamplingSettings(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
    backbone_label = BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler).label

    items = [Item(i, p, s) for i, (p, s) in enumerate((p, s) for p in range(len(prompts)) for s in seeds)]
    mine = items[rank::world]
    prompt_ids = torch.tensor([item.prompt_id for item in mine], dtype=torch.long)
    order = torch.tensor([item.index for item in mine], dtype=torch.long)

    out_dir = Path(out)
    images: dict[str, Tensor] = {}
    rendered: dict[str, int] = {}
    caches: dict[str, ImageCache] = {}
    for key, method in built.items():
        identity = {**method.identity(), "sampling": sampling.to_dict(), "backbone": backbone_label,
                    "size": ldm.image_size}
        cache = caches[key] = ImageCache(out_dir / "cache", key, identity)
        paths = [cache.path(prompts[item.prompt_id], item.seed) for item in mine]
        pending = [index for index, path in enumerate(paths) if not path.is_file()]
        bar = tqdm(total=len(paths), initial=len(paths) - len(pending), desc=key, unit="image",
                   disable=not progress or rank != 0)
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            drawn = method.render([prompts[mine[i].prompt_id] for i in batch], [mine[i].seed for i in batch], sampling)
            for index, image in zip(batch, drawn):
                _save_png(image, paths[index])
            bar.update(len(batch))
        bar.close()
        rendered[key] = _sum_over_ranks(len(pending), ldm.device) if distributed else len(pending)
        # Always measured from the PNGs: a resumed run measures exactly what an uninterrupted one does.
        images[key] = torch.stack([_load_png(path) for path in paths]) if paths else torch.zeros(0, 3, ldm.image_size, ldm.image_size)

    baseline = images[baseline_key]
    metrics: dict[str, Any] = {}
    iterator = tqdm(built, desc="measuring", unit="method", disable=not progress or rank != 0)
    for key in iterator:
        metrics[key] = measure(judges, prompts, prompt_ids, order, images[key],
                               baseline=None if key == baseline_key else baseline, kid_subsets=kid_subsets,
                               where="rsc.evaluate")
    for key in built:
        add_ratio(metrics[key], metrics[baseline_key])
    cost = measure_cost(built, prompts, sampling, cost_images, cost_rounds) if rank == 0 else {}
    if cost and baseline_key != BASELINE:
        for row in cost.values():
            base = cost[baseline_key]["seconds_per_image"]
            row["ratio_to_none"] = row["seconds_per_image"] / base

    import diffusers

    results = {
        "settings": {
            "backbone": backbone, "backbone_identity": backbone_label, "seeds": seeds, "sampling": sampling.to_dict(),
            "prompts": [{"prompt": p.prompt, "group": p.group, "gender": p.gender, "key": p.key} for p in prompts],
            "targeted_groups": targeted, "groups": list(groups), "references": references,
            "classifier": type(classifier).__name__, "quality": type(quality).__name__ if quality is not None else None,
            "device": device, "world_size": world,
        },
        "versions": {"rsc": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": sys.version.split()[0]},
        "baseline": baseline_key,
        "methods": {
            key: {"identity": built[key].identity(), "metrics": metrics[key], "cost": cost.get(key),
                  "summary": _summary(metrics[key], targeted), "rendered": rendered[key]}
            for key in built
        },
    }
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "results.json", _finite(results))
        # From the PNG cache, so that under DDP the grids hold every rank's images.
        grid_items = [item for item in items if item.seed in seeds[:grid_seeds]]
        grids = {key: torch.stack([_load_png(caches[key].path(prompts[item.prompt_id], item.seed)) for item in grid_items])
                 for key in built}
        write_report(results, grids, [prompts[item.prompt_id].key for item in grid_items], out_dir)
    if distributed:
        torch.distributed.barrier()  # the other ranks return once the report exists
    if created:
        torch.distributed.destroy_process_group()
    return results


def _sum_over_ranks(value: int, device: torch.device) -> int:
    total = torch.tensor([value], dtype=torch.long, device=device)  # NCCL reduces CUDA tensors only
    torch.distributed.all_reduce(total)
    return int(total.item())


def _local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` under torchrun, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _default_device() -> str:
    """This process's GPU (``LOCAL_RANK`` under torchrun), else the CPU."""
    return f"cuda:{_local_rank()}" if torch.cuda.is_available() else "cpu"


def init_distributed_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1, not joined yet), NCCL on GPUs, gloo on CPUs.

    Returns whether this call created the group (the caller then destroys it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or torch.distributed.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank())  # "cuda" then means this rank's GPU
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _finite(value: Any) -> Any:
    """NaN and infinities as ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_parser() -> Any:
    """The jsonargparse parser: every argument of :func:`evaluate`, plus ``--config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m rsc.evaluate", description=__doc__, default_env=True, env_prefix="RSC_EVAL")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (e.g. configs/eval/toy.yaml)")
    parser.add_function_arguments(evaluate, as_positional=False)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the configuration and evaluate; a user's mistake ends with one line and exit status 2 (:mod:`rsc.cli`)."""
    return run_cli(_main, argv, "rsc.evaluate")


def _main(argv: list[str] | None) -> dict[str, Any]:
    parser = build_parser()
    config = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    init = parser.instantiate(config)
    kwargs = {k: v for k, v in init.items() if k != "config"}
    results = evaluate(**kwargs)
    log.info("rsc.evaluate: wrote %s", Path(kwargs["out"]) / "report.html")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
