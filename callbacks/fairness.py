"""Validation callback: sample a fixed prompt set x fixed seeds with and without the refiner and log fairness metrics.

Every ``every_n_val_epochs`` validation epochs, :class:`FairnessValidation` samples
each (prompt, seed) of its config with the frozen backbone, with and without
``correction()`` inside ``correction_window`` of the module (:class:`rsc.callbacks.protocol.CorrectorModule`),
classifies the images (optionally on MTCNN face crops) and logs the metrics of
:mod:`rsc.callbacks.metrics` as ``val/<metric>/<group>`` plus summaries
(``val/<metric>/all``, ``val/<metric>/gap``); the uncorrected values are logged as
``val/<metric>_uncorrected/<group>``. An image grid (per group, uncorrected row
above corrected row) is saved under ``<log dir>/fairness/`` and added to
TensorBoard when a ``TensorBoardLogger`` is in use; under DDP it shows rank 0's images.

Under DDP the (prompt, seed) list is split by index striding (rank ``r`` takes items
``r, r + W, r + 2W, ...``), so no image is generated twice and none is padded in;
every rank calls ``compute()`` (a collective), and the metrics' summed states make
the values equal to a single-process run. The backbone is frozen, so the uncorrected
images, and the metric values computed from them, are produced once per run and cached
(in CPU memory: N x 3 x H x W float32 per rank).

Cost: the first run samples every (prompt, seed) twice, later runs once; sampling
dominates (classifiers and metrics take under 3 s), so the cost grows with
prompts x seeds x steps. On the toy world (20 DDIM steps, guidance 7, a 2-core
CPU shared with one or two training jobs, so the numbers are noisy): 8 prompts x
16 seeds took 265 s for the first run and 90 s for each later one; 8 prompts x 8
seeds 117 s and 83 s. Each run's split is in :attr:`FairnessValidation.last_timing`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric

from rsc.callbacks.measures import IMAGE_SUFFIXES, ValidationPrompt, attribute_metrics, check_prompt_attributes
from rsc.callbacks.metrics import (
    AestheticScore,
    DistributionFairness,
    FaceDetection,
    LPIPSPreservation,
    PromptFidelity,
    SSIMPreservation,
    find_local_lpips_backbone,
)
from rsc.callbacks.protocol import CorrectorModule, as_corrector
from rsc.classifiers.base import AestheticPredictor, AttributeClassifier, module_device
from rsc.classifiers.clip import CLIPEncoder
from rsc.classifiers.faces import MTCNNFaces
from rsc.images import before_after_grid
from rsc.sampling import sample

@dataclass
class _Shard:
    """This rank's (prompt, seed) items and their per-image targets."""

    prompts: list[str]
    keys: list[str]  # the prompts' ValidationPrompt.key
    seeds: list[int]
    group_ids: Tensor  # -1: the prompt names no group
    gender_targets: Tensor  # -1: the prompt names no gender
    neutral_ids: Tensor  # index among the prompts that name no group, -1 otherwise


@dataclass
class _Analysis:
    """What the classifiers say about one batch of images."""

    probabilities: dict[str, Tensor]
    found: Tensor
    confidence: Tensor
    aesthetic: Tensor | None


