"""``semantic_guidance``: Fair Diffusion / SEGA with diffusers' ``SemanticStableDiffusionPipeline``.

The pipeline ships (deprecated) in the pinned diffusers and shares our seeds and
images: it draws its initial noise with ``randn_tensor`` from the per-image
generators exactly as :func:`rsc.sampling.sample` does, takes the same scheduler
(a fresh copy per call) and the same classifier-free guidance, and decodes the
same way; with edit guidance scale 0 its images are the ``none`` images (tested).
Each edit concept costs one more UNet pass per image and step (in the same batch).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from rsc.methods.base import Method, MethodContext, SamplingSettings, register
from rsc.sampling import make_scheduler

if TYPE_CHECKING:
    from rsc.callbacks.measures import ValidationPrompt


@register
class SemanticGuidance(Method):
    """Semantic guidance: per concept c, g_c = s_c (eps_c - eps_uncond) kept above its ``edit_threshold`` quantile,
    after ``warmup_steps``, with momentum; ``reverse`` concepts are steered away from.

    Args:
        concepts: Edit prompts, e.g. the stereotype's descriptor (reversed) and the clean-face one.
        reverse: Per concept, steer away (True) or towards (False).
        edit_guidance_scale: s_c (one for all concepts or one each).
        warmup_steps: Steps before the edit guidance applies.
        edit_threshold: Quantile of |g_c| per channel below which g_c is zeroed.
        momentum_scale: Weight of the momentum term.
        momentum_beta: Momentum decay.
    """

    name = "semantic_guidance"

    def __init__(
        self,
        concepts: list[str] | None = None,
        reverse: list[bool] | None = None,
        edit_guidance_scale: float | list[float] = 5.0,
        warmup_steps: int = 2,
        edit_threshold: float = 0.9,
        momentum_scale: float = 0.1,
        momentum_beta: float = 0.4,
    ) -> None:
        super().__init__()
        self.concepts = list(concepts) if concepts is not None else ["caricature", "portrait"]
        self.reverse = list(reverse) if reverse is not None else [True, False][: len(self.concepts)]
        if not self.concepts or len(self.reverse) != len(self.concepts):
            raise ValueError(f"method semantic_guidance: give one reverse flag per concept, got concepts "
                             f"{self.concepts} and reverse {self.reverse}")
        if isinstance(edit_guidance_scale, list) and len(edit_guidance_scale) != len(self.concepts):
            raise ValueError(f"method semantic_guidance: edit_guidance_scale {edit_guidance_scale} needs one value "
                             f"per concept ({len(self.concepts)})")
        self.edit_guidance_scale = edit_guidance_scale
        self.warmup_steps, self.edit_threshold = int(warmup_steps), float(edit_threshold)
        self.momentum_scale, self.momentum_beta = float(momentum_scale), float(momentum_beta)
        self._pipeline: Any = None

    def options(self) -> dict[str, Any]:
        """Concepts and guidance settings."""
        return {"concepts": self.concepts, "reverse": self.reverse, "edit_guidance_scale": self.edit_guidance_scale,
                "warmup_steps": self.warmup_steps, "edit_threshold": self.edit_threshold,
                "momentum_scale": self.momentum_scale, "momentum_beta": self.momentum_beta}

    def setup(self, context: MethodContext) -> None:
        """Build the pipeline from the backbone's components (shared, not copied)."""
        super().setup(context)
        with warnings.catch_warnings():  # it is deprecated upstream; we pin the diffusers that ships it
            warnings.simplefilter("ignore", FutureWarning)
            from diffusers import SemanticStableDiffusionPipeline

            ldm = context.ldm
            self._pipeline = SemanticStableDiffusionPipeline(
                vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer, unet=ldm.unet,
                scheduler=ldm.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        self._pipeline.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Images with semantic guidance."""
        if self._pipeline is None:
            raise RuntimeError("method semantic_guidance: call setup() first")
        pipeline = self._pipeline
        pipeline.scheduler = make_scheduler(self.context.ldm.scheduler, sampling.scheduler)  # per-run state
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        output = pipeline(
            [p.prompt for p in prompts], num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
            generator=generators, output_type="pt",
            editing_prompt=self.concepts, reverse_editing_direction=self.reverse,
            edit_guidance_scale=self.edit_guidance_scale, edit_warmup_steps=self.warmup_steps,
            edit_threshold=self.edit_threshold, edit_momentum_scale=self.momentum_scale,
            edit_mom_beta=self.momentum_beta,
        )
        return output.images.float().cpu()
