"""The frozen backbone's differentiable pieces: frozenness, text/image codecs, noising and x0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rsc.backbone import FrozenLDM


@pytest.fixture(scope="module")
def ldm(tiny_sd_dir: Path) -> FrozenLDM:
    return FrozenLDM.from_pretrained(tiny_sd_dir)


class _ToyRefiner(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.conv(latents)


def test_no_backbone_parameter_changes_after_an_optimizer_step(tiny_sd_dir: Path) -> None:
    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    assert not any(p.requires_grad for p in ldm.parameters())
    before = {k: v.clone() for k, v in ldm.state_dict().items()}
    refiner = _ToyRefiner(ldm.latent_channels)
    wrapper = nn.ModuleDict({"backbone": ldm, "refiner": refiner})
    wrapper.train()  # what Lightning does at fit start
    assert not ldm.training and not ldm.unet.training and not ldm.text_encoder.training
    # Adam over *every* parameter of the wrapper: frozenness must not rely on the optimizer's parameter list.
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=1e-2)
    refiner_before = refiner.conv.weight.clone()

    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 700])
    cond = ldm.encode_prompt(["a", "b"], do_classifier_free_guidance=False).cond
    z_t = ldm.add_noise(x0, noise, t)
    prediction = ldm.predict_x0(z_t + refiner(z_t), t, cond)
    loss = (prediction - x0).pow(2).mean()
    loss.backward()
    assert refiner.conv.weight.grad is not None and refiner.conv.weight.grad.abs().sum() > 0
    optimizer.step()

    assert not torch.equal(refiner.conv.weight, refiner_before)
    for key, value in ldm.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in ldm.parameters())


def test_encode_images_uses_posterior_mean_and_scaling(ldm: FrozenLDM) -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = ldm.encode_images(images)
        expected = ldm.vae.encode(images).latent_dist.mean * ldm.vae.config.scaling_factor
        assert latents.shape == (2, 4, 16, 16)
        torch.testing.assert_close(latents, expected)
        decoded = ldm.decode_latents(latents)
        torch.testing.assert_close(decoded, ldm.vae.decode(expected / ldm.vae.config.scaling_factor).sample)
        sampled = ldm.encode_images(images, generator=torch.Generator().manual_seed(1), sample=True)
    assert not torch.allclose(sampled, latents)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ldm.encode_images(images[0])


def test_encode_prompt_with_empty_and_negative_prompts(ldm: FrozenLDM) -> None:
    embeddings = ldm.encode_prompt(["a photo of a cat", "a dog"])
    assert embeddings.cond.shape == (2, ldm.tokenizer.model_max_length, ldm.text_embedding_dim)
    empty = ldm.encode_prompt([""], do_classifier_free_guidance=False).cond
    torch.testing.assert_close(embeddings.uncond, empty.expand(2, -1, -1))
    assert not torch.allclose(embeddings.cond[0], embeddings.cond[1])
    negative = ldm.encode_prompt(["a photo of a cat"], negative_prompt="blurry")
    torch.testing.assert_close(negative.uncond, ldm.encode_prompt(["blurry"], do_classifier_free_guidance=False).cond)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but there are 2 prompts"):
        ldm.encode_prompt(["a", "b"], negative_prompt=["c"])


def test_add_noise_matches_the_training_schedule(ldm: FrozenLDM) -> None:
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    alphas = ldm.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)  # the sampler's own schedule
    torch.testing.assert_close(ldm.add_noise(x0, noise, t), alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise)


def test_x0_for_epsilon_prediction(ldm: FrozenLDM) -> None:
    assert ldm.prediction_type == "epsilon"
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 980])
    z_t = ldm.add_noise(x0, noise, t)
    torch.testing.assert_close(ldm.x0_from_output(z_t, t, noise), x0, atol=2e-4, rtol=1e-4)


def test_x0_for_v_prediction(tiny_sd_v_dir: Path) -> None:
    ldm = FrozenLDM.from_pretrained(tiny_sd_v_dir)
    assert ldm.prediction_type == "v_prediction"
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 980])
    z_t = ldm.add_noise(x0, noise, t)
    velocity = ldm.noise_scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(ldm.x0_from_output(z_t, t, velocity), x0, atol=1e-5, rtol=1e-5)
    # The epsilon formula would be wrong here: guard against silently using it.
    alphas = ldm.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    epsilon_formula = (z_t - (1 - alphas).sqrt() * velocity) / alphas.sqrt()
    assert (epsilon_formula - x0).abs().max() > 0.1
    # predict_x0 runs the UNet and applies the same conversion.
    cond = ldm.encode_prompt(["a"] * 3, do_classifier_free_guidance=False).cond
    with torch.no_grad():
        output = ldm.unet(z_t, t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(ldm.predict_x0(z_t, t, cond), ldm.x0_from_output(z_t, t, output))


def test_x0_for_sample_prediction(tiny_sd_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type="sample")
    ldm = FrozenLDM.from_pipeline(pipeline)
    z_t, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(ldm.x0_from_output(z_t, torch.tensor([3, 900]), output), output)


def test_unsupported_prediction_type(tiny_sd_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipeline.scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow' is not supported"):
        FrozenLDM.from_pipeline(pipeline)
