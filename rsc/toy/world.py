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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import DatasetDict, load_from_disk

from rsc.atomic import write_json_atomic
from rsc.backbone import FrozenLDM
from rsc.cache import cache_root
from rsc.images import uint8_to_tensor
from rsc.tokenizer import build_clip_tokenizer
from rsc.toy.calibration import LabelledImages, labelled_renders, model_views, psnr, vae_round_trip
from rsc.toy.classifier import ToyAttributeClassifier, labelled_accuracy, train_toy_classifier
from rsc.toy.data import BiasSpec, CaptionedFaces, CaptionSpec, make_biased_dataset, toy_prompts, unnamed_group_prompts
from rsc.toy.evaluate import sample_fidelity, sample_toy_prompts, save_prompt_grid, save_render_grid, toy_statistics
from rsc.toy.preferences import build_preference_pairs
from rsc.toy.manifest import TOY_WORLD_VERSION, toy_source_hash, versions, write_manifest
from rsc.toy.quality import ToyQualityJudge, train_quality_judge
from rsc.toy.train_sd import (
    UNetTrainingConfig,
    VAETrainingConfig,
    assemble_pipeline,
    center_latents,
    encode_posteriors,
    train_text_to_image,
    train_vae,
)

SHIPPED_WORLD_DIR = Path(__file__).parent / "world"


@dataclass
class ClassifierBuildConfig:
    """How the attribute classifier is trained: on renders and on the toy SD's views of renders.

    Attributes:
        num_images: Training renders.
        epochs: Passes over the training set.
        base_channels: Width of the first conv block.
        model_view_images: Further labelled renders shown through the toy SD and added to the training set
            (half as VAE round trips, half redrawn by img2img; :mod:`rsc.toy.calibration`).
        heldout_images: Held-out renders per view for the manifest's accuracies.
        max_img2img_strength: Strongest img2img redraw (fraction of the trajectory).
    """

    num_images: int = 3000
    epochs: int = 2
    base_channels: int = 16
    model_view_images: int = 1600
    heldout_images: int = 500
    max_img2img_strength: float = 0.3


@dataclass
class QualityBuildConfig:
    """How the facial-quality judge is trained (:func:`rsc.toy.quality.train_quality_judge`)."""

    num_images: int = 6000
    epochs: int = 5
    base_channels: int = 16


@dataclass
class ToyWorldConfig:
    """Everything that determines a toy world (with ``seed``)."""

    seed: int = 0
    num_train_images: int = 6000
    image_size: int = 64
    bias: BiasSpec = field(default_factory=BiasSpec)
    captions: CaptionSpec = field(default_factory=CaptionSpec)
    classifier: ClassifierBuildConfig = field(default_factory=ClassifierBuildConfig)
    quality: QualityBuildConfig = field(default_factory=QualityBuildConfig)
    vae: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    unet: UNetTrainingConfig = field(default_factory=UNetTrainingConfig)
    tokenizer_merges: int = 1000
    vae_heldout_images: int = 500
    eval_samples_per_prompt: int = 64
    descriptor_samples_per_prompt: int = 32
    preference_samples_per_prompt: int = 96
    winner_search_samples_per_prompt: int = 96
    sampling_steps: int = 20
    guidance_scale: float = 7.0
    validation_fraction: float = 0.1

    @classmethod
    def full(cls, seed: int = 0, bias: BiasSpec | None = None) -> ToyWorldConfig:
        """The toy world of the demo and of the efficacy claims (``bias``: another planted bias)."""
        return cls(seed=seed, bias=bias or BiasSpec())

    @classmethod
    def micro(cls, seed: int = 0) -> ToyWorldConfig:
        """A seconds-to-build world with the same structure, for unit tests (no statistics guaranteed)."""
        return cls(
            seed=seed,
            num_train_images=256,
            classifier=ClassifierBuildConfig(
                num_images=400, epochs=1, base_channels=8, model_view_images=16, heldout_images=8
            ),
            quality=QualityBuildConfig(num_images=64, epochs=1, base_channels=4),
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
            vae_heldout_images=16,
            eval_samples_per_prompt=4,
            descriptor_samples_per_prompt=2,
            preference_samples_per_prompt=6,
            winner_search_samples_per_prompt=4,
            sampling_steps=4,
            validation_fraction=0.25,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self) -> str:
        """Hash of the config, the toy-world design version and its code: equal fingerprints build equal worlds."""
        payload = json.dumps(
            {"version": TOY_WORLD_VERSION, "code": toy_source_hash(), "config": self.to_dict()}, sort_keys=True
        )
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


