"""Write a diffusers SD pipeline as one original-layout (CompVis/LDM) checkpoint file.

Derivatives of SD are mostly shared as single ``.safetensors`` files in the
original LDM key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). rsc loads those through diffusers'
single-file loader; this module writes them, so that the loading path can be
tested on models the project builds itself, and so toy models can be used in
frontends that expect single files. The key mapping is the inverse of
diffusers' ``convert_ldm_*_checkpoint`` functions, for any number of blocks and
``layers_per_block``; a test checks the round trip through diffusers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from torch import Tensor

from rsc.atomic import atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_NAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _rename_unet_resnet(rest: str) -> str:
    for diffusers_name, ldm_name in _UNET_RESNET_NAMES:
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name) :]
    return rest


def unet_to_ldm(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map a diffusers ``UNet2DConditionModel`` state dict to LDM ``model.diffusion_model.*`` keys."""
    per_level = int(config["layers_per_block"]) + 1  # LDM counts the down/upsampler as a layer
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    fixed = {diffusers: ldm for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in fixed:
            converted[UNET_PREFIX + fixed[key]] = value
            continue
        if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = 1 + block * per_level + layer
            new = f"input_blocks.{index}.0.{_rename_unet_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{match[2]}"
        elif match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(match[1])}.{_rename_unet_resnet(match[2])}"
        elif match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{match[1]}"
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = block * per_level + layer
            new = f"output_blocks.{index}.0.{_rename_unet_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(match[1])
            slot = 2 if up_has_attention[block] else 1
            new = f"output_blocks.{block * per_level + per_level - 1}.{slot}.conv.{match[2]}"
        else:
            raise ValueError(f"UNet key {key!r} has no LDM equivalent (unsupported UNet architecture)")
        converted[UNET_PREFIX + new] = value
    return converted


def vae_to_ldm(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map a diffusers ``AutoencoderKL`` state dict to LDM ``first_stage_model.*`` keys."""
    num_blocks = len(config["block_out_channels"])
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in fixed:
            converted[VAE_PREFIX + fixed[key]] = value
            continue
        if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{match[1]}.block.{match[2]}.{match[3]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(match[1])}.block.{match[2]}.{match[3]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            rest = match[2]
            for diffusers_name, ldm_name in _VAE_ATTENTION_NAMES:
                rest = rest.replace(diffusers_name, ldm_name)
            new = f"{match[1]}.mid.attn_1.{rest}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise ValueError(f"VAE key {key!r} has no LDM equivalent (unsupported VAE architecture)")
        converted[VAE_PREFIX + new.replace("conv_shortcut", "nin_shortcut")] = value
    return converted


def text_encoder_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a transformers ``CLIPTextModel`` state dict to ``cond_stage_model.transformer.text_model.*`` keys."""
    # transformers >= 5.6 dropped the ``text_model.`` level inside CLIPTextModel.
    return {
        TEXT_ENCODER_PREFIX + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in state_dict.items()
    }


def pipeline_to_ldm_state_dict(pipeline: StableDiffusionPipeline) -> dict[str, Tensor]:
    """The whole pipeline (UNet, VAE, text encoder) as one LDM-layout state dict."""
    state: dict[str, Tensor] = {}
    state.update(unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config))
    state.update(vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config))
    state.update(text_encoder_to_ldm(pipeline.text_encoder.state_dict()))
    return state


def save_single_file(pipeline: StableDiffusionPipeline, path: str | os.PathLike[str]) -> Path:
    """Write ``pipeline`` as one original-layout ``.safetensors`` checkpoint, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {path}")
    state = {key: value.detach().contiguous().cpu() for key, value in pipeline_to_ldm_state_dict(pipeline).items()}
    with atomic_path(path) as temporary:
        save_file(state, temporary, metadata={"format": "pt"})
    return path
