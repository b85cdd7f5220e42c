"""Run an rsc CLI in this process and SIGKILL it at a chosen point (used by tests/test_fault_tolerance.py).

    python tests/kill_driver.py fit|generate|export [CLI arguments]

Environment:
    RSC_KILL_AT    where to die (unset: run to the end):
                   ``step:N``             at the start of the training step with global_step N
                   ``epoch:E``            at the start of training epoch E (after epoch E-1's checkpoint)
                   ``checkpoint_write:N`` half-way through writing the N-th checkpoint file (1-based) to disk
                   ``cache_write``        half-way through writing a latent-cache file
                   ``export_swap``        after an export's staging folder is written, before it is swapped in
                   ``generate:N``         after N images of ``rsc.generate`` are finished
    RSC_STEP_LOG   a file that gets one line per training step run: the global step it started at.

A real SIGKILL, not an exception: no ``finally``, no atexit, no flush of anything not yet written.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_and_die(payload: bytes, target: Any) -> None:
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as handle:
            handle.write(payload[: len(payload) // 2])
            handle.flush()
            os.fsync(handle.fileno())
    else:
        target.write(payload[: len(payload) // 2])
        target.flush()
    _die()


def install(kill_at: str, step_log: str | None) -> None:
    """Patch the places the kill points live in."""
    import torch

    from rsc.module import RSCorrector

    point, _, value = kill_at.partition(":")
    if step_log or point in ("step", "epoch"):
        original_step = RSCorrector.training_step

        def training_step(self: RSCorrector, batch: Any, batch_idx: int) -> Any:
            if point == "step" and self.global_step == int(value):
                _die()
            if step_log:
                with open(step_log, "a", encoding="utf-8") as handle:
                    handle.write(f"{self.global_step}\n")
            return original_step(self, batch, batch_idx)

        RSCorrector.training_step = training_step  # type: ignore[method-assign]
    if point == "epoch":

        def on_train_epoch_start(self: RSCorrector) -> None:
            if self.current_epoch == int(value):
                _die()

        RSCorrector.on_train_epoch_start = on_train_epoch_start  # type: ignore[method-assign]
    if point == "checkpoint_write":
        import shutil

        original_save, original_move = torch.save, shutil.move
        calls = {"checkpoints": 0, "armed": False}

        def save(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(obj, dict) and "state_dict" in obj and "global_step" in obj:
                calls["checkpoints"] += 1
                if calls["checkpoints"] == int(value):
                    if not isinstance(target, (str, os.PathLike)):
                        # Serialised to memory first (Lightning's writer): die while those bytes reach the disk.
                        calls["armed"] = True
                    else:
                        buffer = io.BytesIO()
                        original_save(obj, buffer, *args, **kwargs)
                        _write_half_and_die(buffer.getvalue(), target)
            original_save(obj, target, *args, **kwargs)

        def move(source: Any, destination: Any, *args: Any, **kwargs: Any) -> Any:
            if calls["armed"] and str(destination).endswith(".ckpt"):
                _write_half_and_die(Path(source).read_bytes(), destination)  # a cross-device move is a copy
            return original_move(source, destination, *args, **kwargs)

        torch.save = save  # type: ignore[assignment]
        shutil.move = move  # type: ignore[assignment]
    if point == "cache_write":
        import rsc.datamodules.cache as cache

        original_save_file = cache.save_file

        def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
            from safetensors.torch import save as to_bytes

            _write_half_and_die(to_bytes(tensors, metadata=metadata), filename)

        cache.save_file = save_file  # type: ignore[assignment]
        del original_save_file
    if point == "export_swap":
        import rsc.atomic as atomic

        original_rename = atomic.os.rename

        class _OS:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            @staticmethod
            def rename(source: Any, destination: Any) -> None:
                if Path(source).name.endswith(".rsc-new"):
                    _die()
                original_rename(source, destination)

        atomic.os = _OS()  # type: ignore[assignment]
    if point == "generate":
        import rsc.generate as generate

        original_write = generate.write_json_atomic
        written = {"sidecars": 0}

        def write_json_atomic(path: Any, payload: Any) -> None:
            original_write(path, payload)
            written["sidecars"] += 1
            if written["sidecars"] == int(value):
                _die()

        generate.write_json_atomic = write_json_atomic  # type: ignore[assignment]


def main() -> None:
    """Install the kill point, then run the CLI named by the first argument."""
    command, arguments = sys.argv[1], sys.argv[2:]
    install(os.environ.get("RSC_KILL_AT", ""), os.environ.get("RSC_STEP_LOG"))
    if command == "fit":
        from rsc.fit import main as cli
    elif command == "generate":
        from rsc.generate import main as cli
    else:
        from rsc.export import main as cli
    # sys.argv stays as it is: Lightning's DDP launcher starts the other ranks with it.
    cli(arguments)


if __name__ == "__main__":
    main()
