"""The install script refuses to start on a disk too full for it, naming where and how much, and skips when up to date."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checkout_copy(tmp_path: Path) -> Path:
    """The files the install script reads, in a folder of their own (no .venv)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup_env.sh", tmp_path / "scripts")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path)
    return tmp_path


def _run(checkout: Path, need_gib: int) -> subprocess.CompletedProcess:
    # PYTHON=false: were the check skipped, creating the venv fails at once instead of installing torch.
    env = {**os.environ, "RSC_SETUP_MIN_FREE_GIB": str(need_gib), "PYTHON": "false", "TMPDIR": str(checkout)}
    return subprocess.run(["bash", "scripts/setup_env.sh"], cwd=checkout, env=env, capture_output=True, text=True, timeout=60)


def test_a_disk_too_full_to_install_on_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    checkout = _checkout_copy(tmp_path)
    free_gib = shutil.disk_usage(checkout).free / 2**30
    result = _run(checkout, need_gib=int(free_gib) + 1000)
    assert result.returncode == 1
    assert result.stdout == ""  # it stopped there: no "[setup] creating .venv" or "installing"
    assert "not enough disk space to install" in result.stderr
    assert f"at {checkout.resolve()}" in result.stderr
    assert f"expected at least {int(free_gib) + 1000} GiB" in result.stderr
    reported = float(result.stderr.split(" GiB free")[0].rsplit(" ", 1)[1])
    assert abs(reported - free_gib) < 1.0
    assert not (checkout / ".venv").exists()


def test_an_up_to_date_install_is_left_alone_whatever_the_free_space(tmp_path: Path) -> None:
    checkout = _checkout_copy(tmp_path)
    stamp = checkout / ".venv" / ".rsc-install-stamp"
    stamp.parent.mkdir()
    wanted = hashlib.sha256((checkout / "pyproject.toml").read_bytes() + (checkout / "constraints.txt").read_bytes())
    stamp.write_text(wanted.hexdigest() + "\n")
    result = _run(checkout, need_gib=10**9)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
