"""What rsc's callbacks use of the LightningModule they watch: a small typed protocol, not RSCorrector's attributes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import lightning as L

if TYPE_CHECKING:
    import torch

    from rsc.backbone import FrozenLDM
    from rsc.refiner import LatentRefiner
    from rsc.sampling import CorrectionFn


@runtime_checkable
class CorrectorModule(Protocol):
    """A module that corrects a frozen backbone with a refiner (:class:`rsc.module.RSCorrector` is one).

    Attributes:
        ldm: The frozen backbone the callbacks sample with.
        refiner: The trained refiner (exported at the end of fit).
    """

    ldm: FrozenLDM
    refiner: LatentRefiner

    @property
    def device(self) -> torch.device:
        """Where the module's tensors live."""

    @property
    def correction_window(self) -> tuple[float, float]:
        """Fractions (start, end) of the sampling trajectory that are corrected."""

    def correction(self, strength: float | None = None) -> CorrectionFn:
        """The refiner as a sampler correction (default: the trained strength)."""

    def export_config(self) -> dict[str, Any]:
        """Window, strength and the backbone it was trained for (see :meth:`rsc.export.ExportInfo.from_training`)."""


_MEMBERS = ("ldm", "refiner", "device", "correction_window", "correction", "export_config")


def as_corrector(pl_module: L.LightningModule, callback: str) -> CorrectorModule:
    """``pl_module`` as a :class:`CorrectorModule`, or a TypeError naming ``callback`` and what the module lacks."""
    if not isinstance(pl_module, CorrectorModule):
        missing = [name for name in _MEMBERS if not hasattr(pl_module, name)]
        raise TypeError(
            f"{callback} needs a LightningModule with {list(_MEMBERS)} (rsc.callbacks.protocol.CorrectorModule, "
            f"e.g. rsc.module.RSCorrector); {type(pl_module).__name__} lacks {missing}"
        )
    return pl_module
