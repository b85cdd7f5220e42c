"""Kill tests: SIGKILL a real ``python -m rsc.fit`` / ``rsc.generate`` at a chosen point, resume, compare bit for bit.

The reference is one uninterrupted run of the same config: 24 pairs, batch 4, 2 epochs = 12 steps,
``last.ckpt`` every 2 steps and at every epoch end. Every resumed run must run exactly the steps the
killed run had not checkpointed (counted through ``RSC_STEP_LOG``), say where it resumed, and end
with the reference's refiner, bit for bit.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fitting import fit_config, run_cli, steps_run

STEPS = 12  # 24 pairs / batch 4 = 6 steps per epoch, 2 epochs
KILLED = -9  # subprocess return code of SIGKILL


def _tail(result) -> str:  # noqa: ANN001
    return result.stdout[-3000:] + result.stderr[-3000:]


def _fit(config: Path, step_log: Path, kill_at: str | None = None, resume: bool = False,  # noqa: ANN202
         env: dict[str, str] | None = None):
    arguments = ["--config", str(config)] + (["--ckpt_path", "last"] if resume else [])
    return run_cli("fit", arguments, kill_at=kill_at, step_log=step_log, env=env)


def _temporary_folder_on_another_device(path: Path) -> dict[str, str]:
    """``TMPDIR`` on another file system than ``path`` where there is one (e.g. /dev/shm), else nothing.

    There, a writer that stages in the temporary folder and then moves the file copies it: the
    window in which a kill truncates the checkpoint that a plain rename would not have.
    """
    for candidate in ("/dev/shm", "/run/user", "/var/tmp"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) and os.stat(candidate).st_dev != os.stat(path).st_dev:
            return {"TMPDIR": candidate}
    return {}


def _assert_same_refiner(run: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = load_file(run / "refiner" / "refiner.safetensors")
    assert set(weights) == set(reference)
    different = [key for key in reference if not torch.equal(weights[key], reference[key])]
    assert not different, f"resumed refiner differs from the uninterrupted one in {different}"


def _resume_line(log: str) -> str:
    return next((line for line in log.splitlines() if "resumed from" in line), "no 'resumed from' line in:\n" + log)


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = root / "cache"
    config = fit_config(tiny_sd_dir, tiny_prefs_dir, root / "run", cache, every_n_train_steps=2)
    result = _fit(config, root / "steps.log")
    assert result.returncode == 0, _tail(result)
    assert steps_run(root / "steps.log") == list(range(STEPS))
    weights = load_file(root / "run" / "refiner" / "refiner.safetensors")
    assert weights["conv_out.weight"].abs().sum() > 0, "training must move the zero-initialised output layer"
    return SimpleNamespace(cache=cache, weights=weights, refiner=root / "run" / "refiner")


def _killed_and_resumed(
    reference: SimpleNamespace, tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, kill_at: str, **config_args
) -> tuple[list[int], list[int], str]:
    """Kill a run at ``kill_at``, resume it with ``--ckpt_path last``; the steps each ran and the resumed run's log."""
    config_args.setdefault("every_n_train_steps", 2)
    config = fit_config(tiny_sd_dir, tiny_prefs_dir, tmp_path / "run", reference.cache, **config_args)
    killed = _fit(config, tmp_path / "killed.log", kill_at=kill_at)
    assert killed.returncode == KILLED, _tail(killed)
    resumed = _fit(config, tmp_path / "resumed.log", resume=True)
    assert resumed.returncode == 0, _tail(resumed)
    _assert_same_refiner(tmp_path / "run", reference.weights)
    assert _last(tmp_path / "run")["global_step"] == STEPS
    return steps_run(tmp_path / "killed.log"), steps_run(tmp_path / "resumed.log"), resumed.stdout + resumed.stderr


def test_killed_mid_epoch_after_a_step_checkpoint(reference, tiny_sd_dir, tiny_prefs_dir, tmp_path) -> None:  # noqa: ANN001
    # Killed at the start of step 5: the step-4 checkpoint (4 of epoch 0's 6 batches) is the last one.
    killed, resumed, log = _killed_and_resumed(reference, tiny_sd_dir, tiny_prefs_dir, tmp_path, "step:5")
    assert killed == [0, 1, 2, 3, 4]
    assert resumed == list(range(4, STEPS)), "the resumed run must skip the 4 batches already trained on"
    assert "epoch 0, global step 4, 4 step(s) of the epoch already trained" in log, _resume_line(log)


