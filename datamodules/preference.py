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
``latents.safetensors`` (tensors ``anti_stereotypical_latents`` (N, C, h, w),
``stereotypical_latents``, ``prompt_embeds`` (P, L, D) for the P distinct
prompts, ``prompt_index`` (N,), ``row_index`` (N,); the prompts and skip
summary in its metadata) and ``key.json`` (what the key hashes). Both are
written atomically; nothing is ever written into the dataset folder. The key
hashes: the backbone (source, VAE/text-encoder/UNet configs, weight/tokenizer
files' sizes and mtimes for local folders or the snapshot commit for Hub ids),
the dataset split (``datasets`` fingerprint, or metadata content plus image
paths, sizes and mtimes for image folders), the split name, the image size,
the preprocessing and the rsc version. Images are converted to RGB, resized
(LANCZOS) so the shorter side is the backbone's native size, centre-cropped
and mapped to [-1, 1].
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

import rsc
from rsc.datamodules.schema import IMAGE_COLUMNS, REQUIRED_COLUMNS
from rsc.atomic import atomic_path, write_json_atomic
from rsc.backbone import FrozenLDM, check_sd_pipeline_folder, is_hub_offline, looks_like_local_path
from rsc.cache import cache_root
from rsc.images import uint8_to_tensor

log = logging.getLogger(__name__)

# Bump when the cached tensors' layout or the preprocessing changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 1
PREPROCESSING = "rgb; shorter side -> image_size (PIL LANCZOS); centre crop; uint8/127.5-1"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CACHE_FILE = "latents.safetensors"
# Enough to diagnose a bad dataset without bloating the cache file's header.
MAX_STORED_PROBLEMS = 200
BACKBONE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet")
BATCH_KEYS = ("anti_stereotypical_latents", "stereotypical_latents", "prompt_embeds", "index")


# ---------------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class RowProblem:
    """Why one row of a split cannot be used."""

    split: str
    row: int
    column: str
    reason: str
    detail: str
    location: str = ""

    def message(self) -> str:
        """A one-line, human-readable description naming split, row, column and file."""
        where = f" ({self.location})" if self.location else ""
        return f"split {self.split!r}, row {self.row}, column {self.column!r}{where}: {self.reason}: {self.detail}"


class ImageProblem(Exception):
    """An image cell that cannot be used; ``reason`` is the short category counted by ``skip_invalid``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a row lives: embedded bytes and/or a file path."""

    data: bytes | None
    path: str | None

    def describe(self) -> str:
        """The file path, or a note that the image is embedded in the dataset."""
        return f"file {self.path}" if self.path else "embedded image"


def decode_image(ref: ImageRef | None) -> Image.Image:
    """Decode an image fully and convert it to RGB; raise ``ImageProblem`` with a reason otherwise."""
    if ref is None or (ref.data is None and not ref.path):
        raise ImageProblem("missing image path", "the cell is empty; expected an image (or a path to one)")
    if ref.data is None and not Path(ref.path).is_file():  # type: ignore[arg-type]
        raise ImageProblem("missing image file", f"{ref.path} does not exist")
    try:
        source = io.BytesIO(ref.data) if ref.data is not None else ref.path
        with Image.open(source) as image:  # type: ignore[arg-type]
            image.load()  # decode now: a truncated file only fails here
            mode = image.mode
            try:
                return image.convert("RGB")
            except Exception as error:  # noqa: BLE001 - PIL raises several types for unsupported modes
                raise ImageProblem(
                    "not RGB-convertible", f"image mode {mode!r} cannot be converted to RGB ({error})"
                ) from error
    except ImageProblem:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise ImageProblem(
            "unreadable image", f"PIL cannot decode it ({type(error).__name__}: {error}); expected a PNG/JPEG/... image"
        ) from error


# ---------------------------------------------------------------------------------------------- sources
class PreferenceSplit(ABC):
    """One split of a preference dataset, read row by row without decoding images eagerly."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """Number of rows (before skipping invalid ones)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies this split's content, for the cache key."""

    @abstractmethod
    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        """The raw prompt and the image references of row ``index``."""

    def location(self, index: int) -> str:
        """Where row ``index`` is defined (for error messages)."""
        return ""


class HFPreferenceSplit(PreferenceSplit):
    """A split held by a ``datasets.Dataset`` (from ``save_to_disk`` or the Hub)."""

    def __init__(self, name: str, source: str, dataset: Any, kind: str, extra: dict[str, Any] | None = None) -> None:
        from datasets import Image as ImageFeature
        from datasets import Value

        super().__init__(name, source)
        missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"split {name!r} of dataset {source} lacks the required column(s) {missing}: it has "
                f"{dataset.column_names}; every preference dataset needs {list(REQUIRED_COLUMNS)} "
                "(see datamodules/schema.py)"
            )
        prompt_feature = dataset.features["prompt"]
        if not (isinstance(prompt_feature, Value) and prompt_feature.dtype in {"string", "large_string"}):
            raise ValueError(
                f"column 'prompt' of split {name!r} of dataset {source} has type {prompt_feature}, "
                "expected Value('string')"
            )
        for column in IMAGE_COLUMNS:
            if not isinstance(dataset.features[column], ImageFeature):
                raise ValueError(
                    f"column {column!r} of split {name!r} of dataset {source} has type {dataset.features[column]}, "
                    "expected a datasets.Image feature"
                )
        # The fingerprint is the content identity datasets maintains; take it before our in-memory casts.
        self._fingerprint = str(dataset._fingerprint)
        self._kind = kind
        self._extra = extra or {}
        # decode=False: we decode (and report failures) ourselves, row by row. The cast is in memory only.
        dataset = dataset.select_columns(list(REQUIRED_COLUMNS))
        for column in IMAGE_COLUMNS:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self._dataset = dataset

    @property
    def num_rows(self) -> int:
        """Number of rows."""
        return int(self._dataset.num_rows)

    def identity(self) -> dict[str, Any]:
        """``datasets`` fingerprint, row count and (for the Hub) id and revision."""
        return {"kind": self._kind, "fingerprint": self._fingerprint, "num_rows": self.num_rows, **self._extra}

    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        """Prompt and image references of row ``index``."""
        record = self._dataset[index]
        images: dict[str, ImageRef | None] = {}
        for column in IMAGE_COLUMNS:
            value = record[column]
            images[column] = None if value is None else ImageRef(value.get("bytes"), value.get("path"))
        return record["prompt"], images


