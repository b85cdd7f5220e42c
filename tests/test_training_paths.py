"""Every training path on tiny models: the shipped SD configs, bf16, gradient checkpointing, a compiled refiner,
and a v-prediction fit -> ``rsc.export`` -> diffusers ``RefinerCallback`` round trip."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rsc.backbone import FrozenLDM
from rsc.export import ExportInfo, export_refiner, main as export_main, refiner_from_checkpoint
from rsc.identity import BackboneConfigs
from rsc.fit import main as fit_main
from rsc.frontends.diffusers import RefinerCallback, UNetX0Predictor
from rsc.module import RSCorrector
from rsc.sampling import make_scheduler, sample
from test_frontend_diffusers import PROMPTS, SEEDS, STEPS, _pipeline_images

REPO = Path(__file__).resolve().parents[1]
TINY_REFINER = {"hidden_channels": 8, "num_blocks": 1, "embedding_dim": 8, "norm_groups": 4}


def _fit_shipped_config(name: str, backbone: Path, dataset: Path, run: Path, *overrides: str) -> Path:
    """``rsc.fit`` with ``configs/<name>`` as shipped, for 2 steps on CPU with logs under ``run``; return the log dir."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run), "name": "", "version": ""}}
    fit_main([
        "--config", str(REPO / "configs" / name),
        "--model.backbone", str(backbone),
        "--data.dataset", str(dataset), "--data.cache_dir", str(run.parent / "cache"), "--data.num_workers", "0",
        "--data.batch_size", "2", "--data.progress", "false",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--trainer.logger", json.dumps(logger),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *overrides,
    ])
    return run


