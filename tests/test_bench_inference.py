"""scripts/bench_inference.py: its peak-memory probe measures what a call allocates, and the script runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench_inference")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_cpu_peak_memory_sees_each_call_alone(bench) -> None:  # noqa: ANN001
    memory = bench.PeakMemory(torch.device("cpu"))
    if memory.libc is None:
        pytest.skip("needs Linux /proc and glibc")
    mib = 2**20

    def one_block() -> None:
        torch.ones(16 * mib)  # 64 MiB, every page written

    def small_blocks() -> None:
        blocks = [torch.ones(2**16) for _ in range(256)]  # 256 x 256 KiB, held together
        del blocks

    # Each call twice: what the first call freed must not hide the second call's peak.
    peaks = [memory.measure(call) for call in (one_block, one_block, small_blocks, small_blocks)]
    assert all(60 * mib <= peak <= 80 * mib for peak in peaks), [peak / mib for peak in peaks]
    assert memory.measure(lambda: None) < 4 * mib


def test_script_prints_the_four_workloads(bench, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    monkeypatch.setattr(sys, "argv", ["bench_inference.py", "--skip-sd15", "--toy-steps", "2", "--repeats", "1",
                                      "--batch", "1", "--device", "cpu"])
    bench.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if "/image" in line]
    assert [line.split()[0] for line in lines] == ["plain", "corrected", "corrected", "x0-reading"]
    assert "(ratio 1.000)" in lines[0] and all("peak" in line and "MiB" in line for line in lines)
