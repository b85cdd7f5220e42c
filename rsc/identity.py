"""A backbone's identity: one canonical form of its configs, shared by the export and the latent cache.

* :func:`canonical_config` reduces a component's config to what defines the
  network (no private keys, no save-time metadata, no values equal to the
  class's defaults), so the same config reads the same whether it comes from
  a ``config.json`` or a loaded model, and whichever library version saved it.
* The export records :func:`backbone_fingerprint` (UNet + text encoder: what a
  refiner depends on) and a weight signature (:mod:`rsc.signature`) in
  :class:`BackboneConfigs`.
* The latent cache keys on :func:`backbone_identity`: the same canonical
  configs, VAE included (it makes the latents), plus which files or Hub
  snapshot hold the weights.

Whether a backbone is a folder, a single file or a Hub id is decided by
:func:`rsc.hub.backbone_location`. This module imports torch, diffusers'
config classes lazily and the standard library, so frontends can use it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsc.config import json_value
from rsc.hub import backbone_location, check_sd_pipeline_folder, is_hub_offline
from rsc.signature import weight_signature_from_files, weight_signature_from_modules, weight_signature_label

# Keys that say who wrote a config or how it is loaded, not what the network is.
_VOLATILE_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype"})
# The diffusers components whose configs identify a backbone for the latent cache (the tokenizer has no
# config.json; its files count through their sizes and mtimes).
CACHE_COMPONENTS = ("vae", "text_encoder", "unet")
_WEIGHT_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet")
_DEFAULT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def canonical_config(config: Any, model_class: type | None = None, component: str = "unet") -> dict[str, Any]:
    """A component's config reduced to what defines the network (sorted keys).

    ``config`` is a diffusers config (a mapping, e.g. ``unet.config`` or a
    ``config.json`` read from disk), a transformers ``PretrainedConfig`` (its
    ``to_diff_dict()``, the form ``save_pretrained`` writes, is used) or a
    transformers ``config.json`` mapping. Private keys and save-time metadata
    (library versions, dtype) are dropped everywhere; for diffusers models
    (a ``_class_name``, or ``component`` "unet"/"vae") so are values equal to
    the class's ``__init__`` defaults.
    """
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    class_name = values.get("_class_name") or (None if hasattr(config, "to_diff_dict") else _DEFAULT_CLASSES.get(component))
    defaults: dict[str, Any] = {}
    if model_class is None and class_name is not None:
        import diffusers

        model_class = getattr(diffusers, str(class_name), None)
        if model_class is None:
            raise ValueError(f"unknown {component} class {class_name!r} in the backbone's {component} config")
    if model_class is not None:
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(model_class.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
    canonical = {}
    for key, value in values.items():
        if key.startswith("_") or key in _VOLATILE_KEYS:
            continue
        value = json_value(value)
        if key in defaults and value == json_value(defaults[key]):
            continue
        canonical[key] = value
    return dict(sorted(canonical.items()))


def backbone_fingerprint(unet_config: Mapping[str, Any], text_encoder_config: Any, unet_class: type | None = None) -> str:
    """sha256 (hex) of the canonical JSON of a backbone's UNet and text-encoder configs.

    Backbones that share an architecture (SD 1.5 and its fine-tunes that keep
    its configs) share the fingerprint; anything that changes the UNet or the
    text encoder's configuration changes it.
    """
    return _digest({
        "unet": canonical_config(unet_config, unet_class, "unet"),
        "text_encoder": canonical_config(text_encoder_config, None, "text_encoder"),
    })


@dataclass
class BackboneConfigs:
    """The configs of a backbone that a refiner depends on, and the signature of a few of its weights.

    Build with :meth:`from_components` (a loaded pipeline or ``FrozenLDM``) or
    :meth:`from_source` (a diffusers folder or cached Hub id, reading only the
    probe tensors). Built from configs alone (``weights=None``) it cannot pass
    :func:`rsc.export.load_refiner_for`'s weight check without ``allow_mismatch``.
    """

    unet: Mapping[str, Any]
    text_encoder: Any
    prediction_type: str = "epsilon"
    unet_class: type | None = None
    weights: dict[str, Any] | None = None

    @classmethod
    def from_components(cls, unet: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: Any = None) -> BackboneConfigs:
        """From loaded modules (``pipeline.unet``, ``pipeline.text_encoder``, ``pipeline.scheduler``)."""
        prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        return cls(
            dict(unet.config), text_encoder.config, prediction_type, type(unet),
            weight_signature_from_modules(unet, text_encoder),
        )

    @classmethod
    def from_source(
        cls, source: str | os.PathLike[str], config: str | None = None, revision: str | None = None,
        local_files_only: bool | None = None,
    ) -> BackboneConfigs:
        """Read the configs and weight signature of a backbone from a diffusers folder or a Hub id (local cache when offline).

        For a single-file checkpoint, ``config`` names the diffusers folder (or
        Hub id) that holds its configs, as in :func:`rsc.backbone.load_sd_pipeline`;
        its weights use the original SD key names, so the checkpoint is loaded
        (once, on the CPU) to read the probes under diffusers names.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoConfig

        source = os.fspath(source)
        unreadable = (
            f"cannot read the UNet / text-encoder / scheduler configs of backbone {source!r} "
            "(a diffusers folder or a cached Hub id is needed for the fingerprint)"
        )
        try:
            location = backbone_location(source)
        except FileNotFoundError as error:
            raise OSError(f"{unreadable}: {error}") from error
        if location == "single_file":
            if config is None:
                raise ValueError(
                    f"backbone {source} is a single-file checkpoint; its configs come from `backbone_config` "
                    "(a diffusers folder or Hub id of its architecture), which is not set"
                )
            # The lower layer's loader, imported here: rsc.backbone pulls in the training stack's heavy
            # imports, which frontends reading folders and Hub ids never need. Not a cycle: backbone does
            # not import this module.
            from rsc.backbone import load_sd_pipeline

            pipeline = load_sd_pipeline(source, config=config, revision=revision, local_files_only=local_files_only)
            return cls.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)
        if local_files_only is None:
            local_files_only = is_hub_offline()
        where = {"revision": revision, "local_files_only": local_files_only}
        try:
            unet = UNet2DConditionModel.load_config(source, subfolder="unet", **where)
            text_encoder = AutoConfig.from_pretrained(source, subfolder="text_encoder", **where)
            scheduler = DDPMScheduler.load_config(source, subfolder="scheduler", **where)
        except (OSError, ValueError) as error:
            raise OSError(f"{unreadable}: {error}") from error
        weights = weight_signature_from_files(source, revision=revision, local_files_only=local_files_only)
        return cls(unet, text_encoder, scheduler.get("prediction_type", "epsilon"), weights=weights)

    @property
    def latent_channels(self) -> int:
        """Channels of the UNet's latent input."""
        if "in_channels" in self.unet:
            return int(self.unet["in_channels"])
        return int(inspect.signature(self.unet_class or _default_unet_class()).parameters["in_channels"].default)

    @property
    def text_embedding_dim(self) -> int:
        """Width of the text encoder's token embeddings (what the UNet cross-attends to)."""
        config = self.text_encoder
        return int(config.hidden_size if hasattr(config, "hidden_size") else config["hidden_size"])

    @property
    def fingerprint(self) -> str:
        """The configs' fingerprint, see :func:`backbone_fingerprint` (the weights are in :attr:`weights`)."""
        return backbone_fingerprint(self.unet, self.text_encoder, self.unet_class)

    @property
    def label(self) -> str:
        """``configs <fingerprint> / weights <label>``: how messages name this backbone."""
        return f"configs {self.fingerprint} / weights {weight_signature_label(self.weights)}"


