"""The demo refiner shipped in rsc/toy/demo_refiner: it is what ``configs/toy.yaml`` fits now, and it corrects
the toy world's planted stereotype when measured again.

This is the acceptance test of the method. The fit itself takes 8-20 min on two cores, so the suite does
not run it: ``bash scripts/refit_demo.sh`` fits the demo again, checks the same criteria
(:func:`rsc.demo.acceptance_failures`) and compares; ``--ship`` replaces the shipped refiner (the
fingerprint test below fails until a change to the recipe or to the code the fit runs has shipped one).
"""

from __future__ import annotations

import ast
import json
import shutil
import textwrap
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rsc.callbacks.calibration import CALIBRATION_FILE, search_strength
from rsc.callbacks.toy_efficacy import efficacy_targets
from rsc.cli import UserInputError
from rsc.demo import (
    FIT_RECORD,
    REMEASURE_TOLERANCE,
    SHIPPED_DEMO_DIR,
    _stable_dump,
    acceptance_failures,
    demo_fingerprint,
    fit_modules,
    is_current,
    measure_demo,
    module_source_hash,
    planted_stereotype_rate,
    read_fit_record,
    report_differences,
    ship,
    validation_failures,
)
from rsc.export import load_refiner_for
from rsc.identity import BackboneConfigs
from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world


@pytest.fixture(scope="module")
def shipped_report() -> dict:
    return json.loads((SHIPPED_DEMO_DIR / "efficacy.json").read_text())


@pytest.fixture(scope="module")
def shipped_demo_measured() -> dict:
    """The shipped demo refiner's efficacy report measured again (rsc.demo.measure_demo: 64 seeds per prompt with
    and without the refiner, about 2 min on 2 cores). Its uncorrected half samples exactly the shipped world's
    evaluation (same seeds, steps and guidance): the world's reproduction test below reads it instead of sampling."""
    return measure_demo()


def test_shipped_demo_refiner_is_the_current_demo_fit() -> None:
    current, recorded, now = is_current()
    assert current, (f"the shipped demo refiner (fingerprint {recorded}) is not what configs/toy.yaml fits now ({now}): "
                     f"run `bash scripts/refit_demo.sh --ship` and commit rsc/toy/demo_refiner")
    record = read_fit_record()
    # The recorded code is the training code, not just the command line.
    for module in ("rsc.module", "rsc.refiner", "rsc.losses", "rsc.backbone", "rsc.sampling",
                   "rsc.datamodules.preference", "rsc.callbacks.fairness"):
        assert module in record["modules"], module


def test_shipped_demo_refiner_records_an_accepted_fit(shipped_report: dict) -> None:
    assert acceptance_failures(shipped_report, planted_stereotype_rate()) == []
    record = read_fit_record()
    assert validation_failures(record, shipped_report) == []
    # The validation judged the final weights, the ones the report judged.
    assert record["validation_step"] == record["global_step"] > 0
    assert record["world_fingerprint"] == load_toy_world(SHIPPED_WORLD_DIR).manifest["fingerprint"]


