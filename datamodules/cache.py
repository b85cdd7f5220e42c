"""The latent cache: preference pairs encoded once by the frozen backbone, stored as safetensors.

``<cache root>/latents/<key>/`` holds, per split, ``latents.safetensors``
(tensors ``anti_stereotypical_latents`` (N, C, h, w), ``stereotypical_latents``,
``prompt_embeds`` (P, L, D) for the P distinct prompts, ``prompt_index`` (N,),
``row_index`` (N,); the prompts and skip summary in its metadata),
``key.json`` (what the key hashes) and, written last, ``manifest.json`` (size and
sha256 of the other two). Each is written atomically. The key hashes the backbone
(:func:`rsc.identity.backbone_identity`), the split's identity, the split name,
the image size, the preprocessing and the rsc version.

A cache is used only if its manifest matches its files (:func:`cache_problem`): a
truncated, corrupted or half-written cache is reported in one line and rebuilt.
Builders of one cache take its lock (:func:`cache_lock`): one process builds, the
others wait and then find it built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import rsc
from rsc.atomic import atomic_path, file_sha256, write_json_atomic
from rsc.backbone import FrozenLDM
from rsc.datamodules.schema import IMAGE_COLUMNS
from rsc.datamodules.sources import PreferenceSplit, decode_image
from rsc.datamodules.validation import RowProblem, skip_summary
from rsc.images import uint8_to_tensor

# Bump when the cached tensors' layout, the preprocessing or the key's contents change, so old caches
# are not reused. 2: the backbone's configs are hashed in rsc.identity's canonical form.
CACHE_FORMAT_VERSION = 2
PREPROCESSING = "rgb; shorter side -> image_size (PIL LANCZOS); centre crop; uint8/127.5-1"
CACHE_FILE = "latents.safetensors"
KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
# Enough to diagnose a bad dataset without bloating the cache file's header.
MAX_STORED_PROBLEMS = 200
BATCH_KEYS = ("anti_stereotypical_latents", "stereotypical_latents", "prompt_embeds", "index")


def cache_key(payload: dict[str, Any]) -> str:
    """A short hex digest of a JSON-serialisable key payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]



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



def plan_split_cache(
    split: PreferenceSplit, backbone: dict[str, Any], image_size: int, cache_root: Path
) -> SplitCachePlan:
    """The cache plan of ``split`` for a backbone identity (:func:`rsc.identity.backbone_identity`) and image size."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "rsc": rsc.__version__,
        "backbone": backbone,
        "dataset": split.identity(),
        "split": split.name,
        "image_size": image_size,
        "preprocessing": PREPROCESSING,
    }
    key = cache_key(payload)
    return SplitCachePlan(split, payload, key, cache_root / "latents" / key)


def write_cache(plan: SplitCachePlan, tensors: dict[str, Tensor], prompts: list[str], problems: list[RowProblem]) -> None:
    """Write ``key.json``, ``latents.safetensors`` (prompts and skipped rows in its metadata), then the manifest."""
    metadata = {
        "prompts": json.dumps(prompts),
        "skipped": json.dumps(skip_summary(problems)),
        "problems": json.dumps([problem.message() for problem in problems[:MAX_STORED_PROBLEMS]]),
        "num_rows": str(plan.split.num_rows),
        "key": plan.key,
    }
    write_json_atomic(plan.folder / KEY_FILE, {"key": plan.key, **plan.payload})
    with atomic_path(plan.file) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    # Last: a cache without a manifest is one whose writer was killed.
    files = {name: {"size": (plan.folder / name).stat().st_size, "sha256": file_sha256(plan.folder / name)}
             for name in (KEY_FILE, CACHE_FILE)}
    write_json_atomic(plan.folder / MANIFEST_FILE, {"key": plan.key, "files": files})
    _verified[plan.folder] = _stats(plan.folder)


# Caches this process verified, with their files' (size, mtime) then: not hashed again unless they change.
_verified: dict[Path, tuple[tuple[int, int], ...]] = {}


def _stats(folder: Path) -> tuple[tuple[int, int], ...]:
    return tuple((stat.st_size, stat.st_mtime_ns) for stat in (os.stat(folder / name) for name in (KEY_FILE, CACHE_FILE)))


def cache_problem(plan: SplitCachePlan) -> str | None:
    """``None`` if the cache of ``plan`` is complete and intact; else what is wrong ("missing" if there is none)."""
    folder = plan.folder
    if not folder.exists() or not any(folder.iterdir()):
        return "missing"
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["key"] != plan.key or set(files) != {KEY_FILE, CACHE_FILE}:
            return f"{manifest_path} does not describe this cache"
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (its writer was killed, or an older rsc wrote it)"
    except (ValueError, KeyError, TypeError) as error:
        return f"{manifest_path} is unreadable ({type(error).__name__}: {error})"
    try:
        if _verified.get(folder) == _stats(folder):
            return None
    except FileNotFoundError:
        pass
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
        if file_sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupted)"
    _verified[folder] = _stats(folder)
    return None


def remove_cache(plan: SplitCachePlan) -> None:
    """Delete the cache folder of ``plan`` (before a rebuild)."""
    _verified.pop(plan.folder, None)
    shutil.rmtree(plan.folder, ignore_errors=True)


@contextmanager
def cache_lock(plan: SplitCachePlan) -> Iterator[None]:
    """Hold the lock of the cache of ``plan``: one process checks and builds it while the others wait."""
    plan.folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(plan.folder.parent / f".{plan.key}.lock")):
        yield


def read_cache_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a ``latents.safetensors`` cache file."""
    with safe_open(os.fspath(path), framework="pt") as handle:
        return handle.metadata() or {}
