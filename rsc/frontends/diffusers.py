"""Use an exported rsc refiner from a plain diffusers ``StableDiffusionPipeline`` (or img2img pipeline).

Runtime needs: torch, diffusers, safetensors (and what they pull in); no
Lightning, no rsc training code. ::

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    corrector = RefinerCallback.from_pretrained("my-refiner", pipe)
    generator = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    prompts = ["a photo of a doctor"] * 2
    latents = corrector.initial_latents(pipe, prompts, num_inference_steps=30, generator=generator)
    images = pipe(prompts, num_inference_steps=30, generator=generator, latents=latents,
                  callback_on_step_end=corrector).images

The images equal those of rsc's own sampler (:func:`rsc.sampling.sample`) with
the same refiner, seeds, steps, guidance and scheduler.

Why ``initial_latents``: rsc corrects the latent of step ``i`` *before* the
UNet sees it, while diffusers calls ``callback_on_step_end`` *after* step
``i``. The callback therefore corrects, at the end of step ``i``, the latent
that step ``i + 1`` starts from, and step 0's latent (the initial noise) is
corrected by :meth:`RefinerCallback.initial_latents` and passed as ``latents=``.
Without it step 0 is left uncorrected (a warning says so).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from rsc.export import load_refiner_for
from rsc.identity import BackboneConfigs
from rsc.refiner import LatentRefiner, RefinerCorrection, X0Predictor
from rsc.sampling import check_window, correct_latents, correction_step_indices, correction_timestep_indices, x0_from_model_output


class UNetX0Predictor:
    """The conditional x0-prediction of a pipeline's UNet under its scheduler's training schedule.

    What a refiner with ``x0_input`` reads; the same numbers as :meth:`rsc.backbone.FrozenLDM.predict_x0`
    for the same UNet and schedule.
    """

    def __init__(self, unet: Any, scheduler: Any) -> None:
        self.unet = unet
        self.alphas_cumprod = scheduler.alphas_cumprod.clone().float()
        self.prediction_type = str(scheduler.config.prediction_type)

    @torch.no_grad()
    def __call__(self, latents: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """x0 implied by the UNet at ``latents`` (DDPM form), ``timesteps`` (B,) and text embeddings ``cond``."""
        output = self.unet(latents.to(self.unet.dtype), timesteps, encoder_hidden_states=cond.to(self.unet.dtype)).sample
        return x0_from_model_output(latents, timesteps, output.to(latents.dtype), self.alphas_cumprod, self.prediction_type)


class RefinerCallback(PipelineCallback):
    """``callback_on_step_end`` that applies ``z_t <- z_t + strength * R(z_t, t, c)`` inside the correction window.

    ``c`` are the pipeline's conditional prompt embeddings (the second half of
    ``prompt_embeds`` under classifier-free guidance). Step ``i`` is corrected
    when ``start <= i / num_inference_steps < end`` (:func:`rsc.sampling.correction_step_indices`;
    order-2 schedulers such as Heun, with two schedule entries a step, correct both entries of
    those steps, :func:`rsc.sampling.correction_timestep_indices`);
    in img2img, ``i`` counts from the start of the full schedule, so the
    refiner corrects the noise levels it was trained on. The first step of an
    img2img run cannot be corrected (it starts from the pipeline's own noised
    image, before any callback); later steps inside the window are.

    As a diffusers ``PipelineCallback`` it declares its ``tensor_inputs``, so
    pipelines ask for them without ``callback_on_step_end_tensor_inputs``, and it
    composes with other callbacks through ``MultiPipelineCallbacks``.

    Args:
        refiner: The trained refiner.
        correction_window: Fractions (start, end) of the trajectory to correct (0 = pure noise).
        strength: Correction strength s.
        threshold: Dead zone of the update relative to the latent's norm (:class:`rsc.refiner.RefinerCorrection`).
        x0_predictor: The backbone's conditional x0-prediction, for a refiner with ``x0_input``
            (:class:`UNetX0Predictor` of the pipeline's UNet and scheduler; :meth:`from_pretrained` builds it).
    """

    tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self, refiner: LatentRefiner, correction_window: Sequence[float] = (0.0, 1.0), strength: float = 1.0,
        threshold: float = 0.0, x0_predictor: X0Predictor | None = None,
    ) -> None:
        super().__init__()
        start, end = check_window(correction_window)  # now, rather than mid-sampling
        self.refiner = refiner.eval()
        self.correction_window = (start, end)
        self.strength = float(strength)
        self.threshold = float(threshold)
        if refiner.config.x0_input and x0_predictor is None:
            raise ValueError(
                "this refiner reads the backbone's x0-prediction (x0_input=True): load it with "
                "RefinerCallback.from_pretrained(folder, pipe), or pass x0_predictor=UNetX0Predictor(pipe.unet, pipe.scheduler)"
            )
        self.x0_predictor = x0_predictor
        self._initial_corrected = False

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        pipeline: DiffusionPipeline,
        strength: float | None = None,
        allow_mismatch: bool = False,
    ) -> RefinerCallback:
        """Load an exported refiner for ``pipeline``'s backbone (see :func:`rsc.export.load_refiner_for`).

        Raises ``BackboneMismatchError`` when the pipeline's latent channels, text width, config
        fingerprint or weight signature differ from the backbone the refiner was trained for
        (``allow_mismatch=True`` accepts another fingerprint or other weights, e.g. a fine-tune,
        for a deliberate transfer).
        """
        backbone = BackboneConfigs.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)
        exported = load_refiner_for(directory, backbone, allow_mismatch=allow_mismatch, device=pipeline.device)
        return cls(
            exported.refiner, exported.info.correction_window, exported.info.strength if strength is None else strength,
            exported.info.threshold, UNetX0Predictor(pipeline.unet, pipeline.scheduler),
        )

    @property
    def correction(self) -> RefinerCorrection:
        """The update as an rsc sampler correction."""
        return RefinerCorrection(self.refiner, self.strength, self.threshold, self.x0_predictor)

    def corrected_steps(self, num_inference_steps: int) -> list[int]:
        """Indices of the corrected steps of a ``num_inference_steps`` schedule."""
        return correction_step_indices(num_inference_steps, self.correction_window)

    def _correct(self, scheduler: Any, latents: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        if next(self.refiner.parameters()).device != latents.device:
            self.refiner.to(latents.device)
        with torch.no_grad():
            return correct_latents(scheduler, self.correction, latents, timestep, cond)

    @torch.no_grad()
    def initial_latents(
        self,
        pipeline: DiffusionPipeline,
        prompt: str | list[str] | None = None,
        *,
        prompt_embeds: Tensor | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        clip_skip: int | None = None,
    ) -> Tensor:
        """The initial noise with step 0's correction applied, to pass as the text-to-image pipeline's ``latents=``.

        Pass the same prompt (or prompt embeddings), steps, size, images per prompt,
        generator(s) and ``clip_skip`` as to the pipeline call. The noise is drawn from ``generator`` exactly as the pipeline would
        draw it (which advances the generator just as the pipeline would), or taken from
        ``latents``. Without correction at step 0 (window or strength) the noise is returned as is.
        """
        device = pipeline._execution_device
        cond, _ = pipeline.encode_prompt(
            prompt, device, num_images_per_prompt, do_classifier_free_guidance=False, prompt_embeds=prompt_embeds,
            clip_skip=clip_skip,
        )
        # A fresh scheduler: the pipeline's own keeps per-run state, and its call sets it up again.
        scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
        schedule, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        factor = pipeline.vae_scale_factor
        height = height or pipeline.unet.config.sample_size * factor
        width = width or pipeline.unet.config.sample_size * factor
        shape = (cond.shape[0], pipeline.unet.config.in_channels, int(height) // factor, int(width) // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        else:
            latents = latents.to(device)
        if 0 not in self.corrected_steps(num_inference_steps):
            return latents
        # The pipeline multiplies `latents` by init_noise_sigma; correct the latent it will start from.
        sigma = scheduler.init_noise_sigma
        corrected = self._correct(scheduler, latents * sigma, schedule[0], cond) / sigma
        self._initial_corrected = True
        return corrected

    def callback_fn(
        self, pipeline: DiffusionPipeline, step_index: int, timestep: Tensor, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """At the end of step ``step_index``, correct the latents that the next step starts from."""
        scheduler = pipeline.scheduler
        schedule = scheduler.timesteps
        # img2img runs the tail of the full schedule; count steps from the full schedule's start.
        offset = len(schedule) - pipeline.num_timesteps
        num_steps = getattr(scheduler, "num_inference_steps", None) or len(schedule)
        # Entries of the schedule, as rsc's sampler counts them (order-2 schedulers have ~2 a step).
        corrected = correction_timestep_indices(len(schedule), num_steps, self.correction_window)
        if step_index == 0:
            if offset == 0 and 0 in corrected and self.strength != 0 and not self._initial_corrected:
                warnings.warn(
                    "step 0 is inside the refiner's correction window but the initial latents were not "
                    "corrected: pass latents=callback.initial_latents(pipe, prompt, ...) to the pipeline",
                    stacklevel=2,
                )
            self._initial_corrected = False
        following = offset + step_index + 1
        if following >= len(schedule) or following not in corrected:
            return callback_kwargs
        cond = callback_kwargs["prompt_embeds"]
        if pipeline.do_classifier_free_guidance:
            cond = cond.chunk(2)[1]
        callback_kwargs["latents"] = self._correct(scheduler, callback_kwargs["latents"], schedule[following], cond)
        return callback_kwargs
