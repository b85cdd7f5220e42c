"""Where a backbone or a dataset lives: a local folder, a single checkpoint file, or a Hugging Face Hub id.

One rule decides it for every reader (loading a backbone, its identity for
the latent cache and the export, its weight files, a preference dataset):
:func:`backbone_location`. This module imports only the standard library and
``huggingface_hub`` (lazily), so the inference-only frontends can use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TRUE = {"1", "ON", "YES", "TRUE"}
BackboneLocation = Literal["folder", "single_file", "hub"]
SD_PIPELINE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def is_hub_offline() -> bool:
    """Whether Hugging Face Hub access is off (``HF_HUB_OFFLINE``), read at call time."""
    from huggingface_hub import constants as hub_constants

    # Read at call time: tests and users set HF_HUB_OFFLINE after importing.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(hub_constants.HF_HUB_OFFLINE)


def is_datasets_offline() -> bool:
    """Whether ``datasets`` may not download (``HF_DATASETS_OFFLINE`` or the Hub's offline mode)."""
    return os.environ.get("HF_DATASETS_OFFLINE", "").upper() in _TRUE or is_hub_offline()


def looks_like_local_path(source: str) -> bool:
    """Whether ``source`` is meant as a filesystem path rather than a Hub id."""
    # A Hub id is "name" or "org/name"; anything else that is not on disk is a missing path.
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or source.lower().endswith(SINGLE_FILE_SUFFIXES)
    )


def backbone_location(source: str | os.PathLike[str]) -> BackboneLocation:
    """``"folder"`` (an existing folder), ``"single_file"`` (a checkpoint file) or ``"hub"`` (a Hub id).

    Raises:
        FileNotFoundError: ``source`` names a single-file checkpoint that does not exist, or
            looks like a local path (see :func:`looks_like_local_path`) that does not exist.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file() or text.lower().endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
        return "single_file"
    if looks_like_local_path(text):
        raise FileNotFoundError(
            f"{text} does not exist (expected a diffusers folder, a single-file checkpoint or a Hub id)"
        )
    return "hub"


def check_sd_pipeline_folder(folder: Path) -> None:
    """Raise a clear error unless ``folder`` is a diffusers Stable Diffusion pipeline folder."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. Expected a folder "
            f"written by StableDiffusionPipeline.save_pretrained with subfolders {list(SD_PIPELINE_COMPONENTS)}"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{index_file} is not valid JSON: {error}") from error
    missing = [name for name in SD_PIPELINE_COMPONENTS if not index.get(name) or index[name][0] is None]
    if missing:
        raise ValueError(
            f"{folder} is not a Stable Diffusion pipeline: model_index.json lacks the components {missing} "
            f"(it names {sorted(k for k in index if not k.startswith('_'))})"
        )
    absent = [name for name in SD_PIPELINE_COMPONENTS if not (folder / name).is_dir()]
    if absent:
        raise ValueError(f"{folder} is not a complete Stable Diffusion pipeline: missing subfolders {absent}")
