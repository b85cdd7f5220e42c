"""A backbone's weight signature: a few float64 statistics of a few small, trained tensors.

Why the weights have a *signature* compared with a tolerance, not a hash: a
backbone is loaded in float32, float16 or bfloat16, and no rounding of the
values to a common grid is exact across those paths (float32 -> bfloat16 and
float32 -> float16 -> bfloat16 round 6% of trained weights differently, and
any coarser grid still has values on its boundaries). So the signature holds
a few float64 statistics of a few fixed, small, trained tensors
(:data:`UNET_PROBES`, :data:`TEXT_ENCODER_PROBES`), which move with a
fine-tune's first-order weight changes while bfloat16 rounding moves them by
~0.1% of their scale; :func:`compare_weight_signatures` allows 1%.

Signatures are read from loaded modules, from state dicts, or from a
diffusers folder / Hub id reading only the probe tensors (safetensors slices,
sharded checkpoints through their index, ``.bin`` files memory-mapped). This
module imports torch and the standard library at load time (safetensors and
huggingface_hub lazily), so frontends can use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rsc.hub import backbone_location

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
    if backbone_location(source) == "folder":
        path = Path(source).expanduser() / subfolder / name
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
