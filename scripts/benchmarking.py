"""Timing helpers shared by the benchmark scripts: synchronised wall-clock timing and interleaved repeats."""

from __future__ import annotations

import time
from typing import Callable

import torch


def time_call(
    function: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds of one call by ``clock`` (wall clock by default), waiting for queued CUDA work before and after.

    ``clock=time.process_time`` counts the CPU time of this process only, which
    other jobs on a shared CPU machine barely disturb.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def interleaved_times(
    workloads: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each workload over ``repeats`` rounds, after one warm-up call of each.

    Rounds run every workload in turn (a, b, c, a, b, c, ...), so slow drifts of
    the machine (clocks, other jobs) hit all of them alike.
    """
    for function in workloads.values():
        function()
    times: dict[str, list[float]] = {key: [] for key in workloads}
    for _ in range(repeats):
        for key, function in workloads.items():
            times[key].append(time_call(function, device, clock))
    return times
