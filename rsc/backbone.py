"""The frozen latent diffusion model that rsc corrects: loading and its differentiable pieces.

``FrozenLDM`` wraps the diffusers components of a Stable Diffusion pipeline
(VAE, text encoder, tokenizer, UNet, scheduler). It never trains: every
parameter has ``requires_grad=False`` and the modules stay in eval mode even
when a surrounding ``LightningModule`` is put in train mode. Gradients still
flow *through* it (to a refiner's output), which is what the training loss needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants as hub_constants
from torch import Tensor, nn
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from rsc.hub import backbone_location, check_sd_pipeline_folder, is_hub_offline
# The sampler depends on FrozenLDM only for type hints, so the dependency runs one way: backbone -> sampling.
from rsc.sampling import CorrectionFn, SampleOutput, sample, x0_from_model_output

# The backbone dtypes a config or command line can name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs for a batch of prompts.

    ``cond`` is (B, L, D) for the prompts; ``uncond`` is the same shape for the
    negative (by default empty) prompt, or ``None`` when classifier-free
    guidance is off.
    """

    cond: Tensor
    uncond: Tensor | None = None


def load_sd_pipeline(
    source: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline from a Hub id, a local diffusers folder or a single-file checkpoint.

    Args:
        source: Hub id (``"org/name"``), a folder written by ``save_pretrained``, or a single
            ``.safetensors``/``.ckpt`` checkpoint of an SD derivative.
        config: For single-file checkpoints: a local diffusers folder (or Hub id) of the same
            architecture, whose configs, tokenizer and scheduler are used. Required offline.
        dtype: dtype of the loaded weights (default: as saved).
        variant: Weight variant (e.g. ``"fp16"``), passed to diffusers.
        revision: Hub revision (branch, tag or commit), passed to diffusers.
        local_files_only: Never touch the network; defaults to ``HF_HUB_OFFLINE``.
    """
    source_str = os.fspath(source)
    path = Path(source_str).expanduser()
    offline = is_hub_offline() if local_files_only is None else local_files_only
    common: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}
    if dtype is not None:
        common["dtype"] = dtype

    location = backbone_location(source_str)
    if location == "single_file":
        if config is None and offline:
            raise ValueError(
                f"single-file checkpoint {path} needs `config`: a local diffusers folder (or cached Hub id) of "
                "the base architecture (e.g. an SD 1.5 folder for an SD 1.5 fine-tune), whose configs, tokenizer "
                "and scheduler complete the checkpoint. Offline, diffusers cannot fetch one."
            )
        if config is not None and Path(os.fspath(config)).expanduser().exists():
            config = Path(os.fspath(config)).expanduser()
            check_sd_pipeline_folder(config)
            config = str(config)
        elif config is not None:
            config = os.fspath(config)
        return StableDiffusionPipeline.from_single_file(
            str(path), config=config, local_files_only=offline, **common
        )

    if location == "folder":
        check_sd_pipeline_folder(path)
        return StableDiffusionPipeline.from_pretrained(str(path), variant=variant, **common)

    try:
        return StableDiffusionPipeline.from_pretrained(
            source_str, variant=variant, revision=revision, local_files_only=offline, **common
        )
    except (OSError, ValueError) as error:
        if offline:
            raise OSError(
                f"Hub id {source_str!r} (revision={revision!r}, variant={variant!r}) is not in the local Hugging "
                f"Face cache ({hub_constants.HF_HUB_CACHE}) and offline mode is on (HF_HUB_OFFLINE=1 or "
                "local_files_only=True). Download it on a machine with internet access, or pass a local folder."
            ) from error
        raise


class FrozenLDM(nn.Module):
    """A frozen Stable Diffusion model: the pieces rsc trains against and samples with.

    Build it with :meth:`from_pretrained` (Hub id, local folder or single file) or
    :meth:`from_pipeline`. ``scheduler`` is used for sampling; a DDPM scheduler
    with the same training schedule handles noising and x0 prediction.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        self.unet = unet
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.prediction_type: str = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in {"epsilon", "v_prediction", "sample"}:
            raise ValueError(
                f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                "expected 'epsilon', 'v_prediction' or 'sample'"
            )
        self.register_buffer(
            "alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False
        )
        self.source = source
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pipeline(cls, pipeline: StableDiffusionPipeline, source: str | None = None) -> FrozenLDM:
        """Wrap the components of an existing ``StableDiffusionPipeline`` (shared, not copied)."""
        return cls(
            vae=pipeline.vae,
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            unet=pipeline.unet,
            scheduler=pipeline.scheduler,
            source=source,
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        config: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
    ) -> FrozenLDM:
        """Load from a Hub id, a local diffusers folder or a single-file checkpoint (see :func:`load_sd_pipeline`)."""
        pipeline = load_sd_pipeline(
            source,
            config=config,
            dtype=dtype,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
        )
        model = cls.from_pipeline(pipeline, source=os.fspath(source))
        if device is not None:
            model.to(device)
        return model

    def to_pipeline(self) -> StableDiffusionPipeline:
        """A plain diffusers ``StableDiffusionPipeline`` sharing these components."""
        pipeline = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Save in diffusers format, loadable by ``StableDiffusionPipeline.from_pretrained``."""
        self.to_pipeline().save_pretrained(os.fspath(save_directory))

    def train(self, mode: bool = True) -> FrozenLDM:
        """Stay in eval mode whatever is asked: the backbone is frozen (no dropout, fixed norms)."""
        return super().train(False)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Device of the UNet's weights."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the UNet's weights (latents are cast to it)."""
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling factor of the VAE (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent code (4 for SD 1.x/2.x)."""
        return int(self.unet.config.in_channels)

    @property
    def text_embedding_dim(self) -> int:
        """Width of the text embeddings the UNet cross-attends to."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def image_size(self) -> int:
        """Default image side: the UNet's sample size times the VAE factor."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------ text and images
    def _embed_texts(self, texts: Sequence[str], max_length: int | None = None) -> Tensor:
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=max_length or self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(self.text_encoder.device)
        embeddings = self.text_encoder(tokens.input_ids.to(self.text_encoder.device), attention_mask=attention_mask)[0]
        return embeddings.to(dtype=self.text_encoder.dtype)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        do_classifier_free_guidance: bool = True,
    ) -> PromptEmbeddings:
        """Text embeddings for ``prompts`` and, for classifier-free guidance, the negative/empty prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cond = self._embed_texts(prompts)
        if not do_classifier_free_guidance:
            return PromptEmbeddings(cond=cond)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but there are {len(prompts)} prompts"
                )
        return PromptEmbeddings(cond=cond, uncond=self._embed_texts(negatives, max_length=cond.shape[1]))

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """VAE latents of images in [-1, 1], multiplied by the VAE's scaling factor.

        ``sample=False`` uses the posterior mean, so cached latents are deterministic.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (not clamped) from scaled latents."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents, return_dict=False)[0]

    # ------------------------------------------------------------------ diffusion
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward diffusion q(z_t | z_0) of the model's training schedule (per-sample timesteps)."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def unet_output(self, noisy_latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        """Raw UNet prediction (epsilon, v or x0 depending on the scheduler's ``prediction_type``)."""
        return self.unet(
            noisy_latents.to(self.dtype), timesteps, encoder_hidden_states=text_embeddings.to(self.dtype)
        ).sample

    def x0_from_output(self, noisy_latents: Tensor, timesteps: Tensor, model_output: Tensor) -> Tensor:
        """The clean latent implied by a UNet output at ``noisy_latents`` and ``timesteps``."""
        return x0_from_model_output(noisy_latents, timesteps, model_output, self.alphas_cumprod, self.prediction_type)

    def predict_x0(self, noisy_latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        """x0 implied by the frozen UNet at ``noisy_latents`` (differentiable w.r.t. ``noisy_latents``)."""
        output = self.unet_output(noisy_latents, timesteps, text_embeddings)
        return self.x0_from_output(noisy_latents, timesteps, output.to(noisy_latents.dtype))

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 20,
        guidance_scale: float = 7.5,
        correction: CorrectionFn | None = None,
        **kwargs: Any,
    ) -> SampleOutput:
        """Text-to-image sampling with an optional latent correction; see :func:`rsc.sampling.sample`."""
        return sample(self, prompts, seeds, steps=steps, guidance_scale=guidance_scale, correction=correction, **kwargs)
