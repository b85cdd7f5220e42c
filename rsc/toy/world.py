"""Building, caching and loading the toy world.

A toy world is a folder::

    manifest.json      versions, seed, config, sizes, stage times, measured statistics
    sd/                the biased toy SD (diffusers StableDiffusionPipeline format)
    classifier/        the attribute classifier (model.safetensors + config.json)
    preferences/       the preference DatasetDict (datasets.save_to_disk; train/validation)
    samples.png        a grid of toy SD samples per prompt

It is built in stages inside a hidden work folder next to its destination;
each finished stage is saved there, so a killed build resumes where it
stopped, and the folder is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from datasets import DatasetDict, load_from_disk

from rsc.atomic import write_json_atomic
from rsc.backbone import FrozenLDM
from rsc.cache import cache_root
from rsc.images import uint8_to_tensor
from rsc.tokenizer import build_clip_tokenizer
from rsc.toy.classifier import ToyAttributeClassifier, train_toy_classifier
from rsc.toy.data import BiasSpec, make_biased_dataset, toy_prompts
from rsc.toy.evaluate import ToySamples, sample_toy_prompts, save_prompt_grid, toy_statistics
from rsc.toy.preferences import build_preference_pairs
from rsc.toy.train_sd import (
    UNetTrainingConfig,
    VAETrainingConfig,
    assemble_pipeline,
    center_latents,
    encode_posteriors,
    train_text_to_image,
    train_vae,
)

# Bump when a code change alters what a build produces, so cached worlds are rebuilt.
TOY_WORLD_VERSION = 2
SHIPPED_WORLD_DIR = Path(__file__).parent / "world"


@dataclass
class ClassifierBuildConfig:
    """How the attribute classifier is trained."""

    num_images: int = 3000
    epochs: int = 2
    base_channels: int = 16


@dataclass
class ToyWorldConfig:
    """Everything that determines a toy world (with ``seed``)."""

    seed: int = 0
    num_train_images: int = 6000
    image_size: int = 64
    bias: BiasSpec = field(default_factory=BiasSpec)
    classifier: ClassifierBuildConfig = field(default_factory=ClassifierBuildConfig)
    vae: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    unet: UNetTrainingConfig = field(default_factory=UNetTrainingConfig)
    tokenizer_merges: int = 1000
    eval_samples_per_prompt: int = 64
    preference_samples_per_prompt: int = 96
    sampling_steps: int = 20
    guidance_scale: float = 7.0
    validation_fraction: float = 0.1

    @classmethod
    def full(cls, seed: int = 0) -> ToyWorldConfig:
        """The toy world of the demo and of the efficacy claims."""
        return cls(seed=seed)

    @classmethod
    def micro(cls, seed: int = 0) -> ToyWorldConfig:
        """A seconds-to-build world with the same structure, for unit tests (no statistics guaranteed)."""
        return cls(
            seed=seed,
            num_train_images=256,
            classifier=ClassifierBuildConfig(num_images=400, epochs=1, base_channels=8),
            vae=VAETrainingConfig(block_out_channels=(8, 8, 16), norm_num_groups=4, steps=12, batch_size=8),
            unet=UNetTrainingConfig(
                block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=4,
                norm_num_groups=8,
                text_hidden_size=32,
                steps=12,
                batch_size=8,
            ),
            tokenizer_merges=200,
            eval_samples_per_prompt=4,
            preference_samples_per_prompt=6,
            sampling_steps=4,
            validation_fraction=0.25,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self) -> str:
        """Hash of the config and the toy-world code version: equal fingerprints build equal worlds."""
        payload = json.dumps({"version": TOY_WORLD_VERSION, "config": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ToyWorld:
    """A built toy world, loaded."""

    path: Path
    manifest: dict[str, Any]

    @property
    def sd_path(self) -> Path:
        """The diffusers pipeline folder of the toy SD."""
        return self.path / "sd"

    @property
    def classifier_path(self) -> Path:
        """The attribute classifier's folder."""
        return self.path / "classifier"

    @property
    def preferences_path(self) -> Path:
        """The preference DatasetDict's folder."""
        return self.path / "preferences"

    @property
    def targeted_groups(self) -> tuple[str, ...]:
        """Groups the toy SD stereotypes."""
        return tuple(self.manifest["config"]["bias"]["targeted_groups"])

    def load_backbone(self, device: str | torch.device | None = None) -> FrozenLDM:
        """The toy SD as a frozen backbone."""
        return FrozenLDM.from_pretrained(self.sd_path, device=device)

    def load_classifier(self) -> ToyAttributeClassifier:
        """The attribute classifier."""
        return ToyAttributeClassifier.from_pretrained(self.classifier_path)

    def load_preferences(self) -> DatasetDict:
        """The preference dataset (train/validation)."""
        return load_from_disk(str(self.preferences_path))


