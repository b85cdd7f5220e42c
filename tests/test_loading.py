"""Loading paths of the frozen backbone: folder, single file, Hub id, and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from rsc.backbone import FrozenLDM
from rsc.testing import build_random_sd
from rsc.single_file import pipeline_to_ldm_state_dict, save_single_file


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert set(state_a) == set(state_b)
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def test_folder_round_trip(tiny_sd_dir: Path) -> None:
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(ldm, name), getattr(reference, name))
    assert isinstance(ldm.scheduler, DDIMScheduler)
    assert ldm.source == str(tiny_sd_dir)
    assert ldm.tokenizer("a photo").input_ids == reference.tokenizer("a photo").input_ids


def test_save_pretrained_loads_in_plain_diffusers(tiny_sd_dir: Path, tmp_path: Path) -> None:
    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    ldm.save_pretrained(tmp_path / "copy")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "copy")
    _assert_same_weights(plain.unet, ldm.unet)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_round_trip(tiny_sd_dir: Path, tmp_path: Path, suffix: str) -> None:
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    checkpoint = tmp_path / f"derivative{suffix}"
    if suffix == ".safetensors":
        save_single_file(reference, checkpoint)
    else:
        # A user's legacy .ckpt: the LDM state dict inside {"state_dict": ...}; loaded with weights_only=True.
        torch.save({"state_dict": pipeline_to_ldm_state_dict(reference)}, checkpoint)
    ldm = FrozenLDM.from_pretrained(checkpoint, config=tiny_sd_dir)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(ldm, name), getattr(reference, name))


def test_single_file_keys_follow_the_original_sd_layout(tmp_path: Path) -> None:
    # A UNet with SD 1.5's block layout (tiny channels): its keys must be SD 1.5's keys.
    from rsc.testing import RandomSDSpec, sd15_unet_config, tiny_vae_config

    unet = dict(sd15_unet_config(), block_out_channels=(8, 16, 16, 16), attention_head_dim=2, norm_num_groups=4)
    vae = dict(tiny_vae_config(), block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
    vae["down_block_types"], vae["up_block_types"] = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    pipeline = build_random_sd(RandomSDSpec(unet=unet, vae=vae))
    keys = set(pipeline_to_ldm_state_dict(pipeline))
    for expected in (
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.2.in_layers.0.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert expected in keys, expected
    assert not any("output_blocks.12" in key or "input_blocks.12" in key for key in keys)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in keys
    assert pipeline_to_ldm_state_dict(pipeline)["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_single_file_needs_config_offline(tiny_sd_dir: Path, tmp_path: Path) -> None:
    checkpoint = save_single_file(StableDiffusionPipeline.from_pretrained(tiny_sd_dir), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"needs `config`"):
        FrozenLDM.from_pretrained(checkpoint)


def test_single_file_with_a_config_that_is_not_a_pipeline(tiny_sd_dir: Path, tmp_path: Path) -> None:
    checkpoint = save_single_file(StableDiffusionPipeline.from_pretrained(tiny_sd_dir), tmp_path / "model.safetensors")
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        FrozenLDM.from_pretrained(checkpoint, config=tmp_path / "not_a_pipeline")


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        FrozenLDM.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"single-file checkpoint .*missing\.safetensors does not exist"):
        FrozenLDM.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="./relative/model"):
        FrozenLDM.from_pretrained("./relative/model")


def test_folder_that_is_not_an_sd_pipeline(tiny_sd_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty is not a diffusers pipeline folder: it has no model_index.json"):
        FrozenLDM.from_pretrained(empty)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_dir, partial)
    index = json.loads((partial / "model_index.json").read_text())
    del index["unet"]
    (partial / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks the components \['unet'\]"):
        FrozenLDM.from_pretrained(partial)


def test_hub_id_not_in_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OSError, match=r"'someone/some-sd' .* is not in the local Hugging Face cache"):
        FrozenLDM.from_pretrained("someone/some-sd", local_files_only=True)


def test_hub_arguments_are_passed_through(monkeypatch: pytest.MonkeyPatch, tiny_sd_dir: Path) -> None:
    seen: dict = {}
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)

    def fake_from_pretrained(source: str, **kwargs):  # noqa: ANN202
        seen.update(kwargs, source=source)
        return pipeline

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", fake_from_pretrained)
    ldm = FrozenLDM.from_pretrained(
        "org/model", revision="abc123", variant="fp16", dtype=torch.float16, local_files_only=False
    )
    assert seen["source"] == "org/model"
    assert (seen["revision"], seen["variant"], seen["dtype"]) == ("abc123", "fp16", torch.float16)
    assert seen["local_files_only"] is False and seen["safety_checker"] is None
    assert ldm.source == "org/model"


def test_variant_and_dtype_from_a_folder(tiny_sd_dir: Path, tmp_path: Path) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipeline.save_pretrained(tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ldm = FrozenLDM.from_pretrained(tmp_path / "variant", variant="fp16", dtype=torch.bfloat16, device="cpu")
    assert ldm.unet.dtype == torch.bfloat16 and ldm.vae.dtype == torch.bfloat16
    assert ldm.device == torch.device("cpu")
    expected = pipeline.unet.conv_in.weight.to(torch.bfloat16)
    assert torch.equal(ldm.unet.conv_in.weight, expected)