def test_killed_between_epochs_with_the_demos_validation_cadence(reference, tiny_sd_dir, tiny_prefs_dir, tmp_path) -> None:  # noqa: ANN001
    # The demo's settings: no step checkpoints, validation on a step cadence (here at step 8: mid-epoch, in the
    # resumed part, which must count its steps from the checkpoint's, not from 0).
    killed, resumed, log = _killed_and_resumed(
        reference, tiny_sd_dir, tiny_prefs_dir, tmp_path, "epoch:1", every_n_train_steps=None,
        trainer={"check_val_every_n_epoch": None, "val_check_interval": 8})
    assert killed == list(range(6))
    assert resumed == list(range(6, STEPS))
    assert "epoch 1, global step 6, 0 step(s)" in log, _resume_line(log)
    # One validation, after the 8th step (the logger's step 7): counted from 0 again it would never come.
    with open(tmp_path / "run" / "metrics.csv", newline="") as table:
        validated = [row["step"] for row in csv.DictReader(table) if row.get("val/loss")]
    assert validated == ["7"], validated


def test_killed_while_writing_a_checkpoint(reference, tiny_sd_dir, tiny_prefs_dir, tmp_path) -> None:  # noqa: ANN001
    # The 3rd checkpoint file (step 6) is half-written when the process dies: last.ckpt must still be step 4's.
    # With the system temporary folder on another device, Lightning's own writer (staged there, then moved) fails this.
    config = fit_config(tiny_sd_dir, tiny_prefs_dir, tmp_path / "run", reference.cache, every_n_train_steps=2)
    killed = _fit(config, tmp_path / "killed.log", kill_at="checkpoint_write:3",
                  env=_temporary_folder_on_another_device(tmp_path))
    assert killed.returncode == KILLED, _tail(killed)
    assert _last(tmp_path / "run")["global_step"] == 4
    resumed = _fit(config, tmp_path / "resumed.log", resume=True)
    assert resumed.returncode == 0, _tail(resumed)
    assert steps_run(tmp_path / "resumed.log") == list(range(4, STEPS))
    _assert_same_refiner(tmp_path / "run", reference.weights)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt"]


def test_killed_while_building_the_latent_cache(reference, tiny_sd_dir, tiny_prefs_dir, tmp_path) -> None:  # noqa: ANN001
    config = fit_config(tiny_sd_dir, tiny_prefs_dir, tmp_path / "run", tmp_path / "cache")
    killed = _fit(config, tmp_path / "killed.log", kill_at="cache_write")
    assert killed.returncode == KILLED, _tail(killed)
    assert steps_run(tmp_path / "killed.log") == []
    again = _fit(config, tmp_path / "again.log")
    assert again.returncode == 0, _tail(again)
    assert steps_run(tmp_path / "again.log") == list(range(STEPS))
    _assert_same_refiner(tmp_path / "run", reference.weights)


def test_killed_while_exporting(reference, tiny_sd_dir, tiny_prefs_dir, tmp_path) -> None:  # noqa: ANN001
    config = fit_config(tiny_sd_dir, tiny_prefs_dir, tmp_path / "run", reference.cache, every_n_train_steps=2)
    killed = _fit(config, tmp_path / "killed.log", kill_at="export_swap")
    assert killed.returncode == KILLED, _tail(killed)
    assert not (tmp_path / "run" / "refiner").exists() and (tmp_path / "run" / ".refiner.rsc-new").is_dir()
    resumed = _fit(config, tmp_path / "resumed.log", resume=True)
    assert resumed.returncode == 0, _tail(resumed)
    assert steps_run(tmp_path / "resumed.log") == [], "training had finished: the resume only exports"
    _assert_same_refiner(tmp_path / "run", reference.weights)
    assert not (tmp_path / "run" / ".refiner.rsc-new").exists()


def test_killed_while_generating(reference, tiny_sd_dir, tmp_path) -> None:  # noqa: ANN001
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a belor woman\na photo of a dovek man\n")
    common = ["--refiner", str(reference.refiner), "--backbone", str(tiny_sd_dir), "--prompts", str(prompts),
              "--num-per-prompt", "2", "--steps", "3", "--batch-size", "1", "--device", "cpu", "--no-progress"]
    full = run_cli("generate", [*common, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, _tail(full)
    killed = run_cli("generate", [*common, "--out", str(tmp_path / "out")], kill_at="generate:2")
    assert killed.returncode == KILLED, _tail(killed)
    assert len(list((tmp_path / "out").glob("*.json"))) == 2
    resumed = run_cli("generate", [*common, "--out", str(tmp_path / "out")])
    assert resumed.returncode == 0, _tail(resumed)
    assert "2 images generated, 2 already there" in resumed.stdout + resumed.stderr
    expected = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected
    for name in expected:
        if name.endswith(".png"):
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
