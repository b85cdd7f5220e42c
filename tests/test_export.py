"""Exported refiners: the end-of-fit callback and `python -m rsc.export` write one format; loading checks the backbone."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from rsc.callbacks.export import ExportRefiner
from rsc import __version__
from rsc.atomic import recover_folder as recover_export
from rsc.export import (
    BackboneMismatchError,
    ExportInfo,
    export_refiner,
    file_sha256,
    load_refiner_for,
    main as export_main,
)
from rsc.identity import BackboneConfigs
from rsc.signature import WEIGHTS_TOLERANCE, compare_weight_signatures
from rsc.module import RSCorrector
from rsc.testing import RandomSDSpec, build_random_sd


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
                "index": torch.tensor(index),  # the training noise is drawn per dataset row
            }
            for index in range(4)
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


def _configs(pipeline: StableDiffusionPipeline) -> BackboneConfigs:
    return BackboneConfigs.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)


def _load(directory: Path, pipeline: StableDiffusionPipeline, **kwargs):  # noqa: ANN202
    return load_refiner_for(directory, _configs(pipeline), **kwargs)


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
    assert info.correction_window == (0.1, 0.6) and info.strength == 0.7
    assert info.backbone == str(tiny_sd_dir) and info.prediction_type == "epsilon"
    assert info.training_data == {"dataset": "org/my-pairs"} and info.rsc_version == __version__
    on_disk = BackboneConfigs.from_source(tiny_sd_dir)
    fingerprint = on_disk.fingerprint
    assert info.backbone_fingerprint == fingerprint and len(fingerprint) == 64
    # The export read the probes from the files: exactly what a read of the folder gives now.
    assert info.backbone_weights == on_disk.weights and on_disk.weights["scheme"] == "rsc-weights-v1"
    assert all(on_disk.weights["tensors"][name] is not None for name in on_disk.weights["tensors"])
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == {
        "latent_channels": 4, "text_embedding_dim": 32, "hidden_channels": 16, "num_blocks": 1,
        "embedding_dim": 16, "norm_groups": 4, "x0_input": False,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fingerprint_is_the_same_from_disk_and_from_a_loaded_model(tiny_sd_dir: Path, dtype: torch.dtype) -> None:
    on_disk = BackboneConfigs.from_source(tiny_sd_dir)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, dtype=dtype)
    assert loaded.unet.dtype == dtype
    configs = _configs(loaded)
    assert configs.fingerprint == on_disk.fingerprint
    assert compare_weight_signatures(on_disk.weights, configs.weights) == []
    # With a margin: bfloat16 rounding moves a statistic by ~0.0011 (one std) of its scale; the tolerance is 0.01.
    assert compare_weight_signatures(on_disk.weights, configs.weights, tolerance=WEIGHTS_TOLERANCE / 2) == []
    if dtype == torch.float32:
        assert configs.weights == on_disk.weights, "float32 from disk and loaded: the same float64 statistics"
    changed = dict(loaded.unet.config, upcast_attention=True)
    assert BackboneConfigs(changed, loaded.text_encoder.config).fingerprint != configs.fingerprint


def test_weight_signature_reads_probes_from_files_without_loading_them(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """fp16 variants and .bin files give the signature of the float32 safetensors (within tolerance)."""
    reference = BackboneConfigs.from_source(tiny_sd_dir).weights
    half = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, dtype=torch.float16)
    half.save_pretrained(tmp_path / "fp16_variant", variant="fp16")
    assert not list((tmp_path / "fp16_variant" / "unet").glob("diffusion_pytorch_model.safetensors"))
    pickled = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pickled.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert list((tmp_path / "bin" / "unet").glob("*.bin"))
    for folder in ("fp16_variant", "bin"):
        weights = BackboneConfigs.from_source(tmp_path / folder).weights
        assert compare_weight_signatures(reference, weights) == [], folder
    (tmp_path / "no_weights" / "unet").mkdir(parents=True)
    for component in ("unet", "text_encoder", "scheduler"):
        (tmp_path / "no_weights" / component).mkdir(exist_ok=True)
        for config in (tiny_sd_dir / component).glob("*.json"):
            (tmp_path / "no_weights" / component / config.name).write_text(config.read_text())
    with pytest.raises(OSError, match="has no unet weights .*diffusion_pytorch_model.safetensors"):
        BackboneConfigs.from_source(tmp_path / "no_weights")


def _export_for(pipeline: StableDiffusionPipeline, directory: Path, backbone: str = "tiny", seed: int = 0,
                strength: float = 1.0) -> Path:
    from rsc.refiner import LatentRefiner, RefinerConfig

    configs = BackboneConfigs.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)
    torch.manual_seed(seed)
    refiner = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=configs.text_embedding_dim,
                                          hidden_channels=8, num_blocks=1, embedding_dim=8, norm_groups=4))
    info = ExportInfo.from_training({"correction_window": [0.0, 0.5], "strength": strength, "backbone": backbone}, configs)
    return export_refiner(refiner, directory, info)


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_an_export_that_fails_midway_leaves_the_previous_one_intact(pipeline, tmp_path: Path,  # noqa: ANN001
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import rsc.refiner

    export = _export_for(pipeline, tmp_path / "export", seed=0, strength=1.0)
    before = _files(export)
    written: list[Path] = []
    real_write = rsc.refiner.write_json_atomic

    def full_disk(path: Path, payload: object) -> None:  # config.json: the second file save_pretrained writes
        written.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rsc.refiner, "write_json_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _export_for(pipeline, tmp_path / "export", seed=1, strength=0.5)
    monkeypatch.setattr(rsc.refiner, "write_json_atomic", real_write)
    assert written and written[0].parent != export, "the new files go to a staging folder, not into the export"
    assert _files(export) == before, "new weights must not sit beside the old config"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"], "the staging folder is removed"
    assert _load(export, pipeline).info.strength == 1.0

    _export_for(pipeline, tmp_path / "export", seed=1, strength=0.5)
    assert _files(export)["refiner.safetensors"] != before["refiner.safetensors"]
    assert _load(export, pipeline).info.strength == 0.5
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"], "the old export is deleted after the swap"


def test_the_next_export_recovers_from_a_killed_one(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    export = _export_for(pipeline, tmp_path / "export", strength=1.0)
    staging, aside = tmp_path / ".export.rsc-new", tmp_path / ".export.rsc-old"

    # Killed while writing the staged files: the export is untouched, the next export removes the leftover.
    staging.mkdir()
    (staging / "refiner.safetensors").write_bytes(b"half a file")
    assert _load(export, pipeline).info.strength == 1.0
    _export_for(pipeline, export, strength=0.25)
    assert not staging.exists() and _load(export, pipeline).info.strength == 0.25

    # Killed between the renames: no export, the old one aside; loading says so, recovery renames it back.
    export.rename(aside)
    shutil.copytree(aside, staging)
    with pytest.raises(FileNotFoundError, match=r"\.export\.rsc-old does: an export was killed"):
        _load(export, pipeline)
    recover_export(export)
    assert not aside.exists() and not staging.exists() and _load(export, pipeline).info.strength == 0.25

    # Killed before deleting the old export: the new one is in place; the next export deletes the old.
    shutil.copytree(export, aside)
    _export_for(pipeline, export, strength=0.75)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
    assert _load(export, pipeline).info.strength == 0.75


def test_an_export_does_not_replace_a_folder_with_other_files(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"project holds files that are not part of a refiner export \(\['notes.txt'\]\)"):
        _export_for(pipeline, folder)
    assert _files(folder) == {"notes.txt": b"keep me"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["project"]


def test_mismatched_backbones_fail_with_both_values(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    export = _export_for(pipeline, tmp_path / "export")
    trained_fingerprint = json.loads((export / "config.json").read_text())["backbone_fingerprint"]

    wide_text = build_random_sd(RandomSDSpec(text_hidden_size=48))
    for allow in (False, True):
        with pytest.raises(BackboneMismatchError, match="text-embedding width 32 .* has text-embedding width 48"):
            _load(export, wide_text, allow_mismatch=allow)
    weights = _configs(pipeline).weights
    eight_channels = BackboneConfigs(dict(pipeline.unet.config, in_channels=8), pipeline.text_encoder.config, weights=weights)
    with pytest.raises(BackboneMismatchError, match="latent channels 4 .* has latent channels 8"):
        load_refiner_for(export, eight_channels, allow_mismatch=True)

    # A derivative of the same architecture with another configuration: refused unless asked for.
    derivative = BackboneConfigs(dict(pipeline.unet.config, sample_size=32), pipeline.text_encoder.config, weights=weights)
    with pytest.raises(BackboneMismatchError,
                       match=f"{trained_fingerprint}.*{derivative.fingerprint}.*configs differ.*allow_mismatch"):
        load_refiner_for(export, derivative)
    transferred = load_refiner_for(export, derivative, allow_mismatch=True)
    assert transferred.info.backbone_fingerprint == trained_fingerprint

    # The same configs without a weight signature cannot be checked.
    with pytest.raises(BackboneMismatchError, match="has no weight signature.*from_components"):
        load_refiner_for(export, BackboneConfigs(pipeline.unet.config, pipeline.text_encoder.config))
    assert _load(export, pipeline).refiner.config.text_embedding_dim == 32


def test_a_fine_tune_with_the_same_configs_needs_the_override(tiny_sd_dir: Path, pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    export = _export_for(pipeline, tmp_path / "export")
    fine_tune = build_random_sd(seed=0)  # the tiny SD of tiny_sd_dir, before its fine-tune
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (fine_tune.unet, fine_tune.text_encoder):
            for parameter in module.parameters():
                # A light fine-tune: every weight moves by 3% of its tensor's rms.
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(0.03 * parameter.pow(2).mean().sqrt() * noise)
    fine_tune.save_pretrained(tmp_path / "fine_tune")
    on_disk = BackboneConfigs.from_source(tmp_path / "fine_tune")
    original = BackboneConfigs.from_source(tiny_sd_dir)
    assert on_disk.fingerprint == original.fingerprint, "a fine-tune keeps the configs"

    with pytest.raises(BackboneMismatchError) as refused:
        load_refiner_for(export, on_disk)
    message = str(refused.value)
    assert original.label in message and on_disk.label in message and original.label != on_disk.label
    assert "same configs, other weights" in message and "allow_mismatch=True" in message
    assert "unet/conv_in.weight" in message and "text_encoder/final_layer_norm.weight" in message
    # Loaded from the fine-tune's files in half precision: refused just the same.
    half = StableDiffusionPipeline.from_pretrained(tmp_path / "fine_tune", safety_checker=None, dtype=torch.float16)
    with pytest.raises(BackboneMismatchError, match="same configs, other weights"):
        _load(export, half)
    accepted = load_refiner_for(export, on_disk, allow_mismatch=True)
    assert accepted.info.backbone_weights == original.weights


def test_export_without_fingerprint_needs_the_override(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    export = _export_for(pipeline, tmp_path / "old")
    config = json.loads((export / "config.json").read_text())
    # Exported before rsc recorded weight signatures: the configs match, the weights cannot be checked.
    del config["backbone_weights"]
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneMismatchError, match="no backbone_weights.*re-export.*allow_mismatch=True"):
        _load(export, pipeline)
    assert _load(export, pipeline, allow_mismatch=True).info.backbone_weights is None
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
        load_refiner_for(broken, BackboneConfigs({}, {}))


def test_sampling_strength_is_what_sampling_and_the_export_use(tiny_sd_dir: Path) -> None:
    """``sampling_strength`` changes the correction, the export and a checkpoint's export, not the training loss."""
    torch.manual_seed(0)
    kwargs = dict(hidden_channels=16, num_blocks=1, embedding_dim=16, norm_groups=4, strength=1.0)
    trained_at_one = RSCorrector(str(tiny_sd_dir), **kwargs)
    dialled = RSCorrector(str(tiny_sd_dir), sampling_strength=0.7, **kwargs)
    dialled.refiner.load_state_dict(trained_at_one.refiner.state_dict())
    torch.nn.init.normal_(dialled.refiner.conv_out.weight, std=0.1)
    trained_at_one.refiner.load_state_dict(dialled.refiner.state_dict())
    assert dialled.correction().strength == 0.7 and trained_at_one.correction().strength == 1.0
    assert dialled.export_config()["strength"] == 0.7
    configs = BackboneConfigs.from_components(dialled.ldm.unet, dialled.ldm.text_encoder, dialled.ldm.scheduler)
    assert ExportInfo.from_training(dict(dialled.hparams), configs).strength == 0.7  # rsc.export from a checkpoint
    batch = next(iter(_RandomPairs("pairs", dialled.ldm.text_embedding_dim).train_dataloader()))
    losses = [module.pair_step(batch, draws=module.pair_draws(batch["index"], batch["anti_stereotypical_latents"].shape[1:], 0))[0].loss
              for module in (trained_at_one, dialled)]
    assert torch.equal(losses[0], losses[1])  # trained at `strength` either way
    with pytest.raises(ValueError, match="sampling_strength must be a finite number, got nan"):
        RSCorrector(str(tiny_sd_dir), sampling_strength=float("nan"), **kwargs)


