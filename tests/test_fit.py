"""`python -m rsc.fit`: LightningCLI config, refiner-only checkpoints, export, exact resume, DDP."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fitting import PROMPTS, LeftBrighterStereotyped, fit_config, run_cli, steps_run
from rsc.fit import main as fit_main

REPO = Path(__file__).resolve().parents[1]


def _config(world, run_dir: Path, cache: Path, max_epochs: int) -> Path:  # noqa: ANN001
    """The micro toy world's fit, with the end-of-fit sampling calibration and efficacy report."""
    from rsc.toy.data import toy_prompts

    prompts = [{"prompt": prompt, "group": group, "gender": gender} for prompt, group, gender in toy_prompts()]
    calibration = {"class_path": "rsc.callbacks.calibration.SamplingCalibration",
                   "init_args": {"classifier": {"class_path": "rsc.classifiers.ToyClassifier",
                                                "init_args": {"path": str(world.classifier_path)}},
                                 "prompts": prompts, "seeds": 2, "strengths": [1.0, 1.5], "steps": 10}}
    report = {"class_path": "rsc.callbacks.toy_efficacy.ToyEfficacyReport",
              "init_args": {"world": str(world.path), "samples_per_prompt": 2}}
    return fit_config(world.sd_path, world.preferences_path, run_dir, cache, max_epochs=max_epochs, batch_size=16,
                      callbacks=[calibration, report],
                      model={"hidden_channels": 16, "embedding_dim": 16, "sampling_window": [0.0, 0.7]})