class FairnessValidation(Callback):
    """Fairness, quality and preservation metrics of the refiner on a fixed prompt set, every N validation epochs.

    Args:
        classifier: Attribute classifier (e.g. ``rsc.classifiers.ToyClassifier`` or ``FairFaceClassifier``).
        prompts: The fixed validation prompts.
        seeds: Sampling seeds, the same for every prompt; an integer ``n`` means ``0 .. n-1``.
        every_n_val_epochs: Run on every N-th validation epoch (sanity checks do not count).
        steps: Sampling steps.
        guidance_scale: Classifier-free guidance.
        batch_size: Sampling batch size.
        group_attribute: The classifier attribute that prompts' ``group`` names (``"race"`` for FairFace).
        gender_attribute: The attribute that prompts' ``gender`` names; ``None`` to skip gender consistency.
        stereotype_attribute: A binary attribute whose column 1 is "stereotype present"; ``None`` to skip.
        stereotype_threshold: Probability above which an image counts as stereotyped.
        faces: Face detector/cropper; the classifier then reads face crops, and images without a face are
            counted (``face_detection_rate``) and left out of the attribute metrics. ``None``: whole images.
        aesthetic: Aesthetic predictor for ``aesthetic/<group>`` (``rsc.classifiers.LaionAestheticPredictor``,
            or ``ToyFacialQuality`` on the toy world); ``None`` to skip.
        clip_model: Local CLIP folder (or cached Hub id) for ``clip_score/<group>``; ``None`` to skip.
        lpips_backbone_weights: Local torchvision weights of LPIPS' backbone, ``"auto"`` (torch hub cache if
            present, else skip), or ``None`` to skip.
        lpips_net: LPIPS backbone: ``"alex"``, ``"vgg"`` or ``"squeeze"``.
        fid_reference: Folder of reference images for FID/KID; ``None`` to skip.
        fid_features: Feature extractor for FID/KID (an ``nn.Module`` mapping images in [0, 1] to (N, D));
            default: the CLIP image encoder of ``clip_model``.
        kid_subset_size: KID subset size (capped by the number of images).
        low_confidence: Top-probability threshold of a low-confidence group prediction.
        grid_images_per_group: Images per row of the grid; 0 disables the grid.
    """

    def __init__(
        self,
        classifier: AttributeClassifier,
        prompts: list[ValidationPrompt],
        seeds: list[int] | int = 16,
        every_n_val_epochs: int = 1,
        steps: int = 20,
        guidance_scale: float = 7.5,
        batch_size: int = 32,
        group_attribute: str = "group",
        gender_attribute: str | None = "gender",
        stereotype_attribute: str | None = "stereotype",
        stereotype_threshold: float = 0.5,
        faces: MTCNNFaces | None = None,
        aesthetic: AestheticPredictor | None = None,
        clip_model: str | None = None,
        lpips_backbone_weights: str | None = "auto",
        lpips_net: str = "alex",
        fid_reference: str | None = None,
        fid_features: nn.Module | None = None,
        kid_subset_size: int = 100,
        low_confidence: float = 0.5,
        grid_images_per_group: int = 8,
    ) -> None:
        super().__init__()
        if every_n_val_epochs < 1:
            raise ValueError(f"FairnessValidation.every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.classifier, self.faces, self.aesthetic = classifier, faces, aesthetic
        self.prompts = [p if isinstance(p, ValidationPrompt) else ValidationPrompt(**p) for p in prompts]
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
        if not self.prompts or not self.seeds:
            raise ValueError(f"FairnessValidation needs prompts and seeds, got {len(self.prompts)} and {len(self.seeds)}")
        self.every_n_val_epochs, self.steps, self.guidance_scale = every_n_val_epochs, steps, guidance_scale
        self.batch_size = batch_size
        self.group_attribute, self.gender_attribute = group_attribute, gender_attribute
        self.stereotype_attribute, self.stereotype_threshold = stereotype_attribute, stereotype_threshold
        self.clip_model, self.lpips_net, self.lpips_backbone_weights = clip_model, lpips_net, lpips_backbone_weights
        self.fid_reference, self.fid_features, self.kid_subset_size = fid_reference, fid_features, kid_subset_size
        self.low_confidence, self.grid_images_per_group = low_confidence, grid_images_per_group
        self.groups = self._check_config()
        self.neutral = [p.key for p in self.prompts if p.group is None]

        self._validation_runs = 0
        self._baseline: dict[str, Any] | None = None  # images, analysis and metric values of the uncorrected run
        self._metrics: dict[str, Metric] | None = None
        self._references_added = False
        #: ``{"val/<metric>/<key>": value}`` of the last run (corrected and uncorrected).
        self.last_values: dict[str, float] = {}
        #: The trainer's global step at the last run: the weights that ``last_values`` judged.
        self.last_step: int | None = None
        #: Seconds spent in the last run: uncorrected sampling (first run only), corrected sampling, metrics, total.
        self.last_timing: dict[str, float] = {}

    # ------------------------------------------------------------------ configuration
    def _check_config(self) -> tuple[str, ...]:
        return check_prompt_attributes(self.classifier, self.prompts, self.group_attribute, self.gender_attribute,
                                       self.stereotype_attribute, "FairnessValidation")

    def _shard(self, rank: int, world_size: int) -> _Shard:
        items = [(index, seed) for index in range(len(self.prompts)) for seed in self.seeds]
        mine = items[rank::world_size]
        labels = self.classifier.labels
        neutral_index = {key: i for i, key in enumerate(self.neutral)}

        def target(value: str | None, attribute: str | None) -> int:
            return labels[attribute].index(value) if value is not None and attribute is not None else -1

        chosen = [self.prompts[index] for index, _ in mine]
        return _Shard(
            prompts=[p.prompt for p in chosen],
            keys=[p.key for p in chosen],
            seeds=[seed for _, seed in mine],
            group_ids=torch.tensor([target(p.group, self.group_attribute) for p in chosen], dtype=torch.long),
            gender_targets=torch.tensor([target(p.gender, self.gender_attribute) for p in chosen], dtype=torch.long),
            neutral_ids=torch.tensor([neutral_index.get(p.key, -1) for p in chosen], dtype=torch.long),
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Move the classifiers to the module's device."""
        for module in (self.classifier, self.faces, self.aesthetic, self.fid_features):
            if module is not None:
                module.to(pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        """The validation-run counter, so the every-N-th cadence continues across a resume."""
        return {"validation_runs": self._validation_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the validation-run counter."""
        self._validation_runs = int(state_dict.get("validation_runs", 0))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every N-th validation epoch: sample, measure, log, save the grid."""
        if trainer.sanity_checking:
            return
        self._validation_runs += 1
        if self._validation_runs % self.every_n_val_epochs:
            return
        values = self.run(trainer, pl_module)
        self.last_step = trainer.global_step
        # Values are already reduced across ranks; sync_dist averages equal numbers (a no-op) and keeps
        # Lightning from warning about unsynced epoch-level logs under DDP.
        pl_module.log_dict({key: float(value) for key, value in values.items()}, sync_dist=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn when the last measurement judged other weights than the final ones."""
        if self.last_step is not None and self.last_step != trainer.global_step:
            # An epoch cadence that does not divide the step budget ends the fit between two validations.
            rank_zero_warn(
                f"FairnessValidation last measured at step {self.last_step}, the fit ended at step "
                f"{trainer.global_step}: its values are not the final refiner's (validate on a step cadence "
                "that divides max_steps: check_val_every_n_epoch: null, val_check_interval: <steps>)"
            )

    # ------------------------------------------------------------------ the measurement
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample, classify and compute every metric; return ``{"val/...": value}`` (same on every rank)."""
        started = time.perf_counter()
        rank, world_size = trainer.global_rank, trainer.world_size
        shard = self._shard(rank, world_size)
        timing: dict[str, float] = {}
        corrector = as_corrector(pl_module, "FairnessValidation")
        key = (str(corrector.export_config()["backbone"]), rank, world_size)
        if self._baseline is None or self._baseline["key"] != key:
            tick = time.perf_counter()
            images = self._sample(corrector, shard, correction=False)
            self._baseline = {"key": key, "images": images, "analysis": self._analyse(images), "values": None}
            self._metrics = None
            self._references_added = False
            timing["uncorrected_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        corrected = self._sample(corrector, shard, correction=True)
        timing["corrected_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        if self._metrics is None:
            self._metrics = self._make_metrics(pl_module.device)
        self._add_references(rank, world_size, corrected.shape[-2:])
        analysis = self._analyse(corrected)
        if self._baseline["values"] is None:
            self._update(self._metrics, shard, self._baseline["images"], self._baseline["analysis"], baseline=None)
            self._baseline["values"] = self._compute(self._metrics, "_uncorrected")
        self._update(self._metrics, shard, corrected, analysis, baseline=self._baseline["images"])
        values = {**self._compute(self._metrics, ""), **self._baseline["values"]}
        timing["metrics_s"] = time.perf_counter() - tick

        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "fairness"  # log_dir broadcasts: every rank asks
        if trainer.is_global_zero and self.grid_images_per_group > 0:
            self._save_grid(trainer, shard, self._baseline["images"], corrected, out_dir)
        timing["total_s"] = time.perf_counter() - started
        self.last_values, self.last_timing = values, timing
        rank_zero_info(
            f"fairness validation: {len(self.prompts) * len(self.seeds)} images per variant on {world_size} "
            f"rank(s) in {timing['total_s']:.1f} s ("
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timing.items() if name != "total_s") + ")"
        )
        return values

    def _sample(self, corrector: CorrectorModule, shard: _Shard, correction: bool) -> Tensor:
        if not shard.prompts:  # more ranks than items
            size = corrector.ldm.image_size
            return torch.zeros(0, 3, size, size)
        kwargs: dict[str, Any] = {}
        if correction:
            kwargs = {"correction": corrector.correction(), "correction_window": corrector.correction_window}
        return sample(corrector.ldm, shard.prompts, shard.seeds, steps=self.steps, guidance_scale=self.guidance_scale,
                      batch_size=self.batch_size, progress=False, **kwargs).images

    def _analyse(self, images: Tensor) -> _Analysis:
        n = len(images)
        if n == 0:
            return _Analysis({name: torch.zeros(0, len(labels)) for name, labels in self.classifier.labels.items()},
                             torch.zeros(0, dtype=torch.bool), torch.zeros(0), torch.zeros(0) if self.aesthetic is not None else None)
        with torch.no_grad():
            if self.faces is not None:
                crops, detections = self.faces(images)
                found, confidence = detections.found, detections.confidence
            else:
                crops, found, confidence = images, torch.ones(n, dtype=torch.bool), torch.ones(n)
            probabilities = {k: v.cpu() for k, v in self.classifier.predict(crops, batch_size=self.batch_size).items()}
            aesthetic = None
            if self.aesthetic is not None:
                aesthetic = self.aesthetic(images.to(module_device(self.aesthetic))).cpu()
        return _Analysis(probabilities, found, confidence, aesthetic)

    def _make_metrics(self, device: torch.device) -> dict[str, Metric]:
        groups = self.groups
        metrics: dict[str, Metric] = attribute_metrics(
            groups, self.gender_attribute is not None, self.stereotype_attribute is not None, self.stereotype_threshold)
        if self.faces is not None:
            metrics["faces"] = FaceDetection(groups)
        if self.neutral:
            metrics["distribution"] = DistributionFairness(self.neutral, len(groups), low_confidence=self.low_confidence)
        if self.aesthetic is not None:
            metrics["aesthetic"] = AestheticScore(groups)
        encoder = CLIPEncoder(self.clip_model) if self.clip_model is not None else None
        if encoder is not None:
            metrics["clip_score"] = PromptFidelity(encoder, groups)
        metrics["ssim"] = SSIMPreservation(groups)
        lpips_weights = self.lpips_backbone_weights
        if lpips_weights == "auto":
            lpips_weights = find_local_lpips_backbone(self.lpips_net)  # type: ignore[assignment]
            if lpips_weights is None:
                rank_zero_info(f"fairness validation: no local {self.lpips_net} LPIPS backbone weights; LPIPS skipped")
        if lpips_weights is not None:
            metrics["lpips"] = LPIPSPreservation(groups, backbone_weights=lpips_weights, net=self.lpips_net)
        if self.fid_reference is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.kid import KernelInceptionDistance

            features = self.fid_features if self.fid_features is not None else encoder
            if features is None:
                raise ValueError("FairnessValidation.fid_reference needs fid_features or clip_model (its image encoder)")
            for variant in ("", "_uncorrected"):
                # reset_real_features=False: the reference set is embedded once per run, not every epoch.
                metrics[f"fid{variant}"] = FrechetInceptionDistance(feature=features, reset_real_features=False)
                metrics[f"kid{variant}"] = KernelInceptionDistance(
                    feature=features, reset_real_features=False, subsets=1,
                    subset_size=min(self.kid_subset_size, len(self.prompts) * len(self.seeds)),
                )
        return {name: metric.to(device) for name, metric in metrics.items()}

    def _add_references(self, rank: int, world_size: int, size: torch.Size) -> None:
        if self.fid_reference is None or self._references_added:
            return
        folder = Path(self.fid_reference)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"FairnessValidation.fid_reference={str(folder)!r} holds no images ({sorted(IMAGE_SUFFIXES)})")
        assert self._metrics is not None
        for start in range(rank, len(files), world_size * self.batch_size):
            batch = []
            for path in files[start : start + world_size * self.batch_size : world_size]:
                with Image.open(path) as image:
                    resized = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
                batch.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255)
            images = torch.stack(batch)
            for name in ("fid", "fid_uncorrected", "kid", "kid_uncorrected"):
                metric = self._metrics[name]
                metric.update(images.to(metric.device), real=True)
        self._references_added = True

    def _update(
        self, metrics: dict[str, Metric], shard: _Shard, images: Tensor, analysis: _Analysis, baseline: Tensor | None
    ) -> None:
        """Feed one variant's images; ``baseline`` (the uncorrected images) marks the corrected variant."""
        if len(images) == 0:  # a rank without items still takes part in compute()
            return
        probabilities, found, group_ids = analysis.probabilities, analysis.found, shard.group_ids
        suffix = "" if baseline is not None else "_uncorrected"
        metrics["group_match"].update(probabilities[self.group_attribute], group_ids, group_ids, found)
        if "gender_consistency" in metrics:
            metrics["gender_consistency"].update(probabilities[self.gender_attribute], shard.gender_targets, group_ids, found)
        if "stereotype_rate" in metrics:
            metrics["stereotype_rate"].update(probabilities[self.stereotype_attribute][:, 1], group_ids, found)
        if "faces" in metrics:
            metrics["faces"].update(found, analysis.confidence, group_ids)
        if "distribution" in metrics:
            neutral = shard.neutral_ids >= 0
            metrics["distribution"].update(probabilities[self.group_attribute][neutral], shard.neutral_ids[neutral], found[neutral])
        if "aesthetic" in metrics:
            metrics["aesthetic"].update(analysis.aesthetic, group_ids)
        if "clip_score" in metrics:
            metrics["clip_score"].update(images, shard.prompts, group_ids)
        if f"fid{suffix}" in metrics:
            for name in (f"fid{suffix}", f"kid{suffix}"):
                metrics[name].update(images.to(metrics[name].device), real=False)
        if baseline is not None:
            for name in ("ssim", "lpips"):
                if name in metrics:
                    metrics[name].update(images.to(metrics[name].device), baseline.to(metrics[name].device), group_ids)

    def _compute(self, metrics: dict[str, Metric], suffix: str) -> dict[str, float]:
        """Compute (a collective under DDP: every rank gets here) and reset one variant's metrics."""
        values: dict[str, float] = {}
        for name, metric in metrics.items():
            if name.startswith(("fid", "kid")):
                if name.endswith("_uncorrected") != bool(suffix):
                    continue  # the other variant's reference-set metric
                result = metric.compute()
                values[f"val/{name}"] = float(result if name.startswith("fid") else result[0])
            elif name in ("ssim", "lpips") and suffix:
                continue  # preservation compares the two variants: it has no uncorrected value
            else:
                for key, value in metric.compute().items():
                    metric_name, group = key.split("/", 1)
                    values[f"val/{metric_name}{suffix}/{group}"] = float(value)
            metric.reset()
        return values

    def _save_grid(self, trainer: L.Trainer, shard: _Shard, uncorrected: Tensor, corrected: Tensor, out_dir: Path) -> None:
        sections = [(group, shard.group_ids == index) for index, group in enumerate(self.groups)]
        sections += [(key, torch.tensor([k == key for k in shard.keys], dtype=torch.bool)) for key in self.neutral]
        grid = before_after_grid(uncorrected, corrected, sections, self.grid_images_per_group)
        if grid is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        grid.save(out_dir / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/fairness_grid", np.asarray(grid), trainer.global_step, dataformats="HWC")
