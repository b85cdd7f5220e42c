"""Export the trained refiner at the end of fit (safetensors + JSON, ``LatentRefiner.save_pretrained``)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class ExportRefiner(Callback):
    """Save the refiner with its correction window, strength and backbone to ``<log dir>/refiner`` when fit ends.

    Args:
        dirpath: Destination folder; default ``refiner/`` in the trainer's log directory.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.exported_to: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the refiner on the global-zero process."""
        # trainer.log_dir broadcasts under DDP: every rank must ask for it.
        root = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "refiner")
        if not trainer.is_global_zero:
            return
        pl_module.refiner.save_pretrained(root, extra_config=pl_module.export_config())
        self.exported_to = Path(root)
        print(f"refiner exported to {root}")
