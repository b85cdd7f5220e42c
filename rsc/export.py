"""Exported refiners: the folder format, the backbone fingerprint, loading for a backbone, ``python -m rsc.export``.

An exported refiner is a folder that frontends use without rsc's training stack:

* ``refiner.safetensors``: the weights (:meth:`rsc.refiner.LatentRefiner.save_pretrained`);
* ``config.json``: the refiner architecture, the correction window and default
  strength, the backbone it was trained for (a fingerprint of its UNet and
  text-encoder configs and a signature of a few of their weights), the
  training data's identity and the rsc version (:class:`ExportInfo`);
* ``README.md``: a short model card.

:func:`load_refiner_for` refuses a backbone whose latent channels, text width,
config fingerprint or weight signature differ from the export's;
``allow_mismatch=True`` lets a deliberate transfer to a derivative of the same
architecture (e.g. SD 1.5 -> a fine-tuned SD 1.5) through.

Why the weights have a *signature* compared with a tolerance, not a hash: a
backbone is loaded in float32, float16 or bfloat16, and no rounding of the
values to a common grid is exact across those paths (float32 -> bfloat16 and
float32 -> float16 -> bfloat16 round 6% of trained weights differently, and
any coarser grid still has values on its boundaries). So the signature holds
a few float64 statistics of a few fixed, small, trained tensors
(:data:`UNET_PROBES`, :data:`TEXT_ENCODER_PROBES`), which move with a
fine-tune's first-order weight changes while bfloat16 rounding moves them by
~0.1% of their scale; :func:`compare_weight_signatures` allows 1%.

This module imports only torch, safetensors, diffusers and the standard
library at load time (transformers and :mod:`rsc.backbone` lazily, to read a
backbone's configs from disk), so frontends can use it. ``python -m rsc.export --ckpt last.ckpt --out
DIR`` reads a Lightning checkpoint with ``torch.load(weights_only=True)``; it
does not need Lightning either.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from rsc import __version__
from rsc.refiner import CONFIG_NAME, WEIGHTS_NAME, LatentRefiner, RefinerConfig, RefinerCorrection

FORMAT_NAME = "rsc-refiner"
FORMAT_VERSION = 1
MODEL_CARD_NAME = "README.md"
# Keys that say who wrote a config or how it is loaded, not what the network is.
_VOLATILE_TEXT_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype"})


class BackboneMismatchError(ValueError):
    """A refiner was loaded for a backbone it was not trained for."""


# ---------------------------------------------------------------------- fingerprint
def _plain(value: Any) -> Any:
    """JSON-comparable form (tuples become lists, FrozenDicts dicts)."""
    return json.loads(json.dumps(value, default=str))


def canonical_unet_config(config: Mapping[str, Any], unet_class: type | None = None) -> dict[str, Any]:
    """The UNet config reduced to what defines the network: no private keys, no values equal to the defaults.

    The same config reads the same whether it comes from a ``config.json`` (all
    arguments, as saved by some diffusers version) or from a loaded model
    (``unet.config``, defaults filled in), so the fingerprint does not depend
    on how, or by which diffusers version, the backbone was saved.
    """
    if unet_class is None:
        import diffusers

        unet_class = getattr(diffusers, str(config.get("_class_name", "UNet2DConditionModel")), None)
        if unet_class is None:
            raise ValueError(f"unknown UNet class {config.get('_class_name')!r} in the backbone's UNet config")
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(unet_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    canonical = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        value = _plain(value)
        if key in defaults and value == _plain(defaults[key]):
            continue
        canonical[key] = value
    return dict(sorted(canonical.items()))


def canonical_text_encoder_config(config: Any) -> dict[str, Any]:
    """The text-encoder config without private keys and save-time metadata (transformers version, dtype).

    ``config`` is a transformers ``PretrainedConfig`` (its ``to_diff_dict()``,
    the form ``save_pretrained`` writes, is used) or a mapping read from a
    ``config.json``.
    """
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    return {
        key: _plain(value)
        for key, value in sorted(values.items())
        if not key.startswith("_") and key not in _VOLATILE_TEXT_KEYS
    }


def backbone_fingerprint(unet_config: Mapping[str, Any], text_encoder_config: Any, unet_class: type | None = None) -> str:
    """sha256 (hex) of the canonical JSON of a backbone's UNet and text-encoder configs.

    Backbones that share an architecture (SD 1.5 and its fine-tunes that keep
    its configs) share the fingerprint; anything that changes the UNet or the
    text encoder's configuration changes it.
    """
    payload = {
        "unet": canonical_unet_config(unet_config, unet_class),
        "text_encoder": canonical_text_encoder_config(text_encoder_config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------- weight signature
WEIGHTS_SCHEME = "rsc-weights-v1"
# Small tensors that every full fine-tune trains, plus one cross-attention key projection
# (merged LoRAs usually touch only attention) and the text encoder's embeddings and first layer.
UNET_PROBES = (
    "conv_in.weight",
    "conv_out.weight",
    "time_embedding.linear_1.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
)
TEXT_ENCODER_PROBES = (
    "embeddings.token_embedding.weight",
    "embeddings.position_embedding.weight",
    "encoder.layers.0.self_attn.k_proj.weight",
    "final_layer_norm.weight",
)
# CLIP text encoders keep their weights under "text_model." (transformers 4 and SD's files) or
# without it (transformers 5 modules and saves); a probe is found under either.
_PROBE_PREFIXES = {"unet": ("",), "text_encoder": ("", "text_model.")}
# Only the first rows along dim 0 are read (SD 1.5's token embedding has 49408): cheap from disk too.
PROBE_ROWS = 512
PROBE_CHUNKS = 8
# Chunk means may differ by this many of their natural scales (rms / sqrt(chunk size)), and the rms
# by this fraction. bfloat16 rounding moves a chunk mean by ~0.0011 of its scale (std of a sum of
# uniform relative errors of at most 2**-9): 1% is ~9 of those stds, and a fine-tune that moves the
# probed weights by more than ~1% of their rms exceeds it.
WEIGHTS_TOLERANCE = 0.01
_WEIGHT_FILE_BASES = {"unet": ("diffusion_pytorch_model",), "text_encoder": ("model", "pytorch_model")}


def tensor_signature(tensor: torch.Tensor) -> dict[str, Any]:
    """Shape, rms and :data:`PROBE_CHUNKS` chunk means (float64) of the first :data:`PROBE_ROWS` rows of ``tensor``."""
    return _signature_of_rows(tensor[:PROBE_ROWS], list(tensor.shape))


def _signature_of_rows(rows: torch.Tensor, shape: list[int]) -> dict[str, Any]:
    values = rows.detach().to("cpu", torch.float64).flatten()
    count = values.numel()
    chunks = torch.tensor_split(values, min(PROBE_CHUNKS, max(count, 1)))
    return {
        "shape": [int(size) for size in shape],
        "count": count,
        "rms": float(values.square().mean().sqrt()) if count else 0.0,
        "chunk_means": [float(chunk.mean()) for chunk in chunks if chunk.numel()],
    }


def _stored_name(component: str, probe: str, keys: Any) -> str | None:
    """The key under which ``keys`` (a state dict's or a file's) holds ``probe``, or ``None``."""
    return next((prefix + probe for prefix in _PROBE_PREFIXES[component] if prefix + probe in keys), None)


def weight_signature_from_state(
    unet_state: Mapping[str, torch.Tensor], text_encoder_state: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The weight signature of a backbone from its UNet and text-encoder state dicts (absent probes are ``None``)."""
    tensors: dict[str, Any] = {}
    for component, state, probes in (("unet", unet_state, UNET_PROBES), ("text_encoder", text_encoder_state, TEXT_ENCODER_PROBES)):
        for probe in probes:
            key = _stored_name(component, probe, state)
            tensors[f"{component}/{probe}"] = None if key is None else tensor_signature(state[key])
    return {"scheme": WEIGHTS_SCHEME, "tensors": tensors}


