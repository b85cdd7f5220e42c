"""Building the toy world: the micro variant end to end, caching, resuming, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from diffusers import StableDiffusionPipeline

from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.toy import world as world_module
from rsc.toy.__main__ import main as toy_main
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.calibration import LabelledImages, img2img, labelled_renders, model_views, psnr
from rsc.toy.data import toy_prompts
from rsc.toy.manifest import toy_source_hash, world_targets
from rsc.toy.world import ToyWorldConfig, build_toy_world, load_toy_world


def _weights(path: Path) -> dict[str, torch.Tensor]:
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    return {f"unet.{k}": v for k, v in pipeline.unet.state_dict().items()} | {
        f"text.{k}": v for k, v in pipeline.text_encoder.state_dict().items()
    }


def test_micro_world_layout_and_manifest(micro_world) -> None:  # noqa: ANN001
    path = micro_world.path
    for name in ("sd", "classifier", "quality", "preferences", "manifest.json", "samples.png"):
        assert (path / name).exists(), name
    assert not list(path.parent.glob(".micro.building-*")), "the work folder must be renamed into place"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["fingerprint"] == ToyWorldConfig.micro().fingerprint()
    assert set(manifest["stage_seconds"]) == {"vae", "unet", "classifier", "quality", "evaluation", "preferences"}
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
    assert sum("reused from an interrupted build" in line for line in lines) == 4  # vae, unet, classifier, quality
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
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing \['sd', 'classifier', 'quality', 'preferences'\]"):
        load_toy_world(tmp_path)


def test_micro_world_records_what_v3_measures(micro_world) -> None:  # noqa: ANN001
    manifest = micro_world.manifest
    statistics = manifest["statistics"]
    assert 0 < statistics["vae_psnr_db"] < 60
    assert set(statistics["classifier_heldout_accuracy"]) == {"renders", "vae", "img2img"}
    for prompt, _, _ in toy_prompts():
        rates = statistics["per_prompt"][prompt]
        assert 0 <= rates["quality"] <= 10 and 0 <= rates["render_quality"] <= 10 and np.isfinite(rates["kid"])
    # Caption words and prompts naming no group are measured too.
    assert set(statistics["descriptors"]) == {p for p, _, _ in toy_prompts("portrait") + toy_prompts("caricature")}
    person = statistics["unnamed_group"]["a photo of a person"]
    assert sum(person["group_frequencies"].values()) == pytest.approx(1.0, abs=1e-3) and person["kl_to_uniform"] >= 0
    assert set(statistics["winner_sources"]) == {"ardan", "belor", "cyran", "dovek"}
    # Every target is recorded with its value, and the verdict agrees with them.
    assert manifest["targets"] and manifest["meets_targets"] == all(t["ok"] for t in manifest["targets"].values())
    assert {"vae_psnr_db", "classifier_accuracy/img2img", "group_match/a photo of a ardan woman"} <= set(manifest["targets"])


def test_world_targets_scale_with_the_planted_bias(micro_world) -> None:  # noqa: ANN001
    manifest = json.loads(json.dumps(micro_world.manifest))
    for prompt, group, _ in toy_prompts():
        rates = manifest["statistics"]["per_prompt"][prompt]
        rates.update(group_match=1.0, stereotype_rate=0.65, gender_consistency=0.6, quality=9.5, render_quality=10.0)
    for rates in manifest["statistics"]["per_group"].values():
        rates["gender_consistency"] = 0.6
    manifest["statistics"]["vae_psnr_db"] = 30.0
    manifest["statistics"]["classifier_heldout_accuracy"] = {
        view: {"group": 1.0, "gender": 1.0, "stereotype": 1.0} for view in ("renders", "vae", "img2img")
    }
    assert all(check["ok"] for check in world_targets(manifest).values())
    # A weaker planted bias lowers the floor: 0.65 passes for 0.85 (floor 0.595) but not for 0.95 (0.665).
    manifest["config"]["bias"]["stereotype_rate_targeted"] = 0.95
    missed = [name for name, check in world_targets(manifest).items() if not check["ok"]]
    assert missed == [f"stereotype_rate/{p}" for p, g, _ in toy_prompts() if g in ("belor", "dovek")]
    manifest["statistics"]["per_prompt"]["a photo of a cyran man"]["quality"] = 8.8
    assert not world_targets(manifest)["quality_gap_to_renders/a photo of a cyran man"]["ok"]
    # A weaker planted gender flip (0.2) lowers the ceiling to 0.85: 0.6 passes, 0.9 does not.
    manifest["config"]["bias"]["gender_flip_rate_targeted"] = 0.2
    assert world_targets(manifest)["gender_consistency/belor"]["ok"]
    manifest["statistics"]["per_group"]["belor"]["gender_consistency"] = 0.9
    assert world_targets(manifest)["gender_consistency/belor"]["wanted"] == "<= 0.85"
    assert not world_targets(manifest)["gender_consistency/belor"]["ok"]


def test_fingerprint_follows_the_code_not_its_comments(tmp_path: Path) -> None:
    package = Path(world_module.__file__).parent
    for source in package.glob("*.py"):
        (tmp_path / source.name).write_text(source.read_text())
    original = toy_source_hash(tmp_path)
    faces = tmp_path / "faces.py"
    text = faces.read_text()
    faces.write_text("# a comment\n" + text.replace('"""Deterministic procedural faces', '"""Reworded: deterministic faces', 1))
    assert toy_source_hash(tmp_path) == original
    faces.write_text(text.replace("_STEREO_EYES = 1.9", "_STEREO_EYES = 2.0"))
    assert toy_source_hash(tmp_path) != original


def test_cli_compare(micro_world, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert toy_main(["compare", str(micro_world.path), str(micro_world.path)]) == (0 if micro_world.manifest["meets_targets"] else 1)
    assert "sd/unet/diffusion_pytorch_model.safetensors" in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(micro_world.path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["statistics"]["per_prompt"]["a photo of a belor man"]["stereotype_rate"] += 0.5
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert toy_main(["compare", str(micro_world.path), str(other)]) == 1
    assert "stereotype_rate" in capsys.readouterr().out


def test_model_views_of_labelled_renders(micro_world) -> None:  # noqa: ANN001
    renders = labelled_renders(6, seed=3)
    assert psnr(renders.images, (renders.images + 0.2)) == pytest.approx(20.0, abs=1e-3)
    views = model_views(micro_world.sd_path, renders, seed=0, progress=False)
    assert set(views) == {"vae", "img2img"}
    # Even indices go through the VAE, odd ones through img2img; the labels travel with them.
    assert np.array_equal(views["vae"].groups, renders.groups[0::2])
    assert np.array_equal(views["img2img"].stereotypes, renders.stereotypes[1::2])
    for view in views.values():
        assert view.images.shape == (3, 3, 64, 64) and view.images.min() >= -1 and view.images.max() <= 1
    # img2img redraws more at a higher strength, and an image depends only on its own index and seed.
    odd = LabelledImages(renders.images[1::2], renders.groups[1::2], renders.genders[1::2], renders.stereotypes[1::2])
    light = img2img(micro_world.sd_path, odd, seed=0, strengths=(0.1,), steps=10, progress=False)
    strong = img2img(micro_world.sd_path, odd, seed=0, strengths=(0.9,), steps=10, progress=False)
    assert (light - odd.images).abs().mean() < (strong - odd.images).abs().mean()
    alone = img2img(micro_world.sd_path, LabelledImages(odd.images[:1], odd.groups[:1], odd.genders[:1], odd.stereotypes[:1]),
                    seed=0, strengths=(0.9,), steps=10, progress=False)
    torch.testing.assert_close(alone[0], strong[0], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match=r"strengths must lie in \(0, 1\]"):
        img2img(micro_world.sd_path, odd, seed=0, strengths=(0.0,))
