"""Exported refiners: the folder format, its model card, loading for a backbone, ``python -m rsc.export``.

An exported refiner is a folder that frontends use without rsc's training stack:

* ``refiner.safetensors``: the weights (:meth:`rsc.refiner.LatentRefiner.save_pretrained`);
* ``config.json``: the refiner architecture, the correction window and default
  strength, the backbone it was trained for (a fingerprint of its UNet and
  text-encoder configs, :mod:`rsc.identity`, and a signature of a few of their
  weights, :mod:`rsc.signature`), the training data's identity and the rsc
  version (:class:`ExportInfo`);
* ``README.md``: a short model card.

The folder is written as a whole, atomically (:func:`rsc.atomic.write_folder_atomic`).
:func:`load_refiner_for` refuses a backbone whose latent channels, text width,
config fingerprint or weight signature differ from the export's;
``allow_mismatch=True`` lets a deliberate transfer to a derivative of the same
architecture (e.g. SD 1.5 -> a fine-tuned SD 1.5) through.

This module imports only torch, safetensors, diffusers and the standard
library at load time (transformers and :mod:`rsc.backbone` lazily, to read a
backbone's configs from disk), so frontends can use it. ``python -m rsc.export --ckpt last.ckpt --out
DIR`` reads a Lightning checkpoint with ``torch.load(weights_only=True)``; it
does not need Lightning either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from rsc import __version__
from rsc.atomic import aside_folder, file_sha256, write_folder_atomic
from rsc.cli import USER_ERRORS, run_cli
from rsc.config import json_value
from rsc.identity import BackboneConfigs
from rsc.numerics import non_finite_tensors
from rsc.refiner import CONFIG_NAME, WEIGHTS_NAME, LatentRefiner, RefinerConfig, RefinerCorrection, X0Predictor
from rsc.sampling import check_window
from rsc.signature import compare_weight_signatures, weight_signature_label

log = logging.getLogger(__name__)

FORMAT_NAME = "rsc-refiner"
FORMAT_VERSION = 1
MODEL_CARD_NAME = "README.md"
# Names of the export's files: an export replaces a folder that holds only these.
EXPORT_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, MODEL_CARD_NAME})


class BackboneMismatchError(ValueError):
    """A refiner was loaded for a backbone it was not trained for."""


# ---------------------------------------------------------------------- the format
def sampling_strength(hparams: Mapping[str, Any]) -> float:
    """The correction strength sampling uses: ``sampling_strength`` where one was set, else the training ``strength``.

    ``hparams`` are an ``RSCorrector``'s hyper-parameters (a checkpoint's) or its ``export_config()``.
    """
    configured = hparams.get("sampling_strength")
    return float(hparams["strength"] if configured is None else configured)


def sampling_threshold(hparams: Mapping[str, Any]) -> float:
    """The dead zone sampling uses: ``sampling_threshold`` (hyper-parameters) or ``threshold`` (``export_config()``), else 0."""
    configured = hparams.get("sampling_threshold", hparams.get("threshold"))
    return float(configured or 0.0)


def sampling_window(hparams: Mapping[str, Any]) -> tuple[float, float]:
    """The window sampling corrects: ``sampling_window`` where one was set, else the training ``correction_window``
    (``export_config()`` and ``config.json`` hold the sampling one as ``correction_window``)."""
    configured = hparams.get("sampling_window")
    start, end = hparams["correction_window"] if configured is None else configured
    return float(start), float(end)


@dataclass
class ExportInfo:
    """What ``config.json`` says besides the architecture.

    Attributes:
        correction_window: Fractions (start, end) of the sampling trajectory to correct (0 = pure noise).
        strength: Default sampling strength s in ``z_t + s * R(z_t, t, c)``.
        threshold: Dead zone of the update relative to |z_t| (:class:`rsc.refiner.RefinerCorrection`);
            0 in exports written before rsc had it.
        backbone: Hub id or path of the backbone the refiner was trained for.
        backbone_fingerprint: :func:`rsc.identity.backbone_fingerprint` of that backbone's configs (``None`` in old exports).
        backbone_weights: Signature of a few of that backbone's weights (``None`` in exports written
            before rsc recorded it), see :func:`rsc.signature.compare_weight_signatures`.
        backbone_config: For a single-file backbone, the diffusers folder with its configs.
        prediction_type: The backbone's prediction type (epsilon, v_prediction, sample).
        training_data: Identity of the training data (``{"dataset": ...}``), if known.
        rsc_version: Version of rsc that wrote the export.
    """

    correction_window: tuple[float, float]
    strength: float
    backbone: str
    threshold: float = 0.0
    backbone_fingerprint: str | None = None
    backbone_weights: dict[str, Any] | None = None
    backbone_config: str | None = None
    prediction_type: str = "epsilon"
    training_data: dict[str, Any] | None = None
    rsc_version: str = __version__

    @classmethod
    def from_training(
        cls, hparams: Mapping[str, Any], backbone: BackboneConfigs, training_data: dict[str, Any] | None = None
    ) -> ExportInfo:
        """From an ``RSCorrector``'s hyper-parameters (or ``export_config()``) and its backbone's configs."""
        missing = [key for key in ("correction_window", "strength", "backbone") if key not in hparams]
        if missing:
            raise KeyError(f"the training hyper-parameters lack {missing}; got keys {sorted(hparams)}")
        return cls(
            correction_window=sampling_window(hparams),
            strength=sampling_strength(hparams),
            backbone=str(hparams["backbone"]),
            threshold=sampling_threshold(hparams),
            backbone_fingerprint=backbone.fingerprint,
            backbone_weights=backbone.weights,
            backbone_config=None if hparams.get("backbone_config") is None else str(hparams["backbone_config"]),
            prediction_type=str(hparams.get("prediction_type") or backbone.prediction_type),
            training_data=training_data,
        )

    @classmethod
    def from_config_file(cls, path: Path) -> ExportInfo:
        """Read from an exported ``config.json``, naming the file and the field on error."""
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read refiner config {path}: {error}") from error
        if not isinstance(payload, dict):
            raise ValueError(f"{path} holds a JSON {type(payload).__name__}, not an object: not a refiner config")
        missing = [key for key in ("correction_window", "strength", "backbone") if key not in payload]
        if missing:
            raise ValueError(f"{path} lacks {missing}: not a refiner exported by rsc (python -m rsc.export)")
        known = {item.name for item in fields(cls)}
        values = {key: value for key, value in payload.items() if key in known}
        window = values["correction_window"]
        # JSON numbers only: check_window would also take "0.1" or true, which no export writes.
        if not (isinstance(window, list) and all(_is_number(value) for value in window)):
            raise ValueError(f"{path}: correction_window must be [start, end], two JSON numbers, got {window!r}")
        values["correction_window"] = check_window(window, name=f"{path}: correction_window")
        if not _is_number(values["strength"]):
            raise ValueError(f"{path}: strength must be a number, got {values['strength']!r}")
        threshold = values.get("threshold", 0.0)
        if not (_is_number(threshold) and threshold >= 0):
            raise ValueError(f"{path}: threshold must be a number >= 0, got {threshold!r}")
        if not isinstance(values["backbone"], str):
            raise ValueError(f"{path}: backbone must be a string, got {values['backbone']!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON entries (the architecture is added by :meth:`LatentRefiner.save_pretrained`)."""
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **json_value(asdict(self))}