def _default_unet_class() -> type:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


# ---------------------------------------------------------------------- identity for the latent cache
@dataclass(frozen=True)
class BackboneIdentity:
    """What identifies a backbone for the cache key, and its native image size (``None``: load the model to know)."""

    identity: dict[str, Any]
    image_size: int | None


def _read_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _image_size_from_configs(folder: Path) -> int:
    unet, vae = _read_config(folder / "unet" / "config.json"), _read_config(folder / "vae" / "config.json")
    # Same rule as FrozenLDM.image_size, read from configs so a cache hit never loads weights.
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _folder_identity(folder: Path, with_files: bool) -> dict[str, Any]:
    configs = {
        name: _digest(canonical_config(_read_config(folder / name / "config.json"), component=name))
        for name in CACHE_COMPONENTS
    }
    identity: dict[str, Any] = {"configs": configs}
    if with_files:
        files = []
        for component in _WEIGHT_COMPONENTS:
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

    Local folders: resolved path, canonical config hashes (:func:`canonical_config`) and the size
    and mtime of every file of vae/text_encoder/tokenizer/unet. Hub ids: the id, the cached
    snapshot's commit and config hashes. Single files: resolved path, size and mtime, plus
    ``config``'s identity; without ``config`` the image size is unknown until the model is loaded.
    """
    path = Path(backbone).expanduser()
    location = backbone_location(backbone)
    if location == "folder":
        check_sd_pipeline_folder(path)
        return BackboneIdentity(
            {"source": str(path.resolve()), **_folder_identity(path, with_files=True)}, _image_size_from_configs(path)
        )
    if location == "single_file":
        stat = path.stat()
        identity: dict[str, Any] = {"source": str(path.resolve()), "file": [stat.st_size, stat.st_mtime_ns]}
        if config is None:
            return BackboneIdentity(identity, None)
        base = backbone_identity(config)
        identity["config"] = base.identity
        return BackboneIdentity(identity, base.image_size)
    snapshot = _hub_snapshot(backbone)
    return BackboneIdentity(
        {"source": backbone, "commit": snapshot.name, **_folder_identity(snapshot, with_files=False)},
        _image_size_from_configs(snapshot),
    )