def weight_signature_from_modules(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, Any]:
    """The weight signature of loaded modules, whatever their dtype and device."""
    return weight_signature_from_state(unet.state_dict(), text_encoder.state_dict())


def _weight_file_candidates(component: str) -> list[str]:
    """File names a diffusers/transformers component may keep its weights in, preferred first."""
    names = []
    for extension in ("safetensors", "bin"):
        for base in _WEIGHT_FILE_BASES[component]:
            for variant in ("", ".fp16"):
                names += [f"{base}{variant}.{extension}", f"{base}{variant}.{extension}.index.json"]
    return names


def _resolve_file(
    source: str, subfolder: str, name: str, revision: str | None, local_files_only: bool
) -> Path | None:
    """``source/subfolder/name`` in a local folder, or from the Hub (its cache when offline); ``None`` if absent."""
    if Path(source).is_dir():
        path = Path(source) / subfolder / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, subfolder=subfolder, revision=revision, local_files_only=local_files_only))
    except (EntryNotFoundError, OSError):
        return None


def _read_probes(path: Path, component: str, probes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Signatures of the probes in one weight file, reading only those tensors where the format allows."""
    found: dict[str, dict[str, Any]] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for probe in probes:
                key = _stored_name(component, probe, keys)
                if key is not None:
                    sliced = handle.get_slice(key)
                    found[probe] = _signature_of_rows(sliced[:PROBE_ROWS], list(sliced.get_shape()))
        return found
    # A pickled .bin: mmap=True pages in only the tensors read (zip format, torch >= 1.6 files);
    # older files are loaded whole.
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    keys = {probe: _stored_name(component, probe, state) for probe in probes}
    return {probe: tensor_signature(state[key]) for probe, key in keys.items() if key is not None}


def weight_signature_from_files(
    source: str | os.PathLike[str], revision: str | None = None, local_files_only: bool = False
) -> dict[str, Any]:
    """The weight signature of a diffusers folder or Hub id, reading only the probe tensors.

    The first weight file found per component is read (``.safetensors`` before
    ``.bin``, the full-precision file before the ``fp16`` variant; sharded
    checkpoints through their ``.index.json``). The signature does not depend
    on the file's dtype.
    """
    source = os.fspath(source)
    tensors: dict[str, Any] = {}
    for component, probes in (("unet", UNET_PROBES), ("text_encoder", TEXT_ENCODER_PROBES)):
        candidates = _weight_file_candidates(component)
        path = None
        for name in candidates:
            path = _resolve_file(source, component, name, revision, local_files_only)
            if path is not None:
                break
        if path is None:
            raise OSError(
                f"backbone {source!r} has no {component} weights (looked for {component}/{{{', '.join(candidates)}}}); "
                "the export records a signature of the backbone's weights, so point --backbone at the weights"
            )
        found: dict[str, dict[str, Any]] = {}
        if path.name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            keys = (_stored_name(component, probe, weight_map) for probe in probes)
            for shard in sorted({weight_map[key] for key in keys if key is not None}):
                shard_path = _resolve_file(source, component, shard, revision, local_files_only)
                if shard_path is None:
                    raise OSError(f"{path} names shard {shard}, which backbone {source!r} does not have")
                found.update(_read_probes(shard_path, component, probes))
        else:
            found = _read_probes(path, component, probes)
        tensors.update({f"{component}/{name}": found.get(name) for name in probes})
    return {"scheme": WEIGHTS_SCHEME, "tensors": tensors}


def _differences(name: str, trained: dict[str, Any] | None, given: dict[str, Any] | None, tolerance: float) -> str | None:
    """Why two probe signatures differ, or ``None`` when they agree within ``tolerance``."""
    if trained is None or given is None:
        return None if trained is given else f"{name} is {'absent' if trained is None else 'present'} in the export's backbone but not in this one"
    if trained["shape"] != given["shape"] or trained["count"] != given["count"]:
        return f"{name} has shape {trained['shape']} in the export's backbone but {given['shape']} here"
    scale = max(trained["rms"], given["rms"])
    if scale == 0.0:
        return None
    rms_change = abs(trained["rms"] - given["rms"]) / scale
    quotient, remainder = divmod(trained["count"], len(trained["chunk_means"]))
    sizes = [quotient + 1] * remainder + [quotient] * (len(trained["chunk_means"]) - remainder)
    mean_change = max(
        abs(a - b) / (scale / math.sqrt(size)) for a, b, size in zip(trained["chunk_means"], given["chunk_means"], sizes)
    )
    if max(rms_change, mean_change) <= tolerance:
        return None
    return f"{name} differs (rms by {rms_change:.3g} of itself, chunk means by up to {mean_change:.3g} of their scale)"


def compare_weight_signatures(
    trained: Mapping[str, Any], given: Mapping[str, Any], tolerance: float = WEIGHTS_TOLERANCE
) -> list[str]:
    """Descriptions of the probes whose signatures differ by more than ``tolerance`` (empty: the same weights).

    Chunk means are compared in units of their natural scale
    (rms / sqrt(chunk size)) and the rms relative to itself, so the test does
    not depend on a tensor's size or magnitude; see :data:`WEIGHTS_TOLERANCE`.
    """
    if trained.get("scheme") != given.get("scheme"):
        return [f"weight signature schemes differ ({trained.get('scheme')!r} vs {given.get('scheme')!r})"]
    names = sorted(set(trained["tensors"]) | set(given["tensors"]))
    found = (_differences(name, trained["tensors"].get(name), given["tensors"].get(name), tolerance) for name in names)
    return [difference for difference in found if difference is not None]


def weight_signature_label(signature: Mapping[str, Any] | None) -> str:
    """A short name for a weight signature in messages: 12 hex digits of sha256 over its values at 2 significant digits.

    Only a label: two loads of one backbone in different dtypes can get
    different labels; whether weights match is decided by :func:`compare_weight_signatures`.
    """
    if signature is None:
        return "none"

    def coarse(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.2g}")
        if isinstance(value, list):
            return [coarse(item) for item in value]
        if isinstance(value, dict):
            return {key: coarse(item) for key, item in value.items()}
        return value

    return hashlib.sha256(json.dumps(coarse(dict(signature)), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class BackboneConfigs:
    """The configs of a backbone that a refiner depends on, and the signature of a few of its weights.

    Build with :meth:`from_components` (a loaded pipeline or ``FrozenLDM``) or
    :meth:`from_source` (a diffusers folder or cached Hub id, reading only the
    probe tensors). Built from configs alone (``weights=None``) it cannot pass
    :func:`load_refiner_for`'s weight check without ``allow_mismatch``.
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

        from rsc.backbone import SINGLE_FILE_SUFFIXES, is_hub_offline

        source = os.fspath(source)
        single_file = source.lower().endswith(SINGLE_FILE_SUFFIXES) and not Path(source).is_dir()
        if single_file:
            if config is None:
                raise ValueError(
                    f"backbone {source} is a single-file checkpoint; its configs come from `backbone_config` "
                    "(a diffusers folder or Hub id of its architecture), which is not set"
                )
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
            raise OSError(
                f"cannot read the UNet / text-encoder / scheduler configs of backbone {source!r} "
                f"(a diffusers folder or a cached Hub id is needed for the fingerprint): {error}"
            ) from error
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


# ---------------------------------------------------------------------- the format
@dataclass
class ExportInfo:
    """What ``config.json`` says besides the architecture.

    Attributes:
        correction_window: Fractions (start, end) of the sampling trajectory to correct (0 = pure noise).
        strength: Default sampling strength s in ``z_t + s * R(z_t, t, c)``.
        backbone: Hub id or path of the backbone the refiner was trained for.
        backbone_fingerprint: :func:`backbone_fingerprint` of that backbone's configs (``None`` in old exports).
        backbone_weights: Signature of a few of that backbone's weights (``None`` in exports written
            before rsc recorded it), see :func:`compare_weight_signatures`.
        backbone_config: For a single-file backbone, the diffusers folder with its configs.
        prediction_type: The backbone's prediction type (epsilon, v_prediction, sample).
        training_strength: The strength used in training, if it differs from ``strength``.
        training_data: Identity of the training data (``{"dataset": ...}``), if known.
        rsc_version: Version of rsc that wrote the export.
    """

    correction_window: tuple[float, float]
    strength: float
    backbone: str
    backbone_fingerprint: str | None = None
    backbone_weights: dict[str, Any] | None = None
    backbone_config: str | None = None
    prediction_type: str = "epsilon"
    training_strength: float | None = None
    training_data: dict[str, Any] | None = None
    rsc_version: str = __version__

    @classmethod
    def from_training(
        cls, hparams: Mapping[str, Any], backbone: BackboneConfigs, training_data: dict[str, Any] | None = None
    ) -> ExportInfo:
        """From an ``RSCorrector``'s hyper-parameters (or ``export_config()``) and its backbone's configs.

        The default strength is ``sampling_strength`` where the training run set one, else ``strength``.
        """
        missing = [key for key in ("correction_window", "strength", "backbone") if key not in hparams]
        if missing:
            raise KeyError(f"the training hyper-parameters lack {missing}; got keys {sorted(hparams)}")
        training_strength = float(hparams["strength"])
        sampling_strength = hparams.get("sampling_strength")
        strength = training_strength if sampling_strength is None else float(sampling_strength)
        window = tuple(float(edge) for edge in hparams["correction_window"])
        return cls(
            correction_window=(window[0], window[1]),
            strength=strength,
            backbone=str(hparams["backbone"]),
            backbone_fingerprint=backbone.fingerprint,
            backbone_weights=backbone.weights,
            backbone_config=None if hparams.get("backbone_config") is None else str(hparams["backbone_config"]),
            prediction_type=str(hparams.get("prediction_type") or backbone.prediction_type),
            training_strength=None if training_strength == strength else training_strength,
            training_data=training_data,
        )

    @classmethod
    def from_config_file(cls, path: Path) -> ExportInfo:
        """Read from an exported ``config.json``, naming the file and the field on error."""
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read refiner config {path}: {error}") from error
        missing = [key for key in ("correction_window", "strength", "backbone") if key not in payload]
        if missing:
            raise ValueError(f"{path} lacks {missing}: not a refiner exported by rsc (python -m rsc.export)")
        known = {item.name for item in fields(cls)}
        values = {key: value for key, value in payload.items() if key in known}
        window = values["correction_window"]
        if not (isinstance(window, list) and len(window) == 2 and 0.0 <= window[0] <= window[1] <= 1.0):
            raise ValueError(f"{path}: correction_window must be [start, end] with 0 <= start <= end <= 1, got {window!r}")
        values["correction_window"] = (float(window[0]), float(window[1]))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON entries (the architecture is added by :meth:`LatentRefiner.save_pretrained`)."""
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **_plain(asdict(self))}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(refiner: LatentRefiner, info: ExportInfo) -> str:
    """A short model card (README.md) for an exported refiner."""
    start, end = info.correction_window
    data = (info.training_data or {}).get("dataset", "not recorded")
    config = refiner.config
    return f"""# rsc latent refiner

A latent refiner R(z_t, t, c) trained with rsc's preference method (inspired by
"RS-Corrector", arXiv 2312.04810; not a reproduction of it) to correct racial
stereotypes of a frozen Stable Diffusion at inference time: inside the correction window the
sampler updates the latent, `z_t <- z_t + s * R(z_t, t, c)`, before the UNet sees it.

