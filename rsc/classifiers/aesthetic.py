"""LAION-style aesthetic predictor: a linear or MLP head on L2-normalised CLIP image embeddings.

Compatible heads (state dicts, loaded from a local file):

* LAION's improved aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth``, an MLP
  with keys ``layers.{0,2,4,6,7}.*`` on CLIP ViT-L/14 embeddings,
  https://github.com/christophschuhmann/improved-aesthetic-predictor);
* LAION's linear aesthetic predictor (``sa_0_4_vit_l_14_linear.pth``, keys
  ``weight``/``bias``, https://github.com/LAION-AI/aesthetic-predictor).

Both expect the CLIP they were trained on (``openai/clip-vit-large-patch14``, 768-d).
"""

from __future__ import annotations

import os
import re

from torch import Tensor, nn

from rsc.classifiers.base import AestheticPredictor
from rsc.classifiers.clip import CLIPEncoder
from rsc.classifiers.weights import load_into, load_state_dict_file

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.weight$")


class _LayersHead(nn.Module):
    """LAION's MLP layout: ``layers`` is a Sequential (its state-dict keys are ``layers.<i>.*``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores (N, 1)."""
        return self.layers(embeddings)


def _head_for(state: dict[str, Tensor], path: str | os.PathLike[str]) -> nn.Module:
    """An ``nn.Linear`` or a ``layers`` Sequential whose keys match ``state`` (LAION's MLP has no activations)."""
    if set(state) == {"weight", "bias"}:
        out_features, in_features = state["weight"].shape
        return nn.Linear(in_features, out_features)
    indices = sorted(int(match.group(1)) for key in state if (match := _LAYER_KEY.match(key)))
    if not indices:
        raise ValueError(
            f"aesthetic head {str(path)!r} has keys {sorted(state)[:6]}; expected 'weight'/'bias' (linear) "
            "or 'layers.<i>.weight'/'layers.<i>.bias' (LAION's MLP)"
        )
    # Dropout slots between the Linear layers hold no weights: Identity keeps the indices (and keys) aligned.
    layers: list[nn.Module] = [nn.Identity() for _ in range(indices[-1] + 1)]
    for index in indices:
        out_features, in_features = state[f"layers.{index}.weight"].shape
        layers[index] = nn.Linear(in_features, out_features)
    return _LayersHead(layers)


class LaionAestheticPredictor(AestheticPredictor):
    """Aesthetic score per image: a LAION head on the normalised CLIP image embedding.

    Args:
        clip: Local CLIP folder or Hub id (LAION's heads use ``openai/clip-vit-large-patch14``), or a loaded encoder.
        head: Local ``.pth``/``.pt``/``.safetensors`` state dict of the head.
    """

    def __init__(self, clip: str | os.PathLike[str] | CLIPEncoder, head: str | os.PathLike[str]) -> None:
        super().__init__()
        self.encoder = clip if isinstance(clip, CLIPEncoder) else CLIPEncoder(clip)
        state = load_state_dict_file(head, "aesthetic head")
        self.head = _head_for(state, head)
        load_into(self.head, state, head, "aesthetic head")
        first = next(module for module in self.head.modules() if isinstance(module, nn.Linear))
        if first.in_features != self.encoder.num_features:
            raise ValueError(
                f"aesthetic head {str(head)!r} expects {first.in_features}-d CLIP embeddings but CLIP "
                f"{self.encoder.source!r} gives {self.encoder.num_features}-d ones; use the CLIP the head was trained on"
            )
        self.head.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """Scores (N,) for float images (N, 3, H, W) in [0, 1]."""
        return self.head(self.encoder.encode_images(images)).squeeze(-1)
