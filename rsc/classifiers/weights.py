"""Reading state dicts from local weight files (``.pt``/``.pth``/``.bin`` pickles or ``.safetensors``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn


def load_state_dict_file(path: str | os.PathLike[str], what: str) -> dict[str, Tensor]:
    """Load a state dict from ``path`` onto the CPU, never unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A ``"state_dict"`` wrapper and a
    ``module.`` prefix (DataParallel checkpoints) are removed.

    Args:
        path: The weights file.
        what: What the file is, for error messages (e.g. ``"FairFace weights"``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - pickle, zip and weights_only errors all mean "not a state dict"
            raise ValueError(
                f"{what}: {str(path)!r} is not a loadable state dict ({type(error).__name__}: {error}); "
                "expected a torch.save'd state dict or a .safetensors file"
            ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {str(path)!r} does not hold a state dict of tensors (got {type(state).__name__})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_into(module: nn.Module, state: dict[str, Tensor], path: str | os.PathLike[str], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the file and the key mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{what}: {str(path)!r} does not fit the {type(module).__name__} architecture "
            f"(missing keys {missing[:5]}, unexpected keys {unexpected[:5]}): {error}"
        ) from error
