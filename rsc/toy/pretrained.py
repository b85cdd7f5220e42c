"""``save_pretrained`` / ``from_pretrained`` for the toy world's small models: safetensors + JSON config, no pickles.

A model class mixes in :class:`ToyPretrainedMixin`, names its config dataclass in
``config_class`` and keeps the config in ``self.config``; its constructor takes
that config as the only argument. The folder layout is diffusers': ``config.json``
(the config's fields) beside ``model.safetensors`` (the state dict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rsc.atomic import atomic_path, write_json_atomic
from rsc.config import IntegerConfig

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ToyPretrainedMixin"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

ModelT = TypeVar("ModelT", bound="ToyPretrainedMixin")


class ToyPretrainedMixin(nn.Module):
    """An ``nn.Module`` built from one :class:`~rsc.config.IntegerConfig`, saved as safetensors + ``config.json``."""

    config_class: ClassVar[type[IntegerConfig]]
    config: Any

    def num_parameters(self) -> int:
        """Return the number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``model.safetensors`` and ``config.json`` to a directory.

        Each file is written to a temporary file in the same directory and
        moved into place with :func:`os.replace`, so readers never see a
        partial file.
        """
        out = Path(save_directory)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out / WEIGHTS_NAME) as temporary:
            save_file(state, temporary, metadata={"format": "pt"})
        write_json_atomic(out / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(
        cls: type[ModelT], directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> ModelT:
        """Load a model written by :meth:`save_pretrained`.

        Args:
            directory: Folder holding ``config.json`` and ``model.safetensors``.
            map_location: Device to load the weights onto.

        Returns:
            The model, in eval mode.

        Raises:
            FileNotFoundError: If the folder or one of the two files is missing.
        """
        d = Path(directory)
        name = cls.__name__
        if not d.is_dir():
            raise FileNotFoundError(
                f"{name} directory {str(d)!r} does not exist; expected a folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by {name}.save_pretrained)"
            )
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / file_name).is_file():
                raise FileNotFoundError(
                    f"{str(d / file_name)!r} not found; expected {CONFIG_NAME} and {WEIGHTS_NAME} in {str(d)!r} "
                    f"(written by {name}.save_pretrained)"
                )
        with open(d / CONFIG_NAME, encoding="utf-8") as f:
            config = cls.config_class.from_dict(json.load(f))
        model = cls(config)  # type: ignore[call-arg]
        state = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(state, strict=True)
        model.to(map_location)
        return model.eval()
