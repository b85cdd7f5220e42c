"""The preference LightningDataModule: validated preference pairs -> cached VAE latents and text embeddings.

Training never touches pixels or the text encoder: ``prepare_data`` validates
the preference dataset, encodes every pair once with the frozen backbone (VAE
posterior mean of both images, text embeddings of the prompt) and caches the
tensors on disk; ``setup`` loads them, and batches are plain tensors.

Dataset sources (``dataset=``)
------------------------------
1. A folder written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``),
   e.g. the toy world's ``rsc/toy/world/preferences``. A folder whose split
   subfolders were each written by ``Dataset.save_to_disk`` (``<split>/state.json``)
   works too. Columns follow :mod:`rsc.datamodules.schema`; the image columns must be
   ``datasets.Image`` features.
2. An image-folder layout, one folder per split, each with *one* metadata file::

       my_preferences/
         train/
           metadata.jsonl        # or metadata.csv (not both)
           images/0001_anti.png  # any layout below the split folder
           images/0001_stereo.png
         validation/
           metadata.jsonl

   Each metadata row has ``prompt`` (text) and ``anti_stereotypical`` /
   ``stereotypical`` (image paths *relative to the split folder*); other
   columns (``group``, ``gender``, ...) are allowed and ignored here. A JSONL
   line looks like ``{"prompt": "a photo of a ...", "anti_stereotypical":
   "images/0001_anti.png", "stereotypical": "images/0001_stereo.png"}``.
3. A Hugging Face Hub dataset id (``org/name``), loaded with
   ``datasets.load_dataset(id, revision=dataset_revision)``; offline, only
   datasets already in the local ``datasets`` cache load.

Validation
----------
Before anything is encoded: missing splits, empty splits and missing required
columns always raise ``ValueError``. Row problems (empty prompt, missing image
path or file, unreadable image, image not convertible to RGB) raise a
``ValueError`` naming the split, row, column and file, unless
``skip_invalid=True``: then the rows are dropped and counted per reason in
``PreferenceDataModule.skipped``.

Cache
-----
``<cache_dir or $RSC_CACHE or ~/.cache/rsc>/latents/<key>/`` holds, per split,
the encoded tensors (:mod:`rsc.datamodules.cache`); nothing is ever written
into the dataset folder. The key hashes: the backbone
(:func:`rsc.identity.backbone_identity`: source, canonical VAE/text-encoder/UNet
configs, weight/tokenizer files' sizes and mtimes for local folders or the
snapshot commit for Hub ids), the dataset split (``datasets`` fingerprint, or
metadata content plus image paths, sizes and mtimes for image folders), the
split name, the image size, the preprocessing and the rsc version. Images are
converted to RGB, resized (LANCZOS) so the shorter side is the backbone's
native size, centre-cropped and mapped to [-1, 1]. A manifest (size and sha256 of
each file) guards the cache: a truncated, corrupted or half-written one is reported
in one line and rebuilt, and a lock lets one process build it while others wait.

The modules: :mod:`~rsc.datamodules.sources` (reading the three layouts),
:mod:`~rsc.datamodules.validation` (row checks), :mod:`~rsc.datamodules.cache`
(encoding and the cached dataset) and this one (the LightningDataModule).
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from rsc.backbone import FrozenLDM
from rsc.cache import cache_root
from rsc.config import MAX_SEED, check_number
from rsc.datamodules.cache import (
    CachedPreferenceDataset,
    SplitCachePlan,
    cache_lock,
    cache_problem,
    encode_split,
    plan_split_cache,
    read_cache_metadata,
    remove_cache,
    write_cache,
)
from rsc.datamodules.sampling import ResumableDataLoader, ResumableSampler
from rsc.datamodules.sources import load_preference_splits
from rsc.datamodules.validation import RowProblem, skip_summary, validate_split
from rsc.identity import backbone_identity

log = logging.getLogger(__name__)


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs as cached VAE latents and text embeddings of a frozen backbone (see the module docstring).

    Batches are dicts: ``anti_stereotypical_latents`` and ``stereotypical_latents`` (B, C, h, w),
    ``prompt_embeds`` (B, L, D) (float32) and ``index`` (B,) long, the row index in its split.
    """

    def __init__(
        self,
        dataset: str,
        backbone: str,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        skip_invalid: bool = False,
        train_split: str = "train",
        val_split: str = "validation",
        encode_batch_size: int = 32,
        dataset_revision: str | None = None,
        backbone_config: str | None = None,
        encode_device: str | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        """Configure the datamodule; nothing is loaded until ``prepare_data`` / ``setup``.

        Args:
            dataset: A ``save_to_disk`` DatasetDict folder, an image-folder layout or a Hub dataset id.
            backbone: The frozen SD: a diffusers folder, a Hub id or a single-file checkpoint.
            batch_size: Pairs per training/validation batch (per process under DDP).
            num_workers: DataLoader worker processes.
            cache_dir: Cache root (default ``$RSC_CACHE`` or ``~/.cache/rsc``); latents go to ``latents/<key>/``.
            skip_invalid: Skip invalid rows (counted in ``self.skipped``) instead of raising.
            train_split: Name of the training split.
            val_split: Name of the validation split.
            encode_batch_size: Images/prompts per forward pass while building the cache.
            dataset_revision: Hub revision of ``dataset`` (branch, tag or commit) when it is a Hub id.
            backbone_config: For single-file checkpoints: the diffusers folder or Hub id of their architecture.
            encode_device: Device for building the cache (default ``cuda`` if available, else ``cpu``).
            progress: Show progress bars while validating and encoding.
            seed: Seed of the training order (a function of seed and epoch, so resumed runs see the same batches).
        """
        super().__init__()
        check_number("batch_size", batch_size, minimum=1, integer=True)
        check_number("encode_batch_size", encode_batch_size, minimum=1, integer=True)
        check_number("num_workers", num_workers, minimum=0, integer=True)
        check_number("seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
        if train_split == val_split:
            raise ValueError(f"train_split and val_split must differ, both are {train_split!r}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.backbone = backbone
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else cache_root()
        self.skip_invalid = skip_invalid
        self.train_split = train_split
        self.val_split = val_split
        self.encode_batch_size = encode_batch_size
        self.dataset_revision = dataset_revision
        self.backbone_config = backbone_config
        self.encode_device = encode_device
        self.progress = progress
        self.seed = seed

        self.skipped: dict[str, dict[str, int]] = {}
        self.train_dataset: CachedPreferenceDataset | None = None
        self.val_dataset: CachedPreferenceDataset | None = None
        self.latent_shape: tuple[int, ...] | None = None
        self.text_shape: tuple[int, ...] | None = None
        self._plans: dict[str, SplitCachePlan] | None = None
        self._ldm: FrozenLDM | None = None

    # ------------------------------------------------------------------ cache plan
    def cache_plans(self) -> dict[str, SplitCachePlan]:
        """Per split: its source, key payload, key and cache folder (opens the dataset, loads no model)."""
        if self._plans is not None:
            return self._plans
        splits = load_preference_splits(self.dataset, (self.train_split, self.val_split), self.dataset_revision)
        backbone = backbone_identity(self.backbone, self.backbone_config)
        image_size = backbone.image_size
        if image_size is None:
            # A single file without a config: only the loaded model knows its native size.
            image_size = self._backbone().image_size
        self._plans = {
            name: plan_split_cache(split, backbone.identity, image_size, self.cache_root) for name, split in splits.items()
        }
        return self._plans

    @property
    def image_size(self) -> int:
        """The side images are resized to (the backbone's native size)."""
        return int(next(iter(self.cache_plans().values())).payload["image_size"])

    def _backbone(self) -> FrozenLDM:
        if self._ldm is None:
            device = self.encode_device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._ldm = FrozenLDM.from_pretrained(self.backbone, config=self.backbone_config, device=device)
        return self._ldm

    # ------------------------------------------------------------------ lightning hooks
    def prepare_data(self) -> None:
        """Validate and encode every split whose cache is missing or damaged (Lightning runs it on one process per node).

        Each split's cache is locked while it is checked and built: a second process building
        the same cache (another node on a shared disk, another job) waits and then uses it.
        """
        plans = self.cache_plans()
        with ExitStack() as locks:
            for plan in sorted(plans.values(), key=lambda plan: plan.key):  # one order: no deadlock
                locks.enter_context(cache_lock(plan))
            self._prepare(plans)

    def _prepare(self, plans: dict[str, SplitCachePlan]) -> None:
        missing = [plan for plan in plans.values() if not self._cache_usable(plan)]
        for plan in plans.values():
            if plan not in missing:
                self._check_cached(plan)
        if not missing:
            return
        # Validate all missing splits before loading the backbone, so bad data fails fast and cheap.
        kept: dict[str, tuple[list[int], list[RowProblem]]] = {}
        for plan in missing:
            rows, problems = validate_split(plan.split, self.skip_invalid, self.progress)
            kept[plan.split.name] = (rows, problems)
            self.skipped[plan.split.name] = skip_summary(problems)
            if problems:
                log.warning(
                    "skipped %d of %d rows of split %r: %s (first: %s)",
                    len(problems),
                    plan.split.num_rows,
                    plan.split.name,
                    self.skipped[plan.split.name],
                    problems[0].message(),
                )
        ldm = self._backbone()
        if ldm.image_size != self.image_size:
            raise RuntimeError(
                f"backbone {self.backbone} has native image size {ldm.image_size}, "
                f"but its configs say {self.image_size}"
            )
        for plan in missing:
            rows, problems = kept[plan.split.name]
            tensors, prompts = encode_split(
                ldm, plan.split, rows, self.image_size, self.encode_batch_size, self.progress
            )
            write_cache(plan, tensors, prompts, problems)
            log.info("cached %d pairs of split %r in %s", len(rows), plan.split.name, plan.folder)
        # Free the (possibly large, possibly GPU-resident) model: training uses its own copy.
        self._ldm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _cache_usable(self, plan: SplitCachePlan) -> bool:
        """Whether the cache of ``plan`` is intact; a damaged one is reported in one line and removed."""
        problem = cache_problem(plan)
        if problem is None:
            return True
        if problem != "missing":
            log.warning("latent cache of split %r is damaged, rebuilding it: %s", plan.split.name, problem)
            remove_cache(plan)
        return False

    def _check_cached(self, plan: SplitCachePlan) -> dict[str, str]:
        metadata = read_cache_metadata(plan.file)
        skipped = json.loads(metadata.get("skipped", "{}"))
        self.skipped[plan.split.name] = skipped
        if skipped and not self.skip_invalid:
            problems = json.loads(metadata.get("problems", "[]"))
            first = problems[0] if problems else "see the cache's metadata"
            raise ValueError(
                f"split {plan.split.name!r} of dataset {self.dataset} has {sum(skipped.values())} invalid row(s) "
                f"{skipped} (cached in {plan.folder}); first: {first} (pass skip_invalid=True to skip them)"
            )
        return metadata

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tensors of the splits ``stage`` needs (building the cache first if it is missing)."""
        plans = self.cache_plans()
        if any(cache_problem(plan) is not None for plan in plans.values()):
            # Normally prepare_data ran already; a direct setup() call (or a node without it) builds here.
            self.prepare_data()
        # Only fit and validate have dataloaders here; any other stage loads both splits.
        wanted = (self.val_split,) if stage == "validate" else (self.train_split, self.val_split)
        for name in wanted:
            plan = plans[name]
            self._check_cached(plan)
            dataset = CachedPreferenceDataset.from_file(plan.file)
            if name == self.train_split:
                self.train_dataset = dataset
            else:
                self.val_dataset = dataset
            self.latent_shape, self.text_shape = dataset.latent_shape, dataset.text_shape

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training batches, each rank its own shard; the order depends only on ``seed`` and the epoch.

        A seeded ``DistributedSampler`` (Lightning calls its ``set_epoch``, and leaves it in
        place under DDP) instead of ``shuffle=True``, in a stateful loader
        (:mod:`rsc.datamodules.sampling`): a run resumed from any checkpoint, mid-epoch
        included, sees exactly the batches an uninterrupted run sees.
        """
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        rank = int(getattr(self.trainer, "global_rank", 0) or 0) if self.trainer is not None else 0
        sampler = ResumableSampler(self.train_dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        return ResumableDataLoader(
            self.train_dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in row order; under several processes each rank gets a disjoint shard.

        Lightning's automatic DistributedSampler pads the validation set by repeating
        samples so every rank gets equal batches, which double-counts those samples in
        per-rank metric sums. Instead each rank takes ``indices[rank::world_size]``
        through Lightning's ``UnrepeatedDistributedSampler`` (a ``DistributedSampler``,
        so Lightning leaves it alone whether or not ``use_distributed_sampler`` is on).
        Ranks may then run one batch more or less than others: sync metrics at epoch
        end (torchmetrics), not per step. Every rank needs at least one item.
        """
        if self.val_dataset is None:
            raise RuntimeError("call setup('fit') or setup('validate') before val_dataloader()")
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        sampler = None
        if world_size > 1:
            rank = int(self.trainer.global_rank)  # type: ignore[union-attr]
            sampler = UnrepeatedDistributedSampler(self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