def _versions() -> dict[str, str]:
    import datasets
    import diffusers
    import transformers

    import rsc

    return {
        "rsc": rsc.__version__,
        "toy_world": str(TOY_WORLD_VERSION),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
    }


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _Stages:
    """Runs named build stages once; a finished stage leaves a marker and its outputs in the work folder."""

    def __init__(self, work: Path, log: Callable[[str], None], total: int) -> None:
        self.work, self.log, self.total, self.index = work, log, total, 0
        self.times: dict[str, float] = {}
        state = work / "stage_times.json"
        if state.is_file():
            self.times = json.loads(state.read_text())

    def run(self, name: str, build: Callable[[], None]) -> None:
        self.index += 1
        marker = self.work / f".done-{name}"
        if marker.exists():
            self.log(f"[{self.index}/{self.total}] {name}: reused from an interrupted build")
            return
        self.log(f"[{self.index}/{self.total}] {name} ...")
        start = time.perf_counter()
        build()
        self.times[name] = round(time.perf_counter() - start, 1)
        write_json_atomic(self.work / "stage_times.json", self.times)
        marker.touch()
        self.log(f"[{self.index}/{self.total}] {name}: done in {self.times[name]:.1f} s")


def build_toy_world(
    out: str | os.PathLike[str],
    config: ToyWorldConfig | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ToyWorld:
    """Build a toy world into ``out`` (atomically), or return the one already there with the same fingerprint.

    Args:
        out: Destination folder.
        config: What to build; default :meth:`ToyWorldConfig.full`.
        force: Rebuild even if ``out`` holds a world with the same fingerprint.
        progress: Show progress bars inside stages.
        log: Where stage progress lines go.
    """
    config = config or ToyWorldConfig.full()
    out = Path(out).expanduser()
    fingerprint = config.fingerprint()
    if not force:
        existing = _load_if_matching(out, fingerprint)
        if existing is not None:
            log(f"toy world {fingerprint} already built at {out}")
            return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.building-{fingerprint}"
    if force and work.exists():
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    torch_threads = torch.get_num_threads()
    if not progress:
        _silence_library_progress_bars()
    log(f"building toy world {fingerprint} (seed {config.seed}) in {work}")
    started = time.perf_counter()
    stages = _Stages(work, log, total=6)
    seed = config.seed

    def classifier_stage() -> None:
        classifier, accuracy = train_toy_classifier(
            num_images=config.classifier.num_images,
            epochs=config.classifier.epochs,
            seed=seed,
            base_channels=config.classifier.base_channels,
            progress=progress,
        )
        classifier.save_pretrained(work / "classifier")
        write_json_atomic(work / "classifier_accuracy.json", accuracy)

    def vae_stage() -> None:
        data = make_biased_dataset(config.num_train_images, seed, config.bias, size=config.image_size)
        vae = train_vae(uint8_to_tensor(data.images), config.vae, seed, progress=progress)
        means, _ = encode_posteriors(vae, uint8_to_tensor(data.images))
        center_latents(vae, means)
        vae.save_pretrained(work / "vae")

    def unet_stage() -> None:
        from diffusers import AutoencoderKL

        data = make_biased_dataset(config.num_train_images, seed, config.bias, size=config.image_size)
        vae = AutoencoderKL.from_pretrained(work / "vae")
        vae.register_to_config(_name_or_path="rsc-toy-vae")  # not the temporary build path
        # Posterior means only: the toy VAE's posterior noise would otherwise blur what the UNet learns.
        means, _ = encode_posteriors(vae, uint8_to_tensor(data.images))
        tokenizer = build_clip_tokenizer(config.tokenizer_merges, config.unet.text_max_length)
        unet, text_encoder = train_text_to_image(
            tokenizer, means, torch.zeros_like(means), vae.config.scaling_factor, data.captions, config.unet, seed,
            progress=progress,
        )
        assemble_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(work / "sd")

    def evaluation_stage() -> None:
        samples = _sample(work, config, config.eval_samples_per_prompt, first_seed=0, progress=progress)
        write_json_atomic(work / "statistics.json", toy_statistics(samples))
        save_prompt_grid(samples, work / "samples.png", per_prompt=8)

    def preference_stage() -> None:
        # Seeds disjoint from the evaluation seeds, so measured efficacy is not on training pairs.
        samples = _sample(work, config, config.preference_samples_per_prompt, first_seed=100_000, progress=progress)
        pairs = build_preference_pairs(samples, seed, validation_fraction=config.validation_fraction)
        if (work / "preferences").exists():
            shutil.rmtree(work / "preferences")
        pairs.save_to_disk(str(work / "preferences"))

    stages.run("classifier", classifier_stage)
    stages.run("vae", vae_stage)
    stages.run("unet", unet_stage)
    stages.run("evaluation", evaluation_stage)
    stages.run("preferences", preference_stage)
    stages.run("manifest", lambda: _write_manifest(work, config, fingerprint, stages.times, torch_threads))
    if out.exists():
        shutil.rmtree(out)
    for leftover in [*work.glob(".done-*"), work / "stage_times.json", work / "classifier_accuracy.json", work / "statistics.json"]:
        leftover.unlink(missing_ok=True)
    shutil.rmtree(work / "vae", ignore_errors=True)  # the VAE lives on inside sd/
    os.replace(work, out)
    log(f"toy world {fingerprint} ready at {out} ({time.perf_counter() - started:.0f} s this run)")
    return load_toy_world(out)


def _silence_library_progress_bars() -> None:
    import datasets
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _sample(work: Path, config: ToyWorldConfig, per_prompt: int, first_seed: int, progress: bool) -> ToySamples:
    ldm = FrozenLDM.from_pretrained(work / "sd")
    classifier = ToyAttributeClassifier.from_pretrained(work / "classifier")
    return sample_toy_prompts(
        ldm,
        classifier,
        per_prompt,
        first_seed=first_seed,
        steps=config.sampling_steps,
        guidance_scale=config.guidance_scale,
        progress=progress,
    )


def _write_manifest(
    work: Path, config: ToyWorldConfig, fingerprint: str, stage_times: dict[str, float], threads: int
) -> None:
    statistics = json.loads((work / "statistics.json").read_text())
    preferences = load_from_disk(str(work / "preferences"))
    sd = FrozenLDM.from_pretrained(work / "sd")
    manifest = {
        "fingerprint": fingerprint,
        "seed": config.seed,
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads},
        "config": config.to_dict(),
        "stage_seconds": stage_times,
        "build_seconds": round(sum(stage_times.values()), 1),
        "sizes": {
            "train_images": config.num_train_images,
            "unet_parameters": sum(p.numel() for p in sd.unet.parameters()),
            "vae_parameters": sum(p.numel() for p in sd.vae.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in sd.text_encoder.parameters()),
            "classifier_parameters": sum(p.numel() for p in ToyAttributeClassifier.from_pretrained(work / "classifier").parameters()),
            "preference_pairs": {split: preferences[split].num_rows for split in preferences},
            "eval_images": config.eval_samples_per_prompt * len(toy_prompts()),
            "bytes": {name: _folder_size(work / name) for name in ("sd", "classifier", "preferences")},
        },
        "statistics": {
            "classifier_heldout_accuracy": json.loads((work / "classifier_accuracy.json").read_text()),
            "eval_seeds": [0, config.eval_samples_per_prompt - 1],
            "sampling": {"steps": config.sampling_steps, "guidance_scale": config.guidance_scale, "scheduler": "DDIMScheduler"},
            **statistics,
        },
    }
    write_json_atomic(work / "manifest.json", manifest)


def _load_if_matching(path: Path, fingerprint: str) -> ToyWorld | None:
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    return ToyWorld(path, manifest) if manifest.get("fingerprint") == fingerprint else None


def load_toy_world(path: str | os.PathLike[str]) -> ToyWorld:
    """Load a built toy world folder, checking that it is complete."""
    path = Path(path).expanduser()
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{path} is not a built toy world: no manifest.json (build one with `python -m rsc.toy build`)")
    missing = [name for name in ("sd", "classifier", "preferences") if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"toy world {path} is incomplete: missing {missing}")
    return ToyWorld(path, json.loads(manifest_file.read_text()))


def get_toy_world(
    config: ToyWorldConfig | None = None, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> ToyWorld:
    """The toy world for ``config``: the one shipped in the package if it matches, else cached, else built."""
    config = config or ToyWorldConfig.full()
    fingerprint = config.fingerprint()
    shipped = _load_if_matching(SHIPPED_WORLD_DIR, fingerprint)
    if shipped is not None:
        return shipped
    out = Path(cache_dir or cache_root()) / f"toy_world-{fingerprint}"
    return build_toy_world(out, config, progress=progress)