def test_the_dead_zone_travels_from_the_config_to_the_export_and_the_frontend(tiny_sd_dir: Path, pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    """``sampling_threshold`` reaches the correction, the exported config.json, a loaded export and ``RefinerCallback``;
    an export written before the field existed loads with no dead zone, a negative one is refused by name."""
    from rsc.frontends.diffusers import RefinerCallback

    module = RSCorrector(str(tiny_sd_dir), hidden_channels=16, num_blocks=1, embedding_dim=16, norm_groups=4,
                         sampling_threshold=0.05)
    assert module.correction().threshold == 0.05
    configs = BackboneConfigs.from_components(module.ldm.unet, module.ldm.text_encoder, module.ldm.scheduler)
    info = ExportInfo.from_training(module.export_config(), configs)
    assert info.threshold == 0.05 and ExportInfo.from_training(dict(module.hparams), configs).threshold == 0.05
    folder = export_refiner(module.refiner, tmp_path / "export", info)
    assert json.loads((folder / "config.json").read_text())["threshold"] == 0.05
    assert load_refiner_for(folder, configs).correction().threshold == 0.05
    assert RefinerCallback.from_pretrained(folder, pipeline, allow_mismatch=True).correction.threshold == 0.05
    payload = json.loads((folder / "config.json").read_text())
    del payload["threshold"]
    (folder / "config.json").write_text(json.dumps(payload))
    assert load_refiner_for(folder, configs).info.threshold == 0.0
    (folder / "config.json").write_text(json.dumps(payload | {"threshold": -1}))
    with pytest.raises(ValueError, match=r"config.json: threshold must be a number >= 0, got -1"):
        load_refiner_for(folder, configs)
    with pytest.raises(ValueError, match="sampling_threshold must be a finite number >= 0"):
        RSCorrector(str(tiny_sd_dir), sampling_threshold=-0.5)


def test_the_sampling_window_is_what_sampling_and_the_export_use(tiny_sd_dir: Path, pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    """``sampling_window`` reaches the module's sampling window, the export (from the module and from a checkpoint's
    hyper-parameters) and ``RefinerCallback``'s corrected steps; training keeps drawing from ``correction_window``."""
    from rsc.frontends.diffusers import RefinerCallback

    kwargs = dict(hidden_channels=16, num_blocks=1, embedding_dim=16, norm_groups=4, correction_window=(0.1, 0.5))
    trained_window = RSCorrector(str(tiny_sd_dir), **kwargs)
    longer = RSCorrector(str(tiny_sd_dir), sampling_window=(0.1, 0.8), **kwargs)
    assert trained_window.correction_window == (0.1, 0.5) and longer.correction_window == (0.1, 0.8)
    assert longer.timestep_range == trained_window.timestep_range == (500, 900)
    configs = BackboneConfigs.from_components(longer.ldm.unet, longer.ldm.text_encoder, longer.ldm.scheduler)
    for hparams in (longer.export_config(), dict(longer.hparams)):
        assert ExportInfo.from_training(hparams, configs).correction_window == (0.1, 0.8)
    folder = export_refiner(longer.refiner, tmp_path / "export", ExportInfo.from_training(dict(longer.hparams), configs))
    assert json.loads((folder / "config.json").read_text())["correction_window"] == [0.1, 0.8]
    callback = RefinerCallback.from_pretrained(folder, pipeline, allow_mismatch=True)
    assert callback.corrected_steps(20) == list(range(2, 16))
    with pytest.raises(ValueError, match=r"sampling_window must satisfy 0 <= start <= end <= 1, got \(0.5, 0.1\)"):
        RSCorrector(str(tiny_sd_dir), sampling_window=(0.5, 0.1), **kwargs)
