"""`python -m rsc.evaluate` on the micro toy world: results, report, cache and resume, clear errors;
and the toy efficacy report as a thin layer on the same measurement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rsc.backbone import FrozenLDM
from rsc.callbacks.toy_efficacy import efficacy_targets, toy_efficacy
from rsc.evaluate import main as evaluate_main
from rsc.export import BackboneMismatchError, ExportInfo, export_refiner
from rsc.identity import BackboneConfigs
from rsc.refiner import LatentRefiner, RefinerConfig, RefinerCorrection

REPO = Path(__file__).resolve().parents[1]
METHODS = ["none", "negative_prompt", "prompt_addition", "semantic_guidance", "classifier_guidance", "rsc", "finetune_dpo"]


def _refiner(ldm: FrozenLDM, folder: Path) -> LatentRefiner:
    torch.manual_seed(0)
    refiner = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=ldm.text_embedding_dim, hidden_channels=8,
                                          num_blocks=1, embedding_dim=8, norm_groups=4))
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.05)
    configs = BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler)
    info = ExportInfo.from_training({"correction_window": [0.0, 0.5], "strength": 1.5, "backbone": "micro"}, configs)
    export_refiner(refiner, folder, info)
    return refiner


@pytest.fixture(scope="module")
def refiner_dir(micro_world, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    folder = tmp_path_factory.mktemp("eval_refiner") / "refiner"
    _refiner(FrozenLDM.from_pretrained(micro_world.sd_path), folder)
    return folder


def _config(world, refiner: Path, path: Path, **changes) -> Path:  # noqa: ANN001, ANN003
    config = yaml.safe_load((REPO / "configs" / "eval" / "toy.yaml").read_text())
    config.update(
        backbone=str(world.sd_path), seeds=3, steps=4, batch_size=4, reference_count=6, kid_subsets=3,
        cost_images=2, cost_rounds=1, grid_seeds=2, refiner=str(refiner), progress=False,
        prompts=[config["prompts"][1], config["prompts"][2], config["prompts"][-1]],
    )
    config["classifier"]["init_args"]["path"] = str(world.classifier_path)
    config["quality"]["init_args"]["path"] = str(world.path / "quality")
    for method in config["methods"]:
        if method["name"] == "semantic_guidance":
            method["options"]["warmup_steps"] = 1
        if method["name"] == "finetune_dpo":
            method["options"].update(dataset=str(world.preferences_path), steps=2, batch_size=4,
                                     cache_dir=str(path.parent / "dpo"))
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_config_names_every_method() -> None:
    config = yaml.safe_load((REPO / "configs" / "eval" / "toy.yaml").read_text())
    assert [m["name"] for m in config["methods"]] == METHODS


def test_evaluation_end_to_end_and_cache(micro_world, refiner_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    config = _config(micro_world, refiner_dir, tmp_path / "eval.yaml")
    results = evaluate_main(["--config", str(config), "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == METHODS and saved["versions"]["rsc"]
    assert all(row["rendered"] == 9 for row in saved["methods"].values())
    keys = ["a_photo_of_a_ardan_man", "a_photo_of_a_belor_woman", "a_photo_of_a_person"]
    for name, row in saved["methods"].items():
        metrics = row["metrics"]
        assert list(metrics["per_prompt"]) == keys and list(metrics["per_group"]) == ["ardan", "belor", "cyran", "dovek"]
        assert metrics["per_group"]["cyran"]["stereotype_rate"] is None  # no prompt names cyran
        assert metrics["per_prompt"]["a_photo_of_a_person"]["kl_to_uniform"] is not None
        assert metrics["per_prompt"]["a_photo_of_a_person"]["gender_consistency"] is None
        assert metrics["per_prompt"]["a_photo_of_a_ardan_man"]["kid"] is not None
        assert (metrics["per_group"]["ardan"].get("ssim") is None) == (name == "none")
        assert row["cost"]["unet_passes_per_image"] >= 4 * 2 and row["cost"]["seconds_per_image"] > 0
    none = saved["methods"]["none"]
    assert none["metrics"]["all"]["diversity_ratio"] == pytest.approx(1.0)
    assert none["cost"]["ratio_to_none"] == pytest.approx(1.0) and none["cost"]["unet_passes_per_image"] == 4 * 2
    assert saved["methods"]["negative_prompt"]["cost"]["unet_passes_per_image"] == 4 * 2
    assert saved["methods"]["semantic_guidance"]["cost"]["unet_passes_per_image"] == 4 * 4  # + two concepts
    # One group, two prompts' worth: the per-group value pools the group's images.
    belor = none["metrics"]["per_group"]["belor"]["stereotype_rate"]
    assert belor == none["metrics"]["per_prompt"]["a_photo_of_a_belor_woman"]["stereotype_rate"]
    report_md, report_html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in METHODS:
        assert name in report_md and name in report_html
    assert "data:image/png;base64," in report_html and "figures/" not in report_html
    assert (out / "figures" / "grid_rsc.png").is_file() and (out / "figures" / "tradeoff_ssim.png").is_file()
    assert results["methods"]["rsc"]["identity"]["refiner_sha256"]

    # Again: nothing is rendered, the numbers are the same; a changed option re-renders only its method.
    files = {path: path.stat().st_mtime_ns for path in (out / "cache").rglob("*.png")}
    assert len(files) == 9 * len(METHODS)
    again = evaluate_main(["--config", str(config), "--out", str(out), "--cost_images", "0"])
    assert all(row["rendered"] == 0 for row in again["methods"].values())
    assert again["methods"]["rsc"]["metrics"] == results["methods"]["rsc"]["metrics"]
    changed = yaml.safe_load(config.read_text())
    changed["methods"][1]["options"]["negative_prompt"] = "portrait"
    config.write_text(yaml.safe_dump(changed))
    third = evaluate_main(["--config", str(config), "--out", str(out), "--cost_images", "0"])
    assert {name: row["rendered"] for name, row in third["methods"].items()} == {
        name: 9 if name == "negative_prompt" else 0 for name in METHODS}
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in files.items())


def test_killed_evaluation_resumes_without_rerendering(micro_world, refiner_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    config = _config(micro_world, refiner_dir, tmp_path / "eval.yaml", batch_size=1, cost_images=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rsc.evaluate", "--config", str(config), "--out", str(out)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(list((out / "cache").rglob("*.png"))) < 12 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the evaluation ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    finished = {path: path.stat().st_mtime_ns for path in (out / "cache").rglob("*.png")}
    assert 12 <= len(finished) < 9 * len(METHODS)
    assert not list((out / "cache").rglob("*.tmp*")) or True  # leftovers of atomic writes are not images
    results = evaluate_main(["--config", str(config), "--out", str(out)])
    assert sum(row["rendered"] for row in results["methods"].values()) == 9 * len(METHODS) - len(finished)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())
    assert (out / "report.html").is_file()


def test_two_processes_measure_what_one_does(micro_world, refiner_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """``torchrun --nproc_per_node 2 -m rsc.evaluate``: each rank renders its stride of (prompt, seed) items, the
    adapter is trained once, and the reduced metrics equal one process's; the report's grids hold every image."""
    results, trainings, stderrs = {}, {}, {}
    for processes in (1, 2):
        (tmp_path / f"p{processes}").mkdir()
        dpo = {"dataset": str(micro_world.preferences_path), "steps": 2, "batch_size": 4,
               "cache_dir": str(tmp_path / f"p{processes}" / "dpo")}
        methods = [{"name": "none"}, {"name": "negative_prompt", "options": {"negative_prompt": "caricature"}},
                   {"name": "rsc"}, {"name": "finetune_dpo", "options": dpo}]
        config = _config(micro_world, refiner_dir, tmp_path / f"p{processes}" / "eval.yaml", methods=methods,
                         cost_images=0)
        out = tmp_path / f"out{processes}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run([*launcher, "-m", "rsc.evaluate", "--config", str(config), "--out", str(out)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        results[processes] = json.loads((out / "results.json").read_text())
        assert len(list((tmp_path / f"p{processes}" / "dpo").glob("dpo-*/lora.safetensors"))) == 1
        trainings[processes] = result.stderr.count("finetune_dpo: trained the adapter")  # by whichever rank locked first
        stderrs[processes] = result.stderr[-6000:]
    assert trainings == {1: 1, 2: 1}, (trainings, stderrs)
    single, double = results[1], results[2]
    assert double["settings"]["world_size"] == 2 and single["settings"]["world_size"] == 1
    for name, row in single["methods"].items():
        assert double["methods"][name]["rendered"] == row["rendered"] == 9
        for level in ("per_prompt", "per_group", "all"):
            expected, got = _numbers(row["metrics"][level]), _numbers(double["methods"][name]["metrics"][level])
            assert set(got) == set(expected)
            for key, value in expected.items():
                assert (got[key] is None and value is None) or got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (
                    name, key, got[key], value)
    grid = tmp_path / "out2" / "figures" / "grid_rsc.png"
    assert grid.read_bytes() == (tmp_path / "out1" / "figures" / "grid_rsc.png").read_bytes()


def _numbers(tree: object, prefix: str = "") -> dict[str, float | None]:
    """A nested dict of metrics as one flat ``{"a/b/c": number}`` dict."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}/{key}").items()}
    return {prefix: tree}  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"methods": [{"name": "fair_diffusion"}]}, ValueError, r"methods\[0\].*unknown method 'fair_diffusion'"),
        ({"prompts": []}, ValueError, "prompts is empty"),
        ({"stereotype_attribute": "caricature"}, ValueError, "stereotype_attribute='caricature' is not an attribute"),
    ],
)
def test_clear_errors(micro_world, refiner_dir: Path, tmp_path: Path, changes, error, match,  # noqa: ANN001
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSC_TRACEBACK", "1")  # the original exception, not the CLI's one-line exit (tests/test_cli_errors.py)
    config = _config(micro_world, refiner_dir, tmp_path / "eval.yaml", **changes)
    with pytest.raises(error, match=match):
        evaluate_main(["--config", str(config), "--out", str(tmp_path / "out")])


def test_a_refiner_for_another_backbone_is_refused(micro_world, tiny_sd_dir: Path, tmp_path: Path,  # noqa: ANN001
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSC_TRACEBACK", "1")
    folder = tmp_path / "tiny_refiner"
    _refiner(FrozenLDM.from_pretrained(tiny_sd_dir), folder)
    config = _config(micro_world, folder, tmp_path / "eval.yaml", methods=[{"name": "rsc"}])
    with pytest.raises(BackboneMismatchError, match="fingerprint"):
        evaluate_main(["--config", str(config), "--out", str(tmp_path / "out")])


def test_toy_efficacy_is_measured_per_prompt_and_group(micro_world, tmp_path: Path) -> None:  # noqa: ANN001
    ldm = FrozenLDM.from_pretrained(micro_world.sd_path)
    refiner = _refiner(ldm, tmp_path / "refiner")
    unchanged = toy_efficacy(str(micro_world.path), ldm, RefinerCorrection(refiner, 0.0), (0.0, 0.5), 3, batch_size=12)
    report = unchanged.report
    assert len(report["per_prompt"]) == 8 and report["images_per_group"] == 6
    for row in [*report["per_prompt"].values(), *report["per_group"].values()]:
        for name in ("stereotype_rate", "gender_consistency", "group_match", "quality", "diversity"):
            assert row[name][0] == pytest.approx(row[name][1]), name
        assert row["ssim"] == pytest.approx(1.0) and row["diversity_ratio"] == pytest.approx(1.0)
    belor = [row for row in report["per_prompt"].values() if row["group"] == "belor"]
    assert report["per_group"]["belor"]["stereotype_rate"][0] == pytest.approx(
        sum(row["stereotype_rate"][0] for row in belor) / 2)
    assert report["per_group"]["belor"]["targeted"] and not report["per_group"]["ardan"]["targeted"]
    plain = [row["quality"][0] for row in report["per_prompt"].values() if not row["targeted"]]
    assert report["reference"]["non_targeted_uncorrected_quality"] == pytest.approx(sum(plain) / len(plain))
    corrected = toy_efficacy(str(micro_world.path), ldm, RefinerCorrection(refiner, 1.5), (0.0, 0.5), 3, batch_size=12)
    assert torch.equal(corrected.uncorrected, unchanged.uncorrected)
    assert min(row["ssim"] for row in corrected.report["per_prompt"].values()) < 0.999


def _prompt_row(group: str | None, targeted: bool, **values: object) -> dict:
    row = {"group": group, "targeted": targeted, "ssim": values.pop("ssim", None)}
    return row | {name: list(values.get(name, (None, None))) for name in
                  ("stereotype_rate", "gender_consistency", "group_match", "quality", "diversity")}


def test_efficacy_targets_name_the_worst_prompt_and_its_margin() -> None:
    rows = {
        "t_woman": _prompt_row("belor", True, stereotype_rate=(0.8, 0.05), gender_consistency=(0.6, 0.92),
                               group_match=(1.0, 0.97), quality=(9.0, 7.9), diversity=(8.0, 3.0)),
        "t_man": _prompt_row("belor", True, stereotype_rate=(0.5, 0.06), gender_consistency=(0.5, 0.99),
                             group_match=(1.0, 1.0), quality=(9.0, 8.6), diversity=(8.0, 4.0)),
        "n_woman": _prompt_row("ardan", False, ssim=0.97, stereotype_rate=(0.0, 0.0), gender_consistency=(1.0, 1.0),
                               group_match=(1.0, 0.94), quality=(8.0, 8.0), diversity=(4.0, 4.0)),
        "n_man": _prompt_row("ardan", False, ssim=0.93, stereotype_rate=(0.0, 0.0), gender_consistency=(1.0, 0.96),
                             group_match=(1.0, 1.0), quality=(9.0, 9.0), diversity=(3.0, 3.0)),
        # Names no group: no SSIM, group match or gender target applies to it.
        "person": _prompt_row(None, False, ssim=0.1, stereotype_rate=(0.3, 0.0)),
    }
    targets = efficacy_targets(rows, {"non_targeted_uncorrected_quality": 8.5, "non_targeted_uncorrected_diversity": 3.5})
    expected = {
        # 0.06 > 0.1 x 0.5 misses by 0.01; 0.05 <= 0.08 holds.
        "targeted_stereotype_rate_at_most_0.1x": (False, "t_man", -0.01),
        # The non-targeted prompts end at 0.98 on average: 0.92 must be >= 0.93.
        "targeted_gender_consistency_at_least_0.9": (False, "t_woman", -0.01),
        "non_targeted_ssim_at_least_0.95": (False, "n_man", -0.02),
        "group_match_at_least_0.95": (False, "n_woman", -0.01),
        "targeted_quality_within_0.5": (False, "t_woman", -0.1),
        "targeted_diversity_at_least_0.9x": (False, "t_woman", -0.15),
    }
    assert {name: (t["ok"], t["worst_prompt"], pytest.approx(t["margin"], abs=1e-6)) for name, t in targets.items()} == expected
    rows["t_man"]["stereotype_rate"][1] = 0.0
    rows["t_woman"] |= {"gender_consistency": [0.6, 0.95], "quality": [9.0, 8.1]}
    targets = efficacy_targets(rows, {"non_targeted_uncorrected_quality": 8.5, "non_targeted_uncorrected_diversity": None})
    assert targets["targeted_stereotype_rate_at_most_0.1x"]["ok"] and targets["targeted_quality_within_0.5"]["ok"]
    assert targets["targeted_gender_consistency_at_least_0.9"]["ok"]
    assert "targeted_diversity_at_least_0.9x" not in targets


def test_finetune_dpo_trains_once_and_is_cached(micro_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from rsc.callbacks.measures import ValidationPrompt
    from rsc.methods import FinetuneDPO, MethodContext, SamplingSettings, build_method

    ldm = FrozenLDM.from_pretrained(micro_world.sd_path)
    options = {"dataset": str(micro_world.preferences_path), "steps": 3, "batch_size": 4, "learning_rate": 0.05,
               "cache_dir": str(tmp_path)}
    prompts, seeds, sampling = [ValidationPrompt("a photo of a belor man", "belor", "man")] * 2, [0, 1], SamplingSettings(4, 7.0)
    trained = build_method("finetune_dpo", options)
    trained.setup(MethodContext(ldm=ldm))
    assert len(list(tmp_path.glob("dpo-*/lora.safetensors"))) == 1
    images = trained.render(prompts, seeds, sampling)
    none = build_method("none")
    none.setup(MethodContext(ldm=ldm))
    assert (images - none.render(prompts, seeds, sampling)).abs().max() > 1e-4
    monkeypatch.setattr(FinetuneDPO, "_train", lambda *args: pytest.fail("a cached adapter must not be retrained"))
    cached = build_method("finetune_dpo", options)
    cached.setup(MethodContext(ldm=ldm))
    assert cached.identity() == trained.identity()
    torch.testing.assert_close(cached.render(prompts, seeds, sampling), images, atol=1e-5, rtol=0)