class FolderPreferenceSplit(PreferenceSplit):
    """A split folder with ``metadata.jsonl`` or ``metadata.csv`` and image files relative to it."""

    def __init__(self, name: str, folder: Path) -> None:
        super().__init__(name, str(folder.parent))
        self.folder = folder
        present = [folder / filename for filename in METADATA_FILES if (folder / filename).is_file()]
        if not present:
            raise ValueError(f"split folder {folder} has no metadata file: expected one of {list(METADATA_FILES)}")
        if len(present) > 1:
            raise ValueError(f"split folder {folder} has both {present[0].name} and {present[1].name}; keep one")
        self.metadata_file = present[0]
        self._rows, columns = self._read_metadata(self.metadata_file)
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise ValueError(
                f"{self.metadata_file} lacks the required column(s) {missing}: it has {sorted(columns)}; "
                f"every row needs {list(REQUIRED_COLUMNS)} (image columns as paths relative to {folder})"
            )

    @staticmethod
    def _read_metadata(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], set[str]]:
        rows: list[tuple[int, dict[str, Any]]] = []
        columns: set[str] = set()
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                columns = set(reader.fieldnames or [])
                # Line numbers are 1-based and line 1 is the header.
                rows = [(line + 2, dict(record)) for line, record in enumerate(reader)]
            return rows, columns
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {line_number} is not valid JSON: {error}") from error
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path} line {line_number} is a JSON {type(record).__name__}, expected an object with "
                        f"keys {list(REQUIRED_COLUMNS)}"
                    )
                columns.update(record)
                rows.append((line_number, record))
        return rows, columns

    @property
    def num_rows(self) -> int:
        """Number of metadata rows."""
        return len(self._rows)

    def _path(self, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return str(self.folder / str(value))

    def identity(self) -> dict[str, Any]:
        """Metadata content hash and every referenced image's path, size and mtime."""
        files: list[list[Any]] = []
        for _, record in self._rows:
            for column in IMAGE_COLUMNS:
                path = self._path(record.get(column))
                try:
                    stat = os.stat(path) if path else None
                except OSError:
                    stat = None
                files.append([record.get(column), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        return {
            "kind": "imagefolder",
            "folder": str(self.folder.resolve()),
            "metadata": self.metadata_file.name,
            "metadata_sha256": hashlib.sha256(self.metadata_file.read_bytes()).hexdigest(),
            "images_sha256": digest,
            "num_rows": self.num_rows,
        }

    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        """Prompt and image paths of row ``index``."""
        _, record = self._rows[index]
        images: dict[str, ImageRef | None] = {}
        for column in IMAGE_COLUMNS:
            path = self._path(record.get(column))
            images[column] = None if path is None else ImageRef(None, path)
        return record.get("prompt"), images

    def location(self, index: int) -> str:
        """The metadata file and line of row ``index``."""
        return f"{self.metadata_file} line {self._rows[index][0]}"


def load_preference_splits(
    dataset: str, splits: tuple[str, ...], revision: str | None = None
) -> dict[str, PreferenceSplit]:
    """Open ``splits`` of a preference dataset (save_to_disk folder, image folder or Hub id); see the module docstring.

    Raises ``ValueError`` for a missing or empty split or a missing required column,
    ``FileNotFoundError`` for a local path that does not exist and ``OSError`` for a Hub
    id that cannot be loaded (e.g. offline and not cached).
    """
    path = Path(dataset).expanduser()
    if path.is_dir():
        openers = _local_openers(path, splits)
    elif path.exists():
        raise ValueError(f"dataset {dataset} is a file; expected a dataset folder or a Hugging Face Hub dataset id")
    elif looks_like_local_path(dataset):
        raise FileNotFoundError(f"dataset {dataset} does not exist (expected a dataset folder or a Hub dataset id)")
    else:
        openers = _hub_openers(dataset, revision)
    missing = [name for name in splits if name not in openers]
    if missing:
        raise ValueError(
            f"dataset {dataset} has no split(s) {missing}: it has {sorted(openers)}; the datamodule needs "
            f"{list(splits)} (set train_split / val_split to use others)"
        )
    opened = {name: openers[name]() for name in splits}
    for name, split in opened.items():
        if split.num_rows == 0:
            raise ValueError(
                f"split {name!r} of dataset {dataset} is empty (0 rows); expected at least one preference pair"
            )
    return opened


def _local_openers(path: Path, splits: tuple[str, ...]) -> dict[str, Callable[[], PreferenceSplit]]:
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path / 'dataset_dict.json'} is not a valid DatasetDict index: {error}") from error
        return {name: (lambda name=name: _load_saved_split(path, name)) for name in names}
    if (path / "state.json").is_file():
        raise ValueError(
            f"{path} holds a single datasets.Dataset (state.json), not a DatasetDict with splits {list(splits)}; "
            "save a DatasetDict({'train': ..., 'validation': ...}) with save_to_disk"
        )
    openers: dict[str, Callable[[], PreferenceSplit]] = {}
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        if any((child / filename).is_file() for filename in METADATA_FILES):
            openers[child.name] = lambda child=child: FolderPreferenceSplit(child.name, child)
        elif (child / "state.json").is_file():
            openers[child.name] = lambda child=child: _load_saved_split(path, child.name)
    if not openers:
        raise ValueError(
            f"{path} is not a preference dataset: expected dataset_dict.json (DatasetDict.save_to_disk) or split "
            f"folders {list(splits)} each holding one of {list(METADATA_FILES)}"
        )
    return openers


def _load_saved_split(root: Path, name: str) -> PreferenceSplit:
    from datasets import Dataset

    folder = root / name
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"split {name!r} of dataset {root}: cannot read {folder / 'state.json'} ({error})") from error
    if not state.get("_data_files"):
        # datasets cannot load a split saved with no rows (it has no data file); report it as empty.
        return _EmptySplit(name, str(root))
    return HFPreferenceSplit(name, str(root), Dataset.load_from_disk(str(folder)), "save_to_disk")


class _EmptySplit(PreferenceSplit):
    """A split with no rows (rejected by :func:`load_preference_splits`)."""

    @property
    def num_rows(self) -> int:
        return 0

    def identity(self) -> dict[str, Any]:
        return {}

    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        raise IndexError(index)


def _hub_openers(dataset_id: str, revision: str | None) -> dict[str, Callable[[], PreferenceSplit]]:
    import datasets

    try:
        dataset_dict = datasets.load_dataset(dataset_id, revision=revision)
    except Exception as error:  # noqa: BLE001 - datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or is_hub_offline()
        hint = (
            " Offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), so only datasets already in the local "
            "datasets cache load: load it once on a machine with internet access, or pass a local folder."
            if offline
            else ""
        )
        raise OSError(
            f"could not load the Hub dataset {dataset_id!r} (revision={revision!r}): "
            f"{type(error).__name__}: {error}.{hint}"
        ) from error
    if not isinstance(dataset_dict, datasets.DatasetDict):
        raise ValueError(f"Hub dataset {dataset_id!r} did not load as a DatasetDict with splits")
    extra = {"id": dataset_id, "revision": revision}
    return {
        name: (lambda name=name: HFPreferenceSplit(name, dataset_id, dataset_dict[name], "hub", extra))
        for name in dataset_dict
    }


# ---------------------------------------------------------------------------------------------- validation
def validate_split(
    split: PreferenceSplit, skip_invalid: bool = False, progress: bool = True
) -> tuple[list[int], list[RowProblem]]:
    """Check every row (non-empty prompt, every image decodable as RGB); return kept row indices and problems.

    With ``skip_invalid=False`` the first problem raises a ``ValueError`` naming split,
    row, column and file. A row is reported once, for its first problem.
    """
    kept: list[int] = []
    problems: list[RowProblem] = []
    for index in tqdm(range(split.num_rows), desc=f"validating {split.name}", disable=not progress, leave=False):
        problem = _row_problem(split, index)
        if problem is None:
            kept.append(index)
            continue
        if not skip_invalid:
            raise ValueError(
                f"invalid preference row in dataset {split.source}: {problem.message()} "
                "(pass skip_invalid=True to skip such rows)"
            )
        problems.append(problem)
    if not kept:
        reasons = dict(Counter(problem.reason for problem in problems))
        raise ValueError(f"split {split.name!r} of dataset {split.source} has no valid rows left ({reasons})")
    return kept, problems


def _row_problem(split: PreferenceSplit, index: int) -> RowProblem | None:
    prompt, images = split.row(index)
    location = split.location(index)
    if not isinstance(prompt, str) or not prompt.strip():
        detail = f"expected a non-empty string, got {prompt!r}"
        return RowProblem(split.name, index, "prompt", "empty prompt", detail, location)
    for column in IMAGE_COLUMNS:
        ref = images[column]
        try:
            decode_image(ref)
        except ImageProblem as problem:
            where = ", ".join(part for part in (location, ref.describe() if ref else "") if part)
            return RowProblem(split.name, index, column, problem.reason, problem.detail, where)
    return None


def skip_summary(problems: list[RowProblem]) -> dict[str, int]:
    """Count problems by reason, e.g. ``{"unreadable image": 2, "empty prompt": 1}``."""
    return dict(sorted(Counter(problem.reason for problem in problems).items()))


# ---------------------------------------------------------------------------------------------- backbone identity
@dataclass(frozen=True)
class BackboneIdentity:
    """What identifies a backbone for the cache key, and its native image size (``None``: load the model to know)."""

    identity: dict[str, Any]
    image_size: int | None


def _canonical_config(path: Path) -> str:
    config = json.loads(path.read_text(encoding="utf-8"))
    # Keys starting with "_" (library versions, name_or_path) and transformers_version do not change the computation.
    config = {key: value for key, value in config.items() if not key.startswith("_") and key != "transformers_version"}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _image_size_from_configs(folder: Path) -> int:
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    # Same rule as FrozenLDM.image_size, read from configs so a cache hit never loads weights.
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _folder_identity(folder: Path, with_files: bool) -> dict[str, Any]:
    configs = {name: _canonical_config(folder / name / "config.json") for name in ("vae", "text_encoder", "unet")}
    identity: dict[str, Any] = {"configs": configs}
    if with_files:
        files = []
        for component in BACKBONE_COMPONENTS:
            for file in sorted((folder / component).rglob("*")):
                if file.is_file():
                    stat = file.stat()
                    files.append([file.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
        identity["files"] = files
    return identity


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # Configs and tokenizer only: enough for the key and the image size, without fetching weights.
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["model_index.json", "*/config.json", "tokenizer/*", "scheduler/*"],
                local_files_only=is_hub_offline(),
            )
        )
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises several types
        raise OSError(
            f"backbone Hub id {repo_id!r} could not be resolved ({type(error).__name__}: {error}); offline, it must "
            "already be in the local Hugging Face cache. Pass a local diffusers folder otherwise."
        ) from error


def backbone_identity(backbone: str, config: str | None = None) -> BackboneIdentity:
    """Identify a backbone (local diffusers folder, Hub id or single-file checkpoint) without loading its weights.

    Local folders: resolved path, config hashes and the size and mtime of every file of
    vae/text_encoder/tokenizer/unet. Hub ids: the id, the cached snapshot's commit and
    config hashes. Single files: resolved path, size and mtime, plus ``config``'s identity;
    without ``config`` the image size is unknown until the model is loaded.
    """
    path = Path(backbone).expanduser()
    if path.is_dir():
        check_sd_pipeline_folder(path)
        return BackboneIdentity(
            {"source": str(path.resolve()), **_folder_identity(path, with_files=True)}, _image_size_from_configs(path)
        )
    if path.is_file():
        stat = path.stat()
        identity: dict[str, Any] = {"source": str(path.resolve()), "file": [stat.st_size, stat.st_mtime_ns]}
        if config is None:
            return BackboneIdentity(identity, None)
        base = backbone_identity(config)
        identity["config"] = base.identity
        return BackboneIdentity(identity, base.image_size)
    if looks_like_local_path(backbone):
        raise FileNotFoundError(
            f"backbone {backbone} does not exist (expected a diffusers folder, a checkpoint or a Hub id)"
        )
    snapshot = _hub_snapshot(backbone)
    return BackboneIdentity(
        {"source": backbone, "commit": snapshot.name, **_folder_identity(snapshot, with_files=False)},
        _image_size_from_configs(snapshot),
    )


def cache_key(payload: dict[str, Any]) -> str:
    """A short hex digest of a JSON-serialisable key payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------- encoding
def preprocess_image(image: Image.Image, size: int) -> Tensor:
    """RGB, shorter side resized to ``size`` (LANCZOS), centre crop -> (3, size, size) float in [-1, 1]."""
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return uint8_to_tensor(np.array(image, dtype=np.uint8)[None])[0]


@torch.inference_mode()
def encode_split(
    ldm: FrozenLDM,
    split: PreferenceSplit,
    rows: list[int],
    image_size: int,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict[str, Tensor], list[str]]:
    """Encode the kept ``rows`` of ``split``: both images' latents and the distinct prompts' embeddings.

    Returns the tensors stored in the cache (float32 on the CPU) and the distinct
    prompts in the order of ``prompt_embeds``.
    """
    anti: list[Tensor] = []
    stereo: list[Tensor] = []
    prompts: list[str] = []
    bar = tqdm(total=len(rows), desc=f"encoding {split.name} images", unit="pair", disable=not progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pixels: dict[str, list[Tensor]] = {column: [] for column in IMAGE_COLUMNS}
        for index in chunk:
            prompt, images = split.row(index)
            prompts.append(prompt)
            for column in IMAGE_COLUMNS:
                pixels[column].append(preprocess_image(decode_image(images[column]), image_size))
        anti.append(ldm.encode_images(torch.stack(pixels["anti_stereotypical"])).float().cpu())
        stereo.append(ldm.encode_images(torch.stack(pixels["stereotypical"])).float().cpu())
        bar.update(len(chunk))
    bar.close()

    # Many rows share a prompt: encode each distinct prompt once and index into them.
    distinct = list(dict.fromkeys(prompts))
    position = {prompt: i for i, prompt in enumerate(distinct)}
    embeddings = []
    for start in tqdm(
        range(0, len(distinct), batch_size), desc=f"encoding {split.name} prompts", disable=not progress, leave=False
    ):
        batch = distinct[start : start + batch_size]
        embeddings.append(ldm.encode_prompt(batch, do_classifier_free_guidance=False).cond.float().cpu())
    tensors = {
        "anti_stereotypical_latents": torch.cat(anti).contiguous(),
        "stereotypical_latents": torch.cat(stereo).contiguous(),
        "prompt_embeds": torch.cat(embeddings).contiguous(),
        "prompt_index": torch.tensor([position[p] for p in prompts], dtype=torch.long),
        "row_index": torch.tensor(rows, dtype=torch.long),
    }
    return tensors, distinct


# ---------------------------------------------------------------------------------------------- datasets
class CachedPreferenceDataset(Dataset):
    """Cached latents and prompt embeddings of one split; items are dicts of tensors (see ``BATCH_KEYS``)."""

    def __init__(self, tensors: dict[str, Tensor], prompts: list[str] | None = None) -> None:
        self.anti_stereotypical_latents = tensors["anti_stereotypical_latents"]
        self.stereotypical_latents = tensors["stereotypical_latents"]
        self.prompt_embeds = tensors["prompt_embeds"]
        self.prompt_index = tensors["prompt_index"]
        self.row_index = tensors["row_index"]
        self.prompts = prompts or []
        names = ("anti_stereotypical_latents", "stereotypical_latents", "prompt_index", "row_index")
        lengths = {len(tensors[name]) for name in names}
        if len(lengths) != 1:
            raise ValueError(f"cached tensors disagree on the number of rows: {sorted(lengths)}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CachedPreferenceDataset:
        """Load a ``latents.safetensors`` cache file."""
        with safe_open(os.fspath(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata() or {}
        return cls(tensors, json.loads(metadata.get("prompts", "[]")))

    def __len__(self) -> int:
        return len(self.row_index)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "anti_stereotypical_latents": self.anti_stereotypical_latents[index],
            "stereotypical_latents": self.stereotypical_latents[index],
            "prompt_embeds": self.prompt_embeds[self.prompt_index[index]],
            "index": self.row_index[index],
        }

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of one latent."""
        return tuple(self.anti_stereotypical_latents.shape[1:])

    @property
    def text_shape(self) -> tuple[int, ...]:
        """(L, D) of one prompt embedding."""
        return tuple(self.prompt_embeds.shape[1:])


class ShardedEvalSampler(DistributedSampler):
    """Rank ``r`` of ``n`` gets indices ``r, r + n, r + 2n, ...``: no padding, no duplicates, no shuffling.

    It subclasses ``DistributedSampler`` only so that Lightning sees an already
    distributed sampler and does not wrap it again.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- datamodule
@dataclass
class SplitCachePlan:
    """One split's source, cache-key payload, key and cache folder."""

    split: PreferenceSplit
    payload: dict[str, Any]
    key: str
    folder: Path

    @property
    def file(self) -> Path:
        """The split's ``latents.safetensors``."""
        return self.folder / CACHE_FILE


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
        for name, value in (("batch_size", batch_size), ("encode_batch_size", encode_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
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
        plans = {}
        for name, split in splits.items():
            payload = {
                "format": CACHE_FORMAT_VERSION,
                "rsc": rsc.__version__,
                "backbone": backbone.identity,
                "dataset": split.identity(),
                "split": name,
                "image_size": image_size,
                "preprocessing": PREPROCESSING,
            }
            key = cache_key(payload)
            plans[name] = SplitCachePlan(split, payload, key, self.cache_root / "latents" / key)
        self._plans = plans
        return plans

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
        """Validate and encode every split whose cache is missing (Lightning runs it on one process per node)."""
        plans = self.cache_plans()
        missing = [plan for plan in plans.values() if not plan.file.is_file()]
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
            metadata = {
                "prompts": json.dumps(prompts),
                "skipped": json.dumps(skip_summary(problems)),
                "problems": json.dumps([problem.message() for problem in problems[:MAX_STORED_PROBLEMS]]),
                "num_rows": str(plan.split.num_rows),
                "key": plan.key,
            }
            write_json_atomic(plan.folder / "key.json", {"key": plan.key, **plan.payload})
            with atomic_path(plan.file) as temporary:
                save_file(tensors, str(temporary), metadata=metadata)
            log.info("cached %d pairs of split %r in %s", len(rows), plan.split.name, plan.folder)
        # Free the (possibly large, possibly GPU-resident) model: training uses its own copy.
        self._ldm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_cached(self, plan: SplitCachePlan) -> dict[str, str]:
        with safe_open(str(plan.file), framework="pt") as handle:
            metadata = handle.metadata() or {}
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
        if any(not plan.file.is_file() for plan in plans.values()):
            # Normally prepare_data ran already; a direct setup() call (or a node without it) builds here.
            self.prepare_data()
        wanted = {
            "fit": (self.train_split, self.val_split),
            "validate": (self.val_split,),
            "test": (self.val_split,),
            "predict": (self.val_split,),
        }.get(stage or "", (self.train_split, self.val_split))
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
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, each rank its own shard; the order depends only on ``seed`` and the epoch.

        A seeded ``DistributedSampler`` (Lightning calls its ``set_epoch``, and leaves it in
        place under DDP) instead of ``shuffle=True``: a run resumed from an epoch-end
        checkpoint then sees exactly the batches an uninterrupted run sees.
        """
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        rank = int(getattr(self.trainer, "global_rank", 0) or 0) if self.trainer is not None else 0
        sampler = DistributedSampler(self.train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in row order; under several processes each rank gets a disjoint shard.

        Lightning's automatic DistributedSampler pads the validation set by repeating
        samples so every rank gets equal batches, which double-counts those samples in
        per-rank metric sums. Instead each rank takes ``indices[rank::world_size]``
        through a ``DistributedSampler`` subclass, which Lightning leaves alone whether
        or not ``use_distributed_sampler`` is on. Ranks may then run one batch more or
        less than others: sync metrics at epoch end (torchmetrics), not per step.
        """
        if self.val_dataset is None:
            raise RuntimeError("call setup('fit') or setup('validate') before val_dataloader()")
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        sampler = None
        if world_size > 1:
            rank = int(self.trainer.global_rank)  # type: ignore[union-attr]
            sampler = ShardedEvalSampler(self.val_dataset, num_replicas=world_size, rank=rank)
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
