"""``rsc``: an exported refiner corrects the latent code while sampling (the model is unchanged)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from torch import Tensor

from rsc.export import ExportedRefiner, load_refiner_for
from rsc.identity import BackboneConfigs
from rsc.methods.base import Method, MethodContext, SamplingSettings, register

if TYPE_CHECKING:
    from rsc.callbacks.measures import ValidationPrompt


@register
class RefinerMethod(Method):
    """rsc's correction with an exported refiner folder (``python -m rsc.export`` or the end of ``rsc.fit``).

    The images equal ``python -m rsc.generate``'s for the same refiner, prompts, seeds and settings.

    Args:
        refiner: The exported refiner folder.
        strength: Correction strength; default: the exported one.
        threshold: Dead zone of the update relative to the latent (:class:`rsc.refiner.RefinerCorrection`);
            default: the exported one.
        allow_backbone_mismatch: Use the refiner with a backbone of another fingerprint or other weights.
    """

    name = "rsc"

    def __init__(
        self, refiner: str, strength: float | None = None, threshold: float | None = None, allow_backbone_mismatch: bool = False
    ) -> None:
        super().__init__()
        self.refiner, self.strength, self.threshold = str(refiner), strength, threshold
        self.allow_backbone_mismatch = allow_backbone_mismatch
        self._exported: ExportedRefiner | None = None

    def setup(self, context: MethodContext) -> None:
        """Load the refiner; ``BackboneMismatchError`` if it was trained for another backbone."""
        super().setup(context)
        if not Path(self.refiner).is_dir():
            raise FileNotFoundError(f"method rsc: refiner={self.refiner!r} is not a folder (expected an exported refiner)")
        ldm = context.ldm
        self._exported = load_refiner_for(
            self.refiner, BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler),
            allow_mismatch=self.allow_backbone_mismatch, device=ldm.device,
        )

    @property
    def exported(self) -> ExportedRefiner:
        """The loaded export."""
        if self._exported is None:
            raise RuntimeError("method rsc: call setup() first")
        return self._exported

    def options(self) -> dict[str, Any]:
        """Strength, dead zone and window as used (the folder's path is not part of the images' identity; its weights are)."""
        info = self.exported.info
        return {"strength": info.strength if self.strength is None else self.strength,
                "threshold": info.threshold if self.threshold is None else self.threshold,
                "correction_window": list(info.correction_window)}

    def identity(self) -> dict[str, Any]:
        """Options and the refiner weights' sha256."""
        return {**super().identity(), "refiner_sha256": self.exported.weights_sha256}

    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Corrected images."""
        exported = self.exported
        correction = exported.correction(self.strength, self.threshold, self.context.ldm.predict_x0)
        return self._sample([p.prompt for p in prompts], seeds, sampling, correction=correction,
                            correction_window=exported.info.correction_window)