def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
| reads the backbone's x0-prediction | {"yes (one more conditional UNet call per corrected step)" if config.x0_input else "no"} |
| correction window | {start:g} - {end:g} of the trajectory (0 = pure noise) |
| default strength | {info.strength:g} |
| dead zone (relative to the latent) | {info.threshold:g} |
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

    See :func:`rsc.atomic.write_folder_atomic` for what a killed export leaves and how the
    next export (or :func:`rsc.atomic.recover_folder`) tidies it; :func:`load_refiner_for`
    names the ``.rsc-old`` folder when a kill left ``directory`` missing. A ``directory``
    holding files other than an export's is refused, and so is a refiner with a NaN or
    infinite weight (the error names the tensor).
    """

    bad = non_finite_tensors(refiner.state_dict().items())
    if bad:
        raise ValueError(
            f"refusing to export a refiner with non-finite weights: {bad[0]} holds NaN or infinity"
            + (f" (and {len(bad) - 1} more tensor(s): {', '.join(bad[1:4])})" if len(bad) > 1 else "")
        )

    def write(staging: Path) -> None:
        refiner.save_pretrained(staging, extra_config=info.to_dict())
        (staging / MODEL_CARD_NAME).write_text(model_card(refiner, info), encoding="utf-8")

    return write_folder_atomic(directory, write, _check_replaceable)


@dataclass
class ExportedRefiner:
    """A loaded export: the refiner, what its ``config.json`` says, and where it came from."""

    refiner: LatentRefiner
    info: ExportInfo
    directory: Path

    def correction(
        self, strength: float | None = None, threshold: float | None = None, x0_predictor: X0Predictor | None = None
    ) -> RefinerCorrection:
        """The refiner as a sampler correction (default: the exported strength and dead zone).

        ``x0_predictor``: the backbone's x0-prediction (e.g. ``ldm.predict_x0``), needed by a refiner
        with ``x0_input``.
        """
        return RefinerCorrection(
            self.refiner, self.info.strength if strength is None else strength,
            self.info.threshold if threshold is None else threshold, x0_predictor,
        )

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
    if not directory.exists() and aside_folder(directory).exists():
        raise FileNotFoundError(
            f"refiner {directory} does not exist, but {aside_folder(directory)} does: an export was killed while "
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
    """``python -m rsc.export --ckpt <lightning ckpt> --out <dir>``; a bad input ends with one line (:mod:`rsc.cli`)."""
    # KeyError too: a checkpoint whose hyper-parameters lack a field the export needs.
    run_cli(_main, argv, "rsc.export", USER_ERRORS + (KeyError,))


def _main(argv: list[str] | None) -> None:
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_checkpoint(args.ckpt, args.out, backbone=args.backbone, backbone_config=args.backbone_config)
    log.info("refiner exported to %s", out)


if __name__ == "__main__":
    main(sys.argv[1:])
