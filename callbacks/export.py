"""Export the trained refiner at the end of fit, in the format of ``python -m rsc.export`` (:mod:`rsc.export`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rsc.callbacks.protocol import as_corrector
from rsc.export import ExportInfo, export_refiner, training_data_identity
from rsc.identity import BackboneConfigs


class ExportRefiner(Callback):
    """Export the refiner to ``<log dir>/refiner`` when fit ends (``refiner.safetensors``, ``config.json``, ``README.md``).

    The folder is replaced as a whole, atomically (:func:`rsc.export.export_refiner`): a run killed
    while exporting leaves the previous export, which the next export tidies up.

    Args:
        dirpath: Destination folder; default ``refiner/`` in the trainer's log directory.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.exported_to: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where the last export went (a run resumed after its end exports again, to the same place)."""
        return {"exported_to": None if self.exported_to is None else str(self.exported_to)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore where the last export went."""
        exported_to = state_dict.get("exported_to")
        self.exported_to = None if exported_to is None else Path(exported_to)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the export on the global-zero process."""
        # trainer.log_dir broadcasts under DDP: every rank must ask for it.
        root = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "refiner")
        if not trainer.is_global_zero:
            return
        corrector = as_corrector(pl_module, "ExportRefiner")
        ldm = corrector.ldm
        info = ExportInfo.from_training(
            corrector.export_config(),
            BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler),
            training_data_identity(getattr(getattr(trainer, "datamodule", None), "hparams", None)),
        )
        self.exported_to = export_refiner(corrector.refiner, root, info)
        rank_zero_info(f"refiner exported to {root}")
