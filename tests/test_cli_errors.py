"""Every rsc command line ends a user's mistake with one line and exit status 2; other errors keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsc.cli import UserInputError, run_cli
from rsc.evaluate import main as evaluate_main
from rsc.export import main as export_main
from rsc.generate import main as generate_main
from rsc.toy.__main__ import main as toy_main

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys: pytest.CaptureFixture[str], prog: str, words: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and words in err, err
    assert "Traceback" not in err


def test_fit_with_a_missing_dataset_is_one_line(tiny_sd_dir: Path, tmp_path: Path) -> None:
    # The example: a real process, so a traceback printed by the interpreter would show.
    result = subprocess.run(
        [sys.executable, "-m", "rsc.fit", "--model.backbone", str(tiny_sd_dir), "--data.dataset", "/nonexistent",
         "--data.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rsc.fit: error: ") and "/nonexistent" in last, last


def test_generate_export_and_toy_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\n")
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--refiner", str(tmp_path / "no-refiner"), "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    _one_line_error(capsys, "rsc.generate", "no-refiner")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    _one_line_error(capsys, "rsc.export", "missing.ckpt does not exist")
    with pytest.raises(SystemExit) as exit_info:
        toy_main(["info", "--world", str(tmp_path / "no-world")])
    assert exit_info.value.code == 2
    _one_line_error(capsys, "rsc.toy", "no-world is not a built toy world")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--config", str(REPO / "configs" / "eval" / "toy.yaml"), "--prompts", "[]", "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    _one_line_error(capsys, "rsc.evaluate", "prompts is empty")


def test_run_cli_user_errors_and_unexpected_ones(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_input(argv: list[str] | None) -> None:
        raise UserInputError("field model.strength: expected a number,\n got 'strong'")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(bad_input, [], prog="rsc.something")
    assert exit_info.value.code == 2
    _one_line_error(capsys, "rsc.something", "field model.strength: expected a number, got 'strong'")

    def bug(argv: list[str] | None) -> None:
        raise RuntimeError("an rsc bug")

    with pytest.raises(RuntimeError, match="an rsc bug"):  # unexpected: the traceback stays
        run_cli(bug, [])
    monkeypatch.setenv("RSC_TRACEBACK", "1")
    with pytest.raises(UserInputError):
        run_cli(bad_input, [])
    assert run_cli(lambda argv: 7, []) == 7