def test_shipped_export_samples_at_the_strength_its_fit_calibrated() -> None:
    calibration = json.loads((SHIPPED_DEMO_DIR / CALIBRATION_FILE).read_text())
    exported = json.loads((SHIPPED_DEMO_DIR / "refiner" / "config.json").read_text())
    assert exported["strength"] == calibration["strength"]
    # The recorded measurements lead to the recorded choice (the search is replayed on them).
    candidates = {c["strength"]: c for c in calibration["candidates"]}
    criteria = calibration["criteria"]

    def recorded(strength: float) -> tuple[dict, dict, dict]:
        candidate = candidates[strength]
        return candidate["stereotype_rate"], candidate["ssim"], candidate["gender_consistency"]

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "toy.yaml").read_text())
    [strengths] = [c["init_args"]["strengths"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("SamplingCalibration")]
    # A candidate the replay needs but the fit never measured raises KeyError.
    chosen, replayed = search_strength(
        recorded, strengths, calibration["uncorrected_stereotype_rate"], calibration["biased_prompts"],
        calibration["fair_prompts"], criteria["stereotype_ratio"], criteria["min_ssim"], criteria["min_gender_consistency"])
    assert chosen == calibration["strength"]
    assert [c.strength for c in replayed] == sorted(candidates)
    # The world's targeted groups are the prompts the calibration found biased.
    targeted = load_toy_world(SHIPPED_WORLD_DIR).targeted_groups
    assert sorted(calibration["biased_prompts"]) == sorted(
        key for key in calibration["uncorrected_stereotype_rate"] if any(f"_{group}_" in key for group in targeted))


@pytest.mark.slow
def test_shipped_demo_refiner_measured_again_corrects_the_toy_stereotype(shipped_report: dict,
                                                                          shipped_demo_measured: dict) -> None:
    # 64 seeds per prompt with and without the refiner, with the current sampler and judges.
    report = shipped_demo_measured
    assert acceptance_failures(report, planted_stereotype_rate()) == []
    assert report_differences(report, shipped_report, REMEASURE_TOLERANCE) == []
    targeted = sorted(name for name, row in report["per_group"].items() if row["targeted"])
    assert targeted == sorted(load_toy_world(SHIPPED_WORLD_DIR).targeted_groups)


@pytest.mark.slow
def test_shipped_sd_reproduces_its_worlds_manifest(shipped_demo_measured: dict) -> None:
    # The demo's efficacy report, measured again, samples the uncorrected SD with the manifest's evaluation
    # settings: the same images the world's statistics were computed from.
    manifest = load_toy_world(SHIPPED_WORLD_DIR).manifest
    sampling = shipped_demo_measured["sampling"]
    assert (sampling["samples_per_prompt"], sampling["first_seed"], sampling["steps"], sampling["guidance_scale"]) == (
        manifest["config"]["eval_samples_per_prompt"], manifest["statistics"]["eval_seeds"][0],
        manifest["config"]["sampling_steps"], manifest["config"]["guidance_scale"])
    measured = {row["prompt"]: row for row in shipped_demo_measured["per_prompt"].values()}
    assert set(measured) == set(manifest["statistics"]["per_prompt"])
    for prompt, rates in manifest["statistics"]["per_prompt"].items():
        for name in ("group_match", "gender_consistency", "stereotype_rate"):
            # One image of 64 may flip across BLAS builds; more would mean the world changed.
            assert abs(measured[prompt][name][0] - rates[name]) <= 1.5 / rates["images"], (prompt, name)


def _recomputed(report: dict) -> dict:
    report["targets"] = efficacy_targets(report["per_prompt"], report["reference"])
    return report


@pytest.mark.parametrize(
    ("prompt", "field", "value", "named"),
    [
        ("a_photo_of_a_belor_woman", "stereotype_rate", [0.66, 0.2], "targeted_stereotype_rate_at_most_0.1x"),
        ("a_photo_of_a_dovek_man", "gender_consistency", [0.52, 0.85], "dovek_man: corrected gender consistency"),
        ("a_photo_of_a_cyran_woman", "ssim", 0.9, "cyran_woman: non-targeted images changed"),
        ("a_photo_of_a_belor_man", "quality", [9.0, 6.0], "belor_man: corrected quality"),
        ("a_photo_of_a_dovek_woman", "diversity", [5.0, 0.3], "dovek_woman: corrected diversity"),
        ("a_photo_of_a_ardan_man", "group_match", [1.0, 0.8], "group_match_at_least_0.95"),
    ],
)
def test_acceptance_names_what_a_bad_refiner_gets_wrong(
    shipped_report: dict, prompt: str, field: str, value: object, named: str
) -> None:
    report = deepcopy(shipped_report)
    report["per_prompt"][prompt][field] = value
    failures = acceptance_failures(_recomputed(report), planted_stereotype_rate())
    assert len(failures) == 1 and named in failures[0], failures


def test_acceptance_wants_the_planted_bias_before_correcting(shipped_report: dict) -> None:
    report = deepcopy(shipped_report)
    report["per_group"]["dovek"]["stereotype_rate"][0] = 0.3
    [failure] = acceptance_failures(report, planted_stereotype_rate())
    assert failure.startswith("dovek: the uncorrected SD shows stereotype rate 0.300")


def test_remeasured_report_differences_are_named(shipped_report: dict) -> None:
    report = deepcopy(shipped_report)
    assert report_differences(report, shipped_report, REMEASURE_TOLERANCE) == []
    row = report["per_prompt"]["a_photo_of_a_belor_woman"]
    row["stereotype_rate"][1] += 3 / 64
    row["ssim"] += 0.004  # within tolerance
    [difference] = report_differences(report, shipped_report, REMEASURE_TOLERANCE)
    assert difference.startswith("a_photo_of_a_belor_woman: stereotype_rate")


def test_validation_failures_catch_a_callback_that_disagrees(shipped_report: dict) -> None:
    record = read_fit_record()
    values = record["validation"] = dict(record["validation"])
    values["val/stereotype_rate/belor"] = values["val/stereotype_rate_uncorrected/belor"]
    values["val/ssim/ardan"] = 0.8
    failures = validation_failures(record, shipped_report)
    rate = values["val/stereotype_rate/belor"]
    assert sorted(failures) == [f"validation: belor stereotype {rate:.3f} -> {rate:.3f}, not halved",
                                "validation: non-targeted ardan SSIM 0.800 < 0.85"], failures


def test_validation_failures_refuse_values_measured_before_the_last_step(shipped_report: dict) -> None:
    # Session 16: an epoch cadence ended the fit 161 steps after the last validation, whose values
    # (ardan SSIM 0.786) were not the final refiner's (0.996).
    record = dict(read_fit_record(), validation_step=1375, global_step=1536)
    assert validation_failures(record, shipped_report) == [
        "validation: the last fairness validation ran at step 1375, the fit ended at step 1536: it judged other "
        "weights than the report (validate on a step cadence that divides max_steps)"]


# ------------------------------------------------------------------------------------------------ the fingerprint
def _module(folder: Path, body: str) -> None:
    (folder / "demo_probe_module.py").write_text(textwrap.dedent(body))


def test_fingerprint_follows_code_config_and_world_not_docstrings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = ["demo_probe_module"]
    config = {"model": {"strength": 1.0}}
    _module(tmp_path, '''
        """A module."""
        def step(x):
            return x + 1
    ''')
    first = demo_fingerprint(config, "world-a", modules)
    _module(tmp_path, '''
        """The same module, described otherwise."""
        # a comment
        def step(x):
            """Add one."""
            return x + 1
    ''')
    assert demo_fingerprint(config, "world-a", modules) == first
    _module(tmp_path, '''
        def step(x):
            return x + 2
    ''')
    assert demo_fingerprint(config, "world-a", modules) != first
    _module(tmp_path, '''
        import os
        def step(x):
            return x + 1
    ''')
    assert demo_fingerprint(config, "world-a", modules) != first, "an import can change what the fit runs"
    _module(tmp_path, '''
        def step(x):
            return x + 1
    ''')
    assert demo_fingerprint(config, "world-a", modules) == first
    assert demo_fingerprint({"model": {"strength": 1.1}}, "world-a", modules) != first
    assert demo_fingerprint(config, "world-b", modules) != first
    (tmp_path / "demo_probe_module.py").unlink()
    with pytest.raises(UserInputError, match="demo_probe_module, which the demo fit ran, no longer exists"):
        module_source_hash(modules)


def test_code_dump_leaves_out_empty_fields() -> None:
    # What differs between Python 3.11, 3.12 (empty type_params) and 3.13 (ast.dump drops empty fields).
    tree = ast.parse("def f(x):\n    return x + 1")
    assert _stable_dump(tree) == (
        "Module(body=[FunctionDef(name='f', args=arguments(args=[arg(arg='x')]), "
        "body=[Return(value=BinOp(left=Name(id='x', ctx=Load()), op=Add(), right=Constant(value=1)))])])"
    )


def test_fit_modules_are_rsc_code_outside_the_toy_world() -> None:
    loaded = ["torch", "rsc", "rsc.module", "rsc.toy", "rsc.toy.world", "rsc.demo", "rsc.callbacks.fairness", "rscx"]
    assert fit_modules(loaded) == ["rsc", "rsc.callbacks.fairness", "rsc.module"]


def test_shipped_fingerprint_changes_with_the_config(tmp_path: Path) -> None:
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "toy.yaml").read_text())
    config["model"]["sampling_threshold"] = 0.5
    changed = tmp_path / "toy.yaml"
    changed.write_text(yaml.safe_dump(config))
    current, recorded, now = is_current(config_path=changed)
    assert not current and now != recorded


