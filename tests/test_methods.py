"""Each de-biasing method's defining property, on a tiny random SD (rsc.methods)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsc.backbone import FrozenLDM
from rsc.callbacks.measures import ValidationPrompt
from rsc.classifiers import ToyClassifier
from rsc.export import BackboneMismatchError, ExportInfo, export_refiner
from rsc.generate import generate
from rsc.identity import BackboneConfigs
from rsc.images import uint8_to_tensor
from rsc.methods import METHODS, MethodContext, SamplingSettings, build_method
from rsc.refiner import LatentRefiner, RefinerConfig
from rsc.testing import build_random_sd
from rsc.toy.classifier import ToyAttributeClassifier, ToyClassifierConfig

SAMPLING = SamplingSettings(steps=4, guidance_scale=6.0)
PROMPTS = [ValidationPrompt("a photo of a belor woman", group="belor", gender="woman"),
           ValidationPrompt("a photo of a person")]
SEEDS = [3, 11]


@pytest.fixture(scope="module")
def ldm(tiny_sd_dir: Path) -> FrozenLDM:
    return FrozenLDM.from_pretrained(tiny_sd_dir)


@pytest.fixture(scope="module")
def context(ldm: FrozenLDM) -> MethodContext:
    torch.manual_seed(0)
    classifier = ToyClassifier(model=ToyAttributeClassifier(ToyClassifierConfig(base_channels=4)))
    return MethodContext(ldm=ldm, classifier=classifier)


def _render(name: str, context: MethodContext, **options) -> torch.Tensor:  # noqa: ANN003
    method = build_method(name, options)
    method.setup(context)
    return method.render(PROMPTS, SEEDS, SAMPLING)


@pytest.fixture(scope="module")
def plain(context: MethodContext) -> torch.Tensor:
    return _render("none", context)


def test_registry_names_every_method_and_rejects_unknown_ones() -> None:
    assert {"none", "negative_prompt", "prompt_addition", "rsc", "classifier_guidance", "semantic_guidance",
            "finetune_dpo"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method 'sega'.*known methods"):
        build_method("sega")
    with pytest.raises(ValueError, match="bad options .* 'negative_prompt'"):
        build_method("negative_prompt", {"words": "x"})


def test_none_is_the_plain_sampler(context: MethodContext, plain: torch.Tensor) -> None:
    from rsc.sampling import sample

    expected = sample(context.ldm, [p.prompt for p in PROMPTS], SEEDS, steps=4, guidance_scale=6.0, progress=False)
    assert plain.shape == (2, 3, 64, 64)
    torch.testing.assert_close(plain, expected.images, atol=1e-5, rtol=0)  # thread scheduling may reorder sums


def _unet_inputs(ldm: FrozenLDM, render) -> tuple[list[torch.Tensor], torch.Tensor]:  # noqa: ANN001
    seen: list[torch.Tensor] = []
    handle = ldm.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        images = render()
    finally:
        handle.remove()
    return seen, images


def test_negative_prompt_changes_only_the_unconditional_branch(context: MethodContext) -> None:
    plain_inputs, plain = _unet_inputs(context.ldm, lambda: _render("none", context))
    negative_inputs, negative = _unet_inputs(context.ldm, lambda: _render("negative_prompt", context, negative_prompt="caricature"))
    assert len(plain_inputs) == len(negative_inputs) == SAMPLING.steps  # no extra UNet pass
    for before, after in zip(plain_inputs, negative_inputs):
        assert before.shape == after.shape and before.shape[0] == 2 * len(PROMPTS)
        assert torch.equal(before[len(PROMPTS):], after[len(PROMPTS):])  # the conditional half
        assert not torch.allclose(before[: len(PROMPTS)], after[: len(PROMPTS)])  # the unconditional half
    assert not torch.allclose(plain, negative)


def test_prompt_addition_samples_the_extended_prompt(context: MethodContext) -> None:
    from rsc.sampling import sample

    images = _render("prompt_addition", context, addition=", portrait")
    expected = sample(context.ldm, [p.prompt + ", portrait" for p in PROMPTS], SEEDS, steps=4, guidance_scale=6.0,
                      progress=False).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_semantic_guidance_at_scale_zero_is_none_and_costs_a_pass_per_concept(context: MethodContext, plain: torch.Tensor) -> None:
    inputs, zero = _unet_inputs(context.ldm, lambda: _render("semantic_guidance", context, edit_guidance_scale=0.0, warmup_steps=0))
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=0)
    assert all(batch.shape[0] == (2 + 2) * len(PROMPTS) for batch in inputs)  # uncond, text, two concepts
    guided = _render("semantic_guidance", context, edit_guidance_scale=50.0, warmup_steps=0, edit_threshold=0.5)
    assert (guided - plain).abs().max() > 1e-3


def test_classifier_guidance_at_scale_zero_is_none_and_moves_the_image_otherwise(context: MethodContext, plain: torch.Tensor) -> None:
    context.classifier.train()  # what a parent may ask; guidance must not use or change batch statistics
    before = {k: v.clone() for k, v in context.classifier.state_dict().items()}
    torch.testing.assert_close(_render("classifier_guidance", context, scale=0.0), plain, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in context.classifier.state_dict().items())
    assert not any(module.training for module in context.classifier.modules())
    assert (_render("classifier_guidance", context, scale=500.0) - plain).abs().max() > 1e-3


def test_a_zero_lora_is_none(context: MethodContext, plain: torch.Tensor) -> None:
    method = build_method("finetune_dpo", {"steps": 0})
    method.setup(context)
    assert sum(p.numel() for p in method._module.lora_parameters()) > 0  # the adapter is there, at zero
    torch.testing.assert_close(method.render(PROMPTS, SEEDS, SAMPLING), plain, atol=1e-5, rtol=0)
    assert context.ldm.unet is not method._module.unet  # the shared backbone is not changed


def test_classifier_guidance_needs_the_attributes(context: MethodContext) -> None:
    method = build_method("classifier_guidance", {"targets": {"caricature": "absent"}})
    with pytest.raises(ValueError, match="no attribute 'caricature'.*knows"):
        method.setup(context)
    with pytest.raises(ValueError, match="needs the evaluation's classifier"):
        build_method("classifier_guidance").setup(MethodContext(ldm=context.ldm))


def _export(ldm: FrozenLDM, folder: Path, text_width: int = 32) -> Path:
    torch.manual_seed(0)
    refiner = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=text_width, hidden_channels=8,
                                          num_blocks=1, embedding_dim=8, norm_groups=4))
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.05)
    configs = BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler)
    info = ExportInfo.from_training({"correction_window": [0.0, 0.5], "strength": 1.5, "backbone": "tiny"}, configs)
    return export_refiner(refiner, folder, info)


def test_rsc_equals_rsc_generate(context: MethodContext, plain: torch.Tensor, tiny_sd_dir: Path, tmp_path: Path) -> None:
    refiner = _export(context.ldm, tmp_path / "refiner")
    method = build_method("rsc", {"refiner": str(refiner)})
    method.setup(context)
    images = method.render(PROMPTS, SEEDS, SAMPLING)
    assert method.identity()["refiner_sha256"] and method.identity()["strength"] == 1.5
    assert (images - plain).abs().max() > 1e-3
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.prompt for p in PROMPTS))
    out = tmp_path / "generated"
    # rsc.generate writes every seed for every prompt; compare this method's (prompt, seed) pairs.
    generate(refiner, prompts, out, backbone=str(tiny_sd_dir), seeds=SEEDS, steps=4, guidance=6.0, device="cpu",
             progress=False)
    for index, seed in enumerate(SEEDS):
        [path] = out.glob(f"{index:04d}_*_seed{seed}.png")
        expected = uint8_to_tensor(np.asarray(Image.open(path))[None]) / 2 + 0.5
        # Up to one grey level: rsc.generate batches differently (float rounding).
        assert (expected[0] - images[index]).abs().max() <= 1.5 / 255, path.name


def test_rsc_refuses_a_refiner_of_another_backbone(context: MethodContext, tmp_path: Path) -> None:
    refiner = _export(context.ldm, tmp_path / "refiner")
    other = FrozenLDM.from_pipeline(build_random_sd(seed=5))
    method = build_method("rsc", {"refiner": str(refiner)})
    with pytest.raises(BackboneMismatchError, match="other weights"):
        method.setup(MethodContext(ldm=other))
    with pytest.raises(FileNotFoundError, match="refiner='.*missing' is not a folder"):
        build_method("rsc", {"refiner": str(tmp_path / "missing")}).setup(context)
