"""Exported refiners: the folder format, the backbone fingerprint, loading for a backbone, ``python -m rsc.export``.

An exported refiner is a folder that frontends use without rsc's training stack:

* ``refiner.safetensors``: the weights (:meth:`rsc.refiner.LatentRefiner.save_pretrained`);
* ``config.json``: the refiner architecture, the correction window and default
  strength, the backbone it was trained for with a fingerprint of that
  backbone's UNet and text-encoder configs, the training data's identity and
  the rsc version (:class:`ExportInfo`);
* ``README.md``: a short model card.

:func:`load_refiner_for` refuses a backbone whose latent channels, text width
or fingerprint differ from the export's; ``allow_mismatch=True`` lets a
deliberate transfer to a derivative of the same architecture through.

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
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from rsc import __version__
from rsc.atomic import atomic_path
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


@dataclass
class BackboneConfigs:
    """The configs of a backbone that a refiner depends on.

    Build with :meth:`from_components` (a loaded pipeline or ``FrozenLDM``) or
    :meth:`from_source` (a diffusers folder or cached Hub id, without loading weights).
    """

    unet: Mapping[str, Any]
    text_encoder: Any
    prediction_type: str = "epsilon"
    unet_class: type | None = None

    @classmethod
    def from_components(cls, unet: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: Any = None) -> BackboneConfigs:
        """From loaded modules (``pipeline.unet``, ``pipeline.text_encoder``, ``pipeline.scheduler``)."""
        prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        return cls(dict(unet.config), text_encoder.config, prediction_type, type(unet))

    @classmethod
    def from_source(
        cls, source: str | os.PathLike[str], config: str | None = None, revision: str | None = None,
        local_files_only: bool | None = None,
    ) -> BackboneConfigs:
        """Read the configs of a backbone from a diffusers folder or a Hub id (local cache when offline).

        For a single-file checkpoint, ``config`` names the diffusers folder (or
        Hub id) that holds its configs, as in :func:`rsc.backbone.load_sd_pipeline`.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoConfig

        from rsc.backbone import SINGLE_FILE_SUFFIXES, is_hub_offline

        source = os.fspath(source)
        if source.lower().endswith(SINGLE_FILE_SUFFIXES) and not Path(source).is_dir():
            if config is None:
                raise ValueError(
                    f"backbone {source} is a single-file checkpoint; its configs come from `backbone_config` "
                    "(a diffusers folder or Hub id of its architecture), which is not set"
                )
            source = config
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
        return cls(unet, text_encoder, scheduler.get("prediction_type", "epsilon"))

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
        """See :func:`backbone_fingerprint`."""
        return backbone_fingerprint(self.unet, self.text_encoder, self.unet_class)


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
        backbone_fingerprint: :func:`backbone_fingerprint` of that backbone (``None`` in old exports).
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
| backbone fingerprint | `{info.backbone_fingerprint}` |
| latent channels / text width | {config.latent_channels} / {config.text_embedding_dim} |
| correction window | {start:g} - {end:g} of the trajectory (0 = pure noise) |
| default strength | {info.strength:g} |
| training data | `{data}` |
| parameters | {refiner.num_parameters():,} |
| rsc version | {info.rsc_version} |

Use it with plain diffusers (`rsc.frontends.diffusers.RefinerCallback`) or
`python -m rsc.generate --refiner <this folder> --backbone {info.backbone} --prompts prompts.txt --out out/`.
It is meant for the backbone above; loading it for another backbone fails unless you pass
`allow_mismatch=True` (`--allow-backbone-mismatch`) for a deliberate transfer.

Limits: the refiner was trained on the data named above and corrects what that data shows;
measure its effect on your prompts (stereotype rate, attribute consistency, image quality)
before relying on it.
"""


def export_refiner(refiner: LatentRefiner, directory: str | os.PathLike[str], info: ExportInfo) -> Path:
    """Write ``refiner.safetensors``, ``config.json`` and ``README.md`` to ``directory``, each atomically."""
    directory = Path(directory)
    refiner.save_pretrained(directory, extra_config=info.to_dict())
    with atomic_path(directory / MODEL_CARD_NAME) as temporary:
        temporary.write_text(model_card(refiner, info), encoding="utf-8")
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
    unet_config: Mapping[str, Any],
    text_encoder_config: Any,
    allow_mismatch: bool = False,
    device: str | torch.device = "cpu",
    unet_class: type | None = None,
) -> ExportedRefiner:
    """Load an exported refiner for the backbone with these UNet and text-encoder configs.

    Raises:
        BackboneMismatchError: The latent channels or the text-embedding width differ (never
            overridable: the refiner's layers have those shapes), or the backbone fingerprint
            differs (or the export has none) and ``allow_mismatch`` is False.
    """
    directory = Path(directory)
    info = ExportInfo.from_config_file(directory / CONFIG_NAME)
    refiner = LatentRefiner.from_pretrained(directory, device=device)
    backbone = BackboneConfigs(unet_config, text_encoder_config, unet_class=unet_class)
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
    fingerprint = backbone.fingerprint
    if info.backbone_fingerprint != fingerprint and not allow_mismatch:
        if info.backbone_fingerprint is None:
            raise BackboneMismatchError(
                f"{directory / CONFIG_NAME} has no backbone_fingerprint (an older export), so it cannot be "
                f"checked against this backbone (fingerprint {fingerprint}); re-export it with python -m rsc.export, "
                "or pass allow_mismatch=True (--allow-backbone-mismatch) to use it anyway"
            )
        raise BackboneMismatchError(
            f"refiner {directory} was trained for backbone {info.backbone!r} with fingerprint "
            f"{info.backbone_fingerprint}, but this backbone's UNet/text-encoder configs have fingerprint "
            f"{fingerprint}. For a deliberate transfer to a derivative of the same architecture pass "
            "allow_mismatch=True (--allow-backbone-mismatch)"
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
    dataset = (checkpoint.get("datamodule_hyper_parameters") or {}).get("dataset")
    info = ExportInfo.from_training(hparams, configs, None if dataset is None else {"dataset": str(dataset)})
    return export_refiner(refiner_from_checkpoint(checkpoint, configs), directory, info)


def main(argv: list[str] | None = None) -> None:
    """``python -m rsc.export --ckpt <lightning ckpt> --out <dir>``."""
    parser = argparse.ArgumentParser(
        prog="python -m rsc.export",
        description="Export the refiner of an rsc training checkpoint as refiner.safetensors + config.json + README.md.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by python -m rsc.fit")
    parser.add_argument("--out", required=True, help="output folder (files are replaced atomically)")
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