# ------------------------------------------------------------------------------------------------ shipping
def _fake_run(tmp_path: Path, fingerprint: str | None) -> Path:
    """A run folder as a refit leaves it, from the shipped demo (its export names an absolute backbone)."""
    run = tmp_path / "run"
    shutil.copytree(SHIPPED_DEMO_DIR / "refiner", run / "refiner")
    config = json.loads((run / "refiner" / "config.json").read_text())
    config["backbone"] = str(SHIPPED_WORLD_DIR.resolve() / "sd")
    (run / "refiner" / "config.json").write_text(json.dumps(config))
    for name in ("efficacy.json", "efficacy.png"):
        shutil.copy2(SHIPPED_DEMO_DIR / name, run / name)
    record = read_fit_record() | {"fingerprint": fingerprint, "extra_args": [] if fingerprint else ["--model.strength", "2"]}
    (run / FIT_RECORD).write_text(json.dumps(record))
    return run


def test_ship_replaces_the_demo_folder_with_repository_paths(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    (demo / "refiner").mkdir(parents=True)
    (demo / "stale.txt").write_text("from an older demo")
    ship(_fake_run(tmp_path, "0123456789abcdef"), demo)
    assert sorted(p.name for p in demo.iterdir()) == ["efficacy.json", "efficacy.png", "fit.json", "refiner"]
    config = json.loads((demo / "refiner" / "config.json").read_text())
    assert config["backbone"] == "rsc/toy/world/sd" and config["training_data"] == {"dataset": "rsc/toy/world/preferences"}
    assert "`rsc/toy/world/sd`" in (demo / "refiner" / "README.md").read_text()
    shipped, copied = load_file(SHIPPED_DEMO_DIR / "refiner" / "refiner.safetensors"), load_file(demo / "refiner" / "refiner.safetensors")
    assert all(torch.equal(shipped[key], copied[key]) for key in shipped)
    ldm = load_toy_world(SHIPPED_WORLD_DIR).load_backbone()
    load_refiner_for(demo / "refiner", BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler))
    assert read_fit_record(demo)["fingerprint"] == "0123456789abcdef"


def test_a_run_with_extra_arguments_cannot_ship(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    with pytest.raises(UserInputError, match=r"fitted with extra arguments \['--model.strength', '2'\]"):
        ship(_fake_run(tmp_path, None), demo)
    assert not demo.exists()


def test_info_command_says_whether_the_shipped_refiner_is_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsc.demo import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {read_fit_record()['fingerprint']} (current)" in out and "a photo of a dovek woman" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--demo", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path / FIT_RECORD} not found" in capsys.readouterr().err
