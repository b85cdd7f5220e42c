"""The diffusers frontend: a `callback_on_step_end` that reproduces rsc's corrected sampler in a plain pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from rsc.backbone import FrozenLDM
from rsc.export import BackboneMismatchError, ExportInfo, export_refiner
from rsc.identity import BackboneConfigs
from rsc.frontends.diffusers import RefinerCallback
from rsc.testing import RandomSDSpec, build_random_sd
from rsc.refiner import LatentRefiner, RefinerConfig, RefinerCorrection
from rsc.sampling import correction_step_indices, correction_timestep_indices, make_scheduler, sample

PROMPTS = ["a photo of a cat", "a dog on a beach"]
SEEDS = [11, 22]
STEPS = 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tiny_sd_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ldm(tiny_sd_dir: Path) -> FrozenLDM:
    return FrozenLDM.from_pretrained(tiny_sd_dir)


@pytest.fixture(scope="module")
def refiner() -> LatentRefiner:
    """A refiner whose output layer is not zero, so a wrongly applied correction shows in the images."""
    torch.manual_seed(0)
    model = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=32, hidden_channels=16, num_blocks=1,
                                        embedding_dim=16, norm_groups=4))
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    return model.eval()


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _pipeline_images(pipe: StableDiffusionPipeline, callback: RefinerCallback | None, guidance: float,
                     with_initial: bool = True, **kwargs) -> torch.Tensor:  # noqa: ANN003
    generators = _generators(SEEDS)
    if callback is not None and with_initial:
        kwargs["latents"] = callback.initial_latents(pipe, PROMPTS, num_inference_steps=STEPS, generator=generators)
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, generator=generators,
                callback_on_step_end=callback, output_type="pt", **kwargs).images


@pytest.mark.parametrize(
    ("scheduler", "guidance", "window"),
    [
        ("DDIMScheduler", 7.5, (0.0, 0.5)),
        ("DDIMScheduler", 1.0, (0.2, 1.0)),
        ("EulerDiscreteScheduler", 5.0, (0.0, 0.7)),
        ("EulerAncestralDiscreteScheduler", 7.5, (0.0, 1.0)),
        ("HeunDiscreteScheduler", 7.5, (0.0, 0.5)),
        ("HeunDiscreteScheduler", 5.0, (0.3, 0.8)),
        ("KDPM2DiscreteScheduler", 7.5, (0.0, 0.5)),
    ],
)
def test_images_equal_rsc_corrected_sampler(pipeline, ldm, refiner, scheduler: str, guidance: float,  # noqa: ANN001
                                            window: tuple[float, float]) -> None:
    pipeline.scheduler = make_scheduler(ldm.scheduler, scheduler)
    callback = RefinerCallback(refiner, window, strength=1.5)
    ours = _pipeline_images(pipeline, callback, guidance)
    expected = sample(ldm, PROMPTS, SEEDS, steps=STEPS, guidance_scale=guidance, scheduler=scheduler,
                      correction=RefinerCorrection(refiner, 1.5), correction_window=window, progress=False).images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # Both apply the correction at the same schedule entries (for Heun, both entries of each corrected step).
    seen: list[float] = []
    hook = refiner.register_forward_pre_hook(lambda module, args: seen.append(float(args[1][0])))
    try:
        _pipeline_images(pipeline, callback, guidance)
    finally:
        hook.remove()
    schedule = pipeline.scheduler.timesteps
    steps = correction_step_indices(STEPS, window)
    entries = correction_timestep_indices(len(schedule), STEPS, window)
    assert seen == [float(schedule[j]) for j in entries]
    assert len(entries) == (len(steps) if len(schedule) == STEPS else 2 * len(steps) - (0 in steps))
    plain = sample(ldm, PROMPTS, SEEDS, steps=STEPS, guidance_scale=guidance, scheduler=scheduler, progress=False).images
    assert (ours - plain).abs().mean() > 1e-2, "the correction must change the images, or parity proves nothing"


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_strength_zero_equals_the_plain_pipeline(pipeline, ldm, refiner, scheduler: str) -> None:  # noqa: ANN001
    pipeline.scheduler = make_scheduler(ldm.scheduler, scheduler)
    ours = _pipeline_images(pipeline, RefinerCallback(refiner, (0.0, 1.0), strength=0.0), 7.5)
    plain = _pipeline_images(pipeline, None, 7.5)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)


def test_several_images_per_prompt(pipeline, ldm, refiner) -> None:  # noqa: ANN001
    pipeline.scheduler = make_scheduler(ldm.scheduler, "EulerDiscreteScheduler")
    callback = RefinerCallback(refiner, (0.0, 0.5), strength=1.0)
    seeds = [1, 2, 3, 4]
    generators = _generators(seeds)
    latents = callback.initial_latents(pipeline, PROMPTS, num_inference_steps=STEPS, num_images_per_prompt=2,
                                       generator=generators)
    ours = pipeline(PROMPTS, num_inference_steps=STEPS, num_images_per_prompt=2, generator=generators,
                    latents=latents, callback_on_step_end=callback, output_type="pt").images
    expected = sample(ldm, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, seeds, steps=STEPS, scheduler="EulerDiscreteScheduler",
                      correction=callback.correction, correction_window=(0.0, 0.5), progress=False).images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_missing_initial_latents_warns_and_leaves_step_zero_uncorrected(pipeline, ldm, refiner) -> None:  # noqa: ANN001
    pipeline.scheduler = make_scheduler(ldm.scheduler, "DDIMScheduler")
    callback = RefinerCallback(refiner, (0.0, 0.5), strength=1.5)
    with pytest.warns(UserWarning, match="initial latents were not corrected"):
        without = _pipeline_images(pipeline, callback, 7.5, with_initial=False)
    with_initial = _pipeline_images(pipeline, callback, 7.5)
    assert (without - with_initial).abs().mean() > 1e-3


def test_img2img_corrects_the_window_of_the_full_schedule(pipeline, ldm, refiner) -> None:  # noqa: ANN001
    img2img = StableDiffusionImg2ImgPipeline(**pipeline.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler(ldm.scheduler, "EulerDiscreteScheduler")
    seen: list[float] = []
    hook = refiner.register_forward_pre_hook(lambda module, args: seen.append(float(args[1][0])))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(callback: RefinerCallback | None) -> torch.Tensor:
        return img2img(PROMPTS[0], image=image, strength=0.6, num_inference_steps=10, output_type="pt",
                       generator=torch.Generator().manual_seed(3), callback_on_step_end=callback).images

    try:
        corrected = run(RefinerCallback(refiner, (0.0, 0.8), strength=1.5))
    finally:
        hook.remove()
    plain = run(None)
    # strength 0.6 of 10 steps runs steps 4..9; the window (0, 0.8) covers 0..7; step 4 starts from
    # the pipeline's own noised image, so steps 5, 6 and 7 are the corrected ones.
    assert seen == [float(t) for t in img2img.scheduler.timesteps[5:8]]
    assert (corrected - plain).abs().mean() > 1e-3


def test_from_pretrained_reads_window_and_strength_and_checks_the_backbone(pipeline, refiner, tmp_path: Path) -> None:  # noqa: ANN001
    configs = BackboneConfigs.from_components(pipeline.unet, pipeline.text_encoder, pipeline.scheduler)
    info = ExportInfo.from_training({"correction_window": [0.1, 0.4], "strength": 0.8, "backbone": "tiny"}, configs)
    export = export_refiner(refiner, tmp_path / "refiner", info)
    callback = RefinerCallback.from_pretrained(export, pipeline)
    assert callback.correction_window == (0.1, 0.4) and callback.strength == 0.8
    assert RefinerCallback.from_pretrained(export, pipeline, strength=0.3).strength == 0.3
    for key, value in refiner.state_dict().items():
        assert torch.equal(callback.refiner.state_dict()[key], value)
    with pytest.raises(BackboneMismatchError, match="text-embedding width 32 .* 48"):
        RefinerCallback.from_pretrained(export, build_random_sd(RandomSDSpec(text_hidden_size=48)))
    fine_tune = build_random_sd(seed=0)  # the same configs as `pipeline`; other weights below
    with torch.no_grad():
        fine_tune.unet.conv_in.weight.mul_(1.1)
    with pytest.raises(BackboneMismatchError, match="same configs, other weights .*unet/conv_in.weight"):
        RefinerCallback.from_pretrained(export, fine_tune)
    assert RefinerCallback.from_pretrained(export, fine_tune, allow_mismatch=True).strength == 0.8
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        RefinerCallback(refiner, (0.6, 0.2))


def test_runtime_needs_no_training_stack() -> None:
    code = (
        "import sys, rsc.frontends.diffusers\n"
        "heavy = {'lightning', 'pytorch_lightning', 'torchmetrics', 'datasets', 'jsonargparse', 'rsc.datamodules',"
        " 'rsc.callbacks', 'rsc.module', 'rsc.losses', 'rsc.fit', 'rsc.backbone'}\n"
        "print(sorted(m for m in sys.modules if m in heavy or m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
