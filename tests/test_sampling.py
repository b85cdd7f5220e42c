"""The sampler: parity with diffusers, per-image seeds, and the correction hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from rsc.backbone import FrozenLDM
from rsc.sampling import check_window, correction_step_indices, correction_timestep_indices, make_scheduler, window_timestep_range

PROMPTS = ["a photo of a cat", "a dog on a beach", "an empty room"]
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def ldm(tiny_sd_dir: Path) -> FrozenLDM:
    return FrozenLDM.from_pretrained(tiny_sd_dir)


def _diffusers_images(folder: Path, scheduler: str | None, steps: int, guidance: float) -> torch.Tensor:
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipeline.scheduler = make_scheduler(pipeline.scheduler, scheduler)
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    return pipeline(
        PROMPTS, generator=generators, num_inference_steps=steps, guidance_scale=guidance, output_type="pt"
    ).images


@pytest.mark.parametrize(
    ("scheduler", "guidance"),
    [(None, 7.5), ("EulerDiscreteScheduler", 5.0), ("EulerAncestralDiscreteScheduler", 7.5), (None, 1.0),
     ("HeunDiscreteScheduler", 7.5)],
)
def test_matches_diffusers_pipeline(ldm: FrozenLDM, tiny_sd_dir: Path, scheduler: str | None, guidance: float) -> None:
    expected = _diffusers_images(tiny_sd_dir, scheduler, steps=6, guidance=guidance)
    ours = ldm.sample(PROMPTS, SEEDS, steps=6, guidance_scale=guidance, scheduler=scheduler, batch_size=3, progress=False)
    assert ours.images.shape == (3, 3, 64, 64)
    torch.testing.assert_close(ours.images, expected, atol=1e-5, rtol=0)


def test_matches_diffusers_pipeline_for_v_prediction(tiny_sd_v_dir: Path) -> None:
    ldm = FrozenLDM.from_pretrained(tiny_sd_v_dir)
    expected = _diffusers_images(tiny_sd_v_dir, None, steps=5, guidance=7.5)
    ours = ldm.sample(PROMPTS, SEEDS, steps=5, guidance_scale=7.5, progress=False)
    torch.testing.assert_close(ours.images, expected, atol=1e-5, rtol=0)


def test_image_depends_only_on_its_own_seed(ldm: FrozenLDM) -> None:
    # Ancestral sampling draws fresh noise every step: the strictest case for per-image generators.
    kwargs = dict(steps=4, guidance_scale=7.5, scheduler="EulerAncestralDiscreteScheduler", progress=False)
    together = ldm.sample(PROMPTS, SEEDS, batch_size=3, **kwargs).images
    one_by_one = ldm.sample(PROMPTS, SEEDS, batch_size=1, **kwargs).images
    reordered = ldm.sample(PROMPTS[::-1], SEEDS[::-1], batch_size=2, **kwargs).images
    alone = ldm.sample(PROMPTS[1:2], SEEDS[1:2], **kwargs).images
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=0)
    other_seed = ldm.sample(PROMPTS[1:2], [999], **kwargs).images
    assert (other_seed[0] - together[1]).abs().mean() > 1e-3


def test_correction_window_indices() -> None:
    assert correction_step_indices(10, (0.0, 1.0)) == list(range(10))
    assert correction_step_indices(10, (0.0, 0.3)) == [0, 1, 2]
    assert correction_step_indices(20, (0.5, 0.6)) == [10, 11]
    assert correction_step_indices(4, (0.9, 1.0)) == []
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        correction_step_indices(10, (0.6, 0.2))


def test_a_window_is_checked_by_name() -> None:
    assert check_window(["0.1", 0.8]) == (0.1, 0.8)
    assert check_window((0.3, 0.3)) == (0.3, 0.3)  # sampling may correct no step
    with pytest.raises(ValueError, match=r"training window must satisfy 0 <= start < end <= 1, got \(0.3, 0.3\)"):
        check_window((0.3, 0.3), name="training window", empty_ok=False)
    with pytest.raises(ValueError, match=r"correction window must satisfy 0 <= start < end <= 1, got \(0.3, 0.3\)"):
        window_timestep_range((0.3, 0.3))
    with pytest.raises(ValueError, match=r"sampling_window must be two numbers \(start, end\), got 0.5"):
        check_window(0.5, name="sampling_window")
    with pytest.raises(ValueError, match=r"correction window must satisfy 0 <= start <= end <= 1, got \(-0.1, 0.5\)"):
        check_window((-0.1, 0.5))


def test_correction_timestep_indices_count_steps_not_schedule_entries() -> None:
    for steps in (1, 4, 10, 25):
        for window in [(0.0, 0.3), (0.2, 0.8), (0.5, 1.0), (0.0, 1.0)]:
            first_order = correction_step_indices(steps, window)
            assert correction_timestep_indices(steps, steps, window) == first_order
            # Order 2: entry 0 is step 0, entries 2k - 1 and 2k are step k.
            second_order = correction_timestep_indices(2 * steps - 1, steps, window)
            assert second_order == [j for j in range(2 * steps - 1) if (j + 1) // 2 in first_order]
    assert correction_timestep_indices(19, 10, (0.0, 0.3)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        correction_timestep_indices(19, 10, (0.6, 0.2))


@pytest.mark.parametrize("scheduler_name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_order_two_schedulers_correct_the_same_fraction_of_the_trajectory(ldm: FrozenLDM, scheduler_name: str) -> None:
    seen: list[float] = []

    def identity(latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        seen.append(float(timesteps[0]))
        return latents

    steps, window = 10, (0.0, 0.3)
    ldm.sample(PROMPTS[:1], SEEDS[:1], steps=steps, scheduler=scheduler_name, correction=identity,
               correction_window=window, progress=False)
    scheduler = make_scheduler(ldm.scheduler, scheduler_name)
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == 2 * steps - 1
    # Steps 0, 1 and 2 of 10, each with both of its UNet calls: the first 5 schedule entries, not the first 3.
    assert seen == [float(t) for t in scheduler.timesteps[:5]]
    euler = make_scheduler(ldm.scheduler, "EulerDiscreteScheduler")
    euler.set_timesteps(steps)
    first_order = [float(t) for t in euler.timesteps[:3]]
    if scheduler_name == "HeunDiscreteScheduler":  # the same noise levels as a first-order scheduler
        assert sorted(set(seen), reverse=True) == pytest.approx(first_order)
    low, high = window_timestep_range(window, 1000)
    assert all(low - 50 <= t < high for t in seen), (seen, low, high)
    assert min(seen) >= float(euler.timesteps[3]), "no entry past step 2 is corrected"


def test_correction_hook_is_called_inside_the_window_only(ldm: FrozenLDM) -> None:
    calls: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []

    def identity(latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        calls.append((int(timesteps[0]), tuple(timesteps.shape), tuple(cond.shape)))
        return latents

    plain = ldm.sample(PROMPTS, SEEDS, steps=10, progress=False)
    corrected = ldm.sample(PROMPTS, SEEDS, steps=10, correction=identity, correction_window=(0.0, 0.3), progress=False)
    scheduler = make_scheduler(ldm.scheduler)
    scheduler.set_timesteps(10)
    assert [c[0] for c in calls] == [int(t) for t in scheduler.timesteps[:3]]
    assert all(c[1] == (3,) and c[2] == (3, ldm.tokenizer.model_max_length, ldm.text_embedding_dim) for c in calls)
    torch.testing.assert_close(corrected.images, plain.images, atol=0, rtol=0)


def test_correction_changes_the_sample_and_sees_ddpm_form_latents(ldm: FrozenLDM) -> None:
    first_std: list[float] = []

    def shift(latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if not first_std:
            first_std.append(float(latents.std()))
        return latents + 0.5

    plain = ldm.sample(PROMPTS, SEEDS, steps=8, scheduler="EulerDiscreteScheduler", progress=False)
    shifted = ldm.sample(
        PROMPTS, SEEDS, steps=8, scheduler="EulerDiscreteScheduler", correction=shift, correction_window=(0.0, 0.5),
        progress=False,
    )
    assert (shifted.images - plain.images).abs().mean() > 1e-3
    # Euler keeps latents scaled by init_noise_sigma (~14.6); the hook must get unit-variance z_T.
    assert 0.8 < first_std[0] < 1.2


def test_sample_input_errors(ldm: FrozenLDM) -> None:
    with pytest.raises(ValueError, match="got 2 prompts but 1 seeds"):
        ldm.sample(["a", "b"], [1], steps=2, progress=False)
    with pytest.raises(ValueError, match="multiples of 4"):
        ldm.sample(["a"], [1], steps=2, height=62, progress=False)
    with pytest.raises(ValueError, match="unknown diffusers scheduler class 'NoSuchScheduler'"):
        ldm.sample(["a"], [1], steps=2, scheduler="NoSuchScheduler", progress=False)


def test_to_pil(ldm: FrozenLDM) -> None:
    output = ldm.sample(PROMPTS[:1], SEEDS[:1], steps=2, progress=False)
    image = output.to_pil()[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert abs(np.asarray(image).mean() / 255 - float(output.images.mean())) < 0.01