# Per-stage results that the manifest gathers; not part of a built world.
_STAGE_FILES = ("stage_times.json", "vae_psnr.json", "classifier_accuracy.json", "quality_judge.json", "statistics.json")


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
    stages = _Stages(work, log, total=8)
    seed = config.seed

    def training_data() -> CaptionedFaces:
        return make_biased_dataset(config.num_train_images, seed, config.bias, size=config.image_size, captions=config.captions)

    def vae_stage() -> None:
        images = uint8_to_tensor(training_data().images)
        vae = train_vae(images, config.vae, seed, progress=progress)
        means, _ = encode_posteriors(vae, images)
        center_latents(vae, means)
        vae.save_pretrained(work / "vae")
        heldout = labelled_renders(config.vae_heldout_images, seed=10 * seed + 3, stereotype_rate=0.0)
        write_json_atomic(work / "vae_psnr.json", {"psnr_db": psnr(vae_round_trip(vae, heldout.images), heldout.images)})

    def unet_stage() -> None:
        from diffusers import AutoencoderKL

        data = training_data()
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

    def classifier_stage() -> None:
        # Trained after the SD: it must judge the SD's images, so it also learns from the SD's views of renders.
        views = model_views(
            work / "sd", labelled_renders(config.classifier.model_view_images, seed=10 * seed + 4), seed,
            max_strength=config.classifier.max_img2img_strength, progress=progress,
        )
        classifier, accuracy = train_toy_classifier(
            num_images=config.classifier.num_images,
            epochs=config.classifier.epochs,
            seed=seed,
            base_channels=config.classifier.base_channels,
            progress=progress,
            num_eval_images=config.classifier.heldout_images,
            extra_training=LabelledImages.concat(list(views.values())),
        )
        heldout_views = model_views(
            work / "sd", labelled_renders(2 * config.classifier.heldout_images, seed=10 * seed + 5), seed + 1,
            max_strength=config.classifier.max_img2img_strength, progress=progress,
        )
        accuracy = {"renders": accuracy, **{view: labelled_accuracy(classifier, data) for view, data in heldout_views.items()}}
        classifier.save_pretrained(work / "classifier")
        write_json_atomic(work / "classifier_accuracy.json", accuracy)

    def quality_stage() -> None:
        judge, statistics = train_quality_judge(
            num_images=config.quality.num_images, epochs=config.quality.epochs, seed=seed,
            base_channels=config.quality.base_channels, progress=progress,
        )
        judge.save_pretrained(work / "quality")
        write_json_atomic(work / "quality_judge.json", statistics)

    def evaluation_stage() -> None:
        ldm, classifier = FrozenLDM.from_pretrained(work / "sd"), ToyAttributeClassifier.from_pretrained(work / "classifier")
        judge = ToyQualityJudge.from_pretrained(work / "quality")
        sampling = {"steps": config.sampling_steps, "guidance_scale": config.guidance_scale, "progress": progress}
        samples = sample_toy_prompts(ldm, classifier, config.eval_samples_per_prompt, first_seed=0, **sampling)
        described = sample_toy_prompts(
            ldm, classifier, config.descriptor_samples_per_prompt, first_seed=0,
            prompt_table=toy_prompts(config.captions.clean_word) + toy_prompts(config.captions.stereotype_word), **sampling,
        )
        unnamed = sample_toy_prompts(
            ldm, classifier, config.eval_samples_per_prompt, first_seed=0,
            prompt_table=[(prompt, None, gender) for prompt, gender in unnamed_group_prompts()], **sampling,
        )
        statistics = toy_statistics(samples)
        fidelity = sample_fidelity(samples, classifier, judge, seed=10 * seed + 6)
        for prompt, values in fidelity.items():
            statistics["per_prompt"][prompt].update(values)
        statistics["descriptors"] = toy_statistics(described)["per_prompt"]
        statistics["unnamed_group"] = toy_statistics(unnamed)["per_prompt"]
        write_json_atomic(work / "statistics.json", statistics)
        save_prompt_grid(samples, work / "samples.png", per_prompt=8)
        save_render_grid(work / "renders.png", per_prompt=8, seed=10 * seed + 6)

    def preference_stage() -> None:
        ldm, classifier = FrozenLDM.from_pretrained(work / "sd"), ToyAttributeClassifier.from_pretrained(work / "classifier")
        sampling = {"steps": config.sampling_steps, "guidance_scale": config.guidance_scale, "progress": progress}
        # Seeds disjoint from the evaluation seeds, so measured efficacy is not on training pairs.
        samples = sample_toy_prompts(ldm, classifier, config.preference_samples_per_prompt, first_seed=100_000, **sampling)
        # Winners from the model itself: the targeted prompts with the clean-face word give more clean samples;
        # losers from the model too: the other groups' prompts with the stereotype word.
        targeted = [row for row in toy_prompts(config.captions.clean_word) if row[1] in config.bias.targeted_groups]
        others = [row for row in toy_prompts(config.captions.stereotype_word) if row[1] not in config.bias.targeted_groups]
        extra = sample_toy_prompts(
            ldm, classifier, config.winner_search_samples_per_prompt, first_seed=200_000, prompt_table=targeted + others,
            **sampling,
        )
        pairs = build_preference_pairs(samples, seed, validation_fraction=config.validation_fraction, extra=extra)
        if (work / "preferences").exists():
            shutil.rmtree(work / "preferences")
        pairs.save_to_disk(str(work / "preferences"))

    stages.run("vae", vae_stage)
    stages.run("unet", unet_stage)
    stages.run("classifier", classifier_stage)
    stages.run("quality", quality_stage)
    stages.run("evaluation", evaluation_stage)
    stages.run("preferences", preference_stage)
    stages.run("manifest", lambda: write_manifest(work, config, fingerprint, stages.times, torch_threads, versions()))
    manifest = json.loads((work / "manifest.json").read_text())
    missed = [name for name, check in manifest["targets"].items() if not check["ok"]]
    if missed:
        log(f"toy world {fingerprint} MISSES its targets: " + "; ".join(
            f"{name} = {manifest['targets'][name]['value']} (wanted {manifest['targets'][name]['wanted']})" for name in missed
        ))
    else:
        log(f"toy world {fingerprint} meets all {len(manifest['targets'])} targets")
    if out.exists():
        shutil.rmtree(out)
    for leftover in [*work.glob(".done-*"), *(work / name for name in _STAGE_FILES)]:
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
    missing = [name for name in ("sd", "classifier", "quality", "preferences") if not (path / name).is_dir()]
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