| | |
| --- | --- |
| backbone | `{info.backbone}` |
| backbone fingerprint (configs) | `{info.backbone_fingerprint}` |
| backbone weights | signature of {len((info.backbone_weights or {}).get("tensors", {}))} probe tensors (config.json) |
| latent channels / text width | {config.latent_channels} / {config.text_embedding_dim} |
| correction window | {start:g} - {end:g} of the trajectory (0 = pure noise) |
| default strength | {info.strength:g} |
| training data | `{data}` |
| parameters | {refiner.num_parameters():,} |
| rsc version | {info.rsc_version} |

Use it with plain diffusers (`rsc.frontends.diffusers.RefinerCallback`) or
`python -m rsc.generate --refiner <this folder> --backbone {info.backbone} --prompts prompts.txt --out out/`.
It is meant for the backbone above; loading it for another backbone (other configs, or other
weights with the same configs, e.g. a fine-tune) fails unless you pass
`allow_mismatch=True` (`--allow-backbone-mismatch`) for a deliberate transfer.

Limits: the refiner was trained on the data named above and corrects what that data shows;
measure its effect on your prompts (stereotype rate, attribute consistency, image quality)
before relying on it.
"""


# Names of the export's files, and of the siblings an export goes through: fixed (not random) so
# the next export finds what a killed one left.
EXPORT_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, MODEL_CARD_NAME})
_STAGING_SUFFIX = ".rsc-new"
_ASIDE_SUFFIX = ".rsc-old"


def _staging_folder(directory: Path) -> Path:
    return directory.parent / f".{directory.name}{_STAGING_SUFFIX}"


def _aside_folder(directory: Path) -> Path:
    return directory.parent / f".{directory.name}{_ASIDE_SUFFIX}"


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk where the platform allows it (a folder cannot be opened on Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def recover_export(directory: str | os.PathLike[str]) -> None:
    """Undo what an export killed mid-way left beside ``directory`` (see :func:`export_refiner`).

    * ``.<name>.rsc-old`` without ``<name>``: killed between the two renames; the
      old export is renamed back (the staged new one is complete, but the old is
      the one a reader last saw).
    * ``.<name>.rsc-old`` beside ``<name>``: killed after the swap; the old one is deleted.
    * ``.<name>.rsc-new``: a staged export that was never swapped in; deleted.
    """
    directory = Path(directory)
    aside, staging = _aside_folder(directory), _staging_folder(directory)
    if aside.exists():
        if directory.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, directory)
    if staging.exists():
        shutil.rmtree(staging)


def _check_replaceable(directory: Path) -> None:
    """Refuse to swap out a folder that holds anything but an export (``--out .`` must not delete a project)."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"export destination {directory} is a file, not a folder")
    # atomic_path's leftovers (".config.json.abc.tmp") belong to an export killed mid-file.
    foreign = sorted(
        path.name for path in directory.iterdir()
        if path.name not in EXPORT_FILES and not (path.name.startswith(".") and path.name.endswith(".tmp"))
    )
    if foreign:
        raise FileExistsError(
            f"export destination {directory} holds files that are not part of a refiner export ({foreign[:5]}); "
            f"an export replaces the whole folder, so choose an empty or new folder"
        )


