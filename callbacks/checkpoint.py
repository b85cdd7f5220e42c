"""Checkpoints a killed run can resume from: ``last.ckpt`` at every epoch end (and every N steps), written atomically.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt``
only after it saved a top-k checkpoint, and with ``check_val_every_n_epoch > 1``
only at validation epochs: a run killed between them had nothing to resume
from. :class:`ResumableCheckpoint` writes ``last.ckpt`` at the end of every
``every_n_epochs``-th training epoch whatever the validation cadence, and every
``every_n_train_steps`` steps when set (Lightning's own step checkpoints). The
training loader is stateful (:mod:`rsc.datamodules.sampling`), so resuming from
a step checkpoint is exact too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from rsc.atomic import atomic_path, fsync_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, flushed, then renamed over it.

    Lightning's own writer stages local files in the system temporary folder and moves
    them into place, which is a plain copy (a kill mid-copy truncates the checkpoint)
    when that folder is on another file system than the run.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (remote URLs: Lightning's writer)."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)
            fsync_path(temporary)


class ResumableCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every ``every_n_epochs``-th epoch and every ``every_n_train_steps`` steps.

    Top-k checkpoints work as in ``ModelCheckpoint`` (none by default). The strategy's plain
    ``TorchCheckpointIO`` is replaced by :class:`AtomicCheckpointIO`, and the run says where
    it resumed (epoch, step, batches of the epoch already done).

    Args:
        dirpath: Folder of the checkpoints (default: Lightning's, under the log directory).
        every_n_train_steps: Also write ``last.ckpt`` every this many optimizer steps (None: only at epoch ends).
        every_n_epochs: Write ``last.ckpt`` at the end of every this many training epochs.
        save_top_k: Top-k checkpoints by ``monitor`` (0: only ``last.ckpt``).
        monitor: The metric ranking top-k checkpoints.
        mode: ``min`` or ``max`` of ``monitor``.
        filename: Top-k checkpoints' file name pattern.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int = 1,
        save_top_k: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        filename: str | None = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=True,
            save_top_k=save_top_k,
            every_n_train_steps=every_n_train_steps,
            # Lightning takes one cadence; the epoch-end last.ckpt below is this class's own.
            every_n_epochs=0 if every_n_train_steps else every_n_epochs,
            save_on_train_epoch_end=True,
        )
        self.last_every_n_epochs = every_n_epochs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the folder, use the atomic writer, and remove what a write killed mid-way left."""
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath is not None and os.path.isdir(self.dirpath):
            for leftover in Path(self.dirpath).glob(".*.ckpt.*.tmp"):
                leftover.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say where a resumed run starts, so a resume that found nothing cannot pass for one that did."""
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path:
            batches = trainer.num_training_batches
            done: int | str = "?"  # an iterable dataset has no epoch length
            if math.isfinite(batches):
                done = trainer.global_step - trainer.current_epoch * math.ceil(batches / trainer.accumulate_grad_batches)
            rank_zero_info(
                f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch}, global step {trainer.global_step}, "
                f"{done} step(s) of the epoch already trained"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Top-k as Lightning does, then ``last.ckpt`` whether or not a top-k checkpoint was written."""
        step_before = self._last_global_step_saved
        super().on_train_epoch_end(trainer, pl_module)
        if step_before != trainer.global_step and self._last_global_step_saved == trainer.global_step:
            return  # Lightning saved a top-k checkpoint and last.ckpt just now
        if (
            trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self.last_every_n_epochs < 1
            or (trainer.current_epoch + 1) % self.last_every_n_epochs
        ):
            return
        # Also when a step checkpoint was written at this very step: the epoch-end one is the
        # cleaner resume point (the epoch's end hooks have run).
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
