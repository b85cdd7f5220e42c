"""Exported refiners: the end-of-fit callback and `python -m rsc.export` write one format; loading checks the backbone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from callbacks.export import ExportRefiner
from rsc import __version__
from rsc.export import (
    BackboneConfigs,
    BackboneMismatchError,
    ExportInfo,
    export_refiner,
    file_sha256,
    load_refiner_for,
    main as export_main,
)
from rsc.module import RSCorrector
from rsc.random_models import RandomSDSpec, build_random_sd


class _RandomPairs(L.LightningDataModule):
    """Random latents and text embeddings in the preference batch layout, recording a dataset id like the real one."""

    def __init__(self, dataset: str, text_width: int, latent_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        shape = (4, self.hparams.latent_size, self.hparams.latent_size)
        rows = [
            {
                "anti_stereotypical_latents": torch.randn(shape, generator=generator),
                "stereotypical_latents": torch.randn(shape, generator=generator),
                "prompt_embeds": torch.randn(77, self.hparams.text_width, generator=generator),
            }
            for _ in range(4)
        ]
        return DataLoader(rows, batch_size=2)


@pytest.fixture(scope="module")
def trained(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-step fit on the tiny SD: its last.ckpt and the callback's export."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    module = RSCorrector(
        str(tiny_sd_dir), hidden_channels=16, num_blocks=1, embedding_dim=16, norm_groups=4,
        correction_window=(0.1, 0.6), strength=0.7, learning_rate=1e-2,
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0),
            ExportRefiner(dirpath=str(root / "callback_export")),
        ],
    )
    trainer.fit(module, datamodule=_RandomPairs("org/my-pairs", module.ldm.text_embedding_dim))
    return {"ckpt": root / "checkpoints" / "last.ckpt", "callback_export": root / "callback_export"}


@pytest.fixture(scope="module")
def pipeline(tiny_sd_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)


def _load(directory: Path, pipeline: StableDiffusionPipeline, **kwargs):  # noqa: ANN202
    return load_refiner_for(directory, pipeline.unet.config, pipeline.text_encoder.config, **kwargs)


def test_cli_export_round_trip(trained: dict[str, Path], tiny_sd_dir: Path, pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "export"
    export_main(["--ckpt", str(trained["ckpt"]), "--out", str(out)])
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "refiner.safetensors"]

    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    exported = _load(out, pipeline)
    weights = exported.refiner.state_dict()
    assert set(weights) == {key.removeprefix("refiner.") for key in checkpoint["state_dict"]}
    for key, value in weights.items():
        assert torch.equal(value, checkpoint["state_dict"][f"refiner.{key}"]), key
    assert weights["conv_out.weight"].abs().sum() > 0, "two training steps move the zero-initialised output layer"

    info = exported.info
    assert info.correction_window == (0.1, 0.6) and info.strength == 0.7 and info.training_strength is None
    assert info.backbone == str(tiny_sd_dir) and info.prediction_type == "epsilon"
    assert info.training_data == {"dataset": "org/my-pairs"} and info.rsc_version == __version__
    fingerprint = BackboneConfigs.from_source(tiny_sd_dir).fingerprint
    assert info.backbone_fingerprint == fingerprint and len(fingerprint) == 64
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == {
        "latent_channels": 4, "text_embedding_dim": 32, "hidden_channels": 16, "num_blocks": 1,
        "embedding_dim": 16, "norm_groups": 4,
    }
    assert config["format"] == "rsc-refiner" and config["format_version"] == 1
    card = (out / "README.md").read_text()
    assert str(tiny_sd_dir) in card and fingerprint in card and "org/my-pairs" in card and "0.1 - 0.6" in card
    assert exported.weights_sha256 == file_sha256(out / "refiner.safetensors")
    assert not [path for path in out.iterdir() if path.name.startswith(".")], "no temporary files are left"


def test_end_of_fit_callback_writes_the_cli_format(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_main(["--ckpt", str(trained["ckpt"]), "--out", str(out)])
    callback = trained["callback_export"]
    for name in ("config.json", "README.md"):
        assert (callback / name).read_text() == (out / name).read_text(), name
    ours, theirs = load_file(out / "refiner.safetensors"), load_file(callback / "refiner.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_fingerprint_is_the_same_from_disk_and_from_a_loaded_model(tiny_sd_dir: Path) -> None:
    half = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, dtype=torch.float16)
    loaded = BackboneConfigs.from_components(half.unet, half.text_encoder, half.scheduler)
    assert loaded.fingerprint == BackboneConfigs.from_source(tiny_sd_dir).fingerprint
    changed = dict(half.unet.config, upcast_attention=True)
    assert BackboneConfigs(changed, half.text_encoder.config).fingerprint != loaded.fingerprint


def test_sampling_strength_is_the_default_when_training_sets_one(pipeline) -> None:  # noqa: ANN001
    configs = BackboneConfigs.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)
    hparams = {"correction_window": [0.0, 0.5], "strength": 1.0, "backbone": "x", "sampling_strength": 0.0}
    info = ExportInfo.from_training(hparams, configs)
    assert info.strength == 0.0 and info.training_strength == 1.0


def _export_for(pipeline: StableDiffusionPipeline, directory: Path, backbone: str = "tiny") -> Path:
    from rsc.refiner import LatentRefiner, RefinerConfig

    configs = BackboneConfigs.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)
    refiner = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=configs.text_embedding_dim,
                                          hidden_channels=8, num_blocks=1, embedding_dim=8, norm_groups=4))
    info = ExportInfo.from_training({"correction_window": [0.0, 0.5], "strength": 1.0, "backbone": backbone}, configs)
    return export_refiner(refiner, directory, info)


def test_mismatched_backbones_fail_with_both_values(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    export = _export_for(pipeline, tmp_path / "export")
    trained_fingerprint = json.loads((export / "config.json").read_text())["backbone_fingerprint"]

    wide_text = build_random_sd(RandomSDSpec(text_hidden_size=48))
    for allow in (False, True):
        with pytest.raises(BackboneMismatchError, match="text-embedding width 32 .* has text-embedding width 48"):
            _load(export, wide_text, allow_mismatch=allow)
    eight_channels = dict(pipeline.unet.config, in_channels=8)
    with pytest.raises(BackboneMismatchError, match="latent channels 4 .* has latent channels 8"):
        load_refiner_for(export, eight_channels, pipeline.text_encoder.config, allow_mismatch=True)

    # A derivative of the same architecture with another configuration: refused unless asked for.
    derivative = dict(pipeline.unet.config, sample_size=32)
    derivative_fingerprint = BackboneConfigs(derivative, pipeline.text_encoder.config).fingerprint
    with pytest.raises(BackboneMismatchError, match=f"{trained_fingerprint}.*{derivative_fingerprint}.*allow_mismatch"):
        load_refiner_for(export, derivative, pipeline.text_encoder.config)
    transferred = load_refiner_for(export, derivative, pipeline.text_encoder.config, allow_mismatch=True)
    assert transferred.info.backbone_fingerprint == trained_fingerprint

    # Other weights, same configs (a fine-tune that keeps them): the same fingerprint, no flag needed.
    fine_tune = build_random_sd(seed=5)
    assert _load(export, fine_tune).refiner.config.text_embedding_dim == 32


def test_export_without_fingerprint_needs_the_override(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    export = _export_for(pipeline, tmp_path / "old")
    config = json.loads((export / "config.json").read_text())
    del config["backbone_fingerprint"]
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneMismatchError, match="no backbone_fingerprint.*re-export"):
        _load(export, pipeline)
    assert _load(export, pipeline, allow_mismatch=True).info.backbone_fingerprint is None


def test_export_errors(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "missing.ckpt does not exist" in capsys.readouterr().err

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"namespace": argparse.Namespace(a=1)}}, unsafe)
    with pytest.raises(SystemExit):
        export_main(["--ckpt", str(unsafe), "--out", str(tmp_path / "out")])
    assert "weights_only=True" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        export_main(["--ckpt", str(trained["ckpt"]), "--out", str(tmp_path / "out"), "--backbone", str(tmp_path / "nowhere")])
    assert "cannot read the UNet / text-encoder / scheduler configs of backbone" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architecture": {}, "strength": 1.0}))
    with pytest.raises(ValueError, match=r"config.json lacks \['correction_window', 'backbone'\]"):
        load_refiner_for(broken, {}, {})
