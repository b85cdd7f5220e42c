"""Building the toy world: the micro variant end to end, caching, resuming, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from diffusers import StableDiffusionPipeline

from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.toy import world as world_module
from rsc.toy.__main__ import main as toy_main
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.world import ToyWorldConfig, build_toy_world, load_toy_world


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return build_toy_world(tmp_path_factory.mktemp("worlds") / "micro", ToyWorldConfig.micro(), progress=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    return {f"unet.{k}": v for k, v in pipeline.unet.state_dict().items()} | {
        f"text.{k}": v for k, v in pipeline.text_encoder.state_dict().items()
    }


def test_micro_world_layout_and_manifest(micro_world) -> None:  # noqa: ANN001
    path = micro_world.path
    for name in ("sd", "classifier", "preferences", "manifest.json", "samples.png"):
        assert (path / name).exists(), name
    assert not list(path.parent.glob(".micro.building-*")), "the work folder must be renamed into place"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["fingerprint"] == ToyWorldConfig.micro().fingerprint()
    assert set(manifest["stage_seconds"]) == {"classifier", "vae", "unet", "evaluation", "preferences"}
    assert manifest["versions"]["torch"] == torch.__version__
    per_group = manifest["statistics"]["per_group"]
    assert set(per_group) == {"ardan", "belor", "cyran", "dovek"}
    assert sum(g["images"] for g in per_group.values()) == manifest["sizes"]["eval_images"] == 8 * 4
    # The toy SD is a plain diffusers pipeline; the classifier and the data load without rsc's builder.
    pipeline = StableDiffusionPipeline.from_pretrained(path / "sd")
    assert sum(p.numel() for p in pipeline.unet.parameters()) == manifest["sizes"]["unet_parameters"]
    ToyAttributeClassifier.from_pretrained(path / "classifier")
    preferences = load_from_disk(str(path / "preferences"))
    assert set(preferences) == {"train", "validation"}
    assert preferences["train"].features == PREFERENCE_FEATURES
    assert {s: preferences[s].num_rows for s in preferences} == manifest["sizes"]["preference_pairs"]


def test_same_seed_same_world_and_cache_reuse(micro_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    again = build_toy_world(tmp_path / "again", ToyWorldConfig.micro(), progress=False)
    first, second = _weights(micro_world.sd_path), _weights(again.sd_path)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.manifest["statistics"]["per_group"] == micro_world.manifest["statistics"]["per_group"]

    def must_not_train(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a matching world must be reused, not rebuilt")

    monkeypatch.setattr(world_module, "train_text_to_image", must_not_train)
    reused = build_toy_world(tmp_path / "again", ToyWorldConfig.micro(), progress=False)
    assert reused.path == again.path


def test_other_seed_other_world(micro_world, tmp_path: Path) -> None:  # noqa: ANN001
    other = ToyWorldConfig.micro(seed=1)
    assert other.fingerprint() != ToyWorldConfig.micro().fingerprint()
    world = build_toy_world(tmp_path / "seed1", other, progress=False)
    first, second = _weights(micro_world.sd_path), _weights(world.sd_path)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_killed_build_resumes(micro_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    original = world_module.sample_toy_prompts

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(world_module, "sample_toy_prompts", killed)
    with pytest.raises(KeyboardInterrupt):
        build_toy_world(tmp_path / "w", ToyWorldConfig.micro(), progress=False)
    assert not (tmp_path / "w").exists(), "an unfinished world must never appear at its destination"

    monkeypatch.setattr(world_module, "sample_toy_prompts", original)
    monkeypatch.setattr(world_module, "train_text_to_image", lambda *a, **k: pytest.fail("unet stage must be reused"))
    lines: list[str] = []
    world = build_toy_world(tmp_path / "w", ToyWorldConfig.micro(), progress=False, log=lines.append)
    assert sum("reused from an interrupted build" in line for line in lines) == 3  # classifier, vae, unet
    first, resumed = _weights(micro_world.sd_path), _weights(world.sd_path)
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    assert world.manifest["statistics"]["per_group"] == micro_world.manifest["statistics"]["per_group"]


def test_cli_build_and_info(micro_world, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert toy_main(["build", "--micro", "--out", str(micro_world.path), "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "already built" in output and "stereotype" in output
    assert toy_main(["info", "--world", str(micro_world.path)]) == 0
    assert "preference pairs" in capsys.readouterr().out


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_toy_world(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing \['sd', 'classifier', 'preferences'\]"):
        load_toy_world(tmp_path)