def export_refiner(refiner: LatentRefiner, directory: str | os.PathLike[str], info: ExportInfo) -> Path:
    """Write ``refiner.safetensors``, ``config.json`` and ``README.md`` to ``directory``, atomically as a whole.

    The files are written into the sibling ``.<name>.rsc-new`` and swapped in:
    an existing ``directory`` is renamed to ``.<name>.rsc-old``, the new folder
    renamed to ``directory``, then the old one deleted. Readers see the old
    export or the new one, never a mix. If the process is killed:

    * while writing: ``directory`` is untouched; ``.rsc-new`` is left over;
    * between the renames: ``directory`` is missing, the old export is in
      ``.rsc-old`` (:func:`load_refiner_for` says so);
    * before the old one is deleted: ``directory`` is new, ``.rsc-old`` is left over.

    The next export (or :func:`recover_export`) puts each of these right before
    it starts. A failed write (an exception) removes ``.rsc-new`` at once.
    Two exports to one folder at the same time are not supported. A
    ``directory`` holding files other than an export's is refused.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_export(directory)
    _check_replaceable(directory)
    staging, aside = _staging_folder(directory), _aside_folder(directory)
    staging.mkdir()
    try:
        refiner.save_pretrained(staging, extra_config=info.to_dict())
        (staging / MODEL_CARD_NAME).write_text(model_card(refiner, info), encoding="utf-8")
        for name in EXPORT_FILES:
            _fsync(staging / name)  # the renames must not reach the disk before the files' contents
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        os.rename(directory, aside)
    os.rename(staging, directory)
    _fsync(directory.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return directory


@dataclass
class ExportedRefiner:
    """A loaded export: the refiner, what its ``config.json`` says, and where it came from."""

    refiner: LatentRefiner
    info: ExportInfo
    directory: Path

    def correction(self, strength: float | None = None) -> RefinerCorrection:
        """The refiner as a sampler correction (default: the exported strength)."""
        return RefinerCorrection(self.refiner, self.info.strength if strength is None else strength)

    @property
    def weights_sha256(self) -> str:
        """sha256 of ``refiner.safetensors``: identifies the weights in image sidecars."""
        return file_sha256(self.directory / WEIGHTS_NAME)


def load_refiner_for(
    directory: str | os.PathLike[str],
    backbone: BackboneConfigs,
    allow_mismatch: bool = False,
    device: str | torch.device = "cpu",
) -> ExportedRefiner:
    """Load an exported refiner for ``backbone`` (``BackboneConfigs.from_components(pipe.unet, pipe.text_encoder)``).

    Raises:
        BackboneMismatchError: The latent channels or the text-embedding width differ (never
            overridable: the refiner's layers have those shapes); or, unless ``allow_mismatch``,
            the config fingerprint or the weight signature differ, or either side lacks one
            (an export written before rsc recorded weights, or ``backbone`` built without weights).
    """
    directory = Path(directory)
    if not directory.exists() and _aside_folder(directory).exists():
        raise FileNotFoundError(
            f"refiner {directory} does not exist, but {_aside_folder(directory)} does: an export was killed while "
            "swapping folders; export again, or rename that folder back to use the previous export"
        )
    info = ExportInfo.from_config_file(directory / CONFIG_NAME)
    refiner = LatentRefiner.from_pretrained(directory, device=device)
    for what, trained, given in (
        ("latent channels", refiner.config.latent_channels, backbone.latent_channels),
        ("text-embedding width", refiner.config.text_embedding_dim, backbone.text_embedding_dim),
    ):
        if trained != given:
            raise BackboneMismatchError(
                f"refiner {directory} was trained for a backbone with {what} {trained} (backbone "
                f"{info.backbone!r}), but this backbone has {what} {given}; a refiner cannot be used across "
                "latent or text shapes (allow_mismatch does not apply)"
            )
    if allow_mismatch:
        return ExportedRefiner(refiner=refiner.eval(), info=info, directory=directory)
    override = "pass allow_mismatch=True (--allow-backbone-mismatch) to use it anyway"
    fingerprint = backbone.fingerprint
    if info.backbone_fingerprint is None or info.backbone_weights is None:
        missing = "backbone_fingerprint" if info.backbone_fingerprint is None else "backbone_weights"
        raise BackboneMismatchError(
            f"{directory / CONFIG_NAME} has no {missing} (an export from an older rsc), so it cannot be checked "
            f"against this backbone ({backbone.label}); re-export it with python -m rsc.export, or {override}"
        )
    trained_label = f"configs {info.backbone_fingerprint} / weights {weight_signature_label(info.backbone_weights)}"
    if info.backbone_fingerprint != fingerprint:
        raise BackboneMismatchError(
            f"refiner {directory} was trained for backbone {info.backbone!r} with fingerprint {trained_label}, "
            f"but this backbone has {backbone.label}: its UNet/text-encoder configs differ. For a deliberate "
            f"transfer to a derivative of the same architecture {override}"
        )
    if backbone.weights is None:
        raise BackboneMismatchError(
            f"this backbone ({backbone.label}) has no weight signature, so it cannot be checked against refiner "
            f"{directory}; build it with BackboneConfigs.from_components or .from_source, or {override}"
        )
    differences = compare_weight_signatures(info.backbone_weights, backbone.weights)
    if differences:
        raise BackboneMismatchError(
            f"refiner {directory} was trained for backbone {info.backbone!r} with fingerprint {trained_label}, "
            f"but this backbone has {backbone.label}: same configs, other weights ({'; '.join(differences)}), "
            f"e.g. a fine-tune. For a deliberate transfer to a derivative of the same architecture {override}"
        )
    return ExportedRefiner(refiner=refiner.eval(), info=info, directory=directory)


# ---------------------------------------------------------------------- from a Lightning checkpoint
def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint of ``RSCorrector``, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise ValueError(
            f"cannot load {path} with torch.load(weights_only=True): {error}. rsc checkpoints hold plain "
            "tensors and hyper-parameters; a checkpoint with other objects is not rsc's or is damaged"
        ) from error
    for key in ("state_dict", "hyper_parameters"):
        if key not in checkpoint:
            raise ValueError(f"{path} has no {key!r}: not a Lightning checkpoint of rsc.module.RSCorrector")
    return checkpoint


def refiner_from_checkpoint(checkpoint: Mapping[str, Any], backbone: BackboneConfigs) -> LatentRefiner:
    """The refiner of an ``RSCorrector`` checkpoint (its ``refiner.*`` weights; sizes from the hyper-parameters)."""
    hparams = checkpoint["hyper_parameters"]
    # Latent and text widths come from the backbone, as in RSCorrector.__init__; the rest from the hparams.
    sizes = {item.name: hparams[item.name] for item in fields(RefinerConfig) if item.name in hparams}
    config = RefinerConfig(
        **{**sizes, "latent_channels": backbone.latent_channels, "text_embedding_dim": backbone.text_embedding_dim}
    )
    prefix = "refiner."
    state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"the checkpoint holds no {prefix}* weights; keys: {sorted(checkpoint['state_dict'])[:5]}...")
    refiner = LatentRefiner(config)
    refiner.load_state_dict(state)
    return refiner


def training_data_identity(datamodule_hparams: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"dataset": ...}`` from a preference datamodule's hyper-parameters, if they name one."""
    dataset = (datamodule_hparams or {}).get("dataset")
    return None if dataset is None else {"dataset": str(dataset)}


def export_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    backbone: str | None = None,
    backbone_config: str | None = None,
) -> Path:
    """Export the refiner of a Lightning checkpoint (see ``python -m rsc.export --help``)."""
    checkpoint = load_checkpoint(checkpoint_path)
    hparams = dict(checkpoint["hyper_parameters"])
    if backbone is not None:
        hparams["backbone"] = backbone
    if backbone_config is not None:
        hparams["backbone_config"] = backbone_config
    if "backbone" not in hparams:
        raise ValueError(f"{checkpoint_path}: hyper_parameters name no backbone; pass --backbone")
    configs = BackboneConfigs.from_source(hparams["backbone"], config=hparams.get("backbone_config"))
    data = training_data_identity(checkpoint.get("datamodule_hyper_parameters"))
    info = ExportInfo.from_training(hparams, configs, data)
    return export_refiner(refiner_from_checkpoint(checkpoint, configs), directory, info)


def main(argv: list[str] | None = None) -> None:
    """``python -m rsc.export --ckpt <lightning ckpt> --out <dir>``."""
    parser = argparse.ArgumentParser(
        prog="python -m rsc.export",
        description="Export the refiner of an rsc training checkpoint as refiner.safetensors + config.json + README.md.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by python -m rsc.fit")
    parser.add_argument("--out", required=True, help="output folder (replaced as a whole, atomically)")
    parser.add_argument(
        "--backbone", default=None,
        help="read the backbone's configs here and record it instead of the checkpoint's "
        "hyper_parameters.backbone (e.g. the training path is not mounted on this machine)",
    )
    parser.add_argument("--backbone-config", default=None, help="for a single-file backbone: its diffusers config folder")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, backbone=args.backbone, backbone_config=args.backbone_config)
    except (OSError, ValueError, KeyError) as error:
        parser.exit(2, f"rsc.export: error: {error}\n")
    print(f"refiner exported to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