def test_print_config_of_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit_main(["--config", str(REPO / "configs" / "toy.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"] == "rsc/toy/world/sd"
    assert printed["data"]["dataset"] == "rsc/toy/world/preferences"


@pytest.mark.parametrize("name", ["sd15.yaml", "sd21.yaml"])
def test_real_backbone_configs_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit_main(["--config", str(REPO / "configs" / name), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "bf16-mixed" and printed["model"]["gradient_checkpointing"] is True
    assert printed["model"]["correction_window"] == [0.2, 0.5] and printed["data"]["batch_size"] >= 1


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RSC_FIT_MODEL__BACKBONE", "some/backbone")
    monkeypatch.setenv("RSC_FIT_MODEL__LEARNING_RATE", "0.123")
    with pytest.raises(SystemExit):
        fit_main(["--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["learning_rate"] == 0.123 and printed["model"]["backbone"] == "some/backbone"
    # A config file (or a flag) takes precedence over the environment, as in jsonargparse.
    with pytest.raises(SystemExit):
        fit_main(["--config", str(REPO / "configs" / "toy.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["learning_rate"] == 5e-4


def test_fit_checkpoints_the_refiner_only_and_exports_it(micro_world, tmp_path: Path) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    fit_main(["--config", str(_config(micro_world, run, tmp_path / "cache", max_epochs=2))])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all(key.startswith("refiner.") for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["backbone"] == str(micro_world.sd_path)
    exported = load_file(run / "refiner" / "refiner.safetensors")
    for key, value in exported.items():
        assert torch.equal(value, checkpoint["state_dict"][f"refiner.{key}"])
    assert exported["conv_out.weight"].abs().sum() > 0, "training must move the zero-initialised output layer"
    config = yaml.safe_load((run / "refiner" / "config.json").read_text())
    # Trained on the window [0, 0.5], sampled (the calibration, the report, the export) over [0, 0.7].
    assert checkpoint["hyper_parameters"]["correction_window"] == [0.0, 0.5]
    assert config["correction_window"] == [0.0, 0.7] and config["backbone"] == str(micro_world.sd_path)
    assert json.loads((run / "efficacy.json").read_text())["sampling"]["window"] == [0.0, 0.7]
    assert json.loads((run / "calibration.json").read_text())["sampling"]["window"] == [0.0, 0.7]
    assert (run / "efficacy.json").is_file() and (run / "efficacy.png").is_file()
    # The export and the report sample at the strength the calibration chose.
    calibrated = json.loads((run / "calibration.json").read_text())["strength"]
    assert config["strength"] == calibrated
    assert json.loads((run / "efficacy.json").read_text())["sampling"]["strength"] == calibrated
    assert (run / "metrics.csv").read_text().count("train/loss") >= 1
    # The end-of-fit report reaches the logger too, per group and per prompt, with each target's margin.
    report = json.loads((run / "efficacy.json").read_text())
    [logged] = [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("efficacy/quality/belor")]
    assert float(logged["efficacy/quality/belor"]) == pytest.approx(report["per_group"]["belor"]["quality"][1])
    assert float(logged["efficacy/stereotype_rate_uncorrected/a_photo_of_a_dovek_man"]) == pytest.approx(
        report["per_prompt"]["a_photo_of_a_dovek_man"]["stereotype_rate"][0])
    for name, target in report["targets"].items():
        assert float(logged[f"efficacy/target_margin/{name}"]) == pytest.approx(target["margin"])


# Exact resume after a kill (mid-epoch, between epochs, inside a checkpoint write, ...): tests/test_fault_tolerance.py.

# 2 processes x batch 2 and 1 process x batch 4 compute the same gradient up to float rounding: the UNet runs at
# another batch size (other CPU kernels) and the loss takes differences of nearly equal errors. Measured: max
# |difference| 2.8e-4 at a gradient scale of 1.1 (conv_out); pairs drawn per rank or per step differ by O(scale).
# The weights after several steps are not a fair measure: AdamW's first updates are lr * sign(g), so a gradient
# entry within rounding of 0 flips a whole lr (measured: 0.0238 after 6 steps at lr 1e-2), whatever the code.
GRADIENT_RTOL, GRADIENT_ATOL = 1e-3, 1e-3


def _refiner(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "refiner" / "refiner.safetensors")


def _twelve_steps(tiny_sd_dir: Path, tiny_prefs_dir: Path, run: Path, cache: Path, devices: int, batch_size: int,
                  **config_args: Any) -> Path:
    """The config of a 2-epoch, 12-step fit (``last.ckpt`` every 2 steps) on ``devices`` processes."""
    return fit_config(tiny_sd_dir, tiny_prefs_dir, run, cache, max_epochs=2, batch_size=batch_size, devices=devices,
                      every_n_train_steps=2, **config_args)


def _fit_run(tiny_sd_dir: Path, tiny_prefs_dir: Path, run: Path, cache: Path, devices: int, batch_size: int,
             **config_args: Any) -> None:
    """Run :func:`_twelve_steps`'s fit to the end in a subprocess."""
    config = _twelve_steps(tiny_sd_dir, tiny_prefs_dir, run, cache, devices, batch_size, **config_args)
    result = run_cli("fit", ["--config", str(config)] + (["--trainer.strategy", "ddp"] if devices > 1 else []))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# Each rank samples half of the calibration's images and the metrics are reduced across the ranks.
_CALIBRATION = {"class_path": "rsc.callbacks.calibration.SamplingCalibration",
                "init_args": {"classifier": {"class_path": "fitting.LeftBrighterStereotyped",
                                             "init_args": {"path": str(REPO / "rsc" / "toy" / "world" / "classifier")}},
                              "prompts": [{"prompt": p, "group": p.split()[-2], "gender": p.split()[-1]} for p in PROMPTS],
                              "seeds": 8, "first_seed": 0, "strengths": [1.0, 1.5, 2.0], "steps": 4,
                              "min_biased_rate": 0.3}}


@pytest.fixture(scope="module")
def ddp_run(tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-process DDP fit (batch 2 per process), its first step's gradients recorded: the
    reference of both DDP tests (a DDP launch costs two interpreters' start-up)."""
    root = tmp_path_factory.mktemp("ddp")
    recorder = {"class_path": "fitting.GradientRecorder", "init_args": {"path": str(root / "two" / "grads")}}
    _fit_run(tiny_sd_dir, tiny_prefs_dir, root / "two", root / "cache", devices=2, batch_size=2,
             callbacks=[recorder, _CALIBRATION])
    return root / "two"


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_with_the_whole_batch(
    tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, ddp_run: Path
) -> None:
    recorder = {"class_path": "fitting.GradientRecorder", "init_args": {"path": str(tmp_path / "one" / "grads")}}
    # The same callbacks: loading the calibration's classifier draws from the global RNG before the refiner is built.
    _fit_run(tiny_sd_dir, tiny_prefs_dir, tmp_path / "one", tmp_path / "cache", devices=1, batch_size=4,
             callbacks=[recorder, _CALIBRATION])
    runs = (tmp_path / "one", ddp_run)
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["last.ckpt"]
    for run in runs:  # the export carries the calibrated strength
        calibrated = json.loads((run / "calibration.json").read_text())["strength"]
        assert json.loads((run / "refiner" / "config.json").read_text())["strength"] == calibrated
    checkpoints = [torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for run in runs]
    assert checkpoints[0]["global_step"] == checkpoints[1]["global_step"] == 12
    assert all(key.startswith("refiner.") for key in checkpoints[1]["state_dict"])
    single, double = (load_file(run / "grads" / "grad0.safetensors") for run in runs)
    assert set(single) == set(double) and single["conv_out.weight"].abs().max() > 0
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL, msg=key)
    weights = [_refiner(run) for run in runs]
    print("max |2 processes - 1 process| after 12 steps:",
          max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]))


@pytest.mark.slow
def test_ddp_calibration_equals_one_process_calibrating_the_same_refiner(tiny_sd_dir: Path, ddp_run: Path) -> None:
    from rsc.callbacks.calibration import SamplingCalibration
    from rsc.module import RSCorrector

    recorded = json.loads((ddp_run / "calibration.json").read_text())
    config = yaml.safe_load((ddp_run.parent / f"{ddp_run.name}.yaml").read_text())
    [arguments] = [c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("SamplingCalibration")]
    calibration = SamplingCalibration(**{**arguments, "classifier": LeftBrighterStereotyped(arguments["classifier"]["init_args"]["path"])})
    model = {k: v for k, v in config["model"].items() if k not in ("learning_rate", "beta")}
    module = RSCorrector(**model)
    module.refiner.load_state_dict(_refiner(ddp_run))
    alone = calibration.calibrate(module)
    assert alone["biased_prompts"] == recorded["biased_prompts"] and alone["strength"] == recorded["strength"]
    assert alone["uncorrected_stereotype_rate"] == pytest.approx(recorded["uncorrected_stereotype_rate"], abs=1e-9)
    assert [c["strength"] for c in alone["candidates"]] == [c["strength"] for c in recorded["candidates"]]
    assert recorded["candidates"] and recorded["fair_prompts"], "the test must measure candidates on both kinds of prompt"
    for one, two in zip(alone["candidates"], recorded["candidates"]):
        for name in ("stereotype_rate", "ssim", "gender_consistency"):
            assert one[name] == pytest.approx(two[name], abs=1e-6), name


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_exactly(
    tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, ddp_run: Path
) -> None:
    # The reference's config but for its gradient recorder, which does not change the weights.
    killed = _twelve_steps(tiny_sd_dir, tiny_prefs_dir, tmp_path / "killed", tmp_path / "cache", devices=2, batch_size=2,
                           callbacks=[_CALIBRATION])
    log = tmp_path / "steps.log"
    result = run_cli("fit", ["--config", str(killed), "--trainer.strategy", "ddp"], kill_at="step:9", step_log=log)
    assert result.returncode != 0
    ran = steps_run(log)  # both ranks log
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    result = run_cli("fit", ["--config", str(killed), "--trainer.strategy", "ddp", "--ckpt_path", "last"], step_log=log)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = steps_run(log)[len(ran):]
    assert sorted(resumed) == sorted(list(range(8, 12)) * 2), "each rank runs steps 8-11 once more, nothing else"
    full_weights, resumed_weights = _refiner(ddp_run), _refiner(tmp_path / "killed")
    assert all(torch.equal(full_weights[key], resumed_weights[key]) for key in full_weights)


def test_demo_refit_records_the_code_it_ran_and_ships(micro_world, tmp_path: Path) -> None:  # noqa: ANN001
    from rsc.demo import current_fingerprint, is_current, read_fit_record, refit, ship

    config = _config(micro_world, tmp_path / "unused", tmp_path / "cache", max_epochs=1)
    run = refit(tmp_path / "refit", config, world=micro_world.path)
    record = read_fit_record(run)
    assert {"rsc.module", "rsc.losses", "rsc.refiner", "rsc.datamodules.preference"} <= set(record["modules"])
    assert record["fingerprint"] == current_fingerprint(record["modules"], config, micro_world.path)
    assert record["world_fingerprint"] == micro_world.manifest["fingerprint"] and record["fit_seconds"] > 0
    ship(run, tmp_path / "demo")
    assert is_current(tmp_path / "demo", config, micro_world.path)[0]
    shipped_strength = json.loads((tmp_path / "demo" / "refiner" / "config.json").read_text())["strength"]
    assert json.loads((tmp_path / "demo" / "calibration.json").read_text())["strength"] == shipped_strength
    with pytest.raises(FileExistsError, match="choose a new --out folder"):
        refit(tmp_path / "refit", config, world=micro_world.path)