def _train_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _steps_of(run: Path) -> int:
    checkpoint = torch.load(next(run.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    return int(checkpoint["global_step"])


def test_sd15_config_trains_two_steps_with_a_bf16_backbone_in_bf16_mixed(
    tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path
) -> None:
    """configs/sd15.yaml as shipped (bfloat16 backbone, bf16-mixed, gradient checkpointing) on a tiny SD-1.5 shape."""
    run = _fit_shipped_config("sd15.yaml", tiny_sd_dir, tiny_prefs_dir, tmp_path / "run")
    assert _steps_of(run) == 2
    losses = _train_losses(run)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    assert (run / "refiner" / "refiner.safetensors").is_file()


@pytest.fixture(scope="module")
def sd21_run(tiny_sd_v_dir: Path, tiny_prefs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/sd21.yaml for 2 steps on a tiny v-prediction SD (float32 on CPU); a learning rate that moves the
    zero-initialised output layer far enough in 2 steps for the corrected images to differ visibly."""
    run = tmp_path_factory.mktemp("sd21") / "run"
    return _fit_shipped_config(
        "sd21.yaml", tiny_sd_v_dir, tiny_prefs_dir, run, "--trainer.precision", "32-true",
        "--model.backbone_dtype", "float32", "--model.learning_rate", "0.05", "--model.warmup_steps", "0",
    )


def test_sd21_config_trains_two_steps_on_a_v_prediction_backbone(sd21_run: Path) -> None:
    assert _steps_of(sd21_run) == 2
    losses = _train_losses(sd21_run)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    checkpoint = torch.load(next(sd21_run.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["correction_window"] == [0.2, 0.5]
    assert checkpoint["hyper_parameters"]["gradient_checkpointing"] is True


def test_v_prediction_fit_export_and_diffusers_callback_equal_rsc_sampler(
    sd21_run: Path, tiny_sd_v_dir: Path, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    export_main(["--ckpt", str(next(sd21_run.rglob("last.ckpt"))), "--out", str(export)])
    assert json.loads((export / "config.json").read_text())["correction_window"] == [0.2, 0.5]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_v_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ldm = FrozenLDM.from_pretrained(tiny_sd_v_dir)
    pipe.scheduler = make_scheduler(ldm.scheduler, "DDIMScheduler")
    # A strength that makes 2 steps of training visible in the images; parity holds at any strength.
    callback = RefinerCallback.from_pretrained(export, pipe, strength=50.0)
    ours = _pipeline_images(pipe, callback, 7.5)
    expected = sample(ldm, PROMPTS, SEEDS, steps=STEPS, guidance_scale=7.5, scheduler="DDIMScheduler",
                      correction=callback.correction, correction_window=callback.correction_window,
                      progress=False).images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    plain = sample(ldm, PROMPTS, SEEDS, steps=STEPS, guidance_scale=7.5, scheduler="DDIMScheduler", progress=False).images
    assert (ours - plain).abs().mean() > 1e-3, "the trained correction must change the images, or parity proves nothing"


def test_x0_input_refiner_reads_the_reference_prediction_and_the_diffusers_callback_matches(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    """Training feeds the refiner the frozen model's x0 at z_t; sampling, the export and diffusers recompute the same."""
    torch.manual_seed(0)
    module = RSCorrector(str(tiny_sd_dir), **TINY_REFINER, x0_input=True, correction_window=(0.0, 0.5))
    for parameter in module.refiner.parameters():  # conv_out starts at zero: make the x0 channels matter
        torch.nn.init.normal_(parameter, std=0.1)
    batch, (timesteps, noise) = _batch(module.ldm)
    _, delta = module.pair_step(batch, draws=(timesteps, noise))
    clean = torch.cat([batch["anti_stereotypical_latents"], batch["stereotypical_latents"]])
    t, text = torch.cat([timesteps, timesteps]), torch.cat([batch["prompt_embeds"]] * 2)
    noisy = module.ldm.add_noise(clean, torch.cat([noise, noise]), t)
    with torch.no_grad():
        expected = module.refiner(noisy, t, text, module.ldm.predict_x0(noisy, t, text))
        blind = module.refiner(noisy, t, text, torch.zeros_like(noisy))
    torch.testing.assert_close(delta, expected, rtol=0, atol=0)
    assert (blind - expected).abs().max() > 1e-3, "a refiner that ignored x0 would pass the equality above"

    # Through a checkpoint (the switch comes from the hyper-parameters) and the export format to diffusers.
    checkpoint = {"hyper_parameters": dict(module.hparams),
                  "state_dict": {f"refiner.{key}": value for key, value in module.refiner.state_dict().items()}}
    configs = BackboneConfigs.from_source(tiny_sd_dir)
    export = export_refiner(refiner_from_checkpoint(checkpoint, configs), tmp_path / "export",
                            ExportInfo.from_training(module.export_config(), configs))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(module.ldm.scheduler, "EulerDiscreteScheduler")  # a rescaled latent too
    callback = RefinerCallback.from_pretrained(export, pipe)
    assert callback.refiner.config.x0_input and isinstance(callback.x0_predictor, UNetX0Predictor)
    ours = _pipeline_images(pipe, callback, 7.5)
    expected_images = sample(module.ldm, PROMPTS, SEEDS, steps=STEPS, guidance_scale=7.5, scheduler="EulerDiscreteScheduler",
                             correction=module.correction(), correction_window=(0.0, 0.5), progress=False).images
    torch.testing.assert_close(ours, expected_images, atol=1e-5, rtol=0)
    plain = sample(module.ldm, PROMPTS, SEEDS, steps=STEPS, guidance_scale=7.5, scheduler="EulerDiscreteScheduler",
                   progress=False).images
    assert (ours - plain).abs().mean() > 1e-3, "the correction must change the images, or parity proves nothing"
    with pytest.raises(ValueError, match="UNetX0Predictor"):
        RefinerCallback(module.refiner, (0.0, 0.5))


def _batch(ldm: FrozenLDM, pairs: int = 2) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    latents = (pairs, ldm.latent_channels, 16, 16)
    batch = {"anti_stereotypical_latents": torch.randn(latents, generator=generator),
             "stereotypical_latents": torch.randn(latents, generator=generator),
             "prompt_embeds": torch.randn(pairs, 77, ldm.text_embedding_dim, generator=generator)}
    draws = (torch.tensor([300, 700][:pairs]), torch.randn(latents, generator=generator))
    return batch, draws


def _refiner_gradients(module: RSCorrector) -> tuple[dict[str, torch.Tensor], int]:
    """The refiner's gradients on one fixed batch, and how often the UNet's first resnet ran (forward and recompute)."""
    torch.manual_seed(0)
    for parameter in module.refiner.parameters():  # the same non-zero weights everywhere (conv_out starts at zero)
        torch.nn.init.normal_(parameter, std=0.1)
    calls = []
    resnet = module.ldm.unet.down_blocks[0].resnets[0]
    forward = resnet.forward

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)  # not a forward hook: torch does not run those when checkpointing recomputes
        return forward(*args, **kwargs)

    resnet.forward = counted
    batch, draws = _batch(module.ldm)
    output, _ = module.pair_step(batch, draws=draws)
    output.loss.backward()
    del resnet.forward
    grads = {name: parameter.grad.clone() for name, parameter in module.refiner.named_parameters()}
    return grads, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd_dir: Path) -> None:
    plain, plain_calls = _refiner_gradients(RSCorrector(str(tiny_sd_dir), **TINY_REFINER))
    checkpointed, checkpointed_calls = _refiner_gradients(
        RSCorrector(str(tiny_sd_dir), gradient_checkpointing=True, **TINY_REFINER)
    )
    # Policy forward + reference forward; checkpointing recomputes the policy's in the backward pass.
    assert (plain_calls, checkpointed_calls) == (2, 3), "gradient checkpointing must actually recompute activations"
    assert plain["conv_out.weight"].abs().max() > 0 and plain["conv_in.weight"].abs().max() > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=0, msg=name)


def test_compiled_refiner_trains_a_step(tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_refiner`` traces the refiner with TorchDynamo and trains through AOTAutograd's graphs.

    The backend is ``aot_eager``: inductor's C++ code generation alone takes 40-90 s on a 2-core CPU, and it is
    torch's to test; what could break here (a graph the refiner cannot be traced into, a wrong gradient) is not.
    """
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    compiled = RSCorrector(str(tiny_sd_dir), compile_refiner=True, **TINY_REFINER)
    eager = RSCorrector(str(tiny_sd_dir), **TINY_REFINER)
    grads, _ = _refiner_gradients(compiled)
    expected, _ = _refiner_gradients(eager)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    assert counters["stats"]["unique_graphs"] >= 1, "compile_refiner must run the refiner through torch.compile"
