"""Text-to-image sampling with a latent correction hook.

The loop is the one of diffusers' ``StableDiffusionPipeline`` (same noise,
same classifier-free guidance, same scheduler calls), so with no correction it
reproduces the pipeline's images; inside the correction window it first
updates the latent code, ``z_t <- correction(z_t, t, c)``, then runs the
frozen UNet on the corrected latent.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from rsc.images import unit_tensor_to_uint8

if TYPE_CHECKING:
    from rsc.backbone import FrozenLDM


class CorrectionFn(Protocol):
    """A latent update ``z_t -> z_t'`` at timesteps ``t`` (shape (B,)) given text embeddings ``cond`` (B, L, D)."""

    def __call__(self, latents: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor: ...


class GuidanceFn(Protocol):
    """A change of the guided noise prediction ``eps -> eps'`` at one step (e.g. classifier guidance).

    Called after classifier-free guidance with the (B, C, h, w) prediction, the UNet's input latents
    (``scale_model_input`` applied, the DDPM form), the timestep (0-d) and the prompts' embeddings (B, L, D).
    """

    def __call__(self, noise_pred: Tensor, latents: Tensor, timestep: Tensor, cond: Tensor) -> Tensor: ...


@dataclass
class SampleOutput:
    """Sampled images in [0, 1] as (N, 3, H, W) float32 on the CPU, and the final latents."""

    images: Tensor
    latents: Tensor

    def to_pil(self) -> list[Image.Image]:
        """The images as PIL images."""
        return [Image.fromarray(array) for array in unit_tensor_to_uint8(self.images)]


def check_window(window: Any, *, name: str = "correction window", empty_ok: bool = True) -> tuple[float, float]:
    """``window`` as ``(start, end)`` floats, or a ValueError that names ``name`` and the value.

    A window is two fractions of the sampling trajectory, 0 being pure noise, with
    ``0 <= start <= end <= 1``; ``empty_ok=False`` also refuses ``start == end``
    (a training window must hold timesteps to draw).
    """
    try:
        start, end = window
        start, end = float(start), float(end)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{name} must be two numbers (start, end), got {window!r}") from error
    if not (0.0 <= start <= end <= 1.0 and (empty_ok or start < end)):
        relation = "<=" if empty_ok else "<"
        raise ValueError(f"{name} must satisfy 0 <= start {relation} end <= 1, got {window!r}")
    return start, end


def correction_step_indices(num_steps: int, window: tuple[float, float]) -> list[int]:
    """Indices of the sampling steps that are corrected.

    ``window = (start, end)`` are fractions of the sampling trajectory, 0 being
    pure noise: step ``i`` is corrected when ``start <= i / num_steps < end``.
    The same rule decides which timesteps a refiner is trained on.
    """
    start, end = check_window(window)
    return [i for i in range(num_steps) if start <= i / num_steps < end]


def correction_timestep_indices(num_entries: int, num_steps: int, window: tuple[float, float]) -> list[int]:
    """Indices into ``scheduler.timesteps`` (``num_entries`` long, for ``num_steps`` steps) that are corrected.

    First-order schedulers have one entry per step, and the result is
    :func:`correction_step_indices`. Order-2 schedulers (Heun, KDPM2) have
    ``2 * num_steps - 1`` entries: step 0, then for every later step ``k`` the
    second-order evaluation that ends step ``k - 1`` and the first-order one
    that starts step ``k``, both at (Heun) or just above (KDPM2) step ``k``'s
    noise level. Entry ``j`` belongs to step ``round(j * num_steps / num_entries)``
    (``(j + 1) // 2`` for order 2), and is corrected when that step is: the
    window stays a fraction of the trajectory, at the noise levels of
    :func:`window_timestep_range`, for every scheduler.
    """
    if num_entries < 1 or num_steps < 1:
        raise ValueError(f"a schedule needs entries and steps, got {num_entries} entries for {num_steps} steps")
    steps = set(correction_step_indices(num_steps, window))
    # Integer round-half-up of j * num_steps / num_entries (no ties arise for num_entries in {N, 2N - 1}).
    return [j for j in range(num_entries) if (2 * j * num_steps + num_entries) // (2 * num_entries) in steps]


def window_timestep_range(window: tuple[float, float], num_train_timesteps: int = 1000) -> tuple[int, int]:
    """Training timesteps ``[low, high)`` that correspond to a correction window.

    Sampling step ``i`` of ``N`` sits at training timestep ~``T * (1 - i / N)``,
    so the window's fractions ``(start, end)`` map to ``t`` in
    ``[T * (1 - end), T * (1 - start))``: the rule of :func:`correction_step_indices`
    seen from the training side, so training and sampling correct the same noise levels
    (for order-2 schedulers too, see :func:`correction_timestep_indices`).
    """
    start, end = check_window(window, empty_ok=False)
    # Timesteps are 0 .. T-1: a window that ends within half a timestep of pure noise still gets t = T-1.
    low = min(int(round(num_train_timesteps * (1.0 - end))), num_train_timesteps - 1)
    high = int(round(num_train_timesteps * (1.0 - start)))
    return low, min(max(high, low + 1), num_train_timesteps)


def make_scheduler(reference: SchedulerMixin, scheduler: SchedulerMixin | str | None = None) -> SchedulerMixin:
    """A fresh scheduler for one sampling run (schedulers hold per-run state).

    ``scheduler`` may be an instance, the name of a diffusers scheduler class
    (built from ``reference``'s config, e.g. ``"EulerDiscreteScheduler"``) or
    ``None`` for a copy of ``reference``.
    """
    import diffusers

    if scheduler is None:
        return type(reference).from_config(reference.config)
    if isinstance(scheduler, str):
        scheduler_class = getattr(diffusers, scheduler, None)
        if scheduler_class is None or not issubclass(scheduler_class, SchedulerMixin):
            raise ValueError(f"unknown diffusers scheduler class {scheduler!r}")
        return scheduler_class.from_config(reference.config)
    return type(scheduler).from_config(scheduler.config)


def x0_from_model_output(
    noisy_latents: Tensor, timesteps: Tensor, model_output: Tensor, alphas_cumprod: Tensor, prediction_type: str
) -> Tensor:
    """The clean latent implied by a UNet output (epsilon, v or sample) at ``noisy_latents`` and ``timesteps``.

    ``alphas_cumprod`` is the training schedule's (a scheduler's ``alphas_cumprod``). Shared by
    :class:`rsc.backbone.FrozenLDM` and the diffusers frontend, so both compute the same numbers.
    """
    if prediction_type == "sample":
        return model_output
    alphas = alphas_cumprod.to(noisy_latents.device)[timesteps.to(noisy_latents.device).long()]
    shape = (-1,) + (1,) * (noisy_latents.ndim - 1)
    sqrt_alpha = alphas.sqrt().reshape(shape).to(noisy_latents.dtype)
    sqrt_one_minus = (1.0 - alphas).sqrt().reshape(shape).to(noisy_latents.dtype)
    if prediction_type == "epsilon":
        return (noisy_latents - sqrt_one_minus * model_output) / sqrt_alpha
    if prediction_type == "v_prediction":
        return sqrt_alpha * noisy_latents - sqrt_one_minus * model_output
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def correct_latents(
    scheduler: SchedulerMixin, correction: CorrectionFn, latents: Tensor, timestep: Tensor, cond: Tensor
) -> Tensor:
    """Apply ``correction`` to a scheduler's latents at ``timestep``, in the DDPM form a refiner is trained on.

    Schedulers such as Euler keep a rescaled latent and expose the conversion
    to the DDPM parameterisation as ``scale_model_input``; the correction sees
    ``latents * scale`` and its result is scaled back. Call it right before the
    step's own ``scale_model_input`` (it reads the scheduler's current step).
    Shared by :func:`sample` and the diffusers frontend, so both compute the same numbers.
    """
    scale = scheduler.scale_model_input(torch.ones((), device=latents.device, dtype=latents.dtype), timestep)
    batch_t = timestep.expand(latents.shape[0]).to(latents.device)
    return correction(latents * scale, batch_t, cond) / scale


def _step_kwargs(scheduler: SchedulerMixin, generators: list[torch.Generator], eta: float) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


@torch.no_grad()
def sample(
    ldm: FrozenLDM,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 7.5,
    correction: CorrectionFn | None = None,
    correction_window: tuple[float, float] = (0.0, 1.0),
    negative_prompt: str | None = None,
    scheduler: SchedulerMixin | str | None = None,
    batch_size: int = 8,
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    guidance: GuidanceFn | None = None,
) -> SampleOutput:
    """Sample one image per (prompt, seed) pair, optionally correcting the latent code.

    Image ``i`` depends only on ``prompts[i]`` and ``seeds[i]`` (its own CPU
    generator draws its initial noise and any scheduler noise), not on the batch
    size or on the other images in its batch.

    Args:
        ldm: The frozen model.
        prompts: One prompt per image.
        seeds: One seed per image.
        steps: Number of scheduler steps.
        guidance_scale: Classifier-free guidance scale (off at <= 1, as in diffusers).
        correction: Called as ``z_t <- correction(z_t, t, cond)`` before the UNet at each
            step inside ``correction_window``; ``cond`` are the prompts' text embeddings.
            ``z_t`` is given in the DDPM parameterisation the model was trained in
            (``scheduler.scale_model_input`` applied), so one refiner serves any scheduler.
        correction_window: Fractions of the trajectory to correct, see :func:`correction_step_indices`
            (for order-2 schedulers, :func:`correction_timestep_indices`).
        negative_prompt: Negative prompt for guidance (default: empty prompt).
        scheduler: Scheduler instance or diffusers class name; default: the model's.
        batch_size: Images per UNet batch.
        eta: DDIM eta (ignored by schedulers without it).
        height: Image height (default: the model's native size); width likewise.
        progress: Show a progress bar.
        guidance: Called as ``eps <- guidance(eps, z_t, t, cond)`` after classifier-free guidance at every step
            (it may enable gradients itself: the loop runs under ``no_grad``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if not prompts:
        raise ValueError("no prompts to sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    height = height or ldm.image_size
    width = width or ldm.image_size
    factor = ldm.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    do_cfg = guidance_scale > 1.0 and ldm.unet.config.time_cond_proj_dim is None
    correction_step_indices(steps, correction_window)  # validates the window before any work
    device = ldm.device

    images, final_latents = [], []
    num_batches = (len(prompts) + batch_size - 1) // batch_size
    bar = tqdm(total=num_batches * steps, desc="sampling", unit="step", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[start : start + batch_size]]
        embeddings = ldm.encode_prompt(batch_prompts, negative_prompt, do_classifier_free_guidance=do_cfg)
        unet_embeddings = torch.cat([embeddings.uncond, embeddings.cond]) if do_cfg else embeddings.cond

        run_scheduler = make_scheduler(ldm.scheduler, scheduler)
        run_scheduler.set_timesteps(steps, device=device)
        shape = (len(batch_prompts), ldm.latent_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=embeddings.cond.dtype)
        latents = latents * run_scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(run_scheduler, generators, eta)
        schedule = run_scheduler.timesteps
        corrected = set() if correction is None else set(correction_timestep_indices(len(schedule), steps, correction_window))
        if start == 0:
            bar.reset(total=num_batches * len(schedule))  # order-2 schedulers: ~2 UNet calls a step

        for index, t in enumerate(schedule):
            if index in corrected:
                latents = correct_latents(run_scheduler, correction, latents, t, embeddings.cond)
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = run_scheduler.scale_model_input(model_input, t)
            noise_pred = ldm.unet(model_input, t, encoder_hidden_states=unet_embeddings, return_dict=False)[0]
            if do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            if guidance is not None:
                noise_pred = guidance(noise_pred, model_input.chunk(2)[1] if do_cfg else model_input, t, embeddings.cond)
            latents = run_scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            bar.update(1)

        decoded = ldm.decode_latents(latents)
        images.append((decoded / 2 + 0.5).clamp(0, 1).float().cpu())
        final_latents.append(latents.float().cpu())
    bar.close()
    return SampleOutput(images=torch.cat(images), latents=torch.cat(final_latents))
