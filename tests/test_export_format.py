"""A refiner exported before the export/identity split (format version 1) still loads, checks and computes the same."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from rsc.export import load_refiner_for
from rsc.identity import BackboneConfigs
from rsc.refiner import LatentRefiner

DATA = Path(__file__).resolve().parent / "data"
EXPORT = DATA / "refiner_format_v1"


def test_a_format_v1_export_loads_for_its_backbone_and_computes_the_same(tiny_sd_dir: Path) -> None:
    # tests/data/refiner_format_v1 was written by rsc at commit 093b80d for build_random_sd(seed=0), the
    # backbone of tiny_sd_dir; its _io file holds an input batch and the refiner's output at export time.
    loaded = load_refiner_for(EXPORT, BackboneConfigs.from_source(tiny_sd_dir))
    assert loaded.info.correction_window == (0.1, 0.6) and loaded.info.strength == 0.7
    assert loaded.info.backbone == "tiny-random-sd" and loaded.info.training_data == {"dataset": "org/pairs"}
    io = load_file(str(DATA / "refiner_format_v1_io.safetensors"))
    for refiner in (loaded.refiner, LatentRefiner.from_pretrained(EXPORT)):
        assert refiner.config.text_embedding_dim == 32 and refiner.config.hidden_channels == 8
        with torch.no_grad():
            delta = refiner(io["latents"], io["timesteps"], io["text_embeddings"])
        torch.testing.assert_close(delta, io["delta"], rtol=0, atol=1e-6)
